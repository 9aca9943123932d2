"""The backup repository (docs/repository.md): round trips, holes, dedup, CBT keeps, verify, prune, crashes, locks;
manifest versions 1 and 2 and the NVRAM chunk."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from vsphere_proxy.repository import (
    BLOCK_SIZE,
    DiskLayout,
    DiskRef,
    Manifest,
    NicRecord,
    NvramRecord,
    PointWriter,
    Repository,
    RepositoryError,
    RepositoryFull,
    TagRecord,
    VmConfig,
    VmIdentity,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 3, 1, 22, 0, tzinfo=UTC)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def compressible(n: int, seed: int = 0) -> bytes:
    line = f"vsphere-proxy block {seed:08d} ".encode()
    return (line * (n // len(line) + 1))[:n]


def write_disk(point: PointWriter, index: int, image: bytes, label: str = "") -> None:
    disk = point.disk(index, label or f"Hard disk {index + 1}", len(image))
    for offset in range(0, len(image), BLOCK_SIZE):
        disk.write(offset, image[offset:offset + BLOCK_SIZE])


def backup(repo: Repository, vm: str, *images: bytes, started: datetime = T0, job: str = "job-1") -> Manifest:
    with repo.begin(job, VmIdentity(name=vm, moref=f"vm-{vm}"), {"cpus": 2}, started=started) as point:
        for index, image in enumerate(images):
            write_disk(point, index, image)
        return point.commit(ended=started + timedelta(minutes=5))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_files(repo: Repository) -> set[str]:
    return {chunk for chunk, _ in repo.chunks.walk()}


def assert_one_line(exc: pytest.ExceptionInfo[RepositoryError]) -> None:
    assert "\n" not in str(exc.value) and str(exc.value)


# -- round trips -------------------------------------------------------------------------------------------------


def test_round_trip_of_random_compressible_and_zero_blocks_with_a_short_last_block(repo: Repository,
                                                                                   tmp_path: Path) -> None:
    image = b"".join([random_bytes(BLOCK_SIZE, 1), compressible(BLOCK_SIZE), bytes(BLOCK_SIZE),
                      random_bytes(BLOCK_SIZE, 2), random_bytes(123_457, 3)])
    manifest = backup(repo, "db-01", image)

    disk = manifest.disk(0)
    assert disk.capacity == len(image) and len(disk.blocks) == 5
    assert disk.blocks[2] is None and all(b is not None for i, b in enumerate(disk.blocks) if i != 2)
    assert disk.stats.bytes_in == len(image)
    assert (disk.stats.new_chunks, disk.stats.zero_blocks, disk.stats.dedup_chunks) == (4, 1, 0)
    assert repo.chunks.path(disk.blocks[1]).stat().st_size < BLOCK_SIZE // 100  # the text block compresses
    assert disk.stats.new_bytes_stored == sum(p.stat().st_size for _, p in repo.chunks.walk())

    result = repo.restore(manifest.id, 0, tmp_path / "db-01.img")
    assert result.sha256 == sha256(image) == sha256((tmp_path / "db-01.img").read_bytes())
    assert result.bytes == len(image) == (tmp_path / "db-01.img").stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_zero_blocks_are_holes_and_restore_sparse(repo: Repository, tmp_path: Path) -> None:
    image = bytes(3 * BLOCK_SIZE) + random_bytes(BLOCK_SIZE, 4) + bytes(4 * BLOCK_SIZE)
    manifest = backup(repo, "mostly-empty", image)
    assert manifest.disk(0).blocks.count(None) == 7 and len(chunk_files(repo)) == 1

    result = repo.restore(manifest.id, 0, tmp_path / "sparse.img")
    st = os.stat(tmp_path / "sparse.img")
    assert result.sha256 == sha256(image) and st.st_size == len(image)
    assert st.st_blocks * 512 < len(image) // 2


def test_empty_and_all_zero_disks(repo: Repository, tmp_path: Path) -> None:
    manifest = backup(repo, "blank", b"", bytes(BLOCK_SIZE + 10))
    assert manifest.disk(0).blocks == () and manifest.disk(1).blocks == (None, None)
    assert chunk_files(repo) == set()
    assert repo.restore(manifest.id, 1, tmp_path / "z.img").sha256 == sha256(bytes(BLOCK_SIZE + 10))
    assert repo.restore(manifest.id, 0, tmp_path / "e.img").bytes == 0


# -- dedup and incrementals --------------------------------------------------------------------------------------


def test_dedup_across_disks_vms_and_restore_points(repo: Repository) -> None:
    image = random_bytes(2 * BLOCK_SIZE, 5) + compressible(BLOCK_SIZE)
    first = backup(repo, "web-01", image, image)
    assert first.disk(0).stats.new_chunks == 3
    assert first.disk(1).stats.new_chunks == 0 and first.disk(1).stats.dedup_chunks == 3
    chunks = chunk_files(repo)
    assert len(chunks) == 3

    other_vm = backup(repo, "web-02", image, started=T0 + timedelta(hours=1))
    next_point = backup(repo, "web-01", image, image, started=T0 + timedelta(days=1))
    for m in (other_vm, next_point):
        assert all(d.stats.new_bytes_stored == 0 and d.stats.dedup_chunks == 3 for d in m.disks)
        assert m.disks[0].blocks == first.disks[0].blocks
    assert chunk_files(repo) == chunks


def test_keep_reuses_the_base_points_entries(repo: Repository, tmp_path: Path) -> None:
    blocks = [random_bytes(BLOCK_SIZE, 10 + i) for i in range(3)] + [random_bytes(1000, 13)]
    base = backup(repo, "app-01", b"".join(blocks))

    changed = random_bytes(BLOCK_SIZE, 99)
    with repo.begin("job-2", VmIdentity(name="app-01", moref="vm-app-01"), {}, started=T0 + timedelta(1)) as point:
        disk = point.disk(0, "Hard disk 1", base.disk(0).capacity, base=repo.latest("app-01"), change_id="52 1f/7")
        disk.keep(0)
        disk.write(BLOCK_SIZE, changed)
        disk.keep(2, count=2)
        assert disk.stats.kept_blocks == 3 and disk.stats.bytes_in == BLOCK_SIZE
        incremental = point.commit()

    new, old = incremental.disk(0), base.disk(0)
    assert new.change_id == "52 1f/7"
    assert (new.blocks[0], new.blocks[2], new.blocks[3]) == (old.blocks[0], old.blocks[2], old.blocks[3])
    assert new.blocks[1] == sha256(changed) != old.blocks[1]
    expected = blocks[0] + changed + blocks[2] + blocks[3]
    assert repo.restore(incremental.id, 0, tmp_path / "inc.img").sha256 == sha256(expected)
    assert repo.restore(base.id, 0, tmp_path / "base.img").sha256 == sha256(b"".join(blocks))


def test_keep_refuses_without_a_base_or_across_a_changed_block_length(repo: Repository) -> None:
    base = backup(repo, "grow", random_bytes(BLOCK_SIZE + 10, 20))
    with repo.begin("job-2", VmIdentity(name="grow"), {}) as point:
        disk = point.disk(0, "Hard disk 1", 2 * BLOCK_SIZE, base=base)  # the disk grew: block 1 is longer now
        disk.keep(0)
        with pytest.raises(RepositoryError, match="different length") as exc:
            disk.keep(1)
        assert_one_line(exc)
        fresh = point.disk(1, "Hard disk 2", BLOCK_SIZE)
        with pytest.raises(RepositoryError, match="needs a base"):
            fresh.keep(0)
        with pytest.raises(RepositoryError, match="belongs to VM"):
            point.disk(2, "Hard disk 3", BLOCK_SIZE, base=backup(repo, "someone-else", b"x"))


def test_a_base_point_pruned_before_the_backup_starts_is_refused(repo: Repository) -> None:
    base = backup(repo, "gone", random_bytes(BLOCK_SIZE, 21))
    repo.prune(forget=[base.id])
    with repo.begin("job-2", VmIdentity(name="gone"), {}) as point, \
            pytest.raises(RepositoryError, match="no longer in the repository"):
        point.disk(0, "Hard disk 1", BLOCK_SIZE, base=base)


# -- commit, abort, listing --------------------------------------------------------------------------------------


def test_commit_refuses_uncovered_disks_and_abort_leaves_no_manifest(repo: Repository) -> None:
    with repo.begin("job-1", VmIdentity(name="half"), {}) as point:
        disk = point.disk(0, "Hard disk 1", 4 * BLOCK_SIZE)
        disk.write(0, random_bytes(BLOCK_SIZE, 30))
        with pytest.raises(RepositoryError, match=r"3 of 4 blocks not written: 1-3") as exc:
            point.commit()
        assert_one_line(exc)
    assert repo.points() == [] and repo.point_ids() == []
    with pytest.raises(RepositoryError, match="aborted"):
        disk.write(BLOCK_SIZE, random_bytes(BLOCK_SIZE, 31))
    assert list(repo.locks_dir.iterdir()) == [repo.locks_dir / "lock"]
    repo.lock("exclusive", "check").release()  # the shared lock went with the point


def test_points_are_sorted_filtered_and_latest(repo: Repository) -> None:
    late = backup(repo, "a", b"1", started=T0 + timedelta(hours=2))
    early = backup(repo, "a", b"2", started=T0)
    other = backup(repo, "b", b"3", started=T0 + timedelta(hours=1))
    assert [m.id for m in repo.points()] == [early.id, other.id, late.id]
    assert [m.id for m in repo.points("a")] == [early.id, late.id]
    assert repo.latest("a") == late and repo.latest("nobody") is None
    assert repo.manifest(other.id) == other
    assert json.loads((repo.points_dir / f"{other.id}.json").read_text())["vm"]["moref"] == "vm-b"


# -- verify ------------------------------------------------------------------------------------------------------


def test_verify_reports_corrupt_and_missing_chunks_and_the_points_they_break(repo: Repository) -> None:
    shared, only_b, only_c = (random_bytes(BLOCK_SIZE, s) for s in (40, 41, 42))
    a = backup(repo, "vm-a", shared)
    b = backup(repo, "vm-b", shared + only_b, started=T0 + timedelta(1))
    c = backup(repo, "vm-c", bytes(BLOCK_SIZE), only_c, started=T0 + timedelta(2))
    assert repo.verify().ok

    flipped = repo.chunks.path(sha256(shared))
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    repo.chunks.path(sha256(only_c)).unlink()

    report = repo.verify()
    assert not report.ok and report.chunks == 3 and report.points == 3
    assert report.corrupt == (sha256(shared),) and report.missing == (sha256(only_c),)
    assert report.broken == {a.id: (0,), b.id: (0,), c.id: (1,)}
    assert "1 missing, 1 corrupt" in report.summary()
    with pytest.raises(RepositoryError, match=r"is missing \(quarantined as chunks/../[0-9a-f]{64}\.0\.bad\)") as exc:
        repo.restore(a.id, 0, repo.path.parent / "a.img")
    assert_one_line(exc)
    assert not (repo.path.parent / "a.img").exists()


# -- versions ----------------------------------------------------------------------------------------------------


def test_unknown_versions_are_refused(repo: Repository) -> None:
    point = backup(repo, "v", b"data")
    manifest_path = repo.points_dir / f"{point.id}.json"
    body = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(body | {"version": 3}))
    with pytest.raises(RepositoryError, match=r"\.json: unsupported format version 3 \(this build reads versions "
                                              r"1, 2\)") as exc:
        repo.manifest(point.id)
    assert_one_line(exc)

    config = json.loads((repo.path / "config").read_text())
    (repo.path / "config").write_text(json.dumps(config | {"version": 7}))
    with pytest.raises(RepositoryError, match=r"config: unsupported format version 7") as exc:
        Repository.open(repo.path)
    assert_one_line(exc)


def test_init_refuses_a_foreign_directory_and_reopens_a_repository(tmp_path: Path, repo: Repository) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(RepositoryError, match="not empty and not a repository") as exc:
        Repository.init(tmp_path / "photos")
    assert_one_line(exc)
    assert Repository.init(repo.path).config.id == repo.config.id
    with pytest.raises(RepositoryError, match="no such repository"):
        Repository.open(tmp_path / "absent")


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_writes_raise_one_line_errors(repo: Repository) -> None:
    with repo.begin("job-1", VmIdentity(name="bad"), {}) as point:
        disk = point.disk(0, "Hard disk 1", 2 * BLOCK_SIZE + 100)
        cases = [
            (lambda: disk.write(512, b"x" * BLOCK_SIZE), "not a multiple of the block size"),
            (lambda: disk.write(0, b"x" * (BLOCK_SIZE + 1)), "expected 4194304"),
            (lambda: disk.write(BLOCK_SIZE, b"x" * 100), "expected 4194304"),
            (lambda: disk.write(2 * BLOCK_SIZE, b"x" * BLOCK_SIZE), "expected 100"),
            (lambda: disk.write(3 * BLOCK_SIZE, b"x"), "beyond the capacity"),
            (lambda: disk.keep(5), "needs a base"),
            (lambda: point.disk(0, "again", 10), "added twice"),
            (lambda: repo.manifest("../config"), "invalid restore point id"),
            (lambda: repo.manifest("20990101T000000Z-00000000"), "no restore point"),
            (lambda: repo.begin("j", VmIdentity(name="x"), {"when": object()}), "not JSON"),
            (lambda: repo.begin("j", VmIdentity(name="x"), {}, started=datetime(2025, 1, 1)), "timezone-aware"),
        ]
        for call, message in cases:
            with pytest.raises(RepositoryError, match=message) as exc:
                call()
            assert_one_line(exc)
    assert chunk_files(repo) == set()


# -- prune and locks ---------------------------------------------------------------------------------------------


def test_prune_removes_only_unreferenced_chunks_and_forgets_points(repo: Repository, tmp_path: Path) -> None:
    kept_image = random_bytes(BLOCK_SIZE, 50) + random_bytes(BLOCK_SIZE, 51)
    a = backup(repo, "a", kept_image)
    b = backup(repo, "b", kept_image[:BLOCK_SIZE] + random_bytes(10, 52), started=T0 + timedelta(1))
    with repo.begin("job-x", VmIdentity(name="aborted"), {}) as point:
        write_disk(point, 0, random_bytes(BLOCK_SIZE, 53))  # never committed
    (repo.scratch / "12-deadbeef.tmp").write_bytes(b"left by a crash")
    assert len(chunk_files(repo)) == 4

    result = repo.prune()
    assert (result.chunks_removed, result.chunks_kept, result.tmp_removed) == (1, 3, 1)
    assert chunk_files(repo) == a.chunks() | b.chunks() and list(repo.scratch.iterdir()) == []
    assert repo.verify().ok

    result = repo.prune(forget=[a.id])
    assert (result.points_removed, result.chunks_removed, result.chunks_kept) == (1, 1, 2)
    assert [m.id for m in repo.points()] == [b.id] and chunk_files(repo) == b.chunks()
    assert repo.restore(b.id, 0, tmp_path / "b.img").sha256 == sha256(kept_image[:BLOCK_SIZE] + random_bytes(10, 52))
    with pytest.raises(RepositoryError, match="no restore point"):
        repo.prune(forget=["20990101T000000Z-00000000"])


def test_prune_and_backup_exclude_each_other(repo: Repository) -> None:
    point = repo.begin("job-1", VmIdentity(name="busy"), {})
    with pytest.raises(RepositoryError, match=r"repository is locked: shared lock by pid \d+") as exc:
        repo.prune()
    assert_one_line(exc)
    point.abort()
    with repo.lock("exclusive", "maintenance"), pytest.raises(RepositoryError, match="exclusive lock"):
        repo.begin("job-2", VmIdentity(name="busy"), {})
    assert repo.prune().chunks_removed == 0


# -- concurrency -------------------------------------------------------------------------------------------------


def test_concurrent_writers_across_disks_and_points(repo: Repository, tmp_path: Path) -> None:
    common = random_bytes(BLOCK_SIZE, 60)  # every stream writes this chunk at the same moment
    images = {(vm, d): common + random_bytes(BLOCK_SIZE + 7 * d, 61 + 10 * vm + d) for vm in range(3) for d in range(2)}
    start = threading.Barrier(len(images))
    manifests: dict[int, Manifest] = {}
    errors: list[BaseException] = []
    points = {vm: repo.begin("job-c", VmIdentity(name=f"vm-{vm}"), {}) for vm in range(3)}

    def stream(vm: int, d: int) -> None:
        try:
            image = images[vm, d]
            disk = points[vm].disk(d, f"Hard disk {d + 1}", len(image))
            start.wait()
            for offset in range(0, len(image), BLOCK_SIZE):
                disk.write(offset, image[offset:offset + BLOCK_SIZE])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=key) for key in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for vm, point in points.items():
        manifests[vm] = point.commit()
    blocks = {sha256(image[o:o + BLOCK_SIZE]) for image in images.values() for o in range(0, len(image), BLOCK_SIZE)}
    assert repo.verify().ok and chunk_files(repo) == blocks and len(blocks) == 1 + 3 + 3 * 2
    for (vm, d), image in images.items():
        assert repo.restore(manifests[vm].id, d, tmp_path / f"{vm}-{d}.img").sha256 == sha256(image)


# -- crashes -----------------------------------------------------------------------------------------------------

WRITER = """
import random, sys
from vsphere_proxy.repository import BLOCK_SIZE, Repository, VmIdentity
repo, mode, rng = Repository.open(sys.argv[1]), sys.argv[2], random.Random(int(sys.argv[3]))
n = 0
while True:
    point = repo.begin("crash", VmIdentity(name=f"vm-{n % 3}"), {"n": n})
    if mode == "stop-mid-point" and n == 3:
        disk = point.disk(0, "Hard disk 1", 2 * BLOCK_SIZE)
        disk.write(0, rng.randbytes(BLOCK_SIZE))
        print("mid", point.id, flush=True)
        sys.stdin.read()
    size = rng.randrange(1, 200_000) if mode == "fast" else 2 * BLOCK_SIZE
    disk = point.disk(0, "Hard disk 1", size)
    for offset in range(0, size, BLOCK_SIZE):
        disk.write(offset, rng.randbytes(min(BLOCK_SIZE, size - offset)))
    print("committed", point.commit().id, flush=True)
    n += 1
"""


def start_writer(repo: Repository, mode: str, seed: int) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(repo.path), mode, str(seed)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def kill_after(proc: subprocess.Popen[str], marker: str, count: int) -> list[str]:
    """Read the writer's lines until `count` start with `marker`, then SIGKILL it; the lines read."""
    lines: list[str] = []
    assert proc.stdout is not None
    while sum(line.startswith(marker) for line in lines) < count:
        line = proc.stdout.readline()
        assert line, "writer exited early"
        lines.append(line)
    return lines


def assert_consistent(repo: Repository) -> list[Manifest]:
    """Every visible manifest is whole, and every chunk it references is present and intact."""
    manifests = repo.points()
    assert all(repo.chunks.path(c).exists() for m in manifests for c in m.chunks())
    assert repo.verify().ok
    return manifests


def test_a_writer_killed_mid_point_leaves_no_manifest(repo: Repository) -> None:
    proc = start_writer(repo, "stop-mid-point", 70)
    try:
        lines = kill_after(proc, "mid", 1)
    finally:
        proc.kill()
        proc.wait()
    committed = [line.split()[1] for line in lines if line.startswith("committed")]
    interrupted = lines[-1].split()[1]
    assert len(committed) == 3
    assert [m.id for m in sorted(assert_consistent(repo), key=lambda m: m.id)] == sorted(committed)
    assert not (repo.points_dir / f"{interrupted}.json").exists()
    assert len(chunk_files(repo)) == 7  # 3 points x 2 chunks + the interrupted point's first chunk

    result = repo.prune()  # the dead writer's lock went with it
    assert result.chunks_removed == 1 and list(repo.locks_dir.iterdir()) == [repo.locks_dir / "lock"]
    assert assert_consistent(repo)


def test_writers_killed_at_random_moments_never_expose_a_broken_point(repo: Repository) -> None:
    rng = random.Random(71)
    seen: set[str] = set()
    for round_ in range(3):
        proc = start_writer(repo, "fast", round_)
        try:
            lines = kill_after(proc, "committed", 3)
            time.sleep(rng.uniform(0, 0.03))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        seen |= {line.split()[1] for line in lines}
        visible = {m.id for m in assert_consistent(repo)}
        assert seen <= visible
    repo.prune()
    assert {m.id for m in assert_consistent(repo)} >= seen


# -- manifest version 2: the VM configuration and the NVRAM chunk ------------------------------------------------


def vm_config(nvram_file: str = "[ds-1] db-01/db-01.nvram") -> VmConfig:
    return VmConfig(
        config_info={"_vimtype": "vim.vm.ConfigInfo", "name": "db-01", "version": "vmx-19",
                     "hardware": {"_vimtype": "vim.vm.VirtualHardware", "numCPU": 4, "memoryMB": 8192, "device": []}},
        hardware_version="vmx-19", firmware="efi", guest_id="rhel9_64Guest", cpus=4, cores_per_socket=2,
        memory_mb=8192, host="esx-01", cluster="Prod", folder="Production/DB", resource_pool="Prod/Resources",
        resource_pool_moref="resgroup-14", datastore="ds-1",
        nics=(NicRecord(key=4000, label="Network adapter 1", device_type="vmxnet3", network="Prod-Net",
                        network_moref="network-17", network_kind="standard", mac="00:50:56:a1:00:01",
                        mac_type="assigned"),),
        disks=(DiskLayout(index=0, key=2000, label="Hard disk 1", controller_key=1000, controller="pvscsi", bus=0,
                          unit=0, capacity=BLOCK_SIZE, file="[ds-1] db-01/db-01.vmdk", datastore="ds-1",
                          provisioning="thin"),
               DiskLayout(index=None, key=2001, label="Hard disk 2", controller_key=1000, controller="pvscsi", bus=0,
                          unit=1, capacity=1 << 30, file="[ds-1] db-01/db-01_1.vmdk", datastore="ds-1",
                          provisioning="thick-eager", disk_mode="independent_persistent")),
        tags=(TagRecord(category="Tier", name="Gold"),), custom_attributes={"Owner": "dba-team"},
        nvram=NvramRecord(chunk="0" * 64, size=0, file=nvram_file),
    )


def backup_v2(repo: Repository, nvram: bytes, image: bytes, started: datetime = T0) -> Manifest:
    with repo.begin("job-1", VmIdentity(name="db-01", moref="vm-42"), {"cpus": 4}, started=started,
                    vm_config=vm_config(), nvram=nvram) as point:
        write_disk(point, 0, image)
        return point.commit(ended=started + timedelta(minutes=5))


def test_a_version_2_point_round_trips_its_vm_configuration_and_nvram(repo: Repository, tmp_path: Path) -> None:
    nvram, image = random_bytes(8684, 70), random_bytes(BLOCK_SIZE, 71)
    point = backup_v2(repo, nvram, image)
    cfg = point.vm_config
    assert point.version == 2 and cfg is not None
    assert cfg.nvram == NvramRecord(chunk=sha256(nvram), size=len(nvram), file="[ds-1] db-01/db-01.nvram")
    assert point.chunks() == {sha256(nvram), sha256(image)} == chunk_files(repo)

    raw = json.loads((repo.points_dir / f"{point.id}.json").read_text())
    assert raw["version"] == 2 and raw["vm_config"]["nvram"]["chunk"] == sha256(nvram)
    assert raw["vm_config"]["nics"][0]["network"] == "Prod-Net" and raw["vm_config"]["disks"][1]["index"] is None
    assert raw["vm_config"]["config_info"]["hardware"]["numCPU"] == 4
    assert repo.manifest(point.id) == point
    assert repo.nvram(point.id) == nvram
    assert repo.restore(point.id, 0, tmp_path / "d0").sha256 == sha256(image)

    again = backup_v2(repo, nvram, image, started=T0 + timedelta(1))  # the same NVRAM file: deduplicated
    assert again.vm_config is not None and again.vm_config.nvram == cfg.nvram
    assert len(chunk_files(repo)) == 2
    report = repo.verify()
    assert report.ok and report.chunks == 2 and report.points == 2


def test_a_version_1_manifest_written_by_hand_still_reads_restores_and_verifies(repo: Repository,
                                                                                tmp_path: Path) -> None:
    block = random_bytes(BLOCK_SIZE, 72)
    chunk = repo.chunks.put(block).chunk
    manifest = {
        "version": 1, "id": "20250301T220000Z-3fa4c2d1", "job_id": "nightly-2025-03-01",
        "vm": {"name": "db-01", "moref": "vm-42", "uuid": "4210", "instance_uuid": "5010"},
        "config": {"cpus": 4, "memory_mb": 16384, "guest": "rhel9_64Guest"},
        "started": "2025-03-01T22:00:00Z", "ended": "2025-03-01T22:07:12Z",
        "disks": [{"index": 0, "label": "Hard disk 1", "capacity": 2 * BLOCK_SIZE, "block_size": BLOCK_SIZE,
                   "change_id": None, "blocks": [chunk, None],
                   "stats": {"bytes_in": 2 * BLOCK_SIZE, "new_chunks": 1, "new_bytes_stored": 1211,
                             "dedup_chunks": 0, "zero_blocks": 1, "kept_blocks": 0}}],
    }
    (repo.points_dir / "20250301T220000Z-3fa4c2d1.json").write_text(json.dumps(manifest))
    point = repo.manifest("20250301T220000Z-3fa4c2d1")
    assert point.version == 1 and point.vm_config is None and point.nvram is None and point.chunks() == {chunk}
    assert repo.nvram(point.id) is None
    assert repo.restore(point.id, 0, tmp_path / "d0").sha256 == sha256(block + bytes(BLOCK_SIZE))
    assert repo.verify().ok and repo.latest("db-01") == point
    assert backup(repo, "disks-only", b"x").version == 1  # a point begun without a VM configuration


def test_a_manifest_whose_version_and_vm_config_disagree_is_refused(repo: Repository) -> None:
    point = backup_v2(repo, b"nvram", b"disk")
    path = repo.points_dir / f"{point.id}.json"
    body = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in body.items() if k != "vm_config"}))
    with pytest.raises(RepositoryError, match=r"invalid record: a version 2 manifest must hold vm_config$") as exc:
        repo.manifest(point.id)
    assert_one_line(exc)
    assert [b.id for b in repo.broken_points()] == [point.id]
    path.write_text(json.dumps(body | {"version": 1}))
    with pytest.raises(RepositoryError, match="a version 1 manifest holds no vm_config"):
        repo.manifest(point.id)
    with pytest.raises(ValidationError, match="must hold vm_config"):
        Manifest(**{k: v for k, v in body.items() if k != "vm_config"})
    with pytest.raises(RepositoryError, match="needs the VM's configuration") as exc:
        repo.begin("j", VmIdentity(name="x"), {}, nvram=b"nvram")
    assert_one_line(exc)
    with pytest.raises(RepositoryError, match="no NVRAM file was given"):
        repo.begin("j", VmIdentity(name="x"), {}, vm_config=vm_config())
    repo.lock("exclusive", "check").release()  # the refused begins hold no lock


def test_a_corrupt_nvram_chunk_is_quarantined_named_and_breaks_its_point(repo: Repository) -> None:
    nvram, image = random_bytes(9000, 73), random_bytes(1000, 74)
    point, plain = backup_v2(repo, nvram, image), backup(repo, "other", image, started=T0 + timedelta(1))
    stored = repo.chunks.path(sha256(nvram))
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stored.write_bytes(bytes(raw))

    with pytest.raises(RepositoryError, match=rf"^cannot read the NVRAM of restore point {point.id}: chunk "
                                              rf"{sha256(nvram)} is corrupt: .*; quarantined as chunks/") as exc:
        repo.nvram(point.id)
    assert_one_line(exc)
    assert not repo.chunks.present(sha256(nvram))
    report = repo.verify()
    assert not report.ok and report.missing == (sha256(nvram),)
    assert report.problems[0].used_by == (DiskRef.nvram_of(point.id),) and str(DiskRef.nvram_of("p")) == "p nvram"
    assert report.nvram == (point.id,) and report.broken == {} and report.damaged == (point.id,)
    assert plain.id not in report.damaged and f"restore points broken: {point.id}" in report.summary()
    with pytest.raises(RepositoryError, match=r"is missing \(quarantined as chunks/../[0-9a-f]{64}\.0\.bad\)"):
        repo.nvram(point.id)

    healed = backup_v2(repo, nvram, image, started=T0 + timedelta(2))  # the same bytes are stored again
    assert repo.nvram(point.id) == nvram == repo.nvram(healed.id) and repo.verify().ok


def test_prune_keeps_a_referenced_nvram_chunk_and_removes_it_with_its_last_point(repo: Repository) -> None:
    image = random_bytes(1000, 75)
    first = backup_v2(repo, b"first nvram", image)
    second = backup_v2(repo, b"second nvram", image, started=T0 + timedelta(1))
    assert repo.prune().chunks_removed == 0
    assert chunk_files(repo) == {sha256(b"first nvram"), sha256(b"second nvram"), sha256(image)}
    result = repo.prune(forget=[first.id])
    assert result.chunks_removed == 1 and chunk_files(repo) == {sha256(b"second nvram"), sha256(image)}
    assert repo.nvram(second.id) == b"second nvram"


def test_an_nvram_file_that_does_not_fit_ends_the_point_like_a_block(tmp_path: Path) -> None:
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        repo = Repository.init(where / "repo")
        with pytest.raises(RepositoryFull, match=rf"^repository full: \d+ bytes free on {repo.path}$"):
            repo.begin("job-1", VmIdentity(name="db-01"), {}, vm_config=vm_config(), nvram=random_bytes(2 << 20, 76))
        assert list(repo.scratch.iterdir()) == [] and chunk_files(repo) == set()
        repo.lock("exclusive", "check").release()  # the point's shared lock was released
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
