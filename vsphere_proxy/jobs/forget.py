"""Applying a retention policy to a repository: decide (`vsphere_proxy.retention`) which restore points each VM
keeps, forget the others (never a held one), and prune what no point references any more.

`forget` works beside running backups (a shared lock); `prune` needs the repository to itself (the exclusive
lock) and either waits for it a bounded time or gives up with `RepositoryLocked`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from vsphere_proxy.repository import BrokenPoint, HoldState, Manifest, PruneResult, Repository, RepositoryLocked
from vsphere_proxy.repository.lifecycle import forget_chosen
from vsphere_proxy.retention import Candidate, Decision, Rules, decide


@dataclass(frozen=True, slots=True)
class ForgetResult:
    """What a forget decided and did: every decided point with its reasons, the ids forgotten (none for a dry
    run), the broken points left alone (a rule cannot place them), and the prune that followed, if any."""

    rules: str
    decisions: tuple[Decision, ...]
    forgotten: tuple[str, ...]
    broken: tuple[BrokenPoint, ...] = ()
    dry_run: bool = False
    prune: PruneResult | None = None
    prune_skipped: str = ""  # why the prune that was asked did not run (the repository was in use)

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @property
    def removed(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": self.rules, "dry_run": self.dry_run,
            "points": [{"id": d.id, "vm": d.vm, "time": d.time.isoformat(), "keep": d.keep,
                        "reasons": list(d.reasons)} for d in self.decisions],
            "kept": len(self.kept), "removed": len(self.removed), "forgotten": list(self.forgotten),
            "broken_points": [{"id": b.id, "reason": b.reason} for b in self.broken],
            "prune": None if self.prune is None else prune_json(self.prune),
            "prune_skipped": self.prune_skipped or None,
        }


def prune_json(result: PruneResult) -> dict[str, int]:
    return {"points_removed": result.points_removed, "chunks_removed": result.chunks_removed,
            "bytes_freed": result.bytes_removed, "chunks_kept": result.chunks_kept,
            "tmp_removed": result.tmp_removed, "quarantine_removed": result.quarantine_removed}


def candidates(points: Collection[Manifest], holds: dict[str, HoldState],
               vms: Collection[str] | None = None) -> list[Candidate]:
    """The restore points a retention policy decides on (of `vms`, default every VM), with their holds."""
    found = []
    for m in points:
        if vms is not None and m.vm.name not in vms:
            continue
        state = holds.get(m.id)
        protected = state is not None and state.protects()
        found.append(Candidate(m.id, m.vm.name, m.started, protected, state.describe() if protected else ""))
    return found


def apply_retention(repo: Repository, rules: Rules, tz: tzinfo, *, vms: Collection[str] | None = None,
                    dry_run: bool = False, prune: bool = False, wait: float = 0.0) -> ForgetResult:
    """Decide every point of `vms` (default all) under `rules` in `tz`, forget the removed ones unless `dry_run`,
    then with `prune` prune the repository, waiting at most `wait` seconds for running jobs to let go of it
    (`prune_skipped` says why when they did not)."""
    decided: list[Decision] = []
    broken_seen: list[BrokenPoint] = []

    def choose(points: list[Manifest], broken: list[BrokenPoint], holds: dict[str, HoldState]) -> list[str]:
        decided[:] = decide(candidates(points, holds, vms), rules, tz)
        broken_seen[:] = broken
        return [] if dry_run else [d.id for d in decided if not d.keep]

    if dry_run:
        points, broken = repo.scan()
        choose(points, broken, repo.holds())
        forgotten: list[str] = []
    else:
        forgotten = forget_chosen(repo, choose)
    result = ForgetResult(rules.describe(), tuple(decided), tuple(forgotten), tuple(broken_seen), dry_run)
    if prune and not dry_run:
        try:
            return _with_prune(result, prune_waiting(repo, wait))
        except RepositoryLocked as e:
            return _with_prune(result, None, f"prune did not run: {e}")
    return result


def _with_prune(result: ForgetResult, pruned: PruneResult | None, skipped: str = "") -> ForgetResult:
    return ForgetResult(result.rules, result.decisions, result.forgotten, result.broken, result.dry_run, pruned,
                        skipped)


def prune_waiting(repo: Repository, wait: float, *, poll: float = 0.5,
                  on_wait: Callable[[str], None] | None = None) -> PruneResult:
    """`repo.prune()`, retried while another process holds the repository, for at most `wait` seconds; then the
    last `RepositoryLocked`. `on_wait` hears, once, who it waits for."""
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    while True:
        try:
            return repo.prune()
        except RepositoryLocked as e:
            if time.monotonic() + poll > deadline:
                raise
            if on_wait is not None and not told:
                on_wait(f"waiting up to {wait:g} s for the repository: {e}")
                told = True
            time.sleep(poll)
