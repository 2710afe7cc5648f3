"""A blade region mapped into this process: word atomics, byte copies, persistence.

Both the blade (which owns the file) and a node on the shm transport (which maps the same
file) use this class, so one-sided verbs really are one-sided: the atomics are CPU atomics
on the shared mapping (``_atomic.c``), and in NVM mode ``persist`` is ``msync``.
"""

from __future__ import annotations

import mmap
import os
import struct

from rallocator import _atomic
from rallocator.layout import PAGE, Geometry

_U64 = struct.Struct("<Q")


class RegionError(Exception):
    """The region file cannot be created, opened or does not match."""


class Region:
    """One region file, mapped shared. Not a context manager on purpose: daemons hold it."""

    def __init__(self, path: str, geometry: Geometry, mm: mmap.mmap, fd: int) -> None:
        self.path = path
        self.geo = geometry
        self._mm = mm
        self._fd = fd
        self.buf = memoryview(mm)

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, geometry: Geometry) -> Region:
        """Create a zeroed region with a fresh superblock. Refuses to overwrite a file."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise RegionError(f"cannot create region {path}: {e.strerror}") from None
        try:
            os.ftruncate(fd, geometry.region_size)
            mm = mmap.mmap(fd, geometry.region_size, mmap.MAP_SHARED)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise RegionError(f"cannot size region {path} to {geometry.region_size}: "
                              f"{e.strerror}") from None
        region = cls(path, geometry, mm, fd)
        region.buf[0:PAGE] = geometry.pack_superblock().ljust(PAGE, b"\0")
        region.persist(0, geometry.control_size)
        return region

    @classmethod
    def open(cls, path: str, writable: bool = True) -> Region:
        """Map an existing region, trusting only what its superblock says."""
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise RegionError(f"cannot open region {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, PAGE, 0)
            geo = Geometry.from_superblock(head)
            if size < geo.region_size:
                raise ValueError(f"file is {size} bytes, superblock says {geo.region_size}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, geo.region_size, mmap.MAP_SHARED, prot)
        except (ValueError, OSError) as e:
            os.close(fd)
            raise RegionError(f"region {path}: {e}") from None
        return cls(path, geo, mm, fd)

    def close(self) -> None:
        self.buf.release()
        self._mm.close()
        os.close(self._fd)

    # -- words -------------------------------------------------------------------------
    def load(self, addr: int) -> int:
        return _atomic.load(self._mm, addr)

    def store(self, addr: int, value: int) -> None:
        _atomic.store(self._mm, addr, value)

    def fetch_add(self, addr: int, delta: int) -> int:
        return _atomic.fetch_add(self._mm, addr, delta & 0xFFFFFFFFFFFFFFFF)

    def compare_swap(self, addr: int, expected: int, new: int) -> int:
        """Atomically replace ``expected`` by ``new``; returns the old value."""
        return _atomic.compare_swap(self._mm, addr, expected, new)

    def u64(self, addr: int) -> int:
        return _U64.unpack_from(self._mm, addr)[0]

    # -- bytes -------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        return self._mm[addr:addr + length]

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.buf[addr:addr + len(data)] = data

    def persist(self, addr: int, length: int) -> None:
        """Make [addr, addr+length) durable (msync) in NVM mode; a no-op for DRAM."""
        if not self.geo.mode_nvm or length <= 0:
            return
        start = addr - addr % mmap.PAGESIZE
        self._mm.flush(start, addr + length - start)
