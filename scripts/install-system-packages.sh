#!/bin/sh
# The one place system packages are installed (Debian 12). Idempotent and quick when
# nothing is missing: it asks dpkg first and calls apt only for what is absent.
set -eu
PKGS="nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbdfuse fio fuse3 libfuse3-dev
pkg-config gcc python3-dev python3-venv iproute2 psmisc util-linux kmod procps"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing
fi
