"""Fault injection and checks for randomized nights on the testbed (bench/chaos.py): small file systems that fill,
damage to a repository's files, what a job left in vCenter, and the product's commands run many times in one
long-lived process.

`python3 -m testbed.chaos` is that process: it reads one JSON array of arguments per line on stdin, runs
`vsphere_proxy.cli.main` on them and answers one JSON line `{"code": N, "stdout": "..."}` (its stderr goes where
the process's goes). `CliRunner` drives it with a timeout per command and starts a new one after a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


class MountError(RuntimeError):
    """A file system could not be mounted here (not root, no tmpfs): the fault that needs it is skipped."""


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted on `where` for the duration; unmounted (lazily if busy) at the end."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MountError(f"cannot mount a tmpfs on {where}: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        unmount(where)


def unmount(where: Path) -> None:
    """Unmount `where`; a busy mount is detached lazily (it goes away with its last open file)."""
    if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(directory: Path, name: str = "filler") -> int:
    """Write zeros into `directory/name` until its file system has no space left; the bytes written."""
    written = 0
    with open(directory / name, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):  # down to the last bytes that fit
            with contextlib.suppress(OSError):
                while n := f.write(bytes(size)):
                    written += n
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return written


@dataclass(frozen=True)
class Damage:
    """One file of a repository damaged on purpose: what it held before, to put it back afterwards."""

    path: Path
    original: bytes
    what: str  # "manifest" | "chunk"
    name: str  # the point id or the chunk id

    def put_back(self) -> None:
        """The original bytes under the original name again (written to a temporary file, then renamed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.putback")
        tmp.write_bytes(self.original)
        os.replace(tmp, self.path)


def flip_byte(path: Path, rng: random.Random, what: str = "chunk") -> Damage:
    """XOR one byte of `path` (at a random offset) with a random non-zero mask, in place."""
    original = path.read_bytes()
    raw = bytearray(original)
    at = rng.randrange(len(raw))
    raw[at] ^= rng.randrange(1, 256)
    _rewrite_in_place(path, bytes(raw))
    return Damage(path, original, what, path.name)


def truncate(path: Path, rng: random.Random) -> Damage:
    """Cut `path` (a manifest) short, at a random length below its size (0 included)."""
    original = path.read_bytes()
    _rewrite_in_place(path, original[: rng.randrange(len(original))])
    return Damage(path, original, "manifest", path.name.removesuffix(".json"))


def _rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:  # the same inode: as a disk that rots under the file would leave it
        f.write(data)
        f.truncate(len(data))
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class PointFile:
    """A manifest as read straight from `points/<id>.json`; `blocks` None when it cannot be read."""

    id: str
    vm: str
    job: str
    blocks: dict[int, tuple[str | None, ...]] | None  # disk index -> chunk id per block (None: a hole)

    def chunks(self) -> set[str]:
        return {c for bs in (self.blocks or {}).values() for c in bs if c}


def read_points(repository: Path) -> dict[str, PointFile]:
    """Every manifest of the repository, read without the product's code (an unreadable one has blocks None)."""
    out: dict[str, PointFile] = {}
    for path in sorted((repository / "points").glob("*.json")):
        pid = path.name.removesuffix(".json")
        try:
            data = json.loads(path.read_text())
            out[pid] = PointFile(pid, str(data["vm"]["name"]), str(data.get("job_id", "")),
                                 {int(d["index"]): tuple(d["blocks"]) for d in data["disks"]})
        except (OSError, ValueError, KeyError, TypeError):
            out[pid] = PointFile(pid, "", "", None)
    return out


def chunk_path(repository: Path, chunk: str) -> Path:
    return repository / "chunks" / chunk[:2] / chunk


def chunk_state(repository: Path, chunk: str) -> str:
    """"absent", "sound" (decompresses to bytes hashing to its name) or "corrupt"."""
    import zstandard

    try:
        raw = chunk_path(repository, chunk).read_bytes()
    except FileNotFoundError:
        return "absent"
    try:
        data = zstandard.ZstdDecompressor().decompress(raw)
    except zstandard.ZstdError:
        return "corrupt"
    return "sound" if hashlib.sha256(data).hexdigest() == chunk else "corrupt"


def stored_chunks(repository: Path) -> list[str]:
    """The chunk ids present in the repository (quarantined `.bad` files excluded)."""
    return sorted(p.name for p in (repository / "chunks").glob("??/*") if len(p.name) == 64 and "." not in p.name)


def block_hash(path: Path, index: int, block: int = 4 << 20) -> str:
    """SHA-256 of block `index` of a flat disk file (what a full read of that block stores as its chunk id)."""
    with open(path, "rb") as f:
        f.seek(index * block)
        return hashlib.sha256(f.read(block)).hexdigest()


@dataclass
class Left:
    """Snapshots of ours and hot-added disks found in vCenter."""

    snapshots: list[tuple[str, str]] = field(default_factory=list)  # (vm name, snapshot name)
    disks: list[tuple[str, str]] = field(default_factory=list)  # (proxy moref, disk file)

    def __bool__(self) -> bool:
        return bool(self.snapshots or self.disks)


def left_in_vcenter(session: Any, morefs: dict[str, str], proxy_morefs: Sequence[str]) -> Left:
    """Every snapshot of ours on the VMs (name -> moref) and every disk left hot-added to the proxy VMs."""
    from adapters.hotadd import left_behind_disks
    from adapters.snapshots import list_snapshots

    left = Left()
    for vm, moref in sorted(morefs.items()):
        left.snapshots += [(vm, e.name) for e in list_snapshots(session, moref) if e.ours]
    for moref, disks in left_behind_disks(session, proxy_morefs).items():
        left.disks += [(moref, d.file) for d in disks]
    return left


def sweep_everything(session: Any, morefs: Iterable[str], proxy_morefs: Sequence[str]) -> int:
    """Remove every snapshot of ours and detach every disk left hot-added, whatever job made them; how many."""
    from adapters.hotadd import sweep_attached
    from adapters.snapshots import sweep_snapshots

    return len(sweep_snapshots(session, list(morefs))) + len(sweep_attached(session, list(proxy_morefs)))


class CliTimeout(RuntimeError):
    """A command did not answer in time; the process running it was killed."""


class CliRunner:
    """Runs `vsphere-proxy` commands in one long-lived helper process (`python3 -m testbed.chaos`), which imports
    the product once: a restore of a small disk costs milliseconds instead of an interpreter start."""

    def __init__(self, env: dict[str, str], stderr: Path) -> None:
        self.env = env
        self.stderr = stderr
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        with open(self.stderr, "a") as err:
            proc = subprocess.Popen([sys.executable, "-m", "testbed.chaos"], cwd=ROOT, env=self.env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
        self.lines = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, self.lines), daemon=True).start()
        return proc

    def run(self, argv: Sequence[str], timeout: float = 60) -> tuple[int, str]:
        """(exit code, stdout) of `vsphere-proxy ARGV`; CliTimeout when it takes longer than `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise CliTimeout(f"`{' '.join(argv[:1])}` did not end in {timeout:g} s") from None
        if line is None:
            self.close()
            raise RuntimeError(f"the command process died during `{' '.join(argv[:1])}`")
        answer = json.loads(line)
        return int(answer["code"]), str(answer["stdout"])

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            lines.put(line)
    lines.put(None)


def _serve() -> None:
    from vsphere_proxy.cli import main

    answers = sys.stdout
    for line in sys.stdin:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = main(json.loads(line))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # a crash is an answer too (exit 1, as the CLI would)
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        answers.write(json.dumps({"code": code, "stdout": out.getvalue()}) + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
