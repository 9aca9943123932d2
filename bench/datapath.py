"""Data path throughput: source flat file -> repository, against `cat FILE > /dev/null`, side by side in one run.

One stream reads a disk's flat extent with the san transport (`FileTransport` through a datastore -> path map,
`read_blocks` in 4 MiB blocks) and writes it into a repository (`DiskWriter.write`, then `commit`), for three
disks of the same size: random bytes, compressible text (every block different, so deduplication does not hide
compression), and a sparse all-zero file. Each first pass goes into a fresh repository; a second pass of the same
disk into the same repository (every chunk already present) is its own row. `cat` reads the same file in the same
run, and the ratio repository / cat is printed. Then 1 -> 2 streams: two different random disks written at once by
two threads into one repository, against the one-stream figure.

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

from vsphere_proxy.repository import DiskStats, Repository, VmIdentity
from vsphere_proxy.transports import BLOCK, DiskSource, read_blocks
from vsphere_proxy.transports.file import FileTransport

MIB = 1 << 20
DATASTORE = "ds-bench"
JOB = "bench-datapath"
KINDS = ("random", "compressible", "zero")
PAGE_CACHE = "warm: each file read once by cat before timing (dropping caches needs root)"


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


def print_table(rows: list[Row], header: dict[str, Any], scaling: dict[str, float]) -> None:
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


# -- main -----------------------------------------------------------------------------------------------------------


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
        shutil.rmtree(warm.path)
        spawn = [cat_seconds(Path("/dev/null")) for _ in range(args.repeat)]

        cat: dict[str, list[float]] = {kind: [] for kind in KINDS}
        first = {kind: Timed() for kind in KINDS}
        again = {kind: Timed() for kind in KINDS}
        two = Timed()
        for run in range(args.repeat):
            for kind, disk in disks.items():
                cat[kind].append(cat_seconds(flat_file(work, disk)))
                repo = Repository.init(work / f"repo-{kind}-{run}")  # fresh: nothing to deduplicate against
                timed_backups(repo, paths, [disk], first[kind])
                timed_backups(repo, paths, [disk], again[kind])
                shutil.rmtree(repo.path)
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
                  "runs": f"{args.repeat}, median shown"}

    for kind in KINDS:
        zero = blocks if kind == "zero" else 0
        check_premise(f"{kind} first pass", first[kind].stats, blocks, new=blocks - zero, dedup=0, zero=zero)
        check_premise(f"{kind} second pass", again[kind].stats, blocks, new=0, dedup=blocks - zero, zero=zero)
    check_premise("2 streams", two.stats, blocks, new=blocks, dedup=0, zero=0)

    rows = []
    for kind in KINDS:
        rows.append(row(f"{kind}, pass 1 (fresh repo)", first[kind], size, 1, cat[kind]))
        rows.append(row(f"{kind}, pass 2 (same repo)", again[kind], size, 1, cat[kind]))
    pair = row("random, 2 streams (2 disks, 1 repo)", two, size, 2)
    rows.append(pair)
    one = rows[0].mib_s
    scaling = {"one_stream_mib_s": one, "two_streams_mib_s": pair.mib_s, "ratio": pair.mib_s / one}

    if args.json:
        print(json.dumps({**header, "size_mib": args.size_mb, "repeat": args.repeat, "block_bytes": BLOCK,
                          "rows": [asdict(r) for r in rows], "scaling": scaling}, indent=1))
    else:
        print_table(rows, header, scaling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
