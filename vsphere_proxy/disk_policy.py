"""Which disks of a VM a job reads (`job.policy.independent_disks`, `job.policy.exclude_disks`): independent disks
are not captured by snapshots, so they are left out with the reason (or, with `independent_disks: fail`, the VM is
refused with it), and disks the policy excludes by label or index are left out as excluded. Pure: VMs in, VMs out.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vsphere_proxy.model import VM, Disk


@dataclass(frozen=True, slots=True)
class DiskChoice:
    """A VM as the job reads it: its disks marked `excluded` where left out, one note per such disk, and the
    reason the VM is refused (not backed up at all), "" when it is not."""

    vm: VM
    notes: tuple[str, ...] = ()
    refused: str = ""
    empty: str = ""  # why nothing of it is read (every disk left out): the VM is skipped, not failed


def choose_disks(vm: VM, independent: str, exclude: Mapping[str, Sequence[str | int]]) -> DiskChoice:
    """`independent`: skip | fail; `exclude`: VM name pattern -> disk labels or indexes (0 = the VM's first)."""
    excluded = {str(x) for pattern, disks in exclude.items() if fnmatch.fnmatchcase(vm.name, pattern) for x in disks}
    notes: list[str] = []
    refused = ""
    disks: list[Disk] = []
    for index, disk in enumerate(vm.disks):
        what = f"disk {index} ({disk.label})"
        if disk.label in excluded or str(index) in excluded:
            disk = dataclasses.replace(disk, excluded="excluded by policy.exclude_disks")
            notes.append(f"{what} not backed up: excluded by policy.exclude_disks")
        elif disk.independent and disk.backing != "rdm-physical":
            why = f"{disk.mode} disks are not captured by snapshots"
            if independent == "fail":
                refused = refused or f"{what} is an {disk.mode} disk, which snapshots do not capture " \
                                     "(policy.independent_disks: fail)"
            disk = dataclasses.replace(disk, excluded=why)
            notes.append(f"{what} not backed up: {why} (policy.independent_disks: {independent})")
        disks.append(disk)
    empty = ""
    if not refused and notes and not any(d.backing != "rdm-physical" and not d.excluded for d in disks):
        empty = "no disk left to back up: " + "; ".join(notes)
    return DiskChoice(dataclasses.replace(vm, disks=tuple(disks)), tuple(notes), refused, empty)


def choose_all(vms: Mapping[str, VM], independent: str,
               exclude: Mapping[str, Sequence[str | int]]) -> dict[str, DiskChoice]:
    return {name: choose_disks(vm, independent, exclude) for name, vm in vms.items()}
