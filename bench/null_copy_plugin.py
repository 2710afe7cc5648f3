# The benchmark baseline: an nbdkit Python plugin that stores nothing and only copies.
#
#   nbdkit -U /tmp/null.sock python bench/null_copy_plugin.py [size=1G]
#
# pread copies from a zero buffer into nbdkit's buffer, pwrite copies the request into a
# scratch buffer: one memcpy per request, like the rallocator plugin on the shm transport,
# and nothing else. What the rallocator plugin costs beyond this is ours; what this costs
# is nbdkit + the embedded Python interpreter.

import nbdkit

API_VERSION = 2
MAX_REQUEST = 64 << 20

size = 1 << 30
zeros = memoryview(bytes(MAX_REQUEST))  # calloc'd: untouched pages cost no memory
scratch = memoryview(bytearray(MAX_REQUEST))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global size
    if key != "size":
        raise ValueError(f"unknown key {key!r} (only size=)")
    size = nbdkit.parse_size(value)


def open(readonly):
    return 1


def get_size(h):
    return size


def block_size(h):
    return (1, 4096, MAX_REQUEST)


def can_multi_conn(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = zeros[:len(buf)]


def pwrite(h, buf, offset, flags):
    scratch[:len(buf)] = buf


def flush(h, flags):
    pass


def trim(h, count, offset, flags):
    pass
