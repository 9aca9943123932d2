"""Wait for a vCenter task: its `info.state`, `info.error` and `info.result` read with the PropertyCollector.

pyVmomi's `WaitForTask` reads `task.info` through lazy attribute access, which fails for tasks whose entity is
not the object the task was started on (a snapshot's removal, on some servers); the PropertyCollector reads the
three fields it needs whatever the entity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyVmomi import vmodl

from adapters.errors import VSphereError
from adapters.properties import read_one
from adapters.session import Session

TASK_PATHS = ("info.state", "info.error", "info.result")


class TaskError(VSphereError):
    """A vCenter task ended in error; `fault` is the vSphere fault it reported (None if it gave none)."""

    def __init__(self, message: str, *, task: str = "", fault: BaseException | None = None) -> None:
        super().__init__(message)
        self.task = task
        self.fault = fault


class TaskTimeout(TaskError):
    """A task did not finish in time; it may still be running in vCenter."""


def describe_fault(fault: BaseException) -> str:
    """One line naming a vSphere fault: its type, its message when it says more, the file or object it names."""
    name = type(fault).__name__  # pyVmomi's qualified name, e.g. vim.fault.FileNotFound
    short = name.rsplit(".", 1)[-1]
    msg = str(getattr(fault, "msg", "") or "") if isinstance(fault, vmodl.MethodFault) else str(fault)
    text = name if not msg or msg == short or msg.endswith(f".{short}") else f"{name}: {msg}"
    detail = getattr(fault, "file", None) or getattr(fault, "obj", None)
    if detail is not None:
        detail = getattr(detail, "_moId", None) or str(detail)
        if detail not in text:
            text += f" ({detail})"
    return text


def wait_for_task(
    session: Session,
    task: Any,
    *,
    what: str = "",
    timeout: float = 3600.0,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Block until `task` succeeds and return its `info.result`.

    Raises `TaskError` (with the fault's text, prefixed by `what`) when the task ends in error, and `TaskTimeout`
    when it is still queued or running `timeout` seconds after the call; `info` is polled every `poll` seconds,
    each poll a SOAP call bounded by the session (a vCenter that stops answering raises `VCenterUnresponsive` from
    the poll instead of waiting out `timeout`).
    """
    label = what or f"task {task._moId}"
    deadline = clock() + timeout
    while True:
        info = read_one(session, task, TASK_PATHS)
        state = str(info.get("info.state") or "")
        if state == "success":
            return info.get("info.result")
        if state == "error":
            fault = info.get("info.error")
            reason = describe_fault(fault) if fault is not None else "failed without reporting a fault"
            raise TaskError(f"{label}: {reason}", task=task._moId, fault=fault)
        if clock() >= deadline:
            raise TaskTimeout(f"{label}: still {state or 'pending'} after {timeout:g} s", task=task._moId)
        sleep(poll)
