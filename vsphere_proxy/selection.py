"""Which VMs a job backs up: every VM matching any selection criterion, minus the exclusions."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from vsphere_proxy.config import Selection
from vsphere_proxy.model import VM, Inventory, Tag


@dataclass(frozen=True, slots=True)
class Selected:
    vm: VM
    because: str  # the first criterion that matched, e.g. "tag BackupPolicy:gold"
    skip: str = ""  # why a matching VM is not backed up (template, proxy of the job, excluded)


def _in_folder(vm: VM, folder: str) -> bool:
    folder = folder.strip("/")
    return not folder or vm.folder == folder or vm.folder.startswith(folder + "/")


def select_vms(inventory: Inventory, selection: Selection, proxies: set[str] | None = None) -> list[Selected]:
    """Every VM matching the selection, sorted by name; those not to back up carry a `skip` reason
    (templates, the job's own proxy VMs, exclusions, VMs without a disk a snapshot captures), so nothing is
    left out silently."""
    tags = sorted({Tag.parse(t) for t in selection.tags})
    chosen = []
    for vm in inventory.vms:
        because = (
            next((f"name {p}" for p in selection.names if fnmatchcase(vm.name, p)), None)
            or next((f"folder /{f.strip('/')}" for f in selection.folders if _in_folder(vm, f)), None)
            or next((f"cluster {c}" for c in selection.clusters if vm.cluster == c), None)
            or next((f"datastore {d}" for d in selection.datastores if d in vm.datastores), None)
            or next((f"tag {t}" for t in tags if t in vm.tags), None)
        )
        if not because:
            continue
        excluded = next((p for p in selection.exclude if fnmatchcase(vm.name, p)), None)
        skip = ("a template" if vm.template else
                "a proxy of this job" if proxies and vm.name in proxies else
                f"excluded by {excluded}" if excluded else
                "no virtual disks" if not vm.disks else
                "only physical-mode RDM disks, which a snapshot cannot capture" if not vm.backup_disks else "")
        chosen.append(Selected(vm, because, skip))
    return chosen
