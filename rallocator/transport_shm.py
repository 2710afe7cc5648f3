"""The shm transport: a node on the blade's host maps the region and does the verbs itself.

Reads and writes are memcpy on the shared mapping, fetch_add / compare_swap are CPU atomics
on it (``_atomic.c``), persist is msync: the blade's CPU is not on the data path at all,
which is the point of one-sided verbs. Control messages (``call``) go over the link's tcp
pool, and the tcp handshake is how the node proves it holds the cluster secret before it
maps anything (the region file is mode 0600, so only a local root/owner can map it anyway).
"""

from __future__ import annotations

from rallocator.region import Region, RegionError


class ShmUnavailable(Exception):
    """This blade's region cannot be mapped from here (another host, or no permission)."""


class ShmVerbs:
    """The one-sided verbs on a mapped region. Thread-safe (atomics and memcpy).

    Args:
        region_path: the file the blade says it serves.
        superblock: the superblock the blade sent over tcp: the mapped file must match it.
    """

    def __init__(self, region_path: str, superblock: bytes) -> None:
        try:
            self.region = Region.open(region_path)
        except RegionError as e:
            raise ShmUnavailable(str(e)) from None
        if self.region.read(0, 4096) != superblock:
            self.region.close()
            raise ShmUnavailable(f"{region_path} is not the region this blade serves")
        self.geometry = self.region.geo
        self.broken = False

    def read(self, addr: int, length: int) -> bytes:
        return self.region.read(addr, length)

    def read_into(self, addr: int, buf: memoryview) -> None:
        buf[:] = self.region.buf[addr:addr + len(buf)]

    def write(self, addr: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.region.write(addr, data)
        if fua:
            self.region.persist(addr, len(data))

    def fetch_add(self, addr: int, delta: int) -> int:
        return self.region.fetch_add(addr, delta)

    def compare_swap(self, addr: int, expected: int, new: int) -> int:
        return self.region.compare_swap(addr, expected, new)

    def persist(self, addr: int, length: int) -> None:
        self.region.persist(addr, length)

    def close(self) -> None:
        self.region.close()
