"""Transports against the live launcher: san/direct-nfs through a datastore -> path map, nbd over /folder/ with
Range requests; every disk read equals its seeded image, and a broken nbd transfer resumes where it stopped."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from adapters.nbd import NbdTransport, session_cookie
from adapters.session import connect
from vsphere_proxy.transports import BLOCK, DiskSource, TransportError, read_blocks
from vsphere_proxy.transports.file import FileTransport

pytestmark = pytest.mark.integration


def source(vcsim: Any, vm: str, index: int = 0) -> DiskSource:
    image = next(d for d in vcsim.disks() if d.vm == vm and d.index == index)
    name = f"{vm}.vmdk" if index == 0 else f"{vm}_{index}.vmdk"
    return DiskSource(vm, index, f"[{image.datastore}] {vm}/{name}", image.datastore, image.capacity)


def digest(transport: Any, disk: DiskSource) -> str:
    h = hashlib.sha256()
    with transport:
        transport.open(disk)
        for _, block in read_blocks(transport, disk.capacity):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def session(vcsim: Any) -> Iterator[Any]:
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as s:
        yield s


def test_san_reads_every_disk_of_a_vm_through_the_path_map(vcsim: Any) -> None:
    t = FileTransport("san", vcsim.datastores)
    for index in (0, 1):
        disk = source(vcsim, "db-01", index)
        assert digest(t, disk) == vcsim.images[("db-01", index)]


def test_a_datastore_the_proxy_does_not_mount_is_a_clear_error(vcsim: Any, tmp_path: Path) -> None:
    disk = source(vcsim, "db-01")
    with pytest.raises(TransportError, match=r"db-01 disk 0 .*: san: datastore \S+ is not mounted on this proxy"):
        FileTransport("san", {}).open(disk)
    with pytest.raises(TransportError, match="cannot open"):
        FileTransport("direct-nfs", {disk.datastore: tmp_path}).open(disk)


def test_nbd_streams_the_disk_with_range_requests(vcsim: Any, session: Any) -> None:
    t = NbdTransport(session.base_url, vcsim.topology["Datacenter"], session.cookie, verify=False)
    for vm, index in (("web-01", 0), ("app-03", 1)):
        disk = source(vcsim, vm, index)
        assert digest(t, disk) == vcsim.images[(vm, index)]
    assert t.resumed == 0


class _Flaky:
    """An HTTP client that cuts the first answers short, then behaves: a network that drops mid-transfer."""

    def __init__(self, cuts: int) -> None:
        self.real = requests.Session()
        self.cuts = cuts
        self.ranges: list[str] = []

    def get(self, url: str, **kw: Any) -> Any:
        self.ranges.append(kw["headers"]["Range"])
        r = self.real.get(url, **kw)
        if self.cuts > 0:
            self.cuts -= 1
            body = r.iter_content

            def broken(chunk_size: int = 1) -> Iterator[bytes]:
                it = body(chunk_size=64 << 10)
                yield next(it)
                raise requests.exceptions.ChunkedEncodingError("connection reset by peer")

            r.iter_content = broken
        return r


def test_nbd_resumes_a_broken_transfer_from_the_last_byte_received(vcsim: Any, session: Any) -> None:
    disk = source(vcsim, "db-01")
    flaky = _Flaky(cuts=2)
    t = NbdTransport(session.base_url, "DC0", session.cookie, verify=False, http=flaky, wait=lambda _: 0)
    assert digest(t, disk) == vcsim.images[("db-01", 0)]
    assert t.resumed == 2
    assert flaky.ranges[:3] == [f"bytes=0-{BLOCK - 1}", f"bytes={64 << 10}-{BLOCK - 1}",
                                f"bytes={128 << 10}-{BLOCK - 1}"]


def test_nbd_gives_up_after_its_attempts_with_the_disk_named(vcsim: Any, session: Any) -> None:
    disk = source(vcsim, "db-01")
    t = NbdTransport(session.base_url, "DC0", session.cookie, verify=False, http=_Flaky(cuts=99),
                     attempts=3, wait=lambda _: 0)
    t.open(disk)
    with pytest.raises(TransportError, match=r"db-01 disk 0 .*: nbd: block at 0 failed after 3 attempts"):
        t.read_block(0, BLOCK)
    missing = DiskSource("ghost", 0, "[nfs-01] ghost/ghost.vmdk", "nfs-01", BLOCK)
    t2 = NbdTransport(session.base_url, "DC0", session.cookie, verify=False)
    t2.open(missing)
    with pytest.raises(TransportError, match="HTTP 404"):
        t2.read_block(0, BLOCK)


def test_cookie_and_paths() -> None:
    assert session_cookie('vmware_soap_session="abc"; Path=/; HttpOnly') == 'vmware_soap_session="abc"'
    d = DiskSource("v", 1, "[ds 1] v/v_1.vmdk", "ds 1", 10)
    assert (d.path, d.flat) == ("v/v_1.vmdk", "v/v_1-flat.vmdk")
