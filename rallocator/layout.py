"""The blade region's global naming: every well-known offset, computed from the geometry.

A region is one file. Anyone who can read its first page (the blade after a crash, a node on
the shm transport, a node over tcp) learns where everything is. All words are little-endian
u64; atomics act on 8-byte aligned words.

    0            superblock (one page): magic, version, geometry, offsets, flags
    PAGE         control page: one 64-byte line per sequencer, free sequencer, global
                 epoch, published counters
    ring         per size class: ring_slots x 16 B  {ticket, unit}
    ack          per size class: ring_slots x 64 B  {key, node, volume, index, unit}
    free ring    free_slots x 64 B                  {key, node, unit, epoch}
    epochs       max_nodes x 64 B                   {node, epoch, active, heartbeat}
    bitmap       one bit per unit (allocated)
    owner table  n_units x 64 B                     {state, node, volume, index, size_class,
                                                     generation, free_epoch, checksum}
    slab area    n_units x unit_size, page aligned

A *key* word packs a ticket and a state: ``ticket << 2 | state``. Tickets start at 1, so an
all-zero region has no live tickets.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

MAGIC = int.from_bytes(b"RALLOCv1", "little")
VERSION = 1
PAGE = 4096
LINE = 64
MAX_CLASSES = 4

# ack / free slot states (low two bits of a key word)
OPEN, CLAIMED, ACKED, DONE = 0, 1, 2, 3

# owner table states
UNIT_FREE, UNIT_OWNED, UNIT_FREEING, UNIT_CONT = 0, 1, 2, 3

RING_ENTRY = struct.Struct("<QQ")  # ticket, unit
ACK_BODY = struct.Struct("<QQQQ")  # node, volume, index, unit   (after the key word)
FREE_BODY = struct.Struct("<QQQ")  # node, unit, epoch             (after the key word)
EPOCH_ENTRY = struct.Struct("<QQQQ")  # node, epoch, active, heartbeat
OWNER_ENTRY = struct.Struct("<QQQQQQQQ")  # state node volume index class gen free_epoch checksum

_SB = struct.Struct("<" + "Q" * 24)
_SB_FIELDS = (
    "magic version unit_size n_units n_classes class0 class1 class2 class3 ring_slots "
    "free_slots max_nodes off_ring off_ack off_free off_epochs off_bitmap off_owner "
    "off_slabs region_size clean_shutdown blade_starts mode_nvm reserved"
).split()


def make_key(ticket: int, state: int) -> int:
    return (ticket << 2) | state


def split_key(key: int) -> tuple[int, int]:
    return key >> 2, key & 3


def owner_checksum(state: int, node: int, volume: int, index: int, size_class: int,
                   gen: int, free_epoch: int) -> int:
    """CRC of an owner entry, so recovery can tell a torn entry from a real one."""
    return zlib.crc32(OWNER_ENTRY.pack(state, node, volume, index, size_class, gen,
                                       free_epoch, 0)) | 1 << 32


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """Where everything lives in one region. Pure arithmetic; no I/O.

    ``class_units`` lists the slab size classes in units (e.g. ``(1, 4)`` with 1 MiB units
    gives 1 MiB and 4 MiB slabs).
    """

    unit_size: int
    n_units: int
    class_units: tuple[int, ...]
    ring_slots: int = 64
    free_slots: int = 256
    max_nodes: int = 64
    mode_nvm: bool = False

    def __post_init__(self) -> None:
        if self.unit_size < PAGE or self.unit_size % PAGE:
            raise ValueError(f"unit size must be a multiple of {PAGE}")
        if not 1 <= len(self.class_units) <= MAX_CLASSES:
            raise ValueError(f"between 1 and {MAX_CLASSES} slab size classes")
        if any(c < 1 or c > self.n_units for c in self.class_units):
            raise ValueError("every slab size class must fit in the region")
        if self.n_units < 1:
            raise ValueError("region too small for one unit")

    # -- sizes -------------------------------------------------------------------------
    @cached_property
    def n_classes(self) -> int:
        return len(self.class_units)

    def slab_bytes(self, size_class: int) -> int:
        return self.class_units[size_class] * self.unit_size

    def class_for_size(self, size: int) -> int:
        """The size class whose slabs are exactly ``size`` bytes."""
        for c, units in enumerate(self.class_units):
            if units * self.unit_size == size:
                return c
        sizes = ", ".join(str(u * self.unit_size) for u in self.class_units)
        raise ValueError(f"slab size {size} is not one of this blade's classes ({sizes})")

    # -- control page ------------------------------------------------------------------
    def seq_addr(self, size_class: int) -> int:
        return PAGE + LINE * size_class

    @cached_property
    def free_seq_addr(self) -> int:
        return PAGE + LINE * MAX_CLASSES

    @cached_property
    def global_epoch_addr(self) -> int:
        return PAGE + LINE * (MAX_CLASSES + 1)

    @cached_property
    def free_units_addr(self) -> int:
        """Published count of free units, so a node can tell 'full' from 'not stocked yet'."""
        return PAGE + LINE * (MAX_CLASSES + 2)

    # -- tables ------------------------------------------------------------------------
    @cached_property
    def off_ring(self) -> int:
        return 2 * PAGE

    def ring_addr(self, size_class: int, ticket: int) -> int:
        return self.off_ring + (size_class * self.ring_slots + ticket % self.ring_slots) * 16

    @cached_property
    def off_ack(self) -> int:
        return _align(self.off_ring + MAX_CLASSES * self.ring_slots * 16, LINE)

    def ack_addr(self, size_class: int, ticket: int) -> int:
        return self.off_ack + (size_class * self.ring_slots + ticket % self.ring_slots) * 64

    @cached_property
    def off_free(self) -> int:
        return self.off_ack + MAX_CLASSES * self.ring_slots * 64

    def free_addr(self, fticket: int) -> int:
        return self.off_free + (fticket % self.free_slots) * 64

    @cached_property
    def off_epochs(self) -> int:
        return self.off_free + self.free_slots * 64

    def epoch_addr(self, slot: int) -> int:
        return self.off_epochs + slot * 64

    @cached_property
    def off_bitmap(self) -> int:
        return self.off_epochs + self.max_nodes * 64

    @cached_property
    def bitmap_bytes(self) -> int:
        return _align((self.n_units + 7) // 8, 8)

    @cached_property
    def off_owner(self) -> int:
        return _align(self.off_bitmap + self.bitmap_bytes, LINE)

    def owner_addr(self, unit: int) -> int:
        return self.off_owner + unit * 64

    @cached_property
    def off_slabs(self) -> int:
        return _align(self.off_owner + self.n_units * 64, PAGE)

    def unit_addr(self, unit: int) -> int:
        return self.off_slabs + unit * self.unit_size

    def unit_of(self, addr: int) -> int:
        return (addr - self.off_slabs) // self.unit_size

    @cached_property
    def region_size(self) -> int:
        return self.off_slabs + self.n_units * self.unit_size

    @cached_property
    def control_size(self) -> int:
        """Bytes before the slab area: what a node may read of the control structures."""
        return self.off_slabs

    # -- superblock --------------------------------------------------------------------
    def pack_superblock(self, clean_shutdown: int = 0, blade_starts: int = 0) -> bytes:
        cls = list(self.class_units) + [0] * (MAX_CLASSES - self.n_classes)
        return _SB.pack(MAGIC, VERSION, self.unit_size, self.n_units, self.n_classes, *cls,
                        self.ring_slots, self.free_slots, self.max_nodes, self.off_ring,
                        self.off_ack, self.off_free, self.off_epochs, self.off_bitmap,
                        self.off_owner, self.off_slabs, self.region_size, clean_shutdown,
                        blade_starts, int(self.mode_nvm), 0)

    @classmethod
    def from_superblock(cls, data: bytes) -> Geometry:
        """Parse and cross-check a superblock.

        Raises:
            ValueError: not a region, another version, or offsets that disagree with the
                geometry (a corrupt or foreign file).
        """
        if len(data) < _SB.size:
            raise ValueError("superblock truncated")
        f = dict(zip(_SB_FIELDS, _SB.unpack_from(data), strict=True))
        if f["magic"] != MAGIC:
            raise ValueError("not a rallocator region (bad magic)")
        if f["version"] != VERSION:
            raise ValueError(f"region version {f['version']}, this build reads {VERSION}")
        n = f["n_classes"]
        if not 1 <= n <= MAX_CLASSES:
            raise ValueError("corrupt superblock: size classes")
        geo = cls(unit_size=f["unit_size"], n_units=f["n_units"],
                  class_units=tuple(f[f"class{i}"] for i in range(n)),
                  ring_slots=f["ring_slots"], free_slots=f["free_slots"],
                  max_nodes=f["max_nodes"], mode_nvm=bool(f["mode_nvm"]))
        for name in ("off_ring", "off_ack", "off_free", "off_epochs", "off_bitmap",
                     "off_owner", "off_slabs", "region_size"):
            if f[name] != getattr(geo, name):
                raise ValueError(f"corrupt superblock: {name} disagrees with geometry")
        return geo

    @staticmethod
    def superblock_flag_offsets() -> tuple[int, int]:
        return 8 * _SB_FIELDS.index("clean_shutdown"), 8 * _SB_FIELDS.index("blade_starts")

    @classmethod
    def for_capacity(cls, capacity: int, unit_size: int = 1 << 20,
                     slab_sizes: tuple[int, ...] | None = None, mode_nvm: bool = False,
                     **kw: int) -> Geometry:
        """The geometry whose slab area holds ``capacity`` bytes."""
        if slab_sizes is None:
            slab_sizes = (unit_size, 4 * unit_size)
        units = capacity // unit_size
        if units < 1:
            raise ValueError(f"capacity {capacity} is smaller than one unit ({unit_size})")
        class_units = []
        for s in slab_sizes:
            if s % unit_size:
                raise ValueError(f"slab size {s} is not a multiple of the unit {unit_size}")
            if s // unit_size <= units:
                class_units.append(s // unit_size)
        if not class_units:
            raise ValueError("no slab size class fits in the capacity")
        return cls(unit_size=unit_size, n_units=units, class_units=tuple(class_units),
                   mode_nvm=mode_nvm, **kw)
