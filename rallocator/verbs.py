"""The verbs every transport implements: RDMA-shaped, so the allocation protocol is written once.

One-sided: ``read``, ``write``, ``fetch_add``, ``compare_swap`` (and ``persist``, the flush of
an NVM write). Two-sided: ``call`` for control messages the blade must think about; it
always travels over tcp (``BladeLink.call``), whichever transport carries the data.
"""

from __future__ import annotations

from typing import Protocol

from rallocator.layout import Geometry


class BladeUnreachable(ConnectionError):
    """The blade did not answer in time or the connection broke. Callers fail over."""


class Verbs(Protocol):
    geometry: Geometry

    def read(self, addr: int, length: int) -> bytes: ...

    def read_into(self, addr: int, buf: memoryview) -> None: ...

    def write(self, addr: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    def fetch_add(self, addr: int, delta: int) -> int: ...

    def compare_swap(self, addr: int, expected: int, new: int) -> int: ...

    def persist(self, addr: int, length: int) -> None: ...

    def close(self) -> None: ...
