"""The distributed engine: the same `Coordinator`, its assignments sent as Celery tasks to the proxies' queues,
its events read from what the proxy workers report (DESIGN §6).

The loop reads the job's event list in Redis (each stream's result, and attempts a worker ended by itself) and
turns each into the coordinator's events, exactly as the embedded engine does with its threads' results. Between
events it watches the fleet: a proxy whose heartbeat is gone is down (its running VMs are cleaned up through
`on_proxy_lost`, then stranded by `on_proxy_down` and re-planned in a later round); one that comes back is up
again. It renews the leases of its streams on live proxies (a stream still queued has no worker to renew it),
and, when streams were released anywhere (another job), lets the coordinator use them (`on_released`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vsphere_proxy.coordinator import Assignment, Coordinator, JobReport
from vsphere_proxy.engine.embedded import describe
from vsphere_proxy.engine.events import AttemptEnd, Stop, StreamResult
from vsphere_proxy.engine.protocol import JobObserver, Observer
from vsphere_proxy.engine.worker import assignment_from_json, assignment_to_json, events_key, heartbeat_key

log = logging.getLogger(__name__)


class FleetLedger(Protocol):
    """The ledger as this engine needs it (`RedisLedger`)."""

    def renew_streams(self, stream_ids: list[str]) -> set[str]: ...

    def releases(self) -> int: ...


@dataclass
class DispatchStats:
    """Per assignment: the coordinator's time to decide it (all its calls, Redis ledger round trips included,
    over the assignments they made) and the time from sending it to a worker starting it."""

    assignments: int = 0
    decide_s: float = 0.0  # time inside coordinator calls
    queue_ms: list[float] = field(default_factory=list)  # sent -> started on the worker

    def to_json(self) -> dict[str, Any]:
        return {"assignments": self.assignments,
                "decide_ms_mean": round(1000 * self.decide_s / self.assignments, 3) if self.assignments else None,
                "queue_ms_mean": round(sum(self.queue_ms) / len(self.queue_ms), 3) if self.queue_ms else None}


class CeleryEngine:
    def __init__(self, send: Callable[[dict[str, Any], str], Any], ledger: FleetLedger, bus: Any, *,
                 job_context: Mapping[str, Any], tick: float = 0.2, watch_every: float = 1.0,
                 stall_seconds: float = 300.0, grace: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.send = send  # (payload, proxy): queue the stream on the proxy's worker
        self.ledger = ledger
        self.bus = bus  # redis.Redis: blpop, exists
        self.job_context = dict(job_context)
        self.tick = tick
        self.watch_every = watch_every
        self.stats = DispatchStats()
        self.stall_seconds = stall_seconds  # the watchdog: no event for this long while nothing runs ends the job
        self.grace = grace  # how long an ending job waits for the workers to end its attempts
        self.clock = clock
        self.stopped: Stop | None = None
        self._stop: Stop | None = None

    def stop(self, reason: str, status: str = "interrupted") -> None:
        """End the running job as soon as possible (safe from a signal handler: it only records)."""
        if self._stop is None:
            self._stop = Stop(reason, status)

    def run(self, coordinator: Coordinator, observer: JobObserver | None = None) -> JobReport:
        obs: JobObserver = observer or Observer()
        job = coordinator.job.id
        key = events_key(job)
        open_attempts: dict[str, Assignment] = {}  # vm -> the opening assignment of its running attempt
        down: set[str] = set()

        def submit(assignments: list[Assignment], spent: float) -> None:
            self.stats.decide_s += spent
            self.stats.assignments += len(assignments)
            if assignments:  # before sending: a successor numbers attempts on
                obs.states_changed(coordinator, {a.vm for a in assignments})
            for a in assignments:
                if a.opens:
                    open_attempts[a.vm] = a
                    obs.assignment_started(a)
                payload = {"assignment": assignment_to_json(a), "job": self.job_context, "sent": time.time()}
                self.send(payload, a.proxy)

        def call(fn: Callable[..., list[Assignment]], *args: Any, **kwargs: Any) -> None:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            submit(out, time.perf_counter() - t)

        def ended(end: AttemptEnd) -> None:
            current = open_attempts.get(end.vm)
            if current is None or current.attempt != end.attempt:
                return  # late: that attempt was stranded already (its proxy went down)
            del open_attempts[end.vm]
            moved[0] = self.clock()
            if end.fault:
                self.stop(end.fault, "failed")
            call(coordinator.on_complete, end.vm, end.ok, end.error, attempt=end.attempt, final=end.final)
            obs.attempt_ended(end)  # after the coordinator took it in: the VM's new state is readable
            obs.states_changed(coordinator, [end.vm])

        def handle(event: Mapping[str, Any]) -> None:
            if event.get("kind") == "progress":
                current = open_attempts.get(event["vm"])
                if current is not None and current.attempt == event["attempt"]:
                    obs.block_read(event["vm"], int(event["disk"]), int(event["position"]))
                return
            if event.get("kind") == "end":
                ended(AttemptEnd.from_json(event["end"]))
                return
            result = StreamResult.from_json(event["result"])
            moved[0] = self.clock()
            if event.get("assignment") and result.started:
                obs.stream_ended(assignment_from_json(event["assignment"]), result)
            if event.get("sent") and event.get("started"):
                self.stats.queue_ms.append(1000 * (float(event["started"]) - float(event["sent"])))
            if result.disk_done:
                call(coordinator.on_disk_done, result.vm, result.disk, result.attempt)
            if result.end is not None:
                ended(result.end)

        def watch(running: bool = True) -> None:
            for proxy in coordinator.proxy_names:
                alive = bool(self.bus.exists(heartbeat_key(proxy)))
                if not alive and proxy not in down:
                    down.add(proxy)
                    lost = sorted(vm for vm, a in open_attempts.items() if a.proxy == proxy)
                    if lost:
                        try:
                            obs.proxy_lost(proxy, lost)
                        except Exception:
                            log.exception("cleaning up after proxy %s failed", proxy)
                    for vm in lost:
                        del open_attempts[vm]
                    why = "worker heartbeat lost" if running else "no worker heartbeat"
                    call(coordinator.on_proxy_down, proxy, why)
                    obs.states_changed(coordinator, lost)
                elif alive and proxy in down:
                    down.discard(proxy)
                    call(coordinator.on_proxy_up, proxy)
            proxies = {vm: a.proxy for vm, a in open_attempts.items()}
            self.ledger.renew_streams([s for s, vm, _ in coordinator.running() if proxies.get(vm) not in down])

        def why_stop() -> Stop | None:
            if self._stop is not None:
                return self._stop
            idle = self.clock() - moved[0]
            if not coordinator.done and not open_attempts and idle > self.stall_seconds:
                return Stop(f"the coordinator made no progress for {idle:.0f} s while no stream ran "
                            f"(stall limit {self.stall_seconds:g} s)")
            return None

        moved = [self.clock()]
        try:
            watch(running=False)  # proxies without a worker are down before the first assignment
            obs.states_changed(coordinator, [vm.name for vm in coordinator.job.vms])
            call(coordinator.start)
            releases = self.ledger.releases()
            last_watch = time.monotonic()
            while not coordinator.done and (stop := why_stop()) is None:
                got = self.bus.blpop([key], timeout=self.tick)
                if got is not None:
                    handle(json.loads(got[1]))
                    while not coordinator.done and (raw := self.bus.lpop(key)) is not None:  # what came meanwhile
                        handle(json.loads(raw))
                if time.monotonic() - last_watch >= self.watch_every:
                    last_watch = time.monotonic()
                    watch()
                now = self.ledger.releases()
                if now != releases:
                    releases = now
                    call(coordinator.on_released)
        except Exception as e:  # a recorder or the bus failed: the job ends with the reason, never a hang
            log.exception("the distributed job failed")
            self.stop(f"the job could not go on: {describe(e)}", "failed")
        stop = why_stop()
        if stop is not None and (not coordinator.done or open_attempts):
            self._end_early(coordinator, stop, open_attempts, handle, key, obs)
        return coordinator.report()

    def _end_early(self, coordinator: Coordinator, stop: Stop, open_attempts: dict[str, Assignment],
                   handle: Callable[[Mapping[str, Any]], None], key: str, obs: JobObserver) -> None:
        """Stop scheduling and give the job's streams up (their workers abort the attempts and clean up); wait
        at most `grace` seconds for the workers' ends; clean up in vCenter what no worker reported."""
        self.stopped = stop
        log.warning("job %s ends %s: %s", coordinator.job.id, stop.status, stop.reason)
        running = dict(open_attempts)
        coordinator.abort(stop.reason, status=stop.status)  # releases every stream the job held
        with contextlib.suppress(Exception):
            obs.states_changed(coordinator, list(running))
        deadline = self.clock() + self.grace
        while open_attempts and self.clock() < deadline:
            try:
                got = self.bus.blpop([key], timeout=self.tick)
                if got is not None:
                    handle(json.loads(got[1]))
            except Exception:
                log.exception("reading the workers' ends failed")
                break
        for proxy in sorted({a.proxy for a in open_attempts.values()}):
            try:
                obs.proxy_lost(proxy, sorted(vm for vm, a in open_attempts.items() if a.proxy == proxy))
            except Exception:
                log.exception("cleaning up after proxy %s failed", proxy)
