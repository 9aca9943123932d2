"""How a running job is asked to stop from outside its engine (a signal, a lost lease).

`JobControl.stop` only records the request and forwards it to the engine running the job, so it is safe to call
from a signal handler or another thread, before or while the engine runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol


class Stoppable(Protocol):
    def stop(self, reason: str, status: str = "interrupted") -> None: ...


@dataclass(frozen=True)
class StopRequest:
    reason: str
    status: str  # interrupted | failed
    signal: int | None = None  # the signal that asked for it


class JobControl:
    def __init__(self) -> None:
        self.request: StopRequest | None = None
        self._engine: Stoppable | None = None
        self._lock = threading.RLock()  # a signal handler may run while the main thread holds it

    def attach(self, engine: Stoppable) -> None:
        """The engine now running the job; a stop asked before it started reaches it at once."""
        with self._lock:
            self._engine = engine
            request = self.request
        if request is not None:
            engine.stop(request.reason, request.status)

    def stop(self, reason: str, status: str = "interrupted", signal: int | None = None) -> bool:
        """Ask the job to end; False when it was asked already (the caller may then give up waiting)."""
        with self._lock:
            first = self.request is None
            if first:
                self.request = StopRequest(reason, status, signal)
            engine = self._engine
        if first and engine is not None:
            engine.stop(reason, status)
        return first

    @property
    def stopping(self) -> bool:
        return self.request is not None
