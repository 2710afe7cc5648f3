# rallocator's block device: an nbdkit plugin whose disk lives in remote memory slabs.
#
# Run it like this (DIR is the directory of `ralloc cluster up --dir DIR`):
#
#   nbdkit python nbd_plugin/plugin.py cluster=DIR size=SIZE \
#          [volume=NAME] [replicas=K] [slab_size=SIZE] [transport=auto|tcp|shm]
#
# e.g. `nbdkit -U /tmp/swap.sock -f python nbd_plugin/plugin.py cluster=/tmp/c size=1G`,
# then `nbdinfo nbd+unix:///?socket=/tmp/swap.sock`.
#
#   volume     names the device (default "default"): a plugin restarted with the same
#              cluster and volume finds its slabs again and serves the same data.
#   replicas   copies of every slab on distinct blades (default 1); a dead blade's copies
#              are rebuilt elsewhere in the background while I/O goes on.
#   slab_size  a slab size the blades offer (default 4M; blades offer 1M and 4M).
#   transport  auto (map a local blade's region, else tcp), tcp or shm.
#
# The callbacks are thin: the logic is rallocator.blockdev.BlockVolume, which tests use
# without nbdkit.

import os
import sys

# nbdkit embeds the system python3, not our venv: find the project and its venv from here
# (__file__ exists only while nbdkit loads this script).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VENV = os.path.join(_ROOT, ".venv", "lib",
                     f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
for _p in (_VENV, _ROOT):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.insert(0, _p)

import errno  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402

import nbdkit  # noqa: E402

from rallocator.blockdev_config import KEYS, ConfigError, VolumeConfig  # noqa: E402

API_VERSION = 2

cfg = VolumeConfig()
lock = None  # the volume's lock file, taken before nbdkit forks (the server inherits it)
volume = None  # the BlockVolume, made after the fork (it starts threads and sockets)


class _Log(logging.Handler):
    # rallocator's log: info and above to stderr (nbdkit's log); debug (RALLOC_DEBUG=1)
    # through nbdkit.debug, which shows with nbdkit -v.
    def emit(self, record):
        msg = self.format(record)
        if record.levelno >= logging.INFO:
            print(f"nbdkit: rallocator: {record.levelname.lower()}: {msg}",
                  file=sys.stderr, flush=True)
        else:
            nbdkit.debug(msg)


logging.getLogger("rallocator").addHandler(_Log())
logging.getLogger("rallocator").setLevel(
    logging.DEBUG if os.environ.get("RALLOC_DEBUG") else logging.INFO)
logging.getLogger("rallocator").propagate = False


# A bad key or value is one line for the user, not a traceback: nbdkit prints
# "plugin.py: config: error: rallocator: unknown key 'x' (keys: ...)".
_UserError = type("rallocator", (Exception,), {})


def _one_line(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except (ConfigError, OSError) as e:
            sys.tracebacklimit = 0
            raise _UserError(str(e)) from None
    return wrapper


def _errno(fn):
    # nbdkit sends EIO unless told otherwise; BlockVolume raises OSError with the right errno.
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    return wrapper


def thread_model():
    # Requests run in parallel: BlockVolume excludes per slab, never globally.
    return nbdkit.THREAD_MODEL_PARALLEL


def dump_plugin():
    print("rallocator_keys=" + ",".join(KEYS))


@_one_line
def config(key, value):
    cfg.set(key, value)


@_one_line
def config_complete():
    cfg.validate()


@_one_line
def get_ready():
    # Still before the fork: check the blades offer our slab size and claim the volume, so
    # mistakes are startup errors. Nothing stays open but the lock file.
    global lock
    cfg.check_cluster()
    lock = cfg.lock()


@_one_line
def after_fork():
    # Threads and sockets only now: they would not survive nbdkit's fork.
    global volume
    from rallocator.blockdev import BlockVolume  # the heavy part: not for --dump-plugin

    volume = BlockVolume.open(cfg, lock=lock)


def cleanup():
    # The slabs stay on the blades: the next plugin with this volume serves them again.
    if volume is not None:
        volume.close()


def open(readonly):
    # Every connection shares the one volume (that is what makes multi-conn safe).
    return 1


def get_size(h):
    return volume.size


def block_size(h):
    return volume.block_size


def is_rotational(h):
    return False


def can_multi_conn(h):
    # flush persists every connection's writes, and all see one volume.
    return True


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    # Zeroing is freeing slabs or writing zeros at memory speed: never slower than a write.
    return True


def can_extents(h):
    return True


def can_fua(h):
    # write(fua=True) and persist are native verbs on nvm blades.
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NONE


# The data callbacks are written out flat (no wrapper): they run once per request.
_FUA = nbdkit.FLAG_FUA


def pread(h, buf, offset, flags):
    # buf is nbdkit's buffer: the verbs fill it in place, no copy in Python.
    try:
        volume.pread(buf, offset)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def pwrite(h, buf, offset, flags):
    try:
        volume.pwrite(buf, offset, flags & _FUA != 0)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


@_errno
def flush(h, flags):
    volume.flush()


@_errno
def trim(h, count, offset, flags):
    volume.trim(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_errno
def zero(h, count, offset, flags):
    volume.zero(count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM),
                bool(flags & nbdkit.FLAG_FUA))


@_errno
def extents(h, count, offset, flags):
    return volume.extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
