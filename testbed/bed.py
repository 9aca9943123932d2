"""A simulator of one's own, ready to back up: the launcher on the default topology (stopped at the end), its disk
images seeded, a credentials file (0600) and a config whose every proxy mounts every datastore and whose
repository is under `work`. For tests and benches that change the inventory or leave it changed."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import topology as topo
from testbed.config import credentials_path_for, write_config, write_credentials
from testbed.images import write_images
from testbed.launcher import Vcsim

USER = "administrator@vsphere.local"


@dataclass
class OwnTestbed:
    sim: Vcsim
    password: str
    topology: dict[str, Any]
    images: dict[tuple[str, int], str]  # (vm, disk) -> sha256 of the seeded image
    config: Path
    work: Path


@contextlib.contextmanager
def own_testbed(work: Path, *, disk_scale: float = 1.0) -> Iterator[OwnTestbed]:
    password = secrets.token_urlsafe(24)
    topology = topo.load(topo.DEFAULT_TOPOLOGY)
    with Vcsim.start(topo.DEFAULT_TOPOLOGY, USER, password, disk_scale=disk_scale) as sim:
        images = write_images(topo.disks(topology, sim.datastores, disk_scale))
        credentials = write_credentials(USER, password, credentials_path_for(work / "c.yaml"))
        config = write_config(topology, sim.url, credentials, work / "c.yaml", sim.datastores, work / "repository")
        yield OwnTestbed(sim, password, topology, images, config, work)
