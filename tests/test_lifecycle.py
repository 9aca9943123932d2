"""The repository's lifecycle on the command line: `forget` (retention rules or given points) with its reasons,
`protect`/`unprotect`, `prune` (bytes freed; waits for or refuses running jobs with exit 5), `copy` to a second
repository (clear or encrypted, only the chunks it lacks, checked there), `verify --sample`; and `forget --prune`
and `copy` killed with SIGKILL at random moments, after which every remaining point restores bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.cli import main
from vsphere_proxy.repository import Manifest, Repository, Secret, VmIdentity
from vsphere_proxy.repository.format import dump_record
from vsphere_proxy.repository.lifecycle import Hold

BLOCK = 4 << 20
T0 = datetime(2026, 11, 1, 1, 0, tzinfo=UTC)
PASSPHRASE = "the disaster recovery passphrase"


def block(seed: str) -> bytes:
    """4 MiB unique to `seed`, compressible (a 4 KiB random tile repeated): chunks are distinct, files small."""
    tile = hashlib.sha512(seed.encode()).digest() * 64
    return (tile * (BLOCK // len(tile)))[:BLOCK]


def image(vm: str, n: int, blocks: int = 3) -> bytes:
    """Disk `n` of `vm`: block 0 shared by every point of the VM, block 1 unique to the point, a hole, then a
    short last block unique to the point."""
    parts = [block(f"{vm}/base"), block(f"{vm}/{n}"), bytes(BLOCK)][:blocks]
    return b"".join(parts) + f"{vm}-{n}".encode() * 10


def backup(repo: Repository, vm: str, data: bytes, started: datetime) -> Manifest:
    with repo.begin("job-1", VmIdentity(name=vm), {"cpus": 1}, started) as point:
        disk = point.disk(0, "Hard disk 1", len(data))
        for offset in range(0, len(data), BLOCK):
            disk.write(offset, data[offset:offset + BLOCK])
        return point.commit()


def fill(repo: Repository, vms: tuple[str, ...] = ("vm-a", "vm-b"), days: int = 8) -> dict[str, str]:
    """A daily point per VM for `days` days; point id -> SHA-256 of its disk image."""
    expected = {}
    for day in range(days):
        for vm in vms:
            data = image(vm, day)
            point = backup(repo, vm, data, T0 + timedelta(days=day, minutes=vms.index(vm)))
            expected[point.id] = hashlib.sha256(data).hexdigest()
    return expected


def write_config(tmp_path: Path, repository: Path, **extra: Any) -> Path:
    config = tmp_path / "c.yaml"
    data: dict[str, Any] = {
        "vcenter": {"url": "https://vcenter.invalid"},
        "proxies": [{"name": "p1", "kind": "physical", "cpus": 4, "ram_mb": 8192}],
        "job": {"select": {"names": ["*"]}, **({"policy": extra.pop("policy")} if "policy" in extra else {})},
        "repository": {"path": str(repository)},
        **extra,
    }
    config.write_text(json.dumps(data))
    return config


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def restores(repo: Repository, expected: dict[str, str], tmp_path: Path) -> None:
    """Every point in `repo` restores to its expected image, and verify is clean."""
    for m in repo.points():
        got = repo.restore(m.id, 0, tmp_path / "check.img")
        assert got.sha256 == expected[m.id], m.id
    report = repo.verify()
    assert report.ok, report.summary()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


# -- forget and its reasons -----------------------------------------------------------------------------------------


def test_forget_prints_every_point_with_its_reason_and_removes_exactly_those(repo: Repository, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    expected = fill(repo)
    config = write_config(tmp_path, repo.path)
    code, out, _ = cli(capsys, "forget", "--config", str(config), "--keep-last", "2", "--keep-daily", "4",
                       "--timezone", "UTC", "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["dry_run"] and plan["forgotten"] == [] and len(repo.points()) == 16
    kept = {p["id"] for p in plan["points"] if p["keep"]}
    assert len(kept) == 8  # per VM: the 4 newest days (the last 2 among them)
    newest = next(p for p in plan["points"] if p["vm"] == "vm-a")
    assert newest["reasons"] == ["last #1", "daily #1 (2026-11-08)"]
    gone = [p for p in plan["points"] if not p["keep"]]
    assert all(len(p["reasons"]) == 1 for p in gone)

    code, out, _ = cli(capsys, "forget", "--config", str(config), "--keep-last", "2", "--keep-daily", "4",
                       "--timezone", "UTC")
    assert code == 0
    assert "  keep    " in out and "daily #4 (2026-11-05)" in out and "  remove  " in out
    assert out.rstrip().endswith("last 2, daily 4: kept 8, forgot 8 restore points")
    assert {m.id for m in repo.points()} == kept
    restores(repo, expected, tmp_path)  # forgetting deletes manifests only: every chunk is still there


def test_forget_uses_the_job_policy_and_refuses_without_any_rule(repo: Repository, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fill(repo, days=3)
    bare = write_config(tmp_path, repo.path)
    code, _, err = cli(capsys, "forget", "--config", str(bare))
    assert code == 2 and err.count("\n") == 1 and "no rule: set job.policy.retention" in err
    code, _, err = cli(capsys, "forget", "--config", str(bare), "--keep-daily", "0")
    assert code == 2 and err.strip() == "vsphere-proxy: error: --keep-daily: must be >= 1 or -1 (got 0)"
    code, _, err = cli(capsys, "forget", "--config", str(bare), "--keep-last", "1", "--timezone", "Mars/Base")
    assert code == 2 and "--timezone: unknown time zone 'Mars/Base'" in err
    policy = write_config(tmp_path, repo.path, policy={"retention": {"keep_last": 1, "timezone": "UTC"}})
    code, out, _ = cli(capsys, "forget", "--config", str(policy), "--vm", "vm-a", "--json")
    assert code == 0 and json.loads(out)["removed"] == 2
    assert sorted(m.vm.name for m in repo.points()) == ["vm-a", "vm-b", "vm-b", "vm-b"]


def test_a_held_point_is_kept_by_every_rule_and_refused_by_name(repo: Repository, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    fill(repo, days=4)
    config = write_config(tmp_path, repo.path)
    oldest = repo.points("vm-a")[0].id
    code, out, _ = cli(capsys, "protect", "--config", str(config), "--point", oldest, "--until", "2099-12-31",
                       "--reason", "case 4711 [bold]")
    assert code == 0 and "until 2099-12-31 23:59Z: case 4711 [bold]" in out
    code, out, _ = cli(capsys, "forget", "--config", str(config), "--keep-last", "1", "--json")
    decided = {p["id"]: p for p in json.loads(out)["points"]}
    assert decided[oldest]["keep"] and decided[oldest]["reasons"][-1].startswith("protected until 2099-12-31")
    assert oldest in {m.id for m in repo.points()} and len(repo.points()) == 3
    code, _, err = cli(capsys, "forget", "--config", str(config), "--point", oldest)
    assert code == 2 and err.count("\n") == 1 and f"restore point {oldest} is held" in err
    code, _, err = cli(capsys, "protect", "--config", str(config), "--point", "20990101T000000Z-00000000")
    assert code == 2 and "--point: no restore point 20990101T000000Z-00000000" in err
    code, _, err = cli(capsys, "protect", "--config", str(config), "--point", oldest, "--until", "2001-01-01")
    assert code == 2 and "--until 2001-01-01T23:59:59+00:00: is in the past" in err
    assert cli(capsys, "unprotect", "--config", str(config), "--point", oldest)[0] == 0
    assert cli(capsys, "unprotect", "--config", str(config), "--point", oldest)[0] == 2
    code, out, _ = cli(capsys, "forget", "--config", str(config), "--point", oldest, "--prune", "--json")
    assert code == 0 and json.loads(out)["forgotten"] == [oldest] and json.loads(out)["prune"]["bytes_freed"] > 0


def test_an_expired_hold_no_longer_protects_and_an_unreadable_one_does(repo: Repository, tmp_path: Path) -> None:
    fill(repo, vms=("vm-a",), days=3)
    first, second, _ = (m.id for m in repo.points())
    repo.holds_dir.mkdir(exist_ok=True)
    expired = Hold(point=first, until=T0, reason="old case", created=T0 - timedelta(days=1))
    (repo.holds_dir / f"{first}.json").write_bytes(dump_record(expired))
    (repo.holds_dir / f"{second}.json").write_text("{not json")
    states = repo.holds()
    assert not states[first].protects() and states[first].describe().startswith("expired")
    assert states[second].protects() and states[second].describe().startswith("hold cannot be read")
    assert repo.forget([first]) == [first]
    with pytest.raises(Exception, match=f"restore point {second} is held \\(hold cannot be read"):
        repo.forget([second])
    result = repo.prune()
    assert not (repo.holds_dir / f"{first}.json").exists()  # its point is gone: prune removes it
    assert (repo.holds_dir / f"{second}.json").exists() and result.chunks_removed == 2  # the point's own two


# -- prune and running jobs ------------------------------------------------------------------------------------------


def test_prune_reports_bytes_freed_and_waits_for_or_refuses_a_running_job(repo: Repository, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    expected = fill(repo, days=3)
    config = write_config(tmp_path, repo.path)
    gone = [m.id for m in repo.points("vm-a")[:2]]
    unique = set().union(*(m.chunks() for m in repo.points() if m.id in gone)) - set().union(
        *(m.chunks() for m in repo.points() if m.id not in gone))
    sizes = sum(repo.chunks.path(c).stat().st_size for c in unique)
    assert len(unique) == 4  # each point's own two chunks
    repo.forget(gone)
    running = repo.lock("shared", "backup vm-c (job-9)")  # a backup in flight
    code, _, err = cli(capsys, "prune", "--config", str(config))
    assert code == 5 and err.count("\n") == 1 and "repository is locked: shared lock by pid" in err
    code, out, _ = cli(capsys, "forget", "--config", str(config), "--keep-last", "1", "--vm", "vm-b", "--prune")
    assert code == 5 and "prune did not run: repository is locked" in out and len(repo.points("vm-b")) == 1
    code, out, _ = cli(capsys, "prune", "--config", str(config), "--dry-run", "--json")  # beside the backup
    would = json.loads(out)
    assert code == 0 and would["dry_run"] and would["chunks_removed"] == len(unique) + 4
    threading.Timer(1.0, running.release).start()
    code, out, _ = cli(capsys, "prune", "--config", str(config), "--wait", "30", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["bytes_freed"] == would["bytes_freed"]
    freed_vm_b = result["bytes_freed"] - sizes
    assert result["chunks_removed"] == len(unique) + 4 and freed_vm_b > 0  # vm-b: 2 points' own 2 chunks each
    restores(repo, expected, tmp_path)


# -- copy ------------------------------------------------------------------------------------------------------------


def test_copy_to_an_encrypted_repository_writes_only_what_it_lacks_and_back(repo: Repository, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    expected = fill(repo, days=3)
    monkeypatch.setenv("VSP_DR_PASSPHRASE", PASSPHRASE)
    dr = tmp_path / "dr"
    config = write_config(tmp_path, repo.path, repositories=[{
        "name": "dr", "path": str(dr), "select": {"latest": 2},
        "encryption": {"passphrase_env": "VSP_DR_PASSPHRASE", "kdf_memory_mib": 8, "kdf_time_cost": 1}}])
    code, out, _ = cli(capsys, "copy", "--config", str(config), "--json")
    assert code == 0
    first = json.loads(out)
    assert first["selected"] == 4 and first["copied"] == 4 and first["failed"] == 0
    # per VM: the shared block once, each point's own 2 chunks: 2 VMs x 5 chunks, each checked on the target
    assert first["chunks_written"] == 10 and first["chunks_verified"] == 10
    target = Repository.open(dr, Secret("passphrase", PASSPHRASE.encode(), "test"))
    assert target.encrypted and not set(repo.chunks.walk()) & set(target.chunks.walk())
    restores(target, expected, tmp_path)

    code, out, _ = cli(capsys, "copy", "--config", str(config), "--json")
    again = json.loads(out)
    assert code == 0 and again["copied"] == 0 and again["skipped"] == 4 and again["chunk_bytes_written"] == 0

    back = tmp_path / "back"
    # the DR repository copied back into a clear one: chunks named by SHA-256 again, same as the source's
    dr_config = tmp_path / "dr.yaml"
    dr_config.write_text(json.dumps({
        "vcenter": {"url": "https://vcenter.invalid"},
        "proxies": [{"name": "p1", "kind": "physical", "cpus": 4, "ram_mb": 8192}],
        "job": {"select": {"names": ["*"]}},
        "repository": {"path": str(dr), "encryption": {"passphrase_env": "VSP_DR_PASSPHRASE"}}}))
    code, out, _ = cli(capsys, "copy", "--config", str(dr_config), "--to-repository", str(back), "--json")
    assert code == 0 and json.loads(out)["copied"] == 4
    clear = Repository.open(back)
    assert {c for c, _ in clear.chunks.walk()} <= {c for c, _ in repo.chunks.walk()}
    restores(clear, expected, tmp_path)


def test_copy_skips_a_point_it_cannot_read_and_applies_its_retention(repo: Repository, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    expected = fill(repo, vms=("vm-a",), days=4)
    points = repo.points()
    damaged = points[1]
    own = next(c for c in damaged.chunks() if all(c not in m.chunks() for m in points if m.id != damaged.id))
    path = repo.chunks.path(own)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    config = write_config(tmp_path, repo.path, repositories=[{
        "name": "dr", "path": str(tmp_path / "dr"), "retention": {"keep_last": 2, "timezone": "UTC"}}])
    code, out, _ = cli(capsys, "copy", "--config", str(config), "--to", "dr")
    assert code == 3
    assert f"failed     {damaged.id}  vm-a" in out and "reading the source: chunk" in out
    assert "target retention (last 2): kept 2, forgot 1" in out
    target = Repository.open(tmp_path / "dr")
    assert [m.id for m in target.points()] == [p.id for p in points[2:]]
    restores(target, expected, tmp_path)
    code, _, err = cli(capsys, "copy", "--config", str(config), "--to", "nowhere")
    assert code == 2 and "--to: no `repositories:` entry 'nowhere' (entries: dr)" in err
    code, _, err = cli(capsys, "copy", "--config", str(config), "--to-repository", str(repo.path))
    assert code == 2 and "is the job's own repository" in err


def test_verify_sample_checks_a_seeded_subset(repo: Repository, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fill(repo, days=5)  # 2 VMs x (1 shared + 5 x 2 own) = 22 chunks
    config = write_config(tmp_path, repo.path)
    code, out, _ = cli(capsys, "verify", "--config", str(config), "--sample", "25%", "--json")
    first = json.loads(out)
    assert code == 0 and first["chunks"] == 6 and first["referenced"] == 22
    seed = first["sample"]["seed"]
    code, out, _ = cli(capsys, "verify", "--config", str(config), "--sample", "3", "--seed", str(seed))
    assert code == 0 and f"(a sample of 3 chunks of 22, seed {seed}): no errors" in out
    with pytest.raises(SystemExit) as bad:
        main(["verify", "--config", str(config), "--sample", "0%"])
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --sample: must be more than 0% and at most 100% (got 0%)")
    assert cli(capsys, "verify", "--config", str(config), "--seed", "4")[0] == 2


# -- SIGKILL at random moments ---------------------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"VSP_DR_PASSPHRASE": PASSPHRASE}
    return subprocess.Popen([sys.executable, "-m", "vsphere_proxy", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def killed_at_random(rng: random.Random, args: tuple[str, ...], span: float) -> bool:
    """Run the command, SIGKILL it after a random time within its usual run; True if it was killed."""
    proc = spawn(*args)
    time.sleep(rng.uniform(0.0, span))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return proc.returncode == -signal.SIGKILL


def timed(args: tuple[str, ...]) -> float:
    t0 = time.monotonic()
    proc = spawn(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return time.monotonic() - t0


def test_forget_prune_and_copy_killed_at_random_moments_lose_nothing(tmp_path: Path) -> None:
    golden = Repository.init(tmp_path / "golden")
    expected = fill(golden, vms=("vm-a", "vm-b", "vm-c"), days=6)
    rng = random.Random(20261203)
    runs = killed = 0

    def fresh(name: str) -> Path:
        shutil.copytree(golden.path, tmp_path / name)
        return tmp_path / name

    first = fresh("reference")
    forget = ("forget", "--config", str(write_config(tmp_path, first)), "--keep-last", "2", "--prune")
    span = timed(forget)
    for run in range(12):
        path = fresh(f"forget-{run}")
        args = ("forget", "--config", str(write_config(tmp_path, path)), "--keep-last", "2", "--prune")
        killed += killed_at_random(rng, args, span)
        runs += 1
        repo = Repository.open(path)
        assert len(repo.points()) >= 6
        restores(repo, expected, tmp_path)
        assert timed(args) > 0  # run again to its end: the same outcome as an uninterrupted run
        assert sorted(m.id for m in repo.points()) == sorted(m.id for m in Repository.open(first).points())
        restores(repo, expected, tmp_path)
        shutil.rmtree(path)

    target = tmp_path / "dr"
    copy_config = write_config(tmp_path, golden.path, repositories=[{
        "name": "dr", "path": str(target),
        "encryption": {"passphrase_env": "VSP_DR_PASSPHRASE", "kdf_memory_mib": 8, "kdf_time_cost": 1}}])
    copy = ("copy", "--config", str(copy_config))
    reference = tmp_path / "copy-reference.yaml"
    reference.write_text(copy_config.read_text().replace(str(target), str(tmp_path / "dr-reference")))
    span = timed(("copy", "--config", str(reference)))
    secret = Secret("passphrase", PASSPHRASE.encode(), "test")
    for _ in range(12):
        killed += killed_at_random(rng, copy, span)
        runs += 1
        if (target / "config").exists():
            restores(Repository.open(target, secret), expected, tmp_path)  # what counts as copied is whole
    assert timed(copy) > 0
    done = Repository.open(target, secret)
    assert len(done.points()) == len(expected)
    restores(done, expected, tmp_path)
    assert runs >= 20 and killed >= 16, (runs, killed)



# -- a full target ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    where = tmp_path / "small"
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def test_a_copy_into_a_full_repository_ends_cleanly_and_resumes(repo: Repository, tmp_path: Path, small_fs: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    expected = {}
    for n in range(4):  # incompressible: 4 MiB chunk files, the tmpfs holds one
        data = os.urandom(BLOCK) + os.urandom(1000)
        expected[backup(repo, "vm-a", data, T0 + timedelta(days=n)).id] = hashlib.sha256(data).hexdigest()
    target = small_fs / "dr"
    config = write_config(tmp_path, repo.path, repositories=[{"name": "dr", "path": str(target)}])
    code, _, err = cli(capsys, "copy", "--config", str(config))
    assert code == 4 and err.count("\n") == 1
    assert "repository full: " in err and f"bytes free on {target}" in err
    copied = Repository.open(target)
    assert 1 <= len(copied.points()) < 4 and not list(copied.scratch.iterdir())  # no half-written file left
    restores(copied, expected, tmp_path)
    with open(small_fs / "filler", "wb", buffering=0) as f:  # not one byte left
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError:
                pass
    (tmp_path / "on-target").mkdir()
    code, _, err = cli(capsys, "protect", "--config", str(write_config(tmp_path / "on-target", target)), "--point",
                       copied.points()[0].id)
    assert code == 4 and err.count("\n") == 1 and "repository full: 0 bytes free" in err
    assert not copied.holds() and not list(copied.scratch.iterdir())  # nothing half-written
    for m in copied.points():  # forget and prune work on a full file system
        copied.forget([m.id])
    assert copied.prune().bytes_removed > 0
    (small_fs / "filler").unlink()
    code, out, _ = cli(capsys, "copy", "--config", str(config), "--latest", "1", "--json")
    assert code == 0 and json.loads(out)["copied"] == 1
    restores(Repository.open(target), expected, tmp_path)
