"""The `hotadd` transport: attach the snapshot's base disk to the proxy VM, read the device it becomes in the
proxy's guest, detach it always (DESIGN §5). `HotAddWriter` is its write side (DESIGN §8): the new VM's empty disk
attached read-write, written through the device (holes never written), flushed, detached always.

`open(disk)` reconfigures the proxy VM (`adapters.hotadd.attach_disk`, read-only: independent non-persistent),
then a `GuestDevices` resolver finds the block device the guest sees for that disk; `close()` closes the device
and detaches the disk, also after an error. A disk left attached by a crash is found by the job-start sweep
(`adapters.hotadd.sweep_attached`).

Resolvers:
- `DiskUuidDevices`: Linux proxies with `disk.EnableUUID = TRUE` see each virtual disk as
  `/dev/disk/by-id/wwn-0x<disk uuid>`; the resolver waits for that link after the attach.
- `SimulatedGuestDevices`: for the simulator, which has no guest: the "device" is the attached disk's flat file in
  the datastore's local directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, Self

from adapters.errors import VSphereError
from adapters.hotadd import AttachedDisk, attach_disk, detach_disk
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.tasks import TaskError
from vsphere_proxy.transports import DiskSource, TransportError, flat_path
from vsphere_proxy.transports.file import LocalDisk


class GuestDevices(Protocol):
    def path(self, attached: AttachedDisk, disk: DiskSource) -> Path:
        """The block device (or file) in the proxy's guest that reads as the attached disk."""


class DiskUuidDevices:
    """`/dev/disk/by-id/wwn-0x<uuid>` for a disk whose backing UUID is known (needs disk.EnableUUID)."""

    def __init__(self, root: Path = Path("/dev/disk/by-id"), wait: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.root, self.wait, self.sleep = root, wait, sleep

    def path(self, attached: AttachedDisk, disk: DiskSource) -> Path:
        if not attached.uuid:
            raise TransportError(f"{disk}: hotadd: the attached disk has no UUID; set disk.EnableUUID on the proxy")
        link = self.root / f"wwn-0x{attached.uuid.replace('-', '').lower()}"
        waited = 0.0
        while not link.exists():
            if waited >= self.wait:
                raise TransportError(f"{disk}: hotadd: {link} did not appear within {self.wait:g} s of the attach")
            self.sleep(0.5)
            waited += 0.5
        return link


class SimulatedGuestDevices:
    """The simulator has no guest: the attached disk reads as its flat file under the datastore's directory."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self.paths = {k: Path(v) for k, v in paths.items()}

    def path(self, attached: AttachedDisk, disk: DiskSource) -> Path:
        datastore = attached.file[1:attached.file.index("]")] if attached.file.startswith("[") else disk.datastore
        root = self.paths.get(datastore)
        if root is None:
            raise TransportError(f"{disk}: hotadd: no local directory for datastore {datastore}")
        inner = attached.file.split("] ", 1)[1] if "] " in attached.file else attached.file
        return root / flat_path(inner)


_reconfigure_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _proxy_lock(proxy_vm_moref: str) -> threading.Lock:
    """One reconfiguration at a time per proxy VM: two concurrent attaches would pick the same free unit."""
    with _locks_lock:
        return _reconfigure_locks.setdefault(proxy_vm_moref, threading.Lock())


class HotAddTransport:
    mode = "hotadd"

    writable = False

    def __init__(self, session: Session, proxy_vm_moref: str, devices: GuestDevices, *,
                 retry: RetryPolicy = DEFAULT_RETRY, job_id: str = "") -> None:
        self._session = session
        self._job = job_id  # recorded on the proxy VM with the disk: its owner
        self._proxy = proxy_vm_moref
        self._devices = devices
        self._retry = retry
        self._attached: AttachedDisk | None = None
        self._file: LocalDisk | None = None
        self._disk: DiskSource | None = None

    def open(self, disk: DiskSource) -> None:
        self.close(False)
        try:
            with _proxy_lock(self._proxy):
                self._attached = attach_disk(self._session, self._proxy, disk.file, disk.capacity,
                                             retry=self._retry, job_id=self._job, writable=self.writable)
        except VSphereError as e:  # unless vCenter refused it, the attach may still be carried out
            left = "" if isinstance(e, TaskError) and e.fault is not None else \
                f"disk {disk.file} may have been hot-added to {self._proxy}: {e}"
            raise TransportError(f"{disk}: hotadd: {e}", left_behind=left) from None
        self._disk = disk
        try:
            self._file = LocalDisk(self._devices.path(self._attached, disk), disk, self.mode,
                                   writable=self.writable)
            if self.writable:
                self._file.size_for_writing()
        except BaseException:
            self.close(False)
            raise

    def read_block(self, offset: int, length: int) -> bytes:
        if self._file is None:
            raise TransportError("hotadd: read before open")
        return self._file.read(offset, length)

    def close(self, complete: bool = True) -> None:
        """Close the device (written: flushed first when `complete`), then detach the disk; a failed flush or
        detach is raised (the sweep would find a disk left attached later)."""
        file, self._file = self._file, None
        try:
            if file is not None and self.writable and complete:
                file.sync()
        finally:
            if file is not None:
                file.close()
            self._detach()

    def _detach(self) -> None:
        attached, self._attached = self._attached, None
        if attached is not None:
            try:
                with _proxy_lock(self._proxy):
                    detach_disk(self._session, self._proxy, attached, retry=self._retry)
            except VSphereError as e:
                raise TransportError(f"{self._disk}: hotadd: detach failed: {e}",
                                     left_behind=f"disk {attached.file} hot-added to {self._proxy}: {e}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(False)


class HotAddWriter(HotAddTransport):
    """The `hotadd` write tier: the new VM's disk attached to the proxy VM read-write, written through the
    device the guest sees."""

    writable = True

    def read_block(self, offset: int, length: int) -> bytes:
        raise TransportError("hotadd: a restore's writer does not read")

    def write_block(self, offset: int, data: bytes) -> None:
        if self._file is None:
            raise TransportError("hotadd: write before open")
        self._file.write(offset, data)
