"""The metadata log's on-slab format, with no I/O in it.

The filesystem's metadata (inodes, directory entries, extent maps) is an append-only log in
dedicated slabs (volume ``name_id("fs-meta:NAME")``, slab index = segment number). Each
segment is one slab:

    0    segment header  SEG_HDR: magic, fs id, segment number, first lsn, crc32
    64   frames          FRAME header (length, crc32, lsn, flags) + msgpack payload
    ...  zeros           (segments are zeroed when allocated: a zero frame ends the data)

A frame's payload is a msgpack list of ops (``Op`` below). A *transaction* is one or more
consecutive frames, the first flagged ``BEGIN`` and the last ``COMMIT``; replay applies a
transaction only once its COMMIT frame is read, so a torn tail (kill -9, a crash mid-write)
loses only the unfinished transaction. A transaction flagged ``RESET`` is a checkpoint: it
replaces the whole state. A frame flagged ``END`` closes a full segment: the log goes on in
a later segment (normally number + 1) whose header carries the next lsn.

Checkpoints always start a fresh segment, so recovery looks for the highest-numbered segment
that opens with a committed checkpoint and follows the chain from there (see ``Replayer`` and
``fuse_fs.store.recover``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

MAGIC = b"RFSLOG01"
SEG_HDR = struct.Struct("<8sQQQI")  # magic, fs_id, segno, first_lsn, crc
FRAMES_AT = 64
FRAME = struct.Struct("<IIQB3x")  # payload length, crc, lsn, flags
_CRC_HEAD = struct.Struct("<QBI")  # lsn, flags, length: covered by the frame crc

BEGIN, COMMIT, RESET, END = 1, 2, 4, 8
MAX_PAYLOAD = 128 * 1024  # a frame's payload; larger transactions span several frames


# ------------------------------------------------------------------ ops


class SetInode(msgspec.Struct, array_like=True, tag=1):
    """Every attribute of an inode (upsert)."""

    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime: int
    mtime: int
    ctime: int
    target: bytes = b""


class SetEntry(msgspec.Struct, array_like=True, tag=2):
    parent: int
    name: bytes
    ino: int


class DelEntry(msgspec.Struct, array_like=True, tag=3):
    parent: int
    name: bytes


class SetExtents(msgspec.Struct, array_like=True, tag=4):
    """Map blocks of a file: each item is (block, slab index, offset in slab, capacity)."""

    ino: int
    exts: list[tuple[int, int, int, int]]


class CutExtents(msgspec.Struct, array_like=True, tag=5):
    """Forget every extent of ``ino`` at block ``first_block`` or later (truncate)."""

    ino: int
    first_block: int


class DropInode(msgspec.Struct, array_like=True, tag=6):
    ino: int


Op = SetInode | SetEntry | DelEntry | SetExtents | CutExtents | DropInode

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Op])


def encode_ops(ops: list[Op]) -> bytes:
    return _encoder.encode(ops)


def decode_ops(payload: bytes) -> list[Op]:
    return _decoder.decode(payload)


# ------------------------------------------------------------------ segments and frames


def pack_segment_header(fs_id: int, segno: int, first_lsn: int) -> bytes:
    body = SEG_HDR.pack(MAGIC, fs_id, segno, first_lsn, 0)
    crc = zlib.crc32(body)
    return SEG_HDR.pack(MAGIC, fs_id, segno, first_lsn, crc).ljust(FRAMES_AT, b"\0")


def parse_segment_header(buf: bytes, fs_id: int, segno: int) -> int | None:
    """The segment's first lsn, or None if the header is not ours / not written."""
    if len(buf) < SEG_HDR.size:
        return None
    magic, fid, sno, first, crc = SEG_HDR.unpack_from(buf, 0)
    if magic != MAGIC or fid != fs_id or sno != segno:
        return None
    if zlib.crc32(SEG_HDR.pack(magic, fid, sno, first, 0)) != crc:
        return None
    return first


def pack_frame(lsn: int, flags: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(lsn, flags, len(payload))))
    return FRAME.pack(len(payload), crc, lsn, flags) + payload


@dataclass(frozen=True, slots=True)
class Frame:
    lsn: int
    flags: int
    payload: bytes
    offset: int  # where the frame starts in the segment
    end: int  # where the next one would start


def iter_frames(buf: bytes | memoryview, first_lsn: int) -> Iterator[Frame]:
    """Valid frames of one segment, in order, stopping at the first bad or missing one."""
    pos, lsn = FRAMES_AT, first_lsn
    n = len(buf)
    while pos + FRAME.size <= n:
        length, crc, flsn, flags = FRAME.unpack_from(buf, pos)
        end = pos + FRAME.size + length
        if flsn != lsn or end > n:
            return
        payload = bytes(buf[pos + FRAME.size:end])
        if zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(flsn, flags, length))) != crc:
            return
        yield Frame(flsn, flags, payload, pos, end)
        lsn += 1
        pos = end
        if flags & END:
            return


def frames_for(ops: list[Op], first_lsn: int, reset: bool = False) -> list[tuple[int, int, bytes]]:
    """Cut a transaction into frames: [(lsn, flags, payload)], each payload <= MAX_PAYLOAD."""
    chunks: list[bytes] = []
    batch: list[Op] = []
    size = 0
    for op in ops:
        enc = _encoder.encode(op)
        if batch and size + len(enc) > MAX_PAYLOAD:
            chunks.append(encode_ops(batch))
            batch, size = [], 0
        batch.append(op)
        size += len(enc) + 2
    chunks.append(encode_ops(batch))
    out = []
    for i, payload in enumerate(chunks):
        flags = (BEGIN | (RESET if reset else 0) if i == 0 else 0)
        if i == len(chunks) - 1:
            flags |= COMMIT
        out.append((first_lsn + i, flags, payload))
    return out


class Replayer:
    """Turns a stream of frames into committed transactions.

    ``feed(frame)`` returns the ops of a transaction when its COMMIT frame arrives (and
    whether it is a checkpoint); frames of a transaction whose BEGIN was never seen, or that
    a later BEGIN interrupts, are dropped.
    """

    def __init__(self) -> None:
        self.open: list[Op] | None = None
        self.reset = False

    def feed(self, frame: Frame) -> tuple[list[Op], bool] | None:
        if frame.flags & END and not frame.payload:
            return None
        if frame.flags & BEGIN:
            self.open = []
            self.reset = bool(frame.flags & RESET)
        if self.open is None:
            return None
        self.open.extend(decode_ops(frame.payload))
        if frame.flags & COMMIT:
            ops, reset = self.open, self.reset
            self.open, self.reset = None, False
            return ops, reset
        return None
