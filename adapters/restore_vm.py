"""`VSphereRestorer`: recreate VMs from restore points in vCenter (the `vsphere_proxy.jobs.backend.Restorer` of a
real vCenter or the simulator).

`create` makes the VM with `CreateVM_Task` from the saved configuration (`adapters.restore_spec`), its disks
empty on their target datastores (a directory of its own made first on every datastore beside the VM's home),
then reads back where vCenter put each disk. `writer` gives the write transport of the assigned mode through
which a proxy fills a disk. `complete` puts back what is not a disk: the NVRAM file (datastore HTTP PUT), tags,
custom attributes; replaces the original VM when asked (powered off first only with `force_power_off`, and only
now that the new VM is whole), gives the VM its final name and powers it on when asked. `remove` deletes the VM
and every file and directory the restore made; it never raises, and says what it could not remove.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import requests
from pyVmomi import vim, vmodl
from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder

from adapters.backup import ProxyAccess
from adapters.errors import VSphereError
from adapters.hotadd import place_disk
from adapters.hotadd_transport import HotAddWriter
from adapters.nbd import folder_url, session_cookie
from adapters.nbd_write import NbdWriter
from adapters.properties import managed, read_one
from adapters.restore_spec import build_spec, disk_file, file_base
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.tasks import TaskError, describe_fault, wait_for_task
from vsphere_proxy.jobs.backend import CreatedVm
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.restore_plan import DiskRestorePlan, RestorePlan, VmRestorePlan
from vsphere_proxy.model import Inventory
from vsphere_proxy.transports import DiskSource, TransportError
from vsphere_proxy.transports.write import FileWriter, WriteTransport


class RestoreFailed(VSphereError):
    """A restore step vCenter refused or did not finish; the message names the VM and the step."""


def _datastore_of(path: str) -> str:
    return path[1:path.index("]")] if path.startswith("[") and "]" in path else ""


def _inner(path: str) -> str:
    return path.split("] ", 1)[1] if "] " in path else ""


class VSphereRestorer:
    def __init__(self, session: Session, inventory: Inventory, proxies: Mapping[str, ProxyAccess], job_id: str, *,
                 retry: RetryPolicy = DEFAULT_RETRY, task_timeout: float = 3600.0) -> None:
        self.session = session
        self.inventory = inventory
        self.datacenter = inventory.datacenter
        self.proxies = dict(proxies)
        self.job_id = job_id
        self.retry = retry
        self.task_timeout = task_timeout

    # -- finding things -------------------------------------------------------------------------------------------

    def _find(self, path: str) -> Any:
        try:
            return self.session.content.searchIndex.FindByInventoryPath(path)
        except vim.fault.InvalidArgument:
            return None

    def folder(self, folder: str) -> vim.Folder:
        path = f"{self.datacenter}/vm" + (f"/{folder}" if folder else "")
        found = self._find(path)
        if not isinstance(found, vim.Folder):
            raise BadJob(f"--folder: no VM folder {folder!r} in datacenter {self.datacenter}")
        return found

    def pool(self, plan: VmRestorePlan) -> vim.ResourcePool:
        if plan.resource_pool:
            path = plan.resource_pool.strip("/")
            found = self._find(f"{self.datacenter}/host/{path}")
            if not isinstance(found, vim.ResourcePool):
                raise BadJob(f"--resource-pool: no resource pool {plan.resource_pool!r} in datacenter "
                             f"{self.datacenter} (a path below the host folder, e.g. Prod/Resources/Gold)")
            return found
        host = self._host(plan)
        parent = read_one(self.session, host, ["parent"]).get("parent")
        pool = read_one(self.session, parent, ["resourcePool"]).get("resourcePool") if parent is not None else None
        if pool is None:
            raise BadJob(f"--host: {plan.host} has no resource pool to create a VM in")
        return pool

    def _host(self, plan: VmRestorePlan) -> vim.HostSystem:
        host = self.inventory.host_by_name.get(plan.host)
        if host is None:
            raise BadJob(f"--host: no host {plan.host!r} in datacenter {self.datacenter}")
        return managed(self.session, vim.HostSystem, host.moref)

    def _datacenter(self) -> vim.Datacenter:
        found = self._find(self.datacenter)
        if not isinstance(found, vim.Datacenter):
            raise RestoreFailed(f"datacenter {self.datacenter!r} not found")
        return found

    # -- the Restorer protocol ------------------------------------------------------------------------------------

    def check(self, plans: Sequence[RestorePlan]) -> None:
        for plan in plans:
            if isinstance(plan, DiskRestorePlan):
                self._disk_change(plan)
                continue
            self.folder(plan.folder)
            self.pool(plan)
            try:
                build_spec(plan)
            except ValueError as e:
                raise BadJob(f"--point: {e}") from None

    def config_spec(self, plan: RestorePlan) -> dict[str, Any]:
        if isinstance(plan, DiskRestorePlan):
            change = vim.vm.ConfigSpec(deviceChange=self._disk_change(plan))
            return json.loads(json.dumps(change, cls=VmomiJSONEncoder, strip_dynamic=True))  # type: ignore[no-any-return]
        spec = build_spec(plan)
        data: dict[str, Any] = json.loads(json.dumps(spec.spec, cls=VmomiJSONEncoder, strip_dynamic=True))
        data["_left_out"] = list(spec.left_out)
        return data

    def create(self, plan: RestorePlan) -> CreatedVm:
        if isinstance(plan, DiskRestorePlan):
            return self._add_disk(plan)
        spec = build_spec(plan)
        made: list[str] = []
        try:
            for ds in sorted({d.datastore for d in plan.disks} - {plan.home_datastore}):
                directory = f"[{ds}] {file_base(plan.create_as)}"
                if self._make_directory(directory):
                    made.append(directory)
            task = self.folder(plan.folder).CreateVM_Task(config=spec.spec, pool=self.pool(plan),
                                                           host=self._host(plan))
            ref = wait_for_task(self.session, task, what=f"creating VM {plan.create_as}", timeout=self.task_timeout)
        except BaseException as e:
            left = self._delete_files([], made)
            if isinstance(e, TaskError | vmodl.MethodFault):
                raise RestoreFailed(f"creating VM {plan.create_as} failed: {describe(e)}"
                                    + (f"; left behind: {'; '.join(left)}" if left else "")) from None
            raise
        created = CreatedVm(ref._moId, plan.create_as, {}, tuple(made))
        try:
            disks = self._disks(ref, plan)
        except BaseException:
            self.remove(created)
            raise
        return CreatedVm(ref._moId, plan.create_as, disks, tuple(made))

    def writer(self, created: CreatedVm, mode: str, proxy: str) -> WriteTransport:
        access = self.proxies.get(proxy) or ProxyAccess(proxy)
        if mode in ("san", "direct-nfs"):
            return FileWriter(mode, access.paths)
        if mode == "hotadd":
            if access.vm_moref is None or access.devices is None:
                raise TransportError(f"hotadd: proxy {proxy} is not a VM proxy with a device resolver")
            return HotAddWriter(self.session, access.vm_moref, access.devices, retry=self.retry, job_id=self.job_id)
        if mode == "nbd":
            return NbdWriter.for_session(self.session, self.datacenter)
        raise TransportError(f"unknown write mode {mode!r}")

    def complete(self, created: CreatedVm, plan: RestorePlan, nvram: bytes | None = None) -> tuple[str, ...]:
        if isinstance(plan, DiskRestorePlan):
            disk = created.disks[plan.disk.index]
            return (f"attached to {plan.target.name} as {disk.file}",)
        notes: list[str] = []
        vm = managed(self.session, vim.VirtualMachine, created.moref)
        cfg = plan.point.vm_config
        assert cfg is not None
        if nvram is not None:
            home = read_one(self.session, vm, ["config.files.vmPathName"]).get("config.files.vmPathName", "")
            directory = _inner(home).rsplit("/", 1)[0] if "/" in _inner(home) else file_base(plan.create_as)
            self._put(_datastore_of(home) or plan.home_datastore, f"{directory}/{file_base(plan.create_as)}.nvram",
                      nvram)
        elif cfg.nvram is None:
            notes.append("the restore point holds no NVRAM file: vCenter makes a new one at power-on")
        if cfg.custom_attributes:
            notes += self._attributes(vm, cfg.custom_attributes)
        if cfg.tags:
            notes += self._tags(created.moref, [(t.category, t.name) for t in cfg.tags])
        if plan.replaces is not None:
            original = managed(self.session, vim.VirtualMachine, plan.replaces.moref)
            state = read_one(self.session, original, ["runtime.powerState"]).get("runtime.powerState")
            if state != "poweredOff":
                if not plan.force_power_off:
                    raise RestoreFailed(f"{plan.replaces.name} was powered on meanwhile; it is left as it was")
                self._task(original.PowerOffVM_Task(), f"powering off {plan.replaces.name}")
            self._task(original.Destroy_Task(), f"removing the original {plan.replaces.name}")
            notes.append(f"replaced the original {plan.replaces.name} ({plan.replaces.moref})")
        if plan.name != created.name:
            self._task(vm.Rename_Task(newName=plan.name), f"renaming {created.name} to {plan.name}")
        if plan.power_on:
            self._task(vm.PowerOnVM_Task(), f"powering on {plan.name}")
            notes.append("powered on")
        return tuple(notes)

    def remove(self, created: CreatedVm) -> tuple[str, ...]:
        left: list[str] = []
        vm = managed(self.session, vim.VirtualMachine, created.moref)
        if created.attached:
            return self._remove_disks(vm, created)
        try:
            state = read_one(self.session, vm, ["runtime.powerState"]).get("runtime.powerState")
            if state is not None:
                if state != "poweredOff":
                    self._task(vm.PowerOffVM_Task(), f"powering off {created.name}")
                self._task(vm.Destroy_Task(), f"removing {created.name}")
        except Exception as e:
            left.append(f"VM {created.name} ({created.moref}): {describe(e)}")
        files = [d.file for d in created.disks.values()
                 if not any(d.file.startswith(f"{directory}/") for directory in created.directories)]
        return tuple(left + self._delete_files(files, list(created.directories)))

    # -- a disk into an existing VM -------------------------------------------------------------------------------

    def _disk_change(self, plan: DiskRestorePlan) -> list[Any]:
        """The device changes that add the empty disk on the VM's first free SCSI slot (a new paravirtual
        controller when every one is full)."""
        vm = managed(self.session, vim.VirtualMachine, plan.target.moref)
        devices = read_one(self.session, vm, ["config.hardware.device"]).get("config.hardware.device") or []
        placed = place_disk(devices)
        if placed is None:
            raise BadJob(f"--to-vm: every unit of {plan.target.name}'s SCSI controllers is taken")
        changes, slot = placed
        d = plan.disk
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{d.datastore}]", diskMode="persistent", thinProvisioned=d.provisioning == "thin",
            eagerlyScrub=d.provisioning == "thick-eager")
        disk = vim.vm.device.VirtualDisk(key=-201, controllerKey=slot[0], unitNumber=slot[1],
                                         capacityInKB=d.capacity // 1024, capacityInBytes=d.capacity, backing=backing)
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
        return changes

    def _add_disk(self, plan: DiskRestorePlan) -> CreatedVm:
        vm = managed(self.session, vim.VirtualMachine, plan.target.moref)
        before = read_one(self.session, vm, ["config.hardware.device"]).get("config.hardware.device") or []
        known = {d.key for d in before}
        what = f"adding disk {plan.disk.index} of {plan.point.id} to {plan.target.name}"
        try:
            self._task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=self._disk_change(plan))), what)
        except (TaskError, vmodl.MethodFault) as e:
            raise RestoreFailed(f"{what} failed: {describe(e)}") from None
        after = read_one(self.session, vm, ["config.hardware.device"]).get("config.hardware.device") or []
        added = [d for d in after if isinstance(d, vim.vm.device.VirtualDisk) and d.key not in known]
        if len(added) != 1:
            raise RestoreFailed(f"{what}: the reconfiguration succeeded but {len(added)} new disks are on the VM")
        device = added[0]
        file = device.backing.fileName
        source = DiskSource(plan.target.name, plan.disk.index, file, _datastore_of(file) or plan.disk.datastore,
                            plan.disk.capacity)
        return CreatedVm(plan.target.moref, plan.create_as, {plan.disk.index: source}, (), (device.key,))

    def _remove_disks(self, vm: Any, created: CreatedVm) -> tuple[str, ...]:
        try:
            devices = read_one(self.session, vm, ["config.hardware.device"]).get("config.hardware.device") or []
            changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", fileOperation="destroy", device=d)
                       for d in devices if d.key in created.attached]
            if changes:
                self._task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)),
                           f"removing the restored disk from {created.name}")
        except Exception as e:
            files = [d.file for d in created.disks.values()]
            return (f"disk {', '.join(files)} of {created.moref}: {describe(e)}",)
        return ()

    # -- steps ----------------------------------------------------------------------------------------------------

    def _task(self, task: Any, what: str) -> Any:
        return wait_for_task(self.session, task, what=what, timeout=self.task_timeout)

    def _make_directory(self, directory: str) -> bool:
        """Make `directory`; False when it exists already (it is then not ours to delete)."""
        try:
            self.session.content.fileManager.MakeDirectory(name=directory, datacenter=self._datacenter(),
                                                           createParentDirectories=False)
            return True
        except vim.fault.FileAlreadyExists:
            return False

    def _disks(self, ref: Any, plan: VmRestorePlan) -> dict[int, DiskSource]:
        """Where vCenter put each disk of the new VM, by the restore point's disk index (matched by file)."""
        devices = read_one(self.session, ref, ["config.hardware.device"]).get("config.hardware.device") or []
        files = {}
        for d in devices:
            if isinstance(d, vim.vm.device.VirtualDisk):
                files[d.backing.fileName] = d
        out = {}
        for d in plan.disks:
            wanted = disk_file(plan, d)
            device = files.get(wanted)
            if device is None:  # vCenter chose another name: the disk on that controller slot
                raise RestoreFailed(f"{plan.create_as}: disk {d.index} was not created as {wanted}")
            out[d.index] = DiskSource(plan.create_as, d.index, device.backing.fileName,
                                      _datastore_of(device.backing.fileName) or d.datastore, d.capacity)
        return out

    def _delete_files(self, files: Sequence[str], directories: Sequence[str]) -> list[str]:
        left = []
        manager, dc = self.session.content.fileManager, None
        for path in [*files, *(f.removesuffix(".vmdk") + "-flat.vmdk" for f in files), *directories]:
            try:
                dc = dc or self._datacenter()
                self._task(manager.DeleteDatastoreFile_Task(name=path, datacenter=dc), f"deleting {path}")
            except TaskError as e:
                if not isinstance(e.fault, vim.fault.FileNotFound):
                    left.append(f"{path}: {e}")
            except Exception as e:
                left.append(f"{path}: {describe(e)}")
        return left

    def _put(self, datastore: str, path: str, data: bytes) -> None:
        s = self.session
        url = folder_url(s.base_url, self.datacenter, datastore, path)
        try:
            r = requests.put(url, data=data, headers={"Cookie": session_cookie(s.cookie),
                                                      "Content-Type": "application/octet-stream"},
                             verify=s.verify, timeout=s.timeout)
        except requests.RequestException as e:
            raise RestoreFailed(f"uploading [{datastore}] {path}: {type(e).__name__}") from None
        if r.status_code >= 300:
            raise RestoreFailed(f"uploading [{datastore}] {path}: HTTP {r.status_code}")

    def _attributes(self, vm: Any, values: Mapping[str, str]) -> list[str]:
        manager = self.session.content.customFieldsManager
        fields = read_one(self.session, manager, ["field"]).get("field") or []
        keys = {f.name: f.key for f in fields if f.managedObjectType in (None, vim.VirtualMachine)}
        notes = []
        for name, value in sorted(values.items()):
            if name not in keys:
                keys[name] = manager.AddCustomFieldDef(name=name, moType=vim.VirtualMachine).key
                notes.append(f"custom attribute {name!r} was defined in vCenter")
            manager.SetField(entity=vm, key=keys[name], value=value)
        return notes

    def _tags(self, moref: str, tags: Sequence[tuple[str, str]]) -> list[str]:
        with self.session.tag_client() as client:
            missing = client.attach_tags(moref, tags)
        return [f"tag {category}:{name} no longer exists in vCenter: not attached" for category, name in missing]


def describe(e: BaseException) -> str:
    """One line for an error met on the way: a vSphere fault by its type and text, anything else by its text."""
    if isinstance(e, vmodl.MethodFault):
        return describe_fault(e)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


