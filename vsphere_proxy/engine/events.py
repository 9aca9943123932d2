"""What an engine reports as a job runs: how each stream ended (`StreamResult`) and how each VM attempt ended
(`AttemptEnd`), both travelling as JSON between a Celery proxy worker and its coordinator; and why a job ended
before its rounds did (`Stop`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttemptEnd:
    """What an engine reports when an attempt ends (for the catalog and the progress display)."""

    vm: str
    attempt: int
    round: int
    proxy: str
    mode: str
    ok: bool
    error: str
    bytes_read: int
    bytes_written: int
    seconds: float
    point_id: str | None
    notes: tuple[str, ...]
    stats: Mapping[str, int] = field(default_factory=dict)
    read: str = ""
    left_behind: tuple[str, ...] = ()  # what cleanup could not remove (a snapshot, an attached disk), with why
    fault: str = ""  # set when the attempt ended on a fault that ends the whole job (`vsphere_proxy.faults`)
    final: bool = False  # the attempt ended on a fault that ends its VM for the job (`faults.VmFault`): no retry

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"], data["stats"], data["left_behind"] = list(self.notes), dict(self.stats), list(self.left_behind)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttemptEnd:
        return cls(**{**data, "notes": tuple(data.get("notes") or ()), "stats": dict(data.get("stats") or {}),
                      "left_behind": tuple(data.get("left_behind") or ())})


@dataclass(frozen=True)
class StreamResult:
    """How one stream ended: its disk read (`disk_done`), and the attempt's end when this stream ended it."""

    vm: str
    attempt: int
    disk: int
    stream: str
    disk_done: bool
    end: AttemptEnd | None = None
    error: str = ""
    started: float = 0.0  # wall clock (epoch seconds) when the stream began, and ended
    ended: float = 0.0
    bytes: int = 0  # read by this stream
    failed: bool = False  # this stream's own read or preparation failed (not another stream of its attempt)

    @property
    def outcome(self) -> str:
        return "read" if self.disk_done else "failed" if self.failed else "aborted"

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "attempt": self.attempt, "disk": self.disk, "stream": self.stream,
                "disk_done": self.disk_done, "end": self.end.to_json() if self.end else None, "error": self.error,
                "started": self.started, "ended": self.ended, "bytes": self.bytes, "failed": self.failed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StreamResult:
        end = data.get("end")
        return cls(data["vm"], int(data["attempt"]), int(data["disk"]), data["stream"], bool(data["disk_done"]),
                   AttemptEnd.from_json(end) if end else None, data.get("error", ""),
                   float(data.get("started") or 0.0), float(data.get("ended") or 0.0), int(data.get("bytes") or 0),
                   bool(data.get("failed")))


@dataclass(frozen=True)
class Stop:
    """Why a job ends before its rounds do, and the status it ends with."""

    reason: str
    status: str = "failed"  # failed | interrupted
