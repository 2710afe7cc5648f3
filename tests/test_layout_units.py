"""Unit tests of the pure pieces: sizes, region geometry, superblock round trip."""

from __future__ import annotations

import pytest

from rallocator.layout import PAGE, Geometry, make_key, split_key
from rallocator.sizes import format_size, parse_size


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("64K", 65536), ("1M", 1 << 20),
                                             ("1.5G", 3 << 29), ("2GiB", 2 << 30), ("1t", 1 << 40)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "-1M", "0", "1Q"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(1536) == "1.5K" and format_size(1 << 30) == "1G" and format_size(7) == "7B"


def test_geometry_offsets_are_ordered_aligned_and_disjoint() -> None:
    g = Geometry.for_capacity(256 << 20, slab_sizes=(1 << 20, 4 << 20), max_nodes=8)
    offs = [g.off_ring, g.off_ack, g.off_free, g.off_epochs, g.off_bitmap, g.off_owner,
            g.off_slabs]
    assert offs == sorted(offs) and g.off_ring >= 2 * PAGE
    assert g.off_slabs % PAGE == 0 and g.region_size == g.off_slabs + 256 * (1 << 20)
    assert g.ack_addr(1, 5) % 64 == 0 and g.ack_addr(1, 5) < g.off_free
    assert g.ring_addr(0, g.ring_slots) == g.ring_addr(0, 0)  # ring wraps
    assert g.class_for_size(4 << 20) == 1
    with pytest.raises(ValueError):
        g.class_for_size(2 << 20)


def test_superblock_round_trip_and_corruption() -> None:
    g = Geometry.for_capacity(64 << 20, mode_nvm=True)
    sb = g.pack_superblock()
    assert Geometry.from_superblock(sb) == g
    with pytest.raises(ValueError, match="magic"):
        Geometry.from_superblock(b"\0" * len(sb))
    bad = bytearray(sb)
    bad[8 * 12] ^= 0xFF  # off_ring
    with pytest.raises(ValueError, match="corrupt"):
        Geometry.from_superblock(bytes(bad))


def test_keys() -> None:
    assert split_key(make_key(12345, 2)) == (12345, 2)


def test_geometry_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Geometry.for_capacity(100)  # smaller than a unit
    with pytest.raises(ValueError):
        Geometry(unit_size=1000, n_units=4, class_units=(1,))
