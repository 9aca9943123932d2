"""The coordinator's proxy-assignment blocks (US 9563514), pure: no I/O, no clock, no vSphere.

Each block of the patent is a top-level function named after it:
`max_streams` (FIG. 5), `eligible_proxies` (FIG. 6, in `vsphere_proxy.tiers`), `priority_list` (FIG. 4),
`next_available_proxy` (FIG. 7), `datastore_score`, `threshold_for` and `pick_vm` (FIG. 3, blocks 306-312).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass

from vsphere_proxy.ledger import Ledger
from vsphere_proxy.model import Proxy
from vsphere_proxy.tiers import eligible_proxies

__all__ = [
    "Pick",
    "PriorityEntry",
    "StreamFormula",
    "datastore_score",
    "eligible_proxies",
    "max_streams",
    "next_available_proxy",
    "pick_vm",
    "priority_list",
    "threshold_for",
]


@dataclass(frozen=True, slots=True)
class StreamFormula:
    """Per-proxy stream limit: min(per_cpu x cpus, ram_mb // mb_per_stream) (DESIGN §4, configurable)."""

    per_cpu: int = 10
    mb_per_stream: int = 100

    def __call__(self, proxy: Proxy) -> int:
        return max(0, min(self.per_cpu * proxy.cpus, proxy.ram_mb // self.mb_per_stream))


DEFAULT_FORMULA = StreamFormula()


def max_streams(proxy: Proxy, formula: Callable[[Proxy], int] = DEFAULT_FORMULA) -> int:
    """The most data streams `proxy` may hold at once across all jobs (US 9563514 FIG. 5).

    A proxy whose limit is 0 is never used.
    """
    return formula(proxy)


@dataclass(frozen=True, slots=True)
class PriorityEntry:
    vm: str
    eligible: Collection[str]  # proxy names (a frozenset when the list is long)
    total_bytes: int
    datastores: tuple[str, ...]


def priority_list(entries: Iterable[PriorityEntry]) -> list[PriorityEntry]:
    """Order VMs for backup (US 9563514 FIG. 4, blocks 402-412): increasing number of eligible proxies,
    ties by decreasing total allocated storage, then by name for determinism."""
    return sorted(entries, key=lambda e: (len(e.eligible), -e.total_bytes, e.vm))


def datastore_score(datastores: Collection[str], ledger: Ledger) -> int:
    """Datastore activity score (US 9563514 FIG. 3, block 308): the active streams on the busiest of the
    VM's datastores, across every job. 0 means every datastore of the VM is idle."""
    return max((ledger.datastore_active(ds) for ds in datastores), default=0)


def next_available_proxy(candidates: Iterable[Proxy], ledger: Ledger, limits: Mapping[str, int]) -> Proxy | None:
    """The candidate with the lowest stream utilization = active streams / max_streams, across all jobs
    (US 9563514 FIG. 7, blocks 702-710); ties by name. Proxies at their limit (or with limit 0) are skipped."""
    best: tuple[float, str] | None = None
    chosen = None
    for proxy in candidates:
        limit = limits.get(proxy.name, 0)
        active = ledger.proxy_active(proxy.name)
        if limit <= 0 or active >= limit:
            continue
        key = (active / limit, proxy.name)
        if best is None or key < best:
            best, chosen = key, proxy
    return chosen


def threshold_for(score: int, threshold: int, cap: int) -> int | None:
    """The threshold a VM whose datastore score is `score` starts under (US 9563514 FIG. 3, blocks 308-312).

    The threshold in force when the score is below it; otherwise raised by as many steps as it takes to be
    above the score (score + 1), unless that passes `cap`: then None, the VM waits for a stream to be released.
    """
    if score < threshold:
        return threshold
    return score + 1 if score + 1 <= cap else None


@dataclass(frozen=True, slots=True)
class Pick:
    entry: PriorityEntry | None
    threshold: int  # the threshold in force when the VM was picked
    raises: int  # how many times the threshold was raised to find it
    skipped: tuple[tuple[str, str], ...] = ()  # (vm, reason) passed over on the way (when explaining)
    score: int = 0  # the picked VM's datastore score


def pick_vm(proxy: str, plist: Iterable[PriorityEntry], ledger: Ledger, threshold: int, cap: int, *,
            skip: Container[str] = frozenset(), explain: bool = True) -> Pick:
    """Walk the priority list for `proxy` (US 9563514 FIG. 3, blocks 306-312).

    Take the first VM the proxy is eligible for whose datastore score is below the threshold. If every
    eligible VM is at or over it, raise the threshold by one (up to `cap`) and walk again. Returns an
    empty pick when the proxy is eligible for none, or every eligible VM stays over the capped threshold.
    VMs named in `skip` (already started) are ignored.

    The walk is done once: raising the threshold step by step until some VM is below it picks the first
    VM with the lowest score, at the threshold `threshold_for` gives that score (score + 1, within the cap).
    """
    skipped: list[tuple[str, str]] = []
    lowest: tuple[int, PriorityEntry] | None = None
    for entry in plist:
        if entry.vm in skip:
            continue
        if proxy not in entry.eligible:
            if explain:
                skipped.append((entry.vm, f"{proxy} not eligible"))
            continue
        score = datastore_score(entry.datastores, ledger)
        if score < threshold:
            return Pick(entry, threshold, 0, tuple(skipped), score)
        if explain:
            skipped.append((entry.vm, f"datastore score {score} >= threshold {threshold}"))
        if lowest is None or score < lowest[0]:
            lowest = (score, entry)
    if lowest is None:
        return Pick(None, threshold, 0, tuple(skipped))
    score, entry = lowest
    raised = threshold_for(score, threshold, cap)
    if raised is None:
        if explain:
            skipped = [(vm, f"{why} (cap {cap})") if why.startswith("datastore") else (vm, why) for vm, why in skipped]
        return Pick(None, threshold, 0, tuple(skipped))
    return Pick(entry, raised, raised - threshold, tuple(skipped), score)
