"""The working node's fine-grained level (SlabCarver) over a fake node: no network at all,
which is the point of it (allocate/free touch a blade only when a class runs dry or too
many slabs sit empty)."""

from __future__ import annotations

import random

import pytest

from rallocator.finegrained import SlabCarver, SlabSizeTuner
from rallocator.node import Slab

M = 1 << 20


class FakeNode:
    def __init__(self, sizes=(M, 4 * M)) -> None:
        self.sizes = list(sizes)
        self.fetched: list[Slab] = []
        self.returned: list[Slab] = []

    def slab_sizes(self) -> list[int]:
        return self.sizes

    def allocate_slab(self, size: int, volume: int, index: int, replicas: int = 1) -> Slab:
        slab = Slab(size, volume, index)
        self.fetched.append(slab)
        return slab

    def free_slab(self, slab: Slab) -> None:
        self.returned.append(slab)


def test_no_overlap_and_no_network_on_the_fast_path() -> None:
    node = FakeNode()
    carver = SlabCarver(node, empty_threshold=1)  # type: ignore[arg-type]
    rng = random.Random(7)
    live: dict[tuple[int, int], tuple[int, int]] = {}
    for _ in range(20000):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            carver.free(live.pop(key)[0])
        else:
            size = rng.choice((1, 64, 100, 700, 4096, 5000))
            h = carver.allocate(size)
            slab, offset, room = carver.locate(h)
            key = (id(slab), offset)
            assert key not in live, "two live allocations share an address"
            assert room >= size and offset + room <= slab.size
            live[key] = (h, room)
    # objects do not overlap
    spans = sorted((k[0], k[1], k[1] + room) for k, (_, room) in live.items())
    for a, b in zip(spans, spans[1:], strict=False):
        assert a[0] != b[0] or a[2] <= b[1]
    assert len(node.fetched) < 60  # slabs were reused, not fetched per allocation
    for h, _ in list(live.values()):
        carver.free(h)
    st = carver.stats()
    assert st["partial"] == 0 and st["full"] == 0 and st["bytes_allocated"] == 0
    assert st["empty"] <= 1  # the threshold: the rest went back
    assert len(node.returned) == len(node.fetched) - st["empty"]


def test_double_free_and_bad_sizes() -> None:
    carver = SlabCarver(FakeNode(), empty_threshold=4)  # type: ignore[arg-type]
    h = carver.allocate(128)
    carver.free(h)
    with pytest.raises(ValueError, match="double free"):
        carver.free(h)
    with pytest.raises(ValueError):
        carver.allocate(0)
    with pytest.raises(ValueError, match="larger than the largest slab"):
        carver.allocate(5 * M)
    whole = carver.allocate(2 * M)  # bigger than the largest object: a slab of its own
    slab, offset, room = carver.locate(whole)
    assert offset == 0 and room == slab.size == 4 * M and carver.stats()["whole"] == 1
    carver.free(whole)
    with pytest.raises(ValueError, match="double free"):
        carver.free(whole)


def test_full_slab_moves_back_to_partial() -> None:
    carver = SlabCarver(FakeNode(sizes=(M,)), empty_threshold=4)  # type: ignore[arg-type]
    objs = [carver.allocate(M // 4) for _ in range(4)]  # exactly one slab of 4 objects
    assert carver.stats()["full"] == 1
    carver.free(objs[1])
    assert carver.stats()["partial"] == 1
    again = carver.allocate(M // 4)
    assert again == objs[1]  # the freed object is reused first
    with pytest.raises(ValueError):
        carver.locate(12345 << 32)  # never a handle


def test_tuner_grows_for_streaming_and_shrinks_when_sparse() -> None:
    t = SlabSizeTuner([M, 4 * M, 16 * M])
    for i in range(8):
        t.record_fetch(utilisation=0.9, now=i * 0.01)
    assert t.size() == 4 * M
    t.record_fetch(utilisation=0.2, now=1.0)
    assert t.size() == M
