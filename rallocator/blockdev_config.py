"""The block device's settings: the ``key=value`` pairs of the nbdkit command line.

    nbdkit python nbd_plugin/plugin.py cluster=DIR size=SIZE [volume=NAME] [replicas=K]
        [slab_size=SIZE] [transport=auto|tcp|shm]

Every check raises ``ConfigError`` with one line fit for a user (the plugin prints it as is),
in three stages that match nbdkit's: ``set`` per key (``config``), ``validate`` once all are
given (``config_complete``), ``check_cluster`` against the running blades (``get_ready``:
a short tcp handshake, no threads, nothing left open, since nbdkit forks after it).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import IO

from rallocator.cluster_config import ClusterConfig, ClusterConfigError
from rallocator.secret import SecretError, load_secret
from rallocator.sizes import format_size, parse_size

DEFAULT_SLAB_SIZE = 4 << 20
MAX_REPLICAS = 8
TRANSPORTS = ("auto", "tcp", "shm")
KEYS = ("cluster", "size", "volume", "replicas", "slab_size", "transport")


class ConfigError(ValueError):
    """A bad key or value; the message is one line for the user."""


def node_name_for(volume: str) -> str:
    """The working-node name a volume's slabs are owned by: stable for the same volume, so a
    restarted plugin finds them again (``WorkingNode.owned_slabs``)."""
    return f"nbd:{volume}"


@dataclass
class VolumeConfig:
    """What the plugin was asked to serve. ``cluster`` and ``size`` are required."""

    cluster: str = ""
    size: int = 0
    volume: str = "default"
    replicas: int = 1
    slab_size: int = DEFAULT_SLAB_SIZE
    transport: str = "auto"

    def set(self, key: str, value: str) -> None:
        """Apply one ``key=value`` from the command line.

        Raises:
            ConfigError: unknown key or a value that cannot be right.
        """
        if key == "cluster":
            if not value:
                raise ConfigError("cluster= needs the cluster directory (ralloc cluster up --dir)")
            self.cluster = os.path.abspath(value)
        elif key == "size":
            self.size = _size(key, value)
        elif key == "volume":
            if not value or not value.isprintable() or len(value) > 200:
                raise ConfigError(f"volume={value!r}: want a short printable name")
            self.volume = value
        elif key == "replicas":
            try:
                n = int(value)
            except ValueError:
                raise ConfigError(f"replicas={value!r} is not a number") from None
            if not 1 <= n <= MAX_REPLICAS:
                raise ConfigError(f"replicas={n}: want 1 to {MAX_REPLICAS}")
            self.replicas = n
        elif key == "slab_size":
            n = _size(key, value)
            if n & (n - 1):
                raise ConfigError(f"slab_size={value}: want a power of two (blades offer 1M, 4M)")
            self.slab_size = n
        elif key == "transport":
            if value not in TRANSPORTS:
                raise ConfigError(f"transport={value!r}: want one of {', '.join(TRANSPORTS)}")
            self.transport = value
        else:
            raise ConfigError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")

    def validate(self) -> ClusterConfig:
        """Everything is given and the cluster directory is readable.

        Raises:
            ConfigError: a required key is missing, or DIR holds no usable cluster.
        """
        if not self.cluster:
            raise ConfigError("cluster=DIR is required (the directory of ralloc cluster up)")
        if not self.size:
            raise ConfigError("size=SIZE is required (e.g. size=1G)")
        try:
            cfg = ClusterConfig.load(self.cluster)
            load_secret(cfg.secret_file)
        except (ClusterConfigError, SecretError) as e:
            raise ConfigError(str(e)) from None
        if len(cfg.blades) < self.replicas:
            raise ConfigError(f"replicas={self.replicas} but the cluster has "
                              f"{len(cfg.blades)} blade(s)")
        return cfg

    def check_cluster(self) -> None:
        """Ask the blades (one handshake each, closed at once) whether they offer our slab
        size, so a wrong ``slab_size`` fails at startup rather than on the first write.

        Raises:
            ConfigError: no blade answers, or too few offer ``slab_size``.
        """
        from rallocator.node import name_id
        from rallocator.transport_tcp import AuthFailed, TcpVerbs

        cfg = self.validate()
        secret = load_secret(cfg.secret_file)
        offered: set[int] = set()
        fits = answered = 0
        for b in cfg.blades:
            try:
                conn = TcpVerbs(b.address, secret, name_id(node_name_for(self.volume)),
                                timeout=3.0, connect_timeout=1.0)
            except AuthFailed as e:
                raise ConfigError(str(e)) from None
            except OSError:
                continue
            answered += 1
            g = conn.geometry
            sizes = {g.slab_bytes(c) for c in range(g.n_classes)}
            conn.close()
            offered |= sizes
            fits += self.slab_size in sizes
        if not answered:
            raise ConfigError(f"no blade of the cluster in {self.cluster} answers "
                              f"(is it up? ralloc cluster up --dir {self.cluster})")
        if fits < min(self.replicas, answered):
            have = ", ".join(format_size(s) for s in sorted(offered))
            raise ConfigError(f"slab_size={format_size(self.slab_size)} is not offered by "
                              f"enough blades (they offer {have})")

    def lock(self) -> VolumeLock:
        """Claim the volume for this process (see ``VolumeLock``)."""
        return VolumeLock(self.cluster, self.volume)


class VolumeLock:
    """An flock on DIR/nbd-<volume id>.lock: two plugins serving one volume would both own
    its slabs and overwrite each other. The kernel drops it when the process dies; a forked
    child keeps it (nbdkit takes it before forking, the server inherits it).

    Raises:
        ConfigError: another live process serves the volume.
    """

    def __init__(self, cluster: str, volume: str) -> None:
        from rallocator.node import name_id

        self.path = os.path.join(cluster, f"nbd-{name_id(volume):016x}.lock")
        f: IO[str] = open(self.path, "a+")  # held open: the lock lives as long as the file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"volume {volume!r} is already served ({who})") from None
        self.volume = volume
        self._file: IO[str] | None = f
        self.refresh()

    def refresh(self) -> None:
        """Write our pid into the file (again after nbdkit forked), for the error above."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"pid {os.getpid()} volume {self.volume}\n")
            self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _size(key: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise ConfigError(f"{key}={value}: {e}") from None
