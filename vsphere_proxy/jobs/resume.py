"""Taking over a job whose coordinator stopped (`backup --resume JOB`): what it left in the catalog (`Earlier`).
VMs backed up stay done and are not read again; the others are backed up in the round the job had reached,
their attempts numbered on."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from vsphere_proxy.catalog import Catalog, JobRow, VmState
from vsphere_proxy.config import Config
from vsphere_proxy.coordinator import JobReport, VmOutcome, VmStatus
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.setup import JobSetup


@dataclass(frozen=True)
class Earlier:
    """What a stopped coordinator left of a job in the catalog."""

    job_id: str
    done: dict[str, VmOutcome]
    ends: tuple[AttemptEnd, ...]
    attempts: dict[str, int]
    round: int
    rounds: frozenset[int]
    vms: frozenset[str]  # the job's VMs as its first coordinator selected them (empty: unknown)

    @staticmethod
    def check(catalog: Catalog, job_id: str, config: Config, engine: str) -> JobRow:
        """The job, if this configuration and engine may take it over; a one-line CommandError otherwise."""
        job = catalog.job(job_id)
        if job is None:
            raise BadJob(f"--resume: job {job_id!r} is not in the catalog")
        if job.status not in ("running", "interrupted"):
            raise BadJob(f"--resume: job {job_id} already ended ({job.status}); nothing to take over")
        if catalog.live(job_id):
            lease = catalog.lease(job_id)
            holder = lease.holder if lease is not None else "?"
            raise BadJob(f"--resume: job {job_id} is still running (its coordinator {holder} holds its "
                         "lease); only a stopped job can be taken over")
        if job.name != config.job.name:
            raise BadJob(f"--resume: job {job_id} is a run of job {job.name!r}, not of {config.job.name!r}")
        if job.engine != engine:
            raise BadJob(f"--engine: job {job_id} runs on the {job.engine} engine (got {engine!r})")
        return job

    @classmethod
    def load(cls, catalog: Catalog, job_id: str, config: Config, engine: str) -> Earlier:
        job = cls.check(catalog, job_id, config, engine)
        states = catalog.states(job_id)
        attempts: Counter[str] = Counter()
        done: dict[str, VmOutcome] = {}
        ends: dict[str, AttemptEnd] = {}
        rounds = set()
        for r in catalog.results(job_id):
            attempts[r.vm] = max(attempts[r.vm], r.attempt)
            rounds.add(r.round)
            if r.status == "done":
                done[r.vm] = VmOutcome(r.vm, VmStatus.DONE, r.proxy, r.mode, None, None, r.round, r.attempt,
                                       0, "", r.fell_back)
                ends[r.vm] = AttemptEnd(r.vm, r.attempt, r.round, r.proxy or "", r.mode or "", True, "",
                                        r.bytes_read, r.bytes_written, r.seconds, r.point_id, ())
        for st in states.values():
            attempts[st.vm] = max(attempts[st.vm], st.attempts)
            if st.status == "done" and st.vm not in done:
                done[st.vm] = VmOutcome(st.vm, VmStatus.DONE, st.proxy, st.mode, None, None, st.round, st.attempts,
                                        0, "", "")
        round_reached = max([job.rounds, *(st.round for st in states.values()), 1])
        return cls(job_id, done, tuple(ends.values()), dict(attempts), round_reached, frozenset(rounds),
                   frozenset(states))

    def done_states(self) -> list[VmState]:
        """The VMs done before, as the job's state (the stopped coordinator may not have recorded them)."""
        return [VmState(o.vm, "done", o.round, o.attempts, o.proxy, o.mode) for o in self.done.values()]

    def remaining(self, setup: JobSetup) -> JobSetup:
        """The job without the VMs already backed up (and, when known, only the VMs it started with)."""

        def keep(name: str) -> bool:
            return name not in self.done and (not self.vms or name in self.vms)

        vms = tuple(vm for vm in setup.job.vms if keep(vm.name))
        selected = [s for s in setup.selected if s.skip or keep(s.vm.name)]
        policy = dataclasses.replace(setup.job.policy, max_streams=setup.job.limit)  # the whole job's limit
        return dataclasses.replace(setup, selected=selected,
                                   job=dataclasses.replace(setup.job, vms=vms, policy=policy))

    def merged(self, report: JobReport) -> JobReport:
        """The taken-over coordinator's report with the VMs done before it."""
        outcomes = tuple(sorted([*self.done.values(), *report.vms], key=lambda o: o.vm))
        done = sum(1 for o in outcomes if o.status is VmStatus.DONE)
        status = report.status
        if status != "running":
            status = "complete" if done == len(outcomes) else "partial" if done else "failed"
        return dataclasses.replace(report, status=status, vms=outcomes, rounds=max(report.rounds, self.round))
