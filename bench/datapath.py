"""Data path throughput: source flat file -> repository, against `cat FILE > /dev/null`, side by side in one run.

One stream reads a disk's flat extent with the san transport (`FileTransport` through a datastore -> path map,
`read_blocks` in 4 MiB blocks) and writes it into a repository (`DiskWriter.write`, then `commit`), for three
disks of the same size: random bytes, compressible text (every block different, so deduplication does not hide
compression), and a sparse all-zero file. Each first pass goes into a fresh repository; a second pass of the same
disk into the same repository (every chunk already present) is its own row. `cat` reads the same file in the same
run, and the ratio repository / cat is printed. Then 1 -> 2 streams: two different random disks written at once by
two threads into one repository, against the one-stream figure.

Encryption at rest: the random and compressible disks also get a first pass into a fresh encrypted repository
(AES-256-GCM chunks, HMAC-SHA-256 chunk ids; its argon2id key derivation runs once at init, outside the timing),
in the same repeat loop as the clear runs, so that load on the machine affects both alike: the two take turns
going first, and each first pass starts after `sync`, so that the write-back and deletions of the runs before
(the copies write the random disk twice more) fall on neither alone. The ratio encrypted /
clear first pass and the cost (1 - ratio) are printed against the goal of at most 15 %, with whether the CPU
has AES-NI (`aes` in the flags of /proc/cpuinfo).

Copying: the restore point of the random disk's clear first pass is copied (`copy_points`, 4 workers) into a
fresh clear repository (chunk files copied as they are, still checked on both sides) and into a fresh encrypted
one (every chunk re-encoded), each against the clear first pass; MiB/s is the disk size over the wall time of
the copy. A second copy of the same point into the same target must write no chunk bytes.

Caches cannot be dropped without root: every file is read once by `cat` before anything is timed, so both the
repository and `cat` read from the page cache. Every figure is measured; the median of `--repeat` runs is shown.

    python3 bench/datapath.py [--size-mb 256] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from vsphere_proxy.repository import DiskStats, KdfCost, Manifest, Repository, Secret, VmIdentity
from vsphere_proxy.repository.copy import CopyResult, copy_points
from vsphere_proxy.transports import BLOCK, DiskSource, read_blocks
from vsphere_proxy.transports.file import FileTransport

MIB = 1 << 20
DATASTORE = "ds-bench"
JOB = "bench-datapath"
KINDS = ("random", "compressible", "zero")
PAGE_CACHE = "warm: each file read once by cat before timing (dropping caches needs root)"
ENCRYPTED_KINDS = ("random", "compressible")
SECRET = Secret("passphrase", b"bench-datapath-passphrase", "bench")
KDF_COST = KdfCost(time_cost=1, memory_kib=8192)  # the key derivation runs once per init, outside every timing
GOAL_COST_PERCENT = 15
COPY_WORKERS = 4
COPY_TARGETS = ("clear", "encrypted")


# -- source disks ---------------------------------------------------------------------------------------------------


def compressible_block(index: int, length: int) -> bytes:
    """Log-like text, low entropy but different in every line and every block (a block counter and a line counter),
    so each block is its own chunk and zstd does real work on it."""
    lines, size, n = [], 0, 0
    while size < length:
        line = (f"{index:08d}.{n:06d} INFO backup datastore={DATASTORE} block={index} line={n} "
                f"state=ok bytes={index * length + size}\n").encode()
        lines.append(line)
        size += len(line)
        n += 1
    return b"".join(lines)[:length]


def make_disk(root: Path, vm: str, kind: str, size: int) -> DiskSource:
    """Write the flat extent of a one-disk VM as `root/<datastore>/<vm>/<vm>-flat.vmdk`; return its DiskSource."""
    disk = DiskSource(vm, 0, f"[{DATASTORE}] {vm}/{vm}.vmdk", DATASTORE, size)
    path = root / DATASTORE / disk.flat
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if kind == "zero":
            f.truncate(size)
        else:
            for index, offset in enumerate(range(0, size, BLOCK)):
                length = min(BLOCK, size - offset)
                f.write(os.urandom(length) if kind == "random" else compressible_block(index, length))
        f.flush()
        os.fsync(f.fileno())  # no writeback of the source may overlap a timed run
    return disk


def flat_file(root: Path, disk: DiskSource) -> Path:
    return root / DATASTORE / disk.flat


def filesystem(path: Path) -> str:
    """The filesystem holding `path`, from /proc/mounts: "ext4 (/dev/vda on /)"."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best = max((m for m in mounts if len(m) == 3 and (target == m[1] or target.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[0]} on {best[1]})" if best else "unknown"


def aes_ni() -> bool:
    """True if the CPU flags in /proc/cpuinfo include `aes` (AES-NI)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    return any("aes" in line.split(":", 1)[1].split() for line in lines if line.startswith("flags") and ":" in line)


def new_repository(path: Path, encrypted: bool) -> Repository:
    """A fresh repository, encrypted with the bench's passphrase (cheap key derivation) or clear."""
    return Repository.init(path, SECRET, cost=KDF_COST) if encrypted else Repository.init(path)


# -- measured runs --------------------------------------------------------------------------------------------------


def cat_seconds(path: Path) -> float:
    """Wall time of `cat FILE > /dev/null` through the shell."""
    command = f"cat {shlex.quote(str(path))} > /dev/null"
    t0 = time.perf_counter()
    subprocess.run(command, shell=True, check=True)
    return time.perf_counter() - t0


def backup(repo: Repository, paths: dict[str, Path], disk: DiskSource) -> DiskStats:
    """One stream: the san transport reads the disk block by block, the repository stores it as one restore point."""
    vm = VmIdentity(name=disk.vm, moref=f"vm-{disk.vm}", uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, disk.vm)),
                    instance_uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, disk.vm)))
    with FileTransport("san", paths) as transport, repo.begin(JOB, vm, {"disks": 1}) as point:
        transport.open(disk)
        writer = point.disk(disk.index, "Hard disk 1", disk.capacity)
        for offset, block in read_blocks(transport, disk.capacity):
            writer.write(offset, block)
        point.commit()
    return writer.stats


@dataclass
class Timed:
    """Wall and process CPU seconds of each run, and the disk statistics of the last one."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stats: list[DiskStats] = field(default_factory=list)

    def median_wall(self) -> float:
        return statistics.median(self.wall)

    def cpu_percent(self) -> float:
        return 100 * statistics.median(self.cpu) / self.median_wall()


def timed_backups(repo: Repository, paths: dict[str, Path], disks: list[DiskSource], into: Timed) -> None:
    """Write `disks` into `repo`, one thread per disk, all at once; add the wall and CPU time to `into`."""
    with ThreadPoolExecutor(max_workers=len(disks)) as pool:
        c0, t0 = time.process_time(), time.perf_counter()
        futures = [pool.submit(backup, repo, paths, d) for d in disks]
        stats = [f.result() for f in futures]
        t1, c1 = time.perf_counter(), time.process_time()
    into.wall.append(t1 - t0)
    into.cpu.append(c1 - c0)
    into.stats.extend(stats)


def timed_copy(source: Repository, target: Repository, points: list[Manifest], into: Timed) -> CopyResult:
    """Copy `points` from `source` into `target`; add the wall and CPU time to `into`, and what the copy read and
    wrote as disk statistics (block bytes read in, chunks and chunk file bytes written as new)."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = copy_points(source, target, points, workers=COPY_WORKERS)
    t1, c1 = time.perf_counter(), time.process_time()
    into.wall.append(t1 - t0)
    into.cpu.append(c1 - c0)
    into.stats.append(DiskStats(bytes_in=result.bytes_read, new_chunks=result.chunks_written,
                                new_bytes_stored=result.chunk_bytes_written))
    return result


def check_copies(name: str, first: list[CopyResult], again: list[CopyResult], blocks: int, size: int) -> None:
    """A copy copies the one point, writing every chunk and reading every block; the second copy writes nothing."""
    for result in first:
        if result.failed or len(result.copied) != 1 or result.chunks_written != blocks or result.bytes_read != size:
            errors = "".join(f" ({p.error})" for p in result.failed)
            raise RuntimeError(f"{name}: expected 1 point copied, {blocks} chunks written and {size} bytes read, got "
                               f"{len(result.copied)} copied, {len(result.failed)} failed{errors}, "
                               f"{result.chunks_written} chunks written, {result.bytes_read} bytes read")
    for result in again:
        if result.chunk_bytes_written != 0 or result.failed:
            raise RuntimeError(f"{name}, second copy of the same point: expected 0 chunk bytes written, got "
                               f"{result.chunk_bytes_written} ({len(result.failed)} point(s) failed)")


def check_premise(name: str, stats: list[DiskStats], blocks: int, *, new: int, dedup: int, zero: int) -> None:
    """Each row means what its label says: a first pass stores every block, a second pass none."""
    for s in stats:
        if (s.new_chunks, s.dedup_chunks, s.zero_blocks) != (new, dedup, zero):
            raise RuntimeError(f"{name}: expected {new} new, {dedup} deduplicated, {zero} zero of {blocks} blocks, "
                               f"got {s.new_chunks}, {s.dedup_chunks}, {s.zero_blocks}")


# -- report ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    streams: int
    mib: float
    seconds: float  # median wall time
    runs: list[float]
    mib_s: float
    cpu_percent: float
    new_chunks: int
    dedup_chunks: int
    zero_blocks: int
    bytes_in: int
    stored_bytes: int
    cat_mib_s: float | None = None
    repo_over_cat: float | None = None


def row(name: str, timed: Timed, size: int, streams: int, cat: list[float] | None = None) -> Row:
    last = timed.stats[-streams:]
    mib = streams * size / MIB
    seconds = timed.median_wall()
    cat_rate = size / MIB / statistics.median(cat) if cat else None
    rate = mib / seconds
    return Row(name=name, streams=streams, mib=mib, seconds=seconds, runs=timed.wall, mib_s=rate,
               cpu_percent=timed.cpu_percent(), new_chunks=sum(s.new_chunks for s in last),
               dedup_chunks=sum(s.dedup_chunks for s in last), zero_blocks=sum(s.zero_blocks for s in last),
               bytes_in=sum(s.bytes_in for s in last), stored_bytes=sum(s.new_bytes_stored for s in last),
               cat_mib_s=cat_rate, repo_over_cat=rate / cat_rate if cat_rate else None)


def print_table(rows: list[Row], header: dict[str, Any], scaling: dict[str, float], encryption: dict[str, Any],
                copy: dict[str, Any]) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or a file gets the whole table
    for key, value in header.items():
        console.print(f"{key}: {value}", highlight=False)
    table = Table(title="source flat file -> repository (san transport), median of runs")
    for column in ("measurement", "MiB", "seconds", "repo MiB/s", "cat MiB/s", "repo / cat", "CPU %",
                   "new", "dedup", "zero", "stored / in"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for r in rows:
        table.add_row(r.name, f"{r.mib:.0f}", f"{r.seconds:.3f}", f"{r.mib_s:.1f}",
                      "-" if r.cat_mib_s is None else f"{r.cat_mib_s:.1f}",
                      "-" if r.repo_over_cat is None else f"{r.repo_over_cat:.3f}",
                      f"{r.cpu_percent:.0f}", str(r.new_chunks), str(r.dedup_chunks), str(r.zero_blocks),
                      f"{100 * r.stored_bytes / r.bytes_in:.1f} %" if r.bytes_in else "-")
    console.print(table)
    console.print(f"1 stream: {scaling['one_stream_mib_s']:.1f} MiB/s, 2 streams: {scaling['two_streams_mib_s']:.1f} "
                  f"MiB/s aggregate, ratio 2 streams / 1 stream = {scaling['ratio']:.3f}", highlight=False)
    goal = (f"goal: encryption costs at most {encryption['goal_cost_percent']} % "
            f"(AES-NI: {'yes' if encryption['aes_ni'] else 'no'})")
    for kind in ENCRYPTED_KINDS:
        e = encryption[kind]
        verdict = "within" if e["cost_percent"] <= encryption["goal_cost_percent"] else "over"
        console.print(f"{kind}: encrypted {e['encrypted_mib_s']:.1f} MiB/s / clear {e['clear_mib_s']:.1f} MiB/s = "
                      f"{e['ratio']:.3f}, cost {e['cost_percent']:.1f} % ({verdict} the {goal})", highlight=False)
    for target in COPY_TARGETS:
        c = copy[target]
        console.print(f"copy clear -> {target}: {c['mib_s']:.1f} MiB/s / first pass (clear) "
                      f"{copy['first_pass_clear_mib_s']:.1f} MiB/s = {c['ratio_to_first_pass']:.3f}; second copy "
                      f"writes {c['second_copy_chunk_bytes_written']} chunk bytes (point "
                      f"{', '.join(c['second_copy_status'])}, {1000 * c['second_copy_seconds']:.1f} ms)",
                      highlight=False)


# -- main -----------------------------------------------------------------------------------------------------------


def encrypted_pass(work: Path, paths: dict[str, Path], kind: str, disk: DiskSource, run: int, into: Timed) -> None:
    """One timed first pass of `disk` into a fresh encrypted repository (its key derivation untimed)."""
    repo = new_repository(work / f"repo-{kind}-encrypted-{run}", True)
    os.sync()
    timed_backups(repo, paths, [disk], into)
    shutil.rmtree(repo.path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=256, help="size of each source disk, MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported (default 3)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = ap.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        ap.error("--size-mb and --repeat must be at least 1")
    size = args.size_mb * MIB
    blocks = -(-size // BLOCK)

    with tempfile.TemporaryDirectory(prefix="bench-datapath-", dir="/tmp") as tmp:
        work = Path(tmp)
        paths = {DATASTORE: work / DATASTORE}
        disks = {kind: make_disk(work, f"vm-{kind}", kind, size) for kind in KINDS}
        second = make_disk(work, "vm-random-2", "random", size)
        for disk in [*disks.values(), second]:
            cat_seconds(flat_file(work, disk))  # warm the page cache, untimed
        warm = Repository.init(work / "repo-warm-up")  # one untimed backup: first-use costs stay out of the runs
        backup(warm, paths, disks["random"])
        warm_encrypted = new_repository(work / "repo-warm-up-encrypted", True)  # the same for encryption and copy
        backup(warm_encrypted, paths, disks["random"])
        warm_clear = new_repository(work / "repo-warm-up-clear", False)
        for target in (warm_clear, warm_encrypted):
            copy_points(warm, target, warm.points(), workers=COPY_WORKERS)
        for repo in (warm, warm_encrypted, warm_clear):
            shutil.rmtree(repo.path)
        spawn = [cat_seconds(Path("/dev/null")) for _ in range(args.repeat)]

        cat: dict[str, list[float]] = {kind: [] for kind in KINDS}
        first = {kind: Timed() for kind in KINDS}
        again = {kind: Timed() for kind in KINDS}
        two = Timed()
        encrypted = {kind: Timed() for kind in ENCRYPTED_KINDS}
        copied = {target: Timed() for target in COPY_TARGETS}
        copied_again = {target: Timed() for target in COPY_TARGETS}
        copies: dict[str, list[CopyResult]] = {target: [] for target in COPY_TARGETS}
        copies_again: dict[str, list[CopyResult]] = {target: [] for target in COPY_TARGETS}
        for run in range(args.repeat):
            for kind, disk in disks.items():
                cat[kind].append(cat_seconds(flat_file(work, disk)))
                # encrypted and clear first passes take turns going first, each after a sync, so that the
                # write-back and deletions of the runs before fall on neither alone
                encrypted_first = kind in encrypted and run % 2 == 1
                if encrypted_first:
                    encrypted_pass(work, paths, kind, disk, run, encrypted[kind])
                repo = Repository.init(work / f"repo-{kind}-{run}")  # fresh: nothing to deduplicate against
                os.sync()
                timed_backups(repo, paths, [disk], first[kind])
                timed_backups(repo, paths, [disk], again[kind])
                if kind == "random":  # copy the first pass's point (the older of the two) into fresh repositories
                    point = repo.points()[:1]
                    for target_kind in COPY_TARGETS:
                        target = new_repository(work / f"repo-copy-{target_kind}-{run}", target_kind == "encrypted")
                        copies[target_kind].append(timed_copy(repo, target, point, copied[target_kind]))
                        copies_again[target_kind].append(timed_copy(repo, target, point, copied_again[target_kind]))
                        shutil.rmtree(target.path)
                shutil.rmtree(repo.path)
                if kind in encrypted and not encrypted_first:
                    encrypted_pass(work, paths, kind, disk, run, encrypted[kind])
            repo = Repository.init(work / f"repo-two-{run}")
            timed_backups(repo, paths, [disks["random"], second], two)
            shutil.rmtree(repo.path)
        header = {"source disk": f"{args.size_mb} MiB each, {blocks} blocks of {BLOCK // MIB} MiB",
                  "work directory": f"{work.parent} on {filesystem(work)}",
                  "cores": os.cpu_count(),
                  "page cache": PAGE_CACHE,
                  "cat startup": f"{1000 * statistics.median(spawn):.1f} ms (cat /dev/null > /dev/null, included in "
                                 "every cat time)",
                  "zero disk": f"sparse, {os.stat(flat_file(work, disks['zero'])).st_blocks * 512} bytes allocated",
                  "encrypted repositories": f"AES-256-GCM chunks, HMAC-SHA-256 chunk ids; argon2id (time cost "
                                            f"{KDF_COST.time_cost}, {KDF_COST.memory_kib // 1024} MiB) once at init, "
                                            "untimed",
                  "copies": f"copy_points with {COPY_WORKERS} workers, one point of the random disk's clear first "
                            "pass, into a fresh repository",
                  "runs": f"{args.repeat}, median shown"}

    for kind in KINDS:
        zero = blocks if kind == "zero" else 0
        check_premise(f"{kind} first pass", first[kind].stats, blocks, new=blocks - zero, dedup=0, zero=zero)
        check_premise(f"{kind} second pass", again[kind].stats, blocks, new=0, dedup=blocks - zero, zero=zero)
    check_premise("2 streams", two.stats, blocks, new=blocks, dedup=0, zero=0)
    for kind in ENCRYPTED_KINDS:
        check_premise(f"{kind} first pass encrypted", encrypted[kind].stats, blocks, new=blocks, dedup=0, zero=0)
    for target in COPY_TARGETS:
        check_copies(f"random, copy clear -> {target}", copies[target], copies_again[target], blocks, size)

    rows = []
    for kind in KINDS:
        rows.append(row(f"{kind}, pass 1 (fresh repo)", first[kind], size, 1, cat[kind]))
        rows.append(row(f"{kind}, pass 2 (same repo)", again[kind], size, 1, cat[kind]))
    pair = row("random, 2 streams (2 disks, 1 repo)", two, size, 2)
    rows.append(pair)
    one = rows[0].mib_s
    scaling = {"one_stream_mib_s": one, "two_streams_mib_s": pair.mib_s, "ratio": pair.mib_s / one}

    clear_first = {r.name: r for r in rows}
    encryption: dict[str, Any] = {}
    for kind in ENCRYPTED_KINDS:
        sealed = row(f"{kind}, pass 1 encrypted", encrypted[kind], size, 1, cat[kind])
        rows.append(sealed)
        clear = clear_first[f"{kind}, pass 1 (fresh repo)"].mib_s
        ratio = sealed.mib_s / clear
        encryption[kind] = {"clear_mib_s": clear, "encrypted_mib_s": sealed.mib_s, "ratio": ratio,
                            "cost_percent": 100 * (1 - ratio)}
    encryption["aes_ni"] = aes_ni()
    encryption["goal_cost_percent"] = GOAL_COST_PERCENT
    copy: dict[str, Any] = {"first_pass_clear_mib_s": one, "workers": COPY_WORKERS}
    for target in COPY_TARGETS:
        done = row(f"random, copy clear -> {target}", copied[target], size, 1)
        rows.append(done)
        last, second = copies[target][-1], copies_again[target][-1]
        copy[target] = {"mib_s": done.mib_s, "seconds": done.seconds, "runs": done.runs,
                        "cpu_percent": done.cpu_percent, "ratio_to_first_pass": done.mib_s / one,
                        "chunks_written": last.chunks_written, "chunk_bytes_written": last.chunk_bytes_written,
                        "bytes_read": last.bytes_read,
                        "second_copy_chunk_bytes_written": second.chunk_bytes_written,
                        "second_copy_seconds": copied_again[target].median_wall(),
                        "second_copy_status": [p.status for p in second.points]}

    if args.json:
        print(json.dumps({**header, "size_mib": args.size_mb, "repeat": args.repeat, "block_bytes": BLOCK,
                          "rows": [asdict(r) for r in rows], "scaling": scaling, "encryption": encryption,
                          "copy": copy}, indent=1))
    else:
        print_table(rows, header, scaling, encryption, copy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
