"""Build and run the vcsim launcher (testbed/vcsim/*.go) as a child process.

The launcher takes its credentials from the environment (never argv), prints one JSON "ready" line on stdout
and removes its temporary datastore directories when it receives SIGTERM. Faults a real night brings: `pause`
(SIGSTOP: connections are accepted, nothing answers) and `resume`, `drop_sessions` (SIGUSR1: every SOAP and
Automation API session ends, as when vCenter restarts), and a restart on the same address (`stop`, then
`Vcsim.start(..., listen=sim.address)`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlsplit

SETUP_SCRIPT = Path(__file__).resolve().parent / "setup.sh"
STOP_TIMEOUT = 10.0
_STDERR_LINES = 200

_running: weakref.WeakSet[Vcsim] = weakref.WeakSet()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def build_launcher() -> Path:
    """Run testbed/setup.sh (installs Go + govmomi when missing, builds once) and return the binary's path."""
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{SETUP_SCRIPT} failed with exit code {proc.returncode}:\n{_tail(proc.stderr) or '(no stderr)'}"
        )
    lines = proc.stdout.strip().splitlines()
    binary = Path(lines[-1]) if lines else None
    if binary is None or not os.access(binary, os.X_OK):
        raise RuntimeError(f"{SETUP_SCRIPT} did not print an executable path; stdout was {proc.stdout!r}")
    return binary


class Vcsim:
    """A running launcher. Use `Vcsim.start(...)`, as a context manager or with an explicit `stop()`."""

    def __init__(self, process: subprocess.Popen[str], url: str, datastores: dict[str, Path], stderr: deque[str],
                 lines: queue.Queue[str | None] | None = None):
        self.process = process
        self.pid: int = process.pid
        self.url = url
        self.datastores = datastores
        self._stderr = stderr
        self._lines: queue.Queue[str | None] = lines if lines is not None else queue.Queue()
        self._stopped = False
        self._paused = False

    @classmethod
    def start(
        cls,
        topology: Path,
        username: str,
        password: str,
        *,
        disk_scale: float = 1.0,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 60,
        listen: str = "127.0.0.1:0",
        binary: Path | None = None,
        datastore_auth: bool = True,
    ) -> Vcsim:
        """Launch the simulator on `topology` and wait for its ready line (at most `timeout` seconds).

        `listen` "host:port" (port 0: a free one); `datastore_auth` False serves datastore HTTP without a session.
        """
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        exe = binary or build_launcher()
        argv = [str(exe), "-topology", str(topology), "-listen", listen, "-disk-scale", repr(float(disk_scale)),
                f"-datastore-auth={'true' if datastore_auth else 'false'}"]
        if cert is not None and key is not None:
            argv += ["-cert", str(cert), "-key", str(key)]
        env = {**os.environ, "VCSIM_USERNAME": username, "VCSIM_PASSWORD": password}
        process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stderr is not None
        stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_drain, args=(process.stderr, stderr.append), daemon=True).start()
        threading.Thread(target=_drain, args=(process.stdout, lines.put, lines), daemon=True).start()

        try:
            ready = _wait_ready(process, lines, timeout, stderr)
        except BaseException:
            _terminate(process)
            raise
        sim = cls(process, ready["url"], {name: Path(d) for name, d in ready["datastores"].items()}, stderr, lines)
        if ready.get("pid") != process.pid:
            sim.stop()
            raise RuntimeError(f"launcher reported pid {ready.get('pid')}, expected {process.pid}")
        _running.add(sim)
        return sim

    @property
    def address(self) -> str:
        """"host:port" it listens on: `Vcsim.start(..., listen=sim.address)` restarts it there after `stop`."""
        return urlsplit(self.url).netloc

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers them (a hung vCenter)."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`: the requests waiting meanwhile are answered."""
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def drop_sessions(self, timeout: float = 30) -> dict[str, int]:
        """End every SOAP and Automation API session (SIGUSR1), as a vCenter restart does; how many of each
        ({"soap": n, "api": m}). Calls made with them afterwards are refused as not authenticated."""
        while True:  # lines printed since the ready line are not answers to this request
            try:
                self._lines.get_nowait()
            except queue.Empty:
                break
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"vcsim launcher {self.pid} did not report dropped sessions in {timeout:g} s")
            try:
                line = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"vcsim launcher {self.pid} exited:\n{self.stderr_tail()}")
            with contextlib.suppress(json.JSONDecodeError):
                answer = json.loads(line)
                if isinstance(answer, dict) and "dropped" in answer:
                    if not answer["dropped"]:
                        raise RuntimeError(f"vcsim launcher {self.pid}: dropping sessions failed: "
                                           f"{answer.get('error')}")
                    return {str(k): int(v) for k, v in answer["dropped"].items()}

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def temp_dirs(self) -> list[Path]:
        """The launcher's top-level temporary directories (the parents of the datastore directories)."""
        return sorted({d.parent for d in self.datastores.values()})

    def stop(self) -> None:
        """SIGTERM the launcher by PID, SIGKILL it after 10 s, and check its temporary directories are gone.

        Idempotent. Raises RuntimeError (after cleaning up itself) if the launcher had to be killed or
        left directories behind.
        """
        if self._stopped:
            return
        self._stopped = True
        _running.discard(self)
        if self._paused:  # a stopped process does not act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                self.resume()
        problems: list[str] = []
        if self.process.poll() is None:
            if not _terminate(self.process):
                problems.append(f"did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM and was killed")
        elif self.process.returncode != 0:
            problems.append(f"had already exited with code {self.process.returncode}")
        left = [d for d in [*self.datastores.values(), *self.temp_dirs()] if d.exists()]
        if left:
            problems.append("left " + ", ".join(map(str, left)))
            for d in self.temp_dirs():
                if d.name.startswith("govcsim-"):
                    shutil.rmtree(d, ignore_errors=True)
        if problems:
            raise RuntimeError(f"vcsim launcher {self.pid} " + "; ".join(problems) + f"\n{self.stderr_tail()}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Vcsim(pid={self.pid}, url={self.url!r})"


def _drain(stream: IO[str], sink: Any, done: queue.Queue[str | None] | None = None) -> None:
    try:
        for line in stream:
            sink(line.rstrip("\n"))
    except (OSError, ValueError):
        pass
    finally:
        if done is not None:
            done.put(None)


def _wait_ready(
    process: subprocess.Popen[str], lines: queue.Queue[str | None], timeout: float, stderr: deque[str]
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"vcsim launcher not ready after {timeout:g} s:\n" + "\n".join(stderr))
        try:
            line = lines.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the launcher died
            try:
                code = process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            time.sleep(0.05)  # let the stderr thread catch up
            raise RuntimeError(f"vcsim launcher exited with code {code} before ready:\n" + "\n".join(stderr))
        if not line.strip():
            continue
        try:
            ready = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"vcsim launcher printed an unexpected line {line!r}: {e}") from None
        if not isinstance(ready, dict) or not {"url", "pid", "datastores"} <= ready.keys():
            raise RuntimeError(f"vcsim launcher printed an unexpected ready line {line!r}")
        return ready


def _terminate(process: subprocess.Popen[str]) -> bool:
    """SIGTERM by PID, wait, SIGKILL after STOP_TIMEOUT. True when it exited on SIGTERM."""
    if process.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return False


@atexit.register
def _stop_all() -> None:
    for sim in list(_running):
        with contextlib.suppress(RuntimeError):
            sim.stop()
