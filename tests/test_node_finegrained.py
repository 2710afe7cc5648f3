"""The two levels together on a real cluster: small allocations carved from borrowed slabs,
data written and read back through the blades, slabs returned past the empty threshold."""

from __future__ import annotations

import os
import random

import pytest

from rallocator.wire import VerbError


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_allocate_write_read_free(cluster, transport: str) -> None:
    node = cluster.node(f"fine-{transport}", transport=transport, empty_threshold=1)
    try:
        rng = random.Random(3)
        live = {}
        for i in range(1500):
            size = 300000 if i % 300 == 0 else rng.choice((8, 64, 300, 4096, 70000))
            h = node.allocate(size)
            data = os.urandom(min(size, 64))
            node.write(h, data, offset=size - len(data))
            live[h] = (size, data)
        for h, (size, data) in rng.sample(list(live.items()), 200):
            assert node.read(h, len(data), offset=size - len(data)) == data
        st = node.carver.stats()
        assert st["slabs_fetched"] >= 2 and st["whole"] > 0
        with pytest.raises(ValueError):
            small = next(h for h, (size, _) in live.items() if size <= 64)
            node.write(small, b"x" * 65)  # past the end of its 64-byte object
        for h in live:
            node.free(h)
        st = node.carver.stats()
        assert st["bytes_allocated"] == 0 and st["empty"] <= 1
        assert st["slabs_returned"] >= st["slabs_fetched"] - 1
        with pytest.raises(ValueError):
            node.free(next(iter(live)))  # double free
    finally:
        node.close()


def test_freed_handle_memory_is_not_ours_to_touch_after_the_slab_went_back(cluster) -> None:
    node = cluster.node("fine-back", transport="tcp", empty_threshold=0)
    try:
        h = node.allocate(100)
        slab, base, _ = node.carver.locate(h)
        rep = slab.replicas[0]
        node.free(h)  # the slab is empty and the threshold is 0: it goes back
        with pytest.raises(VerbError), rep.link.verbs() as v:
            v.write(rep.addr, b"late write")  # the blade no longer lets us
    finally:
        node.close()
