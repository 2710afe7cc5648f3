import sys

from slabd.daemon import main

sys.exit(main())
