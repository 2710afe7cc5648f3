"""A slab handed out again reads as zeros: blades scrub before reuse, so no node ever sees
another's bytes (and the block device needs no zero-fill of fresh slabs)."""

from __future__ import annotations

from pathlib import Path

from blade_helpers import SlabdPool, wait_for

from rallocator.node import NoSpace, WorkingNode

M = 1 << 20


def _try(node: WorkingNode, index: int, out: list) -> bool:
    """One allocation attempt (the 2-unit blade is full until epochs let a free through)."""
    try:
        out.append(node.allocate_slab(M, volume=node.node_id, index=index))
        return True
    except NoSpace:
        return False


def test_reused_slab_is_zeroed(tmp_path: Path) -> None:
    with SlabdPool(tmp_path) as pool:
        blade = pool.start("b", capacity="2M", extra=("--slab-sizes", "1M"))
        a = WorkingNode([("b", blade.address)], pool.secret, node_id=0xA, transport="tcp")
        b = WorkingNode([("b", blade.address)], pool.secret, node_id=0xB, transport="tcp")
        try:
            units = set()
            for round_ in range(3):  # a 2-unit blade: after the first round units repeat
                mine: list = []
                assert wait_for(lambda mine=mine, r=round_: _try(a, r, mine), timeout=10)
                slab = mine[0]
                rep = slab.replicas[0]
                units.add(rep.unit)
                with rep.link.verbs() as v:
                    v.write(rep.addr, b"\xab" * M)
                a.free_slab(slab)
                got: list = []
                assert wait_for(lambda got=got, r=round_: _try(b, r, got), timeout=10), \
                    "freed slab never came back"
                other = got[0].replicas[0]
                with other.link.verbs() as v:
                    assert v.read(other.addr, M) == bytes(M)
                b.free_slab(got[0])
            assert len(units) <= 2
        finally:
            a.close()
            b.close()
