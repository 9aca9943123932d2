"""SIGTERM and SIGINT end a running job cleanly (DESIGN §9): the first asks the job to stop — scheduling stops,
streams are aborted, snapshots removed, hot-added disks detached, the job marked `interrupted` — and the command
exits 128 + the signal's number (130, 143). A second signal exits at once, leaving the cleanup to the next job's
sweep (the job's lease, no longer renewed, expires)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from vsphere_proxy.engine.control import JobControl

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(control: JobControl) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not control.stop(f"interrupted by {name}", "interrupted", signum):
            os.write(sys.stderr.fileno(), f"vsphere-proxy: {name} again: exiting now\n".encode())
            os._exit(128 + signum)
        os.write(sys.stderr.fileno(), f"vsphere-proxy: {name}: ending the job (cleaning up; {name} again to "
                                      "exit at once)\n".encode())

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
