"""A job as the configuration and vCenter's inventory define it, before it runs: its proxies, its VMs (with why
each is selected or skipped), their access tiers, and the VMs it may claim from other running jobs."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from vsphere_proxy.catalog import Catalog
from vsphere_proxy.config import Config, ConfigError, state_home
from vsphere_proxy.coordinator import Job, WorkVM
from vsphere_proxy.disk_policy import choose_disks
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.ledger_sqlite import LedgerUnavailable, SqliteLedger
from vsphere_proxy.model import Inventory, Proxy
from vsphere_proxy.proxies import resolve_proxies
from vsphere_proxy.selection import Selected, select_vms
from vsphere_proxy.tiers import TierTable, tier_table


@dataclass(frozen=True)
class JobSetup:
    """A job as the configuration and vCenter's inventory define it, before it runs."""

    selected: list[Selected]
    proxies: list[Proxy]
    table: TierTable
    job: Job
    disk_notes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # VM -> disks left out, why
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # VM -> why its attempts fail at once

    def without(self, why: dict[str, str]) -> JobSetup:
        """The job with the named VMs skipped, each with its reason."""
        selected = [dataclasses.replace(s, skip=why[s.vm.name]) if s.vm.name in why and not s.skip else s
                    for s in self.selected]
        job = dataclasses.replace(self.job, vms=tuple(vm for vm in self.job.vms if vm.name not in why))
        return dataclasses.replace(self, selected=selected, job=job)


def build_job(config: Config, inventory: Inventory, job_id: str | None = None) -> JobSetup:
    """Resolve the proxies, select the VMs (skips keep their reason), compute the tiers: the job to run."""
    try:
        proxies = resolve_proxies(config.job_proxies(), inventory)
    except ConfigError as e:
        raise BadJob(str(e)) from None
    policy = config.job.policy
    selected = []
    notes: dict[str, tuple[str, ...]] = {}
    refused: dict[str, str] = {}
    for s in select_vms(inventory, config.job.select, {p.name for p in proxies}):
        if not s.skip:  # the disks the job reads: independent ones and excluded ones left out, with the reason
            choice = choose_disks(s.vm, policy.independent_disks, policy.exclude_disks)
            s = dataclasses.replace(s, vm=choice.vm, skip=choice.empty)
            if choice.notes:
                notes[s.vm.name] = choice.notes
            if choice.refused:
                refused[s.vm.name] = choice.refused
        selected.append(s)
    table = tier_table((s.vm for s in selected if not s.skip), proxies, inventory)
    job = Job(job_id or config.job.name, tuple(WorkVM.from_vm(s.vm) for s in selected if not s.skip), table,
              tuple(proxies), policy.to_policy())
    return JobSetup(selected, proxies, table, job, notes, refused)


def new_job_id(name: str) -> str:
    return f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def vm_key(config: Config, moref: str) -> str:
    """A VM's identity across jobs: the vCenter it lives in and its managed object id."""
    return f"{urlsplit(config.vcenter.url).netloc}/{moref}"


def claim_vms(catalog: Catalog, config: Config, job_id: str, setup: JobSetup, keep_alive: Callable[[], object],
              sleep: Callable[[float], None] = time.sleep) -> tuple[JobSetup, list[tuple[str, str]]]:
    """Claim the job's VMs; a VM another live job is backing up is skipped ("being backed up by job X"), or
    waited for first when the policy says `on_busy: wait`. Returns the job without them, and them."""
    policy = config.job.policy
    keys = {vm_key(config, s.vm.moref): s.vm.name for s in setup.selected if not s.skip}
    busy = catalog.claim_vms(job_id, keys)
    deadline = time.monotonic() + policy.busy_wait_seconds
    while busy and policy.on_busy == "wait" and time.monotonic() < deadline:
        sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        keep_alive()
        busy = catalog.claim_vms(job_id, {k: keys[k] for k in busy})
    if not busy:
        return setup, []
    why = {keys[k]: f"being backed up by job {other}" for k, other in busy.items()}
    return setup.without(why), sorted(why.items())


def job_ledger(config: Config) -> SqliteLedger:
    """The embedded engine's ledger of a job (backup or restore): the file every job of this host naming it
    shares (`repository.ledger`, default `RepositoryConfig.ledger_path`), its leases as long as the job's."""
    if config.repository is None:
        raise BadJob("repository: not configured; the ledger lives beside its catalog")
    path = config.repository.ledger_path()
    try:
        if path.parent == state_home():  # the default of a catalog on a server: made on first use
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return SqliteLedger(path, ttl=config.job.policy.lease_seconds)
    except OSError as e:
        raise BadJob(f"repository.ledger: {path.parent}: cannot create it ({e.strerror})") from None
    except LedgerUnavailable as e:
        raise BadJob(f"repository.ledger: {e}") from None


def throttles(config: Config) -> dict[str, float]:
    """proxy -> the most bytes per second one of its streams may read (proxies[].stream_mb_s)."""
    return {pc.name: pc.stream_mb_s * 1_000_000 for pc in config.proxies if pc.stream_mb_s}
