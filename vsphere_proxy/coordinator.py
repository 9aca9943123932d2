"""The coordinator: a job's rounds driven one event at a time through the patent's blocks (DESIGN §4).

Pure and event-driven. An engine (embedded threads, Celery workers, the simulator) calls `start()`, then
`on_disk_done`, `on_complete`, `on_proxy_down` as things happen, and executes the `Assignment`s each call
returns. The coordinator never sleeps, polls or does I/O; the `Ledger` is the only state it shares with other
jobs. When another job releases streams, the engine calls `on_released()` to let this job use them. Engines
that drive several coordinators from several threads serialize the calls per coordinator; the ledger makes the
limits hold across coordinators (proxy limit and datastore threshold are checked and taken atomically).

The executor's side of the contract: every `Assignment` names one disk of one VM attempt to read on one stream.
Report each disk read with `on_disk_done` (the same stream may be handed the VM's next disk), and end the
attempt with `on_complete(vm, ok, error)`; a failed attempt strands the VM until the next round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol

from vsphere_proxy.ledger import Ledger, Stream
from vsphere_proxy.model import VM, Proxy
from vsphere_proxy.scheduler import (
    DEFAULT_FORMULA,
    PriorityEntry,
    datastore_score,
    eligible_proxies,
    max_streams,
    next_available_proxy,
    pick_vm,
    priority_list,
    threshold_for,
)
from vsphere_proxy.tiers import LAST_TIER, Tier, TierTable, allowed_tier
from vsphere_proxy.units import human_size

__all__ = [
    "Assignment",
    "Coordinator",
    "Decision",
    "DiskStreams",
    "Job",
    "JobReport",
    "Policy",
    "RoundState",
    "VmOutcome",
    "VmStatus",
    "WorkDisk",
    "WorkVM",
]


class DiskStreams(StrEnum):
    AUTO = "auto"  # spare job streams read further disks of running VMs
    OFF = "off"  # one stream per VM


@dataclass(frozen=True, slots=True)
class Policy:
    """A job's storage policy: the limits and knobs of its scheduling."""

    max_streams: int | None = None  # job limit; None = 2 x distinct datastores in the job
    threshold: int = 1  # datastore score a VM must be below; 1 = only idle datastores
    datastore_cap: int = 4  # the threshold is never raised past this: streams per datastore, all jobs
    disk_streams: DiskStreams = DiskStreams.AUTO
    rounds: int = int(LAST_TIER)  # round k admits tiers <= k; after the last round leftovers are reported
    formula: Callable[[Proxy], int] = DEFAULT_FORMULA  # per-proxy stream limit

    def __post_init__(self) -> None:
        if self.max_streams is not None and self.max_streams < 1:
            raise ValueError(f"max_streams: must be 1 or more (got {self.max_streams})")
        if self.threshold < 1:
            raise ValueError(f"threshold: must be 1 or more (got {self.threshold})")
        if self.datastore_cap < self.threshold:
            raise ValueError(f"datastore_cap: must be >= threshold {self.threshold} (got {self.datastore_cap})")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be 1 or more (got {self.rounds})")


@dataclass(frozen=True, slots=True)
class WorkDisk:
    index: int
    bytes: int
    datastore: str


@dataclass(frozen=True, slots=True)
class WorkVM:
    """A VM as the scheduler sees it: a name and the disks to read."""

    name: str
    disks: tuple[WorkDisk, ...]

    @property
    def datastores(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.datastore for d in self.disks))

    @property
    def total_bytes(self) -> int:
        return sum(d.bytes for d in self.disks)

    @classmethod
    def from_vm(cls, vm: VM) -> WorkVM:
        """The disks a backup reads (`VM.backup_disks`), indexed in that order."""
        return cls(vm.name, tuple(WorkDisk(i, d.capacity_bytes, d.datastore) for i, d in enumerate(vm.backup_disks)))


@dataclass(frozen=True)
class Job:
    id: str
    vms: tuple[WorkVM, ...]
    table: TierTable
    proxies: tuple[Proxy, ...]
    policy: Policy = field(default_factory=Policy)

    @cached_property
    def limit(self) -> int:
        """The job limit: the policy's max_streams, by default 2 x the distinct datastores of the job (computed
        once: the scheduler asks on every pass)."""
        if self.policy.max_streams is not None:
            return self.policy.max_streams
        return max(1, 2 * len({ds for vm in self.vms for ds in vm.datastores}))


@dataclass(frozen=True, slots=True)
class Assignment:
    """Read one disk of one VM attempt on one stream of one proxy."""

    job: str
    vm: str
    proxy: str
    mode: str
    tier: Tier
    round: int
    attempt: int
    stream: str
    disk: int
    disk_count: int
    opens: bool  # first assignment of the attempt: the executor prepares the VM (snapshot)
    extra: bool  # a disk stream beside the VM's first stream
    datastore_score: int | None  # at assignment (None when the strategy ignores datastores)
    threshold: int | None  # the threshold then in force
    reason: str


class VmStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    STRANDED = "stranded"  # waits for the next round
    DONE = "done"
    FAILED = "failed"  # stranded after the last round
    UNPROTECTED = "unprotected"  # no proxy can reach it in any tier


@dataclass(frozen=True, slots=True)
class Decision:
    """One scheduling verdict with its reason: what `plan --explain` and the report print."""

    seq: int
    round: int
    verdict: str  # assign | disk-stream | skip | raise | wait | strand | done | round | proxy-down | job ...
    vm: str | None
    proxy: str | None
    reason: str
    scores: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class VmOutcome:
    vm: str
    status: VmStatus
    proxy: str | None
    mode: str | None
    tier: Tier | None
    best_tier: Tier | None
    round: int
    attempts: int
    bytes: int
    error: str
    fell_back: str  # "fell back from san to nbd: ..." when backed up below its best tier


@dataclass(frozen=True)
class JobReport:
    job: str
    status: str  # running | complete | partial | failed | interrupted
    rounds: int
    limit: int
    threshold_raises: int
    vms: tuple[VmOutcome, ...]
    strategy: str

    def count(self, status: VmStatus) -> int:
        return sum(1 for v in self.vms if v.status is status)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job, "status": self.status, "rounds": self.rounds, "job_limit": self.limit,
            "threshold_raises": self.threshold_raises, "strategy": self.strategy,
            "counts": {s.value: self.count(s) for s in VmStatus if self.count(s)},
            "vms": [{"vm": v.vm, "status": v.status.value, "proxy": v.proxy, "mode": v.mode,
                     "tier": int(v.tier) if v.tier else None, "round": v.round, "attempts": v.attempts,
                     "bytes": v.bytes, "error": v.error, "fell_back": v.fell_back} for v in self.vms],
        }


@dataclass(slots=True)
class _Run:
    """The coordinator's mutable record of one VM."""

    vm: WorkVM
    status: VmStatus = VmStatus.PENDING
    attempts: int = 0
    round: int = 0
    proxy: str | None = None
    mode: str | None = None
    tier: Tier | None = None
    streams: dict[str, int] = field(default_factory=dict)  # stream id -> disk being read
    opened: int = 0  # streams opened this attempt (for ids)
    todo: list[int] = field(default_factory=list)  # disks not started, largest first
    error: str = ""


@dataclass(slots=True)
class RoundState:
    """One round's scratch (US 9563514 FIG. 3 within a round of FIG. 6): written when the round begins, changed
    only by `take` (a VM leaves the pending ones) and the threshold methods, read by the strategies.

    The priority list in the strategy's order; the VMs no longer pending; per proxy, how many pending VMs it is
    eligible for and those VMs in list order; the datastore threshold in force, from the policy's baseline.
    """

    number: int  # the round: 1 admits each VM's best tier, k every tier <= k
    baseline: int  # the policy's threshold: where the threshold is when the round begins and returns to
    threshold: int
    plist: list[PriorityEntry] = field(default_factory=list)
    started: set[str] = field(default_factory=set)  # VMs of the round no longer pending
    eligible_count: Counter[str] = field(default_factory=Counter)  # pending VMs each proxy is eligible for
    recheck: bool = False  # pending VMs may have lost every proxy that can serve them
    _by_proxy: dict[str, list[PriorityEntry]] = field(default_factory=dict)
    _compacted: dict[str, int] = field(default_factory=dict)

    @classmethod
    def begin(cls, number: int, plist: list[PriorityEntry], baseline: int) -> RoundState:
        """Round `number` over `plist`, every VM pending, the threshold at its baseline; its VMs are checked
        for a proxy that can serve them before anything starts."""
        by_proxy: dict[str, list[PriorityEntry]] = {}
        for entry in plist:
            for proxy in entry.eligible:
                if proxy in by_proxy:
                    by_proxy[proxy].append(entry)
                else:
                    by_proxy[proxy] = [entry]
        counts = Counter({proxy: len(entries) for proxy, entries in by_proxy.items()})
        return cls(number, baseline, baseline, plist, set(), counts, True, by_proxy, {})

    @property
    def pending(self) -> int:
        """How many VMs of the round are still pending."""
        return len(self.plist) - len(self.started)

    def take(self, entry: PriorityEntry) -> None:
        """`entry` is no longer pending: started, or stranded before it could start."""
        self.started.add(entry.vm)
        counts = self.eligible_count
        for proxy in entry.eligible:
            counts[proxy] -= 1

    def pending_entries(self) -> Iterator[PriorityEntry]:
        started = self.started
        return (e for e in self.plist if e.vm not in started)

    def pending_for(self, proxy: str) -> list[PriorityEntry]:
        """The priority list restricted to VMs `proxy` is eligible for; started ones may remain (callers skip
        them), dropped once they are more than half of the list."""
        entries = self._by_proxy.get(proxy, [])
        if len(self.started) - self._compacted.get(proxy, 0) > len(entries) // 2:
            entries = self._by_proxy[proxy] = [e for e in entries if e.vm not in self.started]
            self._compacted[proxy] = len(self.started)
        return entries

    def raise_to(self, threshold: int) -> int:
        """Raise the threshold (US 9563514 FIG. 3 block 312); the number of steps it went up."""
        steps = threshold - self.threshold
        self.threshold = threshold
        return steps

    def reset_threshold(self) -> None:
        """A stream was released: the threshold returns to its baseline (US 9563514 FIG. 3)."""
        self.threshold = self.baseline


@dataclass(frozen=True, slots=True)
class Choice:
    """A strategy's answer: start `entry` on `proxy`, under `threshold` (None when the strategy ignores
    datastores; above the round's when every VM the proxy can back up was over it)."""

    proxy: Proxy
    entry: PriorityEntry
    threshold: int | None
    score: int | None
    why: str


class Strategy(Protocol):
    """How the next (proxy, VM) pair of a round is chosen. The patent's is the product's; the others are the
    baselines the simulator compares it with."""

    name: str
    uses_datastore_score: bool

    def order(self, entries: Iterable[PriorityEntry]) -> list[PriorityEntry]: ...

    def choose(self, c: Coordinator, tried: set[str]) -> Choice | None: ...


class PatentStrategy:
    """US 9563514 FIG. 3: next available proxy (lowest utilization), then the first VM of the priority list it
    is eligible for whose datastore score is below the threshold (raised when every such VM is over it)."""

    name = "scheduler"
    uses_datastore_score = True

    def order(self, entries: Iterable[PriorityEntry]) -> list[PriorityEntry]:
        return priority_list(entries)

    def choose(self, c: Coordinator, tried: set[str]) -> Choice | None:
        while True:
            proxy = next_available_proxy(c.candidates(tried), c.ledger, c.limits)
            if proxy is None:
                return None
            pick = pick_vm(proxy.name, c.pending_for(proxy.name), c.ledger, c.threshold, c.job.policy.datastore_cap,
                           skip=c.started, explain=c.explain)
            if c.explain:
                for vm, why in pick.skipped:
                    c.record("skip", vm, proxy.name, why)
            if pick.entry is None:
                tried.add(proxy.name)
                continue
            active, limit = c.ledger.proxy_active(proxy.name), c.limits[proxy.name]
            why = (f"{proxy.name} next available ({active}/{limit} streams); first VM in the priority list it can "
                   f"back up ({len(pick.entry.eligible)} eligible proxies, {human_size(pick.entry.total_bytes)}); "
                   f"datastore score {pick.score} < threshold {pick.threshold}")
            return Choice(proxy, pick.entry, pick.threshold, pick.score, why)


class _Baseline:
    """What the baselines share: VMs in job order, no datastore score."""

    uses_datastore_score = False

    def order(self, entries: Iterable[PriorityEntry]) -> list[PriorityEntry]:
        return list(entries)


class LeastLoadedStrategy(_Baseline):
    """Baseline: VMs in job order, each to its least utilized eligible proxy; no priority list, no datastore
    score."""

    name = "least-loaded"

    def choose(self, c: Coordinator, tried: set[str]) -> Choice | None:
        free = {p.name for p in c.candidates(tried)}
        for entry in c.pending() if free else ():
            proxy = next_available_proxy((c.proxy(n) for n in sorted(free.intersection(entry.eligible))),
                                         c.ledger, c.limits)
            if proxy is not None:
                return Choice(proxy, entry, None, None, f"{proxy.name} least loaded of {entry.vm}'s proxies")
        return None


class RoundRobinStrategy(_Baseline):
    """Baseline: VMs in job order, each to the next proxy in rotation that it is eligible for and that has a
    free stream."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, c: Coordinator, tried: set[str]) -> Choice | None:
        free = {p.name for p in c.candidates(tried)}
        ring = c.proxy_names
        for entry in c.pending() if free else ():
            for step in range(len(ring)):
                name = ring[(self._next + step) % len(ring)]
                if name in free and name in entry.eligible:
                    self._next = (self._next + step + 1) % len(ring)
                    return Choice(c.proxy(name), entry, None, None, f"{name} next in rotation")
        return None


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "scheduler": PatentStrategy,
    "round-robin": RoundRobinStrategy,
    "least-loaded": LeastLoadedStrategy,
}


class Coordinator:
    """Runs one job against a shared ledger (US 9563514 FIG. 3 and the rounds of FIG. 6)."""

    def __init__(self, job: Job, ledger: Ledger, *, strategy: Strategy | None = None, explain: bool = False) -> None:
        self.job = job
        self.ledger = ledger
        self.strategy: Strategy = strategy or PatentStrategy()
        self.explain = explain
        self.decisions: list[Decision] = []
        self.limits = {p.name: max_streams(p, job.policy.formula) for p in job.proxies}
        self._proxies = {p.name: p for p in job.proxies}
        self.proxy_names = sorted(self._proxies)
        names = [vm.name for vm in job.vms]
        if len(set(names)) != len(names):
            dup = next(n for n, k in Counter(names).items() if k > 1)
            raise ValueError(f"vms: {dup!r} appears twice in job {job.id}")
        self._runs = {vm.name: _Run(vm) for vm in job.vms}
        self._down: dict[str, str] = {p.name: f"down: {p.down_reason}" if p.down_reason else "down"
                                      for p in job.proxies if not p.alive}
        self._round = RoundState(0, job.policy.threshold, job.policy.threshold)
        self.threshold_raises = 0
        self._started = False
        self._finished = False
        self._ended_as = ""  # the job's status when it was ended before its rounds (`abort`)
        self._waiting = ""

    # ---- the engine's API -------------------------------------------------------------------------------

    def start(self) -> list[Assignment]:
        """Begin round 1 and return the first assignments."""
        if self._started:
            raise RuntimeError(f"job {self.job.id} already started")
        self._started = True
        for run in self._runs.values():
            if not run.vm.disks:
                self._set(run, VmStatus.UNPROTECTED, "no disk to back up")
            elif self.job.table.best_tier(run.vm.name) is None:
                self._set(run, VmStatus.UNPROTECTED, self._no_proxy_reason(run.vm.name, None))
            else:
                run.status = VmStatus.STRANDED  # so that round 1 picks it up
        self._begin_round()
        return self.schedule()

    def schedule(self) -> list[Assignment]:
        """Start whatever can start now (US 9563514 FIG. 3); call it when streams were released elsewhere."""
        out: list[Assignment] = []
        while self._started and not self._finished:
            if self._round.recheck:
                self._strand_unreachable()
            out += self.run_round()
            if self._round.pending or any(r.status is VmStatus.RUNNING for r in self._runs.values()):
                break
            if not self._begin_round():
                self._finish()
        return out

    def on_released(self) -> list[Assignment]:
        """Streams were released by another job: the threshold is back to its baseline, then schedule."""
        self._round.reset_threshold()
        return self.schedule()

    def on_disk_done(self, vm: str, disk: int, attempt: int | None = None) -> list[Assignment]:
        """A stream finished reading `disk`: it goes on with the VM's next disk, or is released."""
        run = self._live(vm, attempt)
        if run is None:
            return []
        stream = next((s for s, d in run.streams.items() if d == disk), None)
        if stream is None:
            return []
        if run.todo:
            nxt = run.todo.pop(0)
            run.streams[stream] = nxt
            self._narrow(run)
            return [self._assignment(run, stream, nxt, opens=False, extra=False, score=None, threshold=None,
                                     reason=f"{stream} goes on with disk {nxt}")]
        del run.streams[stream]
        self._release(stream)
        self._narrow(run)
        return self.schedule()

    def on_complete(self, vm: str, ok: bool, error: str = "", attempt: int | None = None, *,
                    final: bool = False) -> list[Assignment]:
        """The attempt ended: success removes the VM from the job, failure strands it until the next round, or
        with `final` fails it for the whole job at once (nothing can change in a later round)."""
        run = self._live(vm, attempt)
        if run is None:
            return []
        self._drop_streams(run)
        if ok:
            self._set(run, VmStatus.DONE, f"backed up by {run.proxy} ({run.mode}) in round {self.round}")
        elif final:
            run.error = error or "failed"
            self._set(run, VmStatus.FAILED, f"attempt {run.attempts} on {run.proxy} failed, not retried: "
                                            f"{run.error}")
        else:
            run.error = error or "failed"
            self._set(run, VmStatus.STRANDED, f"attempt {run.attempts} on {run.proxy} failed: {run.error}")
        return self.schedule()

    def on_proxy_down(self, proxy: str, reason: str = "") -> list[Assignment]:
        """A proxy stopped answering: its VMs are stranded, its streams released, it takes nothing more."""
        why = f"proxy {proxy} down" + (f": {reason}" if reason else "")
        self._down[proxy] = f"down: {reason}" if reason else "down"
        self.record("proxy-down", None, proxy, why)
        for run in self._runs.values():
            if run.status is VmStatus.RUNNING and run.proxy == proxy:
                self._drop_streams(run)
                run.error = why
                self._set(run, VmStatus.STRANDED, why)
        self._round.recheck = True
        return self.schedule()

    def on_proxy_up(self, proxy: str) -> list[Assignment]:
        if self._down.pop(proxy, None) is not None:
            self.record("proxy-up", None, proxy, f"proxy {proxy} is back")
        return self.schedule()

    def abort(self, reason: str, *, status: str = "failed") -> None:
        """End the job now, whatever its rounds: every VM not backed up is failed with `reason` (its streams
        released). `status` is the job's ("failed" after a fault, "interrupted" after a signal)."""
        if self._finished:
            return
        for run in self._runs.values():
            if run.status in (VmStatus.DONE, VmStatus.UNPROTECTED, VmStatus.FAILED):
                continue
            self._drop_streams(run)
            run.error = reason
            self._set(run, VmStatus.FAILED, reason)
        self._finished = True
        self._ended_as = status
        self.record("job", None, None, f"job {status}: {reason}")

    @property
    def done(self) -> bool:
        return self._finished

    def running(self) -> list[tuple[str, str, int]]:
        """(stream, vm, disk) of every stream this job holds."""
        return [(s, r.vm.name, d) for r in self._runs.values() for s, d in r.streams.items()]

    def carry_over(self, attempts: Mapping[str, int], round_number: int) -> None:
        """Take a job over from a coordinator that stopped: attempts go on from the numbers it reached (stream ids
        stay unique) and the first round is the one it was in."""
        if self._started:
            raise RuntimeError(f"job {self.job.id} already started")
        for vm, n in attempts.items():
            if vm in self._runs:
                self._runs[vm].attempts = n
        baseline = self.job.policy.threshold
        self._round = RoundState(max(0, round_number - 1), baseline, baseline)

    def outcome(self, vm: str) -> VmOutcome:
        run = self._runs[vm]
        best = self.job.table.best_tier(run.vm.name)
        fell_back = ""
        if run.status is VmStatus.DONE and best is not None and run.tier is not None and run.tier > best:
            fell_back = f"fell back from {best.label} to {run.tier.label}: {self._why_not_better(run, best)}"
        error = "" if run.status is VmStatus.DONE else run.error
        return VmOutcome(run.vm.name, run.status, run.proxy, run.mode, run.tier, best, run.round,
                         run.attempts, run.vm.total_bytes, error, fell_back)

    def report(self) -> JobReport:
        outcomes = [self.outcome(name) for name in self._runs]
        statuses = Counter(o.status for o in outcomes)
        if not self._finished:
            status = "running"
        elif self._ended_as:
            status = self._ended_as
        elif statuses[VmStatus.DONE] == len(outcomes):
            status = "complete"
        elif statuses[VmStatus.DONE]:
            status = "partial"
        else:
            status = "failed"
        return JobReport(self.job.id, status, self.round, self.job.limit, self.threshold_raises,
                         tuple(outcomes), self.strategy.name)

    # ---- read by strategies --------------------------------------------------------------------------------

    def proxy(self, name: str) -> Proxy:
        return self._proxies[name]

    def candidates(self, tried: set[str]) -> list[Proxy]:
        """Proxies alive, not tried in this pass, eligible for a pending VM and below their stream limit."""
        out = []
        down, counts, limits, ledger = self._down, self._round.eligible_count, self.limits, self.ledger
        for name in self.proxy_names:
            if name in tried or name in down or counts[name] <= 0:
                continue
            if ledger.proxy_active(name) < limits[name]:
                out.append(self._proxies[name])
        return out

    @property
    def round(self) -> int:
        return self._round.number

    @property
    def threshold(self) -> int:
        """The datastore threshold in force (US 9563514 FIG. 3)."""
        return self._round.threshold

    @property
    def started(self) -> set[str]:
        """VMs of the current round no longer pending."""
        return self._round.started

    @property
    def priority(self) -> list[PriorityEntry]:
        """The current round's list in the strategy's order (the priority list, for the patent's)."""
        return list(self._round.plist)

    def pending(self) -> Iterable[PriorityEntry]:
        return self._round.pending_entries()

    def pending_for(self, proxy: str) -> list[PriorityEntry]:
        """The round's priority list restricted to VMs `proxy` is eligible for (started ones are skipped)."""
        return self._round.pending_for(proxy)

    def record(self, verdict: str, vm: str | None, proxy: str | None, reason: str,
               scores: Sequence[tuple[str, int]] = ()) -> None:
        self.decisions.append(Decision(len(self.decisions), self.round, verdict, vm, proxy, reason, tuple(scores)))

    # ---- the blocks ----------------------------------------------------------------------------------------

    def run_round(self) -> list[Assignment]:
        """One pass of the current round (US 9563514 FIG. 3, blocks 304-316): while the job has a free stream,
        take the next available proxy and the VM it should back up; then give spare streams to further disks."""
        out: list[Assignment] = []
        tried: set[str] = set()
        limit = self.job.limit
        while self._round.pending:
            if self.ledger.job_active(self.job.id) >= limit:
                self._wait(f"job limit reached: {limit} streams in use")
                break
            choice = self.strategy.choose(self, tried)
            if choice is None:
                self._wait(f"{self._round.pending} VMs wait for a free stream on their proxies")
                break
            run = self._runs[choice.entry.vm]
            stream = self._stream_id(run, run.attempts + 1)
            if not self.ledger.acquire(Stream(stream, self.job.id, choice.proxy.name, run.vm.datastores),
                                       self.limits[choice.proxy.name], choice.threshold):
                tried.add(choice.proxy.name)  # another job took its last stream, or a datastore, meanwhile
                continue
            if choice.threshold is not None and choice.threshold > self.threshold:
                self._raise_threshold(choice.entry.vm, choice.proxy.name, choice.threshold,
                                      f"every VM {choice.proxy.name} can back up is")
            out.append(self._open(run, choice, stream))
            self._waiting = ""
        if self.job.policy.disk_streams is DiskStreams.AUTO:
            out += self._disk_streams()
        return out

    def _open(self, run: _Run, choice: Choice, stream: str) -> Assignment:
        name = run.vm.name
        self._round.take(choice.entry)
        c = self.job.table.get(name, choice.proxy.name)
        assert c is not None and c.tier is not None and c.mode is not None
        run.status, run.attempts, run.round = VmStatus.RUNNING, run.attempts + 1, self.round
        run.proxy, run.mode, run.tier = choice.proxy.name, c.mode, c.tier
        run.opened = 1
        run.todo = [d.index for d in sorted(run.vm.disks, key=lambda d: (-d.bytes, d.index))]
        disk = run.todo.pop(0)
        run.streams = {stream: disk}
        self._narrow(run)
        reason = f"{choice.why}; {c.mode}: {c.reason}"
        scores = [("utilization_pct", 100 * (self.ledger.proxy_active(choice.proxy.name) - 1)
                   // max(1, self.limits[choice.proxy.name]))]
        if choice.score is not None and choice.threshold is not None:
            scores += [("datastore_score", choice.score), ("threshold", choice.threshold)]
        self.record("assign", name, choice.proxy.name, reason, scores)
        return self._assignment(run, stream, disk, opens=True, extra=False, score=choice.score,
                                threshold=choice.threshold, reason=reason)

    def _disk_streams(self) -> list[Assignment]:
        """Spare streams read further disks of running VMs on the same proxy, largest remaining work first."""
        spare = self.job.limit - self.ledger.job_active(self.job.id) - self._round.pending
        if spare <= 0:
            return []
        running = [r for r in self._runs.values() if r.status is VmStatus.RUNNING and r.todo]
        running.sort(key=lambda r: (-sum(r.vm.disks[i].bytes for i in r.todo), r.vm.name))
        out: list[Assignment] = []
        cap = self.job.policy.datastore_cap
        for run in running:
            while run.todo and spare > 0 and run.proxy not in self._down:
                assert run.proxy is not None
                score = threshold = None
                if self.strategy.uses_datastore_score:
                    score = datastore_score(run.vm.datastores, self.ledger)
                    threshold = threshold_for(score, self.threshold, cap)
                    if threshold is None:
                        break
                    if threshold > self.threshold:
                        self._raise_threshold(run.vm.name, run.proxy, threshold, "spare streams, every datastore")
                stream = self._stream_id(run, run.attempts, run.opened)
                if not self.ledger.acquire(Stream(stream, self.job.id, run.proxy, run.vm.datastores),
                                           self.limits[run.proxy], threshold):
                    break
                run.opened += 1
                disk = run.todo.pop(0)
                run.streams[stream] = disk
                self._narrow(run)
                spare -= 1
                reason = (f"{spare + 1} spare job streams over {self._round.pending} pending VMs: disk {disk} of "
                          f"{run.vm.name} on its own stream")
                self.record("disk-stream", run.vm.name, run.proxy, reason,
                            (("datastore_score", score), ("threshold", threshold))
                            if score is not None and threshold is not None else ())
                out.append(self._assignment(run, stream, disk, opens=False, extra=True, score=score,
                                            threshold=threshold, reason=reason))
        return out

    def _begin_round(self) -> bool:
        """The next round for the stranded VMs, with one more tier allowed (US 9563514 FIG. 6)."""
        stranded = [r for r in self._runs.values() if r.status is VmStatus.STRANDED]
        if not stranded or self.round >= self.job.policy.rounds:
            return False
        number, table, serving = self.round + 1, self.job.table, self._serving()
        entries = []
        for run in stranded:
            eligible = eligible_proxies(run.vm.name, number, table, serving=serving)
            entries.append(PriorityEntry(run.vm.name, eligible.names, run.vm.total_bytes, run.vm.datastores))
            run.status = VmStatus.PENDING
        self._round = RoundState.begin(number, self.strategy.order(entries), self.job.policy.threshold)
        what = "each VM's best tier" if self.round == 1 else f"tiers up to {Tier(min(self.round, LAST_TIER)).label}"
        self.record("round", None, None, f"round {self.round}: {len(entries)} VMs, {what}")
        return True

    def _strand_unreachable(self) -> None:
        """Pending VMs none of whose eligible proxies can take a stream are stranded now, with the reasons."""
        state, serving = self._round, self._serving()
        state.recheck = False
        for entry in state.pending_entries():  # `take` changes `started`, never the list walked
            if not serving.isdisjoint(entry.eligible):
                continue
            run = self._runs[entry.vm]
            state.take(entry)
            run.error = self._no_proxy_reason(entry.vm, self.round)
            self._set(run, VmStatus.STRANDED, run.error)

    def _finish(self) -> None:
        for run in self._runs.values():
            if run.status is VmStatus.STRANDED:
                self._set(run, VmStatus.FAILED, f"still stranded after round {self.round}: {run.error}")
        self._finished = True
        report = self.report()
        counts = ", ".join(f"{report.count(s)} {s.value}" for s in VmStatus if report.count(s))
        self.record("job", None, None, f"job {report.status} after {self.round} rounds: {counts}")

    # ---- helpers -------------------------------------------------------------------------------------------

    def _serving(self) -> frozenset[str]:
        """The job's proxies that can serve at all: not down, stream limit above 0 (what `eligible_proxies`
        is restricted to)."""
        return frozenset(p for p, limit in self.limits.items() if limit > 0 and p not in self._down)

    def _raise_threshold(self, vm: str, proxy: str, threshold: int, every: str) -> None:
        """Raise the round's threshold to `threshold` (US 9563514 FIG. 3 block 312), counted and explained."""
        was = self._round.threshold
        self.threshold_raises += self._round.raise_to(threshold)
        self.record("raise", vm, proxy, f"{every} over threshold {was}: raised to {threshold}",
                    (("threshold", threshold),))

    def _no_proxy_reason(self, vm: str, round_number: int | None) -> str:
        """'0/N proxies eligible: 2 no access, 1 down, ...' with the reasons counted (like a FitError)."""
        best = self.job.table.best_tier(vm)
        kinds: Counter[str] = Counter()
        for p in self.proxy_names:
            c = self.job.table.get(vm, p)
            if c is None or c.tier is None:
                kinds["no access"] += 1
            elif round_number is not None and best is not None and c.tier > allowed_tier(best, round_number):
                kinds[f"{c.mode} not before round {int(c.tier)}"] += 1
            elif p in self._down:
                kinds["down"] += 1
            elif self.limits.get(p, 0) <= 0:
                kinds["stream limit 0"] += 1
            else:
                kinds["eligible"] += 1
        detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"0/{len(self.proxy_names)} proxies eligible: {detail}"

    def _why_not_better(self, run: _Run, best: Tier) -> str:
        better = [c for c in self.job.table.for_vm(run.vm.name) if c.tier is not None and c.tier < (run.tier or 0)]
        parts = [f"{c.proxy} ({c.mode}) {self._down[c.proxy]}" for c in better if c.proxy in self._down]
        if run.error:
            parts.append(f"earlier attempt: {run.error}")
        return "; ".join(parts) or f"no {best.label} proxy took it by round {run.round}"

    def _live(self, vm: str, attempt: int | None) -> _Run | None:
        run = self._runs.get(vm)
        if run is None or run.status is not VmStatus.RUNNING:
            return None
        if attempt is not None and attempt != run.attempts:
            return None  # a late report from an attempt already stranded
        return run

    def _narrow(self, run: _Run) -> None:
        """A stream counts on the datastore it reads and on those of the VM's disks not started yet (any of its
        streams may go on with them); datastores it is done with stop counting."""
        ahead = {run.vm.disks[i].datastore for i in run.todo}
        for stream, disk in run.streams.items():
            self.ledger.narrow(stream, ahead | {run.vm.disks[disk].datastore})

    def _drop_streams(self, run: _Run) -> None:
        for stream in list(run.streams):
            self._release(stream)
        run.streams = {}
        run.todo = []

    def _release(self, stream: str) -> None:
        if self.ledger.release(stream) is not None:
            self._round.reset_threshold()

    def _set(self, run: _Run, status: VmStatus, reason: str) -> None:
        run.status = status
        verdict = {VmStatus.DONE: "done", VmStatus.STRANDED: "strand", VmStatus.FAILED: "failed",
                   VmStatus.UNPROTECTED: "unprotected"}.get(status, status.value)
        if status is VmStatus.UNPROTECTED:
            run.error = reason
        self.record(verdict, run.vm.name, run.proxy, reason)

    def _wait(self, why: str) -> None:
        if why != self._waiting:
            self._waiting = why
            self.record("wait", None, None, why)

    def _stream_id(self, run: _Run, attempt: int, n: int = 0) -> str:
        return f"{self.job.id}/{run.vm.name}/{attempt}/{n}"

    def _assignment(self, run: _Run, stream: str, disk: int, *, opens: bool, extra: bool, score: int | None,
                    threshold: int | None, reason: str) -> Assignment:
        assert run.proxy is not None and run.mode is not None and run.tier is not None
        return Assignment(self.job.id, run.vm.name, run.proxy, run.mode, run.tier, self.round, run.attempts, stream,
                          disk, len(run.vm.disks), opens, extra, score, threshold, reason)
