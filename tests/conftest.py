"""Shared fixtures: one vcsim launcher per session on the default topology, with seeded disk images."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import topology as topo
from testbed.config import credentials_path_for, write_config, write_credentials
from testbed.images import write_images
from testbed.launcher import Vcsim

USERNAME = "administrator@vsphere.local"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs the vcsim launcher (built by testbed/setup.sh)")


@dataclass
class VcsimTestbed:
    """What a test needs to reach the session's simulator."""

    sim: Vcsim
    username: str
    password: str
    topology: dict[str, Any]
    topology_path: Path
    images: dict[tuple[str, int], str]  # (vm, disk index) -> sha256 of the flat image
    config_path: Path
    credentials_path: Path
    disk_scale: float = 1.0

    @property
    def url(self) -> str:
        return self.sim.url

    @property
    def pid(self) -> int:
        return self.sim.pid

    @property
    def datastores(self) -> dict[str, Path]:
        return self.sim.datastores

    def disks(self) -> list[topo.DiskImage]:
        return topo.disks(self.topology, self.datastores, self.disk_scale)


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VcsimTestbed]:
    """The session's launcher on testbed/topology/default.json; stopped by PID at the end."""
    password = secrets.token_urlsafe(24)
    topology_path = topo.DEFAULT_TOPOLOGY
    topology = topo.load(topology_path)
    sim = Vcsim.start(topology_path, USERNAME, password)
    try:
        images = write_images(topo.disks(topology, sim.datastores))
        work = tmp_path_factory.mktemp("vcsim")
        config_path = work / "vsphere-proxy.yaml"
        credentials = write_credentials(USERNAME, password, credentials_path_for(config_path))
        write_config(topology, sim.url, credentials, config_path, sim.datastores, work / "repository")
        yield VcsimTestbed(sim, USERNAME, password, topology, topology_path, images, config_path, credentials)
    finally:
        sim.stop()


@pytest.fixture
def vcsim_env(vcsim: VcsimTestbed, monkeypatch: pytest.MonkeyPatch) -> VcsimTestbed:
    """The session's simulator, with VSPHERE_USERNAME / VSPHERE_PASSWORD set for this test only."""
    monkeypatch.setenv("VSPHERE_USERNAME", vcsim.username)
    monkeypatch.setenv("VSPHERE_PASSWORD", vcsim.password)
    return vcsim
