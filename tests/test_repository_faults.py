"""Faults of the repository (docs/repository.md): flock locks that need no space and die with their holder, a full
file system (a real small tmpfs), concurrent `init`, broken manifests and corrupt chunks that stay local
(quarantine and self-healing), and `verify` printing what the repository names literally."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.cli import main
from vsphere_proxy.repository import (
    BLOCK_SIZE,
    BaseDamaged,
    Manifest,
    Repository,
    RepositoryError,
    RepositoryFull,
    RepositoryLocked,
    VmIdentity,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 3, 1, 22, 0, tzinfo=UTC)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup(repo: Repository, vm: str, *images: bytes, started: datetime = T0) -> Manifest:
    with repo.begin("job-1", VmIdentity(name=vm), {"cpus": 1}, started=started) as point:
        for index, image in enumerate(images):
            disk = point.disk(index, f"Hard disk {index + 1}", len(image))
            for offset in range(0, len(image), BLOCK_SIZE):
                disk.write(offset, image[offset:offset + BLOCK_SIZE])
        return point.commit(ended=started + timedelta(minutes=1))


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def one_line(exc: pytest.ExceptionInfo[Any]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {result.stderr.strip() or result.returncode})")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


# -- locks -------------------------------------------------------------------------------------------------------


def test_shared_locks_of_threads_are_independent_and_an_exclusive_one_conflicts_in_the_same_process(
        repo: Repository) -> None:
    before = sorted(repo.locks_dir.iterdir()), (repo.locks_dir / "lock").stat().st_size
    start = threading.Barrier(8)
    held: list[Any] = []
    errors: list[BaseException] = []

    def take() -> None:
        try:
            start.wait()
            held.append(repo.lock("shared", "restore"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(held) == 8
    assert (sorted(repo.locks_dir.iterdir()), (repo.locks_dir / "lock").stat().st_size) == before  # wrote nothing

    with pytest.raises(RepositoryLocked, match=rf"^repository is locked: shared lock by pid {os.getpid()} "
                                                r"\(this process\)$") as exc:
        repo.lock("exclusive", "prune")
    one_line(exc)
    for lock in held[:-1]:
        lock.release()
        lock.release()  # idempotent
    with pytest.raises(RepositoryLocked):
        repo.lock("exclusive", "prune")  # one shared lock is still held
    held[-1].release()

    with repo.lock("exclusive", "maintenance"):
        with pytest.raises(RepositoryLocked, match=rf"^repository is locked: exclusive lock by pid {os.getpid()} "
                                                    r"\(maintenance, since \S+\)$") as exc:
            repo.lock("shared", "verify")
        one_line(exc)
        with pytest.raises(RepositoryLocked, match="exclusive lock"):
            repo.begin("job-2", VmIdentity(name="x"), {})
        with pytest.raises(RepositoryLocked, match="exclusive lock"):
            repo.lock("exclusive", "prune")
    assert (repo.locks_dir / "lock").stat().st_size == 0  # the holder record goes with the lock
    repo.lock("shared", "verify").release()


HOLDER = """
import sys, time
from vsphere_proxy.repository import Repository, VmIdentity
repo = Repository.open(sys.argv[1])
if sys.argv[2] == "exclusive":
    lock = repo.lock("exclusive", "prune by hand")
else:
    point = repo.begin("job-9", VmIdentity(name="db-01"), {})
    point.disk(0, "Hard disk 1", 10).write(0, b"0123456789")
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["shared", "exclusive"])
def test_a_killed_holder_leaves_no_lock_and_no_file(repo: Repository, kind: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(repo.path), kind], cwd=ROOT, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(RepositoryLocked, match=rf"{kind} lock by pid {proc.pid} ") as exc:
            repo.lock("exclusive", "prune")
        text = one_line(exc)
        assert ("prune by hand" if kind == "exclusive" else "-c") in text  # the purpose, or the command line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in repo.locks_dir.iterdir()) == ["lock"]
    assert list(repo.scratch.iterdir()) == []
    assert repo.prune().chunks_removed == (1 if kind == "shared" else 0)  # the exclusive lock is free at once


def test_lock_files_of_the_old_scheme_are_ignored_and_removed_by_the_exclusive_lock(repo: Repository) -> None:
    body = {"kind": "exclusive", "host": os.uname().nodename, "pid": os.getpid(), "created": T0.isoformat(),
            "purpose": "prune"}
    for name in ("exclusive-0123456789abcdef.json", "shared-fedcba9876543210.json"):
        (repo.locks_dir / name).write_text(json.dumps(body))
    backup(repo, "old", b"still works")
    assert len(list(repo.locks_dir.glob("*.json"))) == 2
    repo.prune()
    assert sorted(p.name for p in repo.locks_dir.iterdir()) == ["lock"]


def test_open_creates_a_missing_lock_file(repo: Repository) -> None:
    (repo.locks_dir / "lock").unlink()
    reopened = Repository.open(repo.path)
    assert (repo.locks_dir / "lock").is_file()
    with reopened.lock("shared", "verify"), pytest.raises(RepositoryLocked):
        reopened.lock("exclusive", "prune")


def test_a_read_only_repository_without_a_lock_file_still_restores_and_verifies(tmp_path: Path) -> None:
    source = Repository.init(tmp_path / "repo")
    image = random_bytes(BLOCK_SIZE + 99, 1)
    point = backup(source, "ro-vm", image)
    (source.locks_dir / "lock").unlink()  # as a repository made before the lock file existed
    view = tmp_path / "ro"
    view.mkdir()
    mount("--bind", str(source.path), str(view))
    try:
        mount("-o", "remount,ro,bind", str(view))
        repo = Repository.open(view)
        assert not (view / "locks" / "lock").exists()
        assert repo.verify().ok
        assert repo.restore(point.id, 0, tmp_path / "ro.img").sha256 == sha256(image)
        with pytest.raises(RepositoryError, match=r"cannot take a exclusive lock: .*lock is missing and cannot be "
                                                  "created: .*Read-only file system") as exc:
            repo.prune()
        one_line(exc)
    finally:
        umount(view)


# -- a full file system ------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where))
    try:
        yield where
    finally:
        umount(where)


def fill(directory: Path) -> None:
    """Write a filler file until the file system has no byte left."""
    with open(directory / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError:
                pass


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_repository_ends_the_point_cleanly_and_restore_and_verify_still_work(small_fs: Path,
                                                                                   tmp_path: Path) -> None:
    repo = Repository.init(small_fs / "repo")
    image = random_bytes(BLOCK_SIZE // 2, 10) + bytes(BLOCK_SIZE)
    kept = backup(repo, "db-01", image)
    fill(small_fs)
    points_before = sorted(repo.points_dir.iterdir())
    full = re.compile(rf"repository full: (\d+) bytes free on {re.escape(str(repo.path))}")

    # a chunk that does not fit
    point = repo.begin("job-2", VmIdentity(name="db-01"), {})
    disk = point.disk(0, "Hard disk 1", 2 * BLOCK_SIZE)
    with pytest.raises(RepositoryFull) as exc:
        disk.write(0, random_bytes(BLOCK_SIZE, 11))
    match = full.fullmatch(one_line(exc))
    assert match and int(match.group(1)) < BLOCK_SIZE
    with pytest.raises(RepositoryFull, match=full.pattern):  # the point is over: the same fault, every call
        disk.write(BLOCK_SIZE, random_bytes(BLOCK_SIZE, 12))
    with pytest.raises(RepositoryFull, match=full.pattern):
        point.commit()
    assert sorted(repo.points_dir.iterdir()) == points_before
    assert list(repo.scratch.iterdir()) == [] and sorted(p.name for p in repo.locks_dir.iterdir()) == ["lock"]
    repo.lock("exclusive", "check").release()  # the point's shared lock was released

    # a manifest that does not fit (every block a hole or already stored)
    with repo.begin("job-3", VmIdentity(name="db-01"), {}) as point:
        disk = point.disk(0, "Hard disk 1", len(image))
        disk.write(0, image[:BLOCK_SIZE])
        disk.write(BLOCK_SIZE, image[BLOCK_SIZE:])
        assert disk.stats.dedup_chunks == 1 and disk.stats.new_chunks == 0
        with pytest.raises(RepositoryFull) as exc:
            point.commit()
        assert full.fullmatch(one_line(exc))
    assert sorted(repo.points_dir.iterdir()) == points_before and list(repo.scratch.iterdir()) == []
    repo.lock("exclusive", "check").release()

    # still full: restore (to another file system) and verify
    assert free_bytes(small_fs) < BLOCK_SIZE // 2
    restored = repo.restore(kept.id, 0, tmp_path / "db-01.img")
    assert restored.sha256 == sha256(image) == sha256((tmp_path / "db-01.img").read_bytes())
    report = repo.verify()
    assert report.ok and report.points == 1
    assert sorted(p.name for p in repo.locks_dir.iterdir()) == ["lock"] and list(repo.scratch.iterdir()) == []


def test_a_full_repository_with_a_corrupt_chunk_still_verifies_and_quarantines(small_fs: Path) -> None:
    repo = Repository.init(small_fs / "repo")
    good, bad = random_bytes(100_000, 20), random_bytes(100_000, 21)
    a, b = backup(repo, "a", good), backup(repo, "b", bad)
    flip_a_byte(repo.chunks.path(sha256(bad)))
    fill(small_fs)
    report = repo.verify()
    assert report.corrupt == (sha256(bad),) and report.damaged == (b.id,) and a.id not in report.broken
    assert not repo.chunks.present(sha256(bad)) and report.problems[0].quarantined.endswith(".0.bad")


# -- concurrent init ---------------------------------------------------------------------------------------------


def _init_in_process(path: str, start: Any, results: Any) -> None:
    try:
        start.wait()
        results.put(Repository.init(path).config.id)
    except BaseException as exc:
        results.put(f"error: {exc}")


def test_concurrent_inits_in_processes_all_open_the_same_repository(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        path = tmp_path / f"r{round_}" / "repo"  # the parent is created by the initialisers too
        start, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_init_in_process, args=(str(path), start, results)) for _ in range(4)]
        for p in procs:
            p.start()
        ids = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs)
        assert len(set(ids)) == 1 and not ids[0].startswith("error"), ids
        assert Repository.open(path).config.id == ids[0]
        assert list((path / "tmp").iterdir()) == []


def test_concurrent_inits_in_threads_and_an_interrupted_init_all_succeed(tmp_path: Path) -> None:
    for round_ in range(15):
        path = tmp_path / f"t{round_}"
        if round_ % 3 == 0:  # what an init killed half-way leaves, in a directory given empty
            (path / "chunks" / "00").mkdir(parents=True)
            (path / "locks").mkdir()
        start = threading.Barrier(6)
        ids: list[str] = []

        def init(path: Path = path, start: threading.Barrier = start, ids: list[str] = ids) -> None:
            start.wait()
            try:
                ids.append(Repository.init(path).config.id)
            except RepositoryError as exc:
                ids.append(f"error: {exc}")

        threads = [threading.Thread(target=init) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ids) == 6 and len(set(ids)) == 1 and not ids[0].startswith("error"), ids
        assert Repository.open(path).config.id == ids[0]


def test_init_accepts_a_fresh_file_systems_root_and_names_what_it_refuses(tmp_path: Path) -> None:
    (tmp_path / "fs" / "lost+found").mkdir(parents=True)
    assert Repository.init(tmp_path / "fs").point_ids() == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "points").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match=r"not empty and not a repository \(holds 'notes.txt'\)") as exc:
        Repository.init(tmp_path / "other")
    one_line(exc)


# -- broken manifests --------------------------------------------------------------------------------------------


def test_broken_manifests_are_named_and_everything_else_keeps_working(repo: Repository, tmp_path: Path) -> None:
    images = [random_bytes(50_000, 30 + i) for i in range(4)]
    a1 = backup(repo, "a", images[0], started=T0)
    a2 = backup(repo, "a", images[1], started=T0 + timedelta(hours=1))
    a3 = backup(repo, "a", images[2], started=T0 + timedelta(hours=2))
    b1 = backup(repo, "b", images[3], started=T0 + timedelta(hours=3))
    truncated = repo.points_dir / f"{a3.id}.json"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (repo.points_dir / f"{b1.id}.json").write_bytes(b"\x00\xff garbage \xfe")
    renamed = "20250302T000000Z-0badc0de"
    (repo.points_dir / f"{renamed}.json").write_bytes((repo.points_dir / f"{a1.id}.json").read_bytes())
    future = "20250303T000000Z-f0f0f0f0"
    body = json.loads((repo.points_dir / f"{a2.id}.json").read_text()) | {"version": 3, "id": future}
    (repo.points_dir / f"{future}.json").write_text(json.dumps(body))

    assert [m.id for m in repo.points()] == [a1.id, a2.id]
    assert repo.latest("a") == a2 and repo.latest("b") is None
    broken = dict(repo.broken_points())
    assert sorted(broken) == sorted([a3.id, b1.id, renamed, future])
    assert broken[a3.id].startswith("unreadable: ") and broken[b1.id].startswith("unreadable: ")
    assert broken[renamed] == f"holds restore point {a1.id}, not {renamed}"
    assert broken[future].startswith("unsupported format version 3")
    with pytest.raises(RepositoryError, match=rf"^restore point {a3.id} is broken: .*{a3.id}\.json: unreadable: "):
        repo.restore(a3.id, 0, tmp_path / "a3.img")

    report = repo.verify()
    assert not report.ok and report.problems == () and report.points == 2
    assert {b.id for b in report.broken_points} == set(broken) and report.damaged == tuple(sorted(broken))
    assert "4 unreadable manifest(s)" in report.summary()

    after = backup(repo, "a", images[2], started=T0 + timedelta(hours=5))  # backups go on
    assert repo.latest("a") == after
    assert repo.restore(a2.id, 0, tmp_path / "a2.img").sha256 == sha256(images[1])

    with pytest.raises(RepositoryError, match=rf"prune: restore point {sorted(broken)[0]} is broken .* \(and 3 "
                                              "more\\); its chunks are unknown, so nothing is deleted") as exc:
        repo.prune()
    one_line(exc)
    result = repo.prune(forget=sorted(broken))
    assert result.points_removed == 4 and repo.broken_points() == [] and repo.verify().ok
    assert repo.restore(a1.id, 0, tmp_path / "a1.img").sha256 == sha256(images[0])


# -- corrupt chunks: quarantine and self-healing -----------------------------------------------------------------


def test_a_corrupt_chunk_is_quarantined_names_exactly_its_points_and_the_next_write_heals_it(
        repo: Repository, tmp_path: Path) -> None:
    x, y, z = (random_bytes(BLOCK_SIZE, s) for s in (40, 41, 42))
    p1 = backup(repo, "vm-1", x + y)
    p2 = backup(repo, "vm-2", z, x, started=T0 + timedelta(1))
    p3 = backup(repo, "vm-3", z, started=T0 + timedelta(2))
    p4 = backup(repo, "vm-2", z, x[:1000], started=T0 + timedelta(3))  # x[:1000] is another chunk
    assert repo.verify().ok
    flip_a_byte(repo.chunks.path(sha256(x)))

    report = repo.verify()
    assert not report.ok and report.corrupt == (sha256(x),) and report.missing == ()
    assert report.broken == {p1.id: (0,), p2.id: (1,)} and report.damaged == (p1.id, p2.id)
    assert report.vms == {p1.id: "vm-1", p2.id: "vm-2"}
    bad = repo.path / report.problems[0].quarantined
    assert bad == repo.chunks.path(sha256(x)).with_name(f"{sha256(x)}.0.bad") and bad.is_file()
    assert not repo.chunks.present(sha256(x))
    assert [(q.chunk, q.rewritten) for q in report.quarantine] == [(sha256(x), False)]

    again = repo.verify()  # until written again, the chunk is missing and its points are broken
    assert again.missing == (sha256(x),) and again.corrupt == () and again.damaged == (p1.id, p2.id)
    assert "quarantined as chunks/" in again.problems[0].detail
    with pytest.raises(RepositoryError, match=r"is missing \(quarantined as chunks/") as exc:
        repo.restore(p1.id, 0, tmp_path / "p1.img")
    assert f"cannot restore {p1.id} disk 0 block 0: " in one_line(exc)

    with repo.begin("job-2", VmIdentity(name="vm-1"), {}) as point, \
            pytest.raises(BaseDamaged, match=rf"base restore point {p1.id} disk 0 lost 1 chunk") as exc:
        point.disk(0, "Hard disk 1", 2 * BLOCK_SIZE, base=p1)  # a kept block would be broken too
    one_line(exc)

    healed = backup(repo, "vm-4", x, started=T0 + timedelta(4))  # the same bytes, in a new point
    assert healed.disk(0).stats.new_chunks == 1 and repo.chunks.present(sha256(x))
    report = repo.verify()
    assert report.ok and [(q.chunk, q.rewritten) for q in report.quarantine] == [(sha256(x), True)]
    assert repo.restore(p1.id, 0, tmp_path / "p1.img").sha256 == sha256(x + y)
    assert repo.restore(p2.id, 1, tmp_path / "p2.img").sha256 == sha256(x)
    for point, disk, image in ((p2, 0, z), (p3, 0, z), (p4, 1, x[:1000])):
        assert repo.restore(point.id, disk, tmp_path / f"{point.id}.img").sha256 == sha256(image)

    assert repo.prune().quarantine_removed == 1 and not bad.exists()


def test_a_restore_that_finds_a_corrupt_chunk_quarantines_it_and_names_point_disk_and_block(
        repo: Repository, tmp_path: Path) -> None:
    blocks = [random_bytes(BLOCK_SIZE, 50 + i) for i in range(3)]
    point = backup(repo, "web-05", bytes(BLOCK_SIZE), b"".join(blocks))
    other = backup(repo, "web-06", blocks[0], started=T0 + timedelta(1))
    repo.chunks.path(sha256(blocks[2])).write_bytes(b"")  # truncated to nothing

    with pytest.raises(RepositoryError) as exc:
        repo.restore(point.id, 1, tmp_path / "web-05.img")
    text = one_line(exc)
    assert text.startswith(f"cannot restore {point.id} disk 1 block 2: chunk {sha256(blocks[2])} is corrupt: ")
    assert text.endswith(f"; quarantined as chunks/{sha256(blocks[2])[:2]}/{sha256(blocks[2])}.0.bad")
    assert not (tmp_path / "web-05.img").exists() and [p for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    assert not repo.chunks.present(sha256(blocks[2]))
    report = repo.verify()
    assert report.missing == (sha256(blocks[2]),) and report.damaged == (point.id,)
    assert repo.restore(other.id, 0, tmp_path / "web-06.img").sha256 == sha256(blocks[0])


def test_quarantine_leaves_a_chunk_written_again_since_it_was_read(repo: Repository) -> None:
    data = random_bytes(10_000, 60)
    backup(repo, "q", data)
    chunk = sha256(data)
    stale = os.stat(repo.chunks.path(chunk))
    repo.chunks.path(chunk).unlink()
    repo.chunks.put(data)  # a writer stores it again under a new inode
    assert repo.chunks.quarantine(chunk, stale) is None and repo.chunks.present(chunk)
    moved = repo.chunks.quarantine(chunk)
    assert moved is not None and moved.name == f"{chunk}.0.bad" and not repo.chunks.present(chunk)
    repo.chunks.put(data)
    assert repo.chunks.quarantine(chunk).name == f"{chunk}.1.bad"  # type: ignore[union-attr]


# -- the verify command ------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, repo: Repository) -> Path:
    config = tmp_path / "verify.yaml"
    config.write_text(json.dumps({
        "vcenter": {"url": "https://vcenter.invalid"},
        "proxies": [{"name": "p1", "kind": "physical", "cpus": 4, "ram_mb": 8192}],
        "job": {"select": {"names": ["*"]}},
        "repository": {"path": str(repo.path)},
    }))
    return config


def test_verify_prints_names_literally_and_its_json_names_broken_points(repo: Repository, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    hostile = ["web-05 [/]", "[bold]x[/bold]", "web [prod] 06", ":smile: ünï"]
    data = {name: random_bytes(20_000, i) for i, name in enumerate(hostile)}
    points = {name: backup(repo, name, image, started=T0 + timedelta(i)) for i, (name, image) in
              enumerate(data.items())}
    keep = backup(repo, "fine", random_bytes(20_000, 99), started=T0 + timedelta(9))
    for name in hostile[:3]:
        flip_a_byte(repo.chunks.path(sha256(data[name])))
    unreadable = repo.points_dir / f"{points[hostile[3]].id}.json"
    unreadable.write_text('{"version": 1, "id": "[red]')
    config = write_config(tmp_path, repo)

    assert main(["verify", "--config", str(config)]) == 4
    out = capsys.readouterr().out
    assert out.startswith("damaged: 4 restore points, 4 chunks: 0 missing, 3 corrupt; ")
    for name in hostile[:3]:
        assert f"{points[name].id} ({name}): disks 0 cannot be restored" in out
    assert f"{points[hostile[3]].id}: broken: unreadable: " in out
    assert "quarantined chunk files: 3 (3 not written again yet" in out and keep.id not in out

    assert main(["verify", "--config", str(config), "--json"]) == 4
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["corrupt"] == []  # quarantined by the first run: missing now
    assert sorted(report["missing"]) == sorted(sha256(data[n]) for n in hostile[:3])
    assert [b["id"] for b in report["broken_points"]] == [points[hostile[3]].id]
    assert report["broken_points"][0]["reason"].startswith("unreadable: ")
    assert report["damaged"] == sorted(points[n].id for n in hostile)
    assert {u["vm"] for p in report["problems"] for u in p["used_by"]} == set(hostile[:3])
    assert [q["rewritten"] for q in report["quarantine"]] == [False] * 3

    for name in hostile[:3]:  # the next backup of the same data heals them
        backup(repo, f"{name} again", data[name], started=T0 + timedelta(20))
    unreadable.unlink()
    assert main(["verify", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_restore_of_a_broken_point_fails_with_one_line_naming_it(repo: Repository, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    point = backup(repo, "db-01", random_bytes(10_000, 70))
    (repo.points_dir / f"{point.id}.json").write_bytes(b'{"version": 1, "id": "')
    config = write_config(tmp_path, repo)
    code = main(["restore", "disk", "--config", str(config), "--vm", "db-01", "--point", point.id, "--disk", "0",
                 "--to", str(tmp_path / "db-01.img")])
    err = capsys.readouterr().err.strip()
    assert code == 4 and "\n" not in err
    assert err.startswith(f"vsphere-proxy: error: restore point {point.id} is broken: ") and "unreadable" in err
