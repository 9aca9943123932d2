"""How a hot-added disk is found in the proxy's guest: by the disk's UUID under /dev/disk/by-id, or, for the
simulator (no guest), as the disk's flat file in the datastore's directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.hotadd import AttachedDisk
from adapters.hotadd_transport import DiskUuidDevices, SimulatedGuestDevices
from vsphere_proxy.transports import DiskSource, TransportError

DISK = DiskSource("web-01", 0, "[ds1] web-01/web-01.vmdk", "ds1", 1 << 20)


def _attached(uuid: str = "") -> AttachedDisk:
    return AttachedDisk("vm-9", 2001, 1000, 1, DISK.file, uuid=uuid)


def test_the_disk_uuid_names_the_guest_device(tmp_path: Path) -> None:
    device = tmp_path / "sdb"
    device.write_bytes(b"x")
    (tmp_path / "wwn-0x6000c29a1b2c3d4e5f60718293a4b5c6").symlink_to(device)
    found = DiskUuidDevices(tmp_path, wait=1, sleep=lambda s: None).path(
        _attached("6000C29a-1b2c-3d4e-5f60-718293a4b5c6"), DISK)
    assert found.resolve() == device


def test_a_device_that_never_appears_is_a_clear_error(tmp_path: Path) -> None:
    slept: list[float] = []
    with pytest.raises(TransportError, match="did not appear within 2 s"):
        DiskUuidDevices(tmp_path, wait=2, sleep=slept.append).path(_attached("6000c29a"), DISK)
    assert sum(slept) == 2
    with pytest.raises(TransportError, match="EnableUUID"):
        DiskUuidDevices(tmp_path).path(_attached(""), DISK)


def test_the_simulator_reads_the_flat_file_of_the_attached_disk(tmp_path: Path) -> None:
    devices = SimulatedGuestDevices({"ds1": tmp_path})
    assert devices.path(_attached(), DISK) == tmp_path / "web-01" / "web-01-flat.vmdk"
    with pytest.raises(TransportError, match="no local directory for datastore ds1"):
        SimulatedGuestDevices({}).path(_attached(), DISK)
