"""The far-memory filesystem: a pyfuse3 + trio filesystem whose files live in blade slabs.

    ralloc mount --cluster DIR MOUNTPOINT [--name NAME] [--replicas K] [--foreground]
    ralloc umount MOUNTPOINT

Modules, bottom up:

- ``metalog``  the metadata log's on-slab format (segments, crc-framed msgpack records,
  transactions, checkpoints); no I/O.
- ``state``    inodes, directory entries and extent maps in memory; replay; no I/O.
- ``extents``  the filesystem's own extent allocator over its data slabs; no I/O.
- ``slabio``   blocking replica-aware slab reads/writes/persists (worker threads only).
- ``store``    recovery, the log writer, the async data path, sync and checkpoints.
- ``fs``       the pyfuse3 request handlers.
- ``cli``      mount (background + readiness), the daemon's main, umount.
- ``testing``  helpers for tests that mount for real.

Design choices:

- **Extents.** A file is cut into 64 KiB blocks; each block that holds data has an extent
  in a data slab. The first extent of a file smaller than a block is sized to the file
  (512 B, 1 KiB, ... 64 KiB, grown by copy as the file grows), so small files share slabs.
  Holes and the tail of a block past its extent read as zeros; truncate and unlink free
  extents. Data slabs are allocated by the filesystem itself (volume
  ``name_id("fs-data:NAME")``, a unique index each) and carved SLUB-style into one size
  class per slab (``extents.ExtentAllocator``) -- not with ``node.allocate``, whose carver
  tags every slab ``HEAP_VOLUME`` and keeps its layout only in memory, so nothing could be
  found again after a restart.
- **Metadata.** An append-only log in slabs of volume ``name_id("fs-meta:NAME")`` (index =
  segment number): msgspec-msgpack ops framed with length + crc32 + lsn, grouped into
  transactions. Every change is applied in memory and queued; ``fsync``/``fsyncdir`` (and a
  timer every second) persist the written data extents, then append the queued ops as one
  transaction and persist it (msync on nvm blades). Checkpoints (at mount, at unmount,
  and when the log outgrows its last snapshot) rewrite the state into fresh segments and
  free the old ones. The daemon joins the cluster as node ``fs:NAME``, so after a crash
  ``owned_slabs`` finds both volumes again; recovery replays from the newest complete
  checkpoint, drops unreachable inodes, and frees data slabs nothing references.
- **Never block trio.** Every network call (verbs, slab allocation and freeing, blade
  stats, persist, the log) runs in a worker thread behind one capacity limiter. Only data
  copies whose every replica is on a live shm link run on the trio thread: they are a
  memcpy on a local mapping, and the thread hop would cost several times the copy.
- **Page cache on.** Regular files are opened ``direct_io=False, keep_cache=True`` so
  applications can ``mmap(MAP_SHARED)`` them; the daemon ``mlockall``s itself so the
  kernel's writeback of mapped pages never waits on a daemon that is itself waiting for
  reclaim.
"""
