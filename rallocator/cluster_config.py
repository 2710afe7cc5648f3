"""DIR/cluster.toml: where a cluster's coordinator, blades and secret are.

Written by ``ralloc cluster up``, read by everything that joins the cluster (the swap
plugin, the filesystem, ``ralloc status``). Plain TOML so people can read and edit it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field


class ClusterConfigError(Exception):
    """No cluster here, or its cluster.toml is unreadable."""


@dataclass
class BladeEntry:
    name: str
    address: str
    region: str
    capacity: int
    mode: str = "dram"
    pid: int = 0


@dataclass
class ClusterConfig:
    dir: str
    secret_file: str
    coordinator: str = ""
    coordinator_pid: int = 0
    blades: list[BladeEntry] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "cluster.toml")

    @classmethod
    def load(cls, directory: str) -> ClusterConfig:
        path = os.path.join(directory, "cluster.toml")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ClusterConfigError(f"no cluster in {directory} (run: ralloc cluster up "
                                     f"--dir {directory})") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ClusterConfigError(f"cannot read {path}: {e}") from None
        try:
            c = data["cluster"]
            coord = data.get("coordinator", {})
            blades = [BladeEntry(name=b["name"], address=b["address"], region=b["region"],
                                 capacity=int(b["capacity"]), mode=b.get("mode", "dram"),
                                 pid=int(b.get("pid", 0))) for b in data.get("blades", [])]
            return cls(dir=os.path.abspath(directory), secret_file=c["secret_file"],
                       coordinator=coord.get("address", ""),
                       coordinator_pid=int(coord.get("pid", 0)), blades=blades)
        except (KeyError, TypeError, ValueError) as e:
            raise ClusterConfigError(f"{path} is malformed: missing or bad {e}") from None

    def save(self) -> None:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["# written by `ralloc cluster up`; read by every node that joins", "",
                 "[cluster]", f"secret_file = {q(self.secret_file)}", "",
                 "[coordinator]", f"address = {q(self.coordinator)}",
                 f"pid = {self.coordinator_pid}", ""]
        for b in self.blades:
            lines += ["[[blades]]", f"name = {q(b.name)}", f"address = {q(b.address)}",
                      f"region = {q(b.region)}", f"capacity = {b.capacity}",
                      f"mode = {q(b.mode)}", f"pid = {b.pid}", ""]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines))
        os.replace(tmp, self.path)
