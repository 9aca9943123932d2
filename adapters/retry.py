"""Bounded retries of vCenter calls and tasks on transient faults (tenacity).

A fault is transient when retrying the same call later can succeed: another task holds the object
(`TaskInProgress`, `ConcurrentAccess`), vCenter lost its host or timed out (`HostCommunication`, `Timedout`),
a generic server error (`SystemError`), or the connection broke. Anything else is raised at once. Every
error leaves `RetryPolicy.call` as a `VSphereError` naming the operation and the fault.

Each SOAP call is already bounded by the session (`adapters.session.Bounded`: a timeout per connect and read,
repeated on timeouts): its `VCenterUnresponsive` and a refused new login (`AuthError`) are final here, never
multiplied by this policy's attempts. A timeout that reaches the policy raw (a call outside the session) counts as
transient, and when the attempts are spent becomes `VCenterUnresponsive` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity
from pyVmomi import vim, vmodl

from adapters.errors import VCenterUnresponsive, VSphereError
from adapters.session import TRANSIENT, Session
from adapters.tasks import TaskError, TaskTimeout, describe_fault, wait_for_task

T = TypeVar("T")

TRANSIENT_FAULTS: tuple[type[BaseException], ...] = (
    vim.fault.TaskInProgress,
    vim.fault.ConcurrentAccess,
    vim.fault.Timedout,
    vmodl.fault.HostCommunication,
    vmodl.fault.SystemError,
)


def is_transient(exc: BaseException) -> bool:
    """True for a fault worth retrying, raised by a call or reported by a task (`TaskError.fault`).

    A task that timed out on our side is not: it may still complete, and starting it again would do the work
    twice.
    """
    if isinstance(exc, TaskTimeout):
        return False
    if isinstance(exc, TaskError):
        return exc.fault is not None and isinstance(exc.fault, TRANSIENT_FAULTS)
    return isinstance(exc, TRANSIENT_FAULTS + TRANSIENT)


@dataclass(frozen=True)
class RetryPolicy:
    """How vCenter calls are retried and tasks awaited; `wait`, `sleep` and `clock` are injectable for tests."""

    attempts: int = 4
    wait: tenacity.wait.wait_base = field(default_factory=lambda: tenacity.wait_exponential(multiplier=0.5, max=5))
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    task_timeout: float = 3600.0
    poll: float = 0.5

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, retried on transient faults up to `attempts` times in all; errors become `VSphereError`."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self.wait,
            sleep=self.sleep,
            reraise=True,
        )
        started = self.clock()
        try:
            return retrying(fn)
        except TimeoutError as e:  # socket.timeout too: every attempt waited its read timeout in vain
            waited = self.clock() - started
            raise VCenterUnresponsive(f"{what}: vCenter did not answer in {waited:.0f} s "
                                      f"({self.attempts} attempts)") from e
        except TaskError as e:
            if is_transient(e):
                raise TaskError(f"{e} (after {self.attempts} attempts)", task=e.task, fault=e.fault) from e
            raise
        except VSphereError:
            raise
        except vmodl.MethodFault as e:
            suffix = f" (after {self.attempts} attempts)" if is_transient(e) else ""
            raise VSphereError(f"{what}: {describe_fault(e)}{suffix}") from e
        except TRANSIENT as e:
            raise VSphereError(f"{what}: {type(e).__name__}: {e} (after {self.attempts} attempts)") from e

    def wait_task(self, session: Session, task: Any, what: str) -> Any:
        """Wait for `task` with this policy's timeout, poll interval, clock and sleep; return its result."""
        return wait_for_task(session, task, what=what, timeout=self.task_timeout, poll=self.poll,
                             clock=self.clock, sleep=self.sleep)


DEFAULT_RETRY = RetryPolicy()
