"""An encrypted repository after a full backup of the testbed on the live simulator: no 4 KiB-aligned window of
any source image appears anywhere in any repository file (searched at every byte offset), every disk restores bit
for bit, a flipped byte in a chunk or a manifest is reported broken and never returned as data, a wrong
passphrase is exit 2 in one line; and `policy.retention.after_backup` forgets and prunes after the next backup."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from vsphere_proxy.repository import Repository, Secret, VmIdentity

pytestmark = pytest.mark.integration

PASSPHRASE = "an encrypted testbed repository"
WINDOW = 4096
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))


def run(*args: str, passphrase: str = PASSPHRASE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {
        "COLUMNS": "1000", "VSP_TEST_PASSPHRASE": passphrase}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


@dataclass
class Sealed:
    config: Path
    path: Path
    report: dict[str, Any]

    def open(self) -> Repository:
        return Repository.open(self.path, Secret("passphrase", PASSPHRASE.encode(), "test"))


@pytest.fixture(scope="module")
def sealed(vcsim: Any, tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    work = tmp_path_factory.mktemp("encrypted")
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository"), "encryption": {
        "passphrase_env": "VSP_TEST_PASSPHRASE", "kdf_memory_mib": 8, "kdf_time_cost": 1}}
    data["job"]["policy"] = {**data["job"].get("policy", {}),
                             "retention": {"keep_last": 1, "after_backup": True, "timezone": "UTC"}}
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    r = run("backup", "--config", str(config), "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "complete" and report["counts"].get("done", 0) >= 10
    assert PASSPHRASE not in r.stdout + r.stderr
    return Sealed(config, work / "repository", report)


# -- the search ------------------------------------------------------------------------------------------------------


def window_hashes(data: bytes) -> np.ndarray:
    """The polynomial hash (mod 2**64) of the 4 KiB window starting at every offset of `data`."""
    n = len(data) - WINDOW + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    with np.errstate(over="ignore"):
        powers = np.ones(len(data), dtype=np.uint64)
        powers[1:] = np.cumprod(np.full(len(data) - 1, _BASE, dtype=np.uint64), dtype=np.uint64)
        inverse = np.ones(n, dtype=np.uint64)
        inverse[1:] = np.cumprod(np.full(n - 1, _BASE_INV, dtype=np.uint64), dtype=np.uint64)
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum(raw * powers, dtype=np.uint64, out=prefix[1:])
        return (prefix[WINDOW:] - prefix[:n]) * inverse


def source_windows(paths: list[Path]) -> tuple[np.ndarray, dict[int, bytes]]:
    """The hashes of every 4 KiB-aligned window of the images that is not all zero, sorted; and a sample window
    per hash for confirming a hit."""
    found: dict[int, bytes] = {}
    zero = bytes(WINDOW)
    for path in paths:
        data = path.read_bytes()
        aligned = window_hashes(data)[::WINDOW]
        for i, h in enumerate(aligned.tolist()):
            window = data[i * WINDOW:(i + 1) * WINDOW]
            if window != zero:
                found.setdefault(h, window)
    return np.array(sorted(found), dtype=np.uint64), found


def leaks(files: list[Path], wanted: np.ndarray, windows: dict[int, bytes]) -> list[str]:
    """Where a source window appears in `files`, at any offset (a hash hit confirmed byte for byte)."""
    hits = []
    for path in files:
        data = path.read_bytes()
        hashes = window_hashes(data)
        for offset in np.nonzero(np.isin(hashes, wanted))[0].tolist():
            if data[offset:offset + WINDOW] == windows[int(hashes[offset])]:
                hits.append(f"{path}@{offset}")
    return hits


def test_no_window_of_any_source_image_is_in_any_repository_file(sealed: Sealed, vcsim: Any,
                                                                 tmp_path: Path) -> None:
    images = [d.path for d in vcsim.disks()]
    wanted, windows = source_windows(images)
    assert len(wanted) > 10_000  # the images hold data, not just holes
    files = [p for p in sealed.path.rglob("*") if p.is_file()]
    assert len(files) > 50  # config, slots, manifests, chunks
    assert leaks(files, wanted, windows) == []
    # the search finds what is there: a clear repository stores an incompressible block of an image as it is
    clear = Repository.init(tmp_path / "clear")
    data = images[0].read_bytes()
    block = next(data[o:o + (4 << 20)] for o in range(0, len(data), 4 << 20)
                 if len(set(data[o:o + 4096])) > 200)
    with clear.begin("job", VmIdentity(name="control"), {}) as point:
        point.disk(0, "Hard disk 1", len(block)).write(0, block)
        point.commit()
    control = [p for p in clear.path.rglob("*") if p.is_file() and p.parent.parent.name == "chunks"]
    assert leaks(control, wanted, windows)


def test_every_disk_restores_bit_for_bit(sealed: Sealed, vcsim: Any, tmp_path: Path) -> None:
    repo = sealed.open()
    points = {m.vm.name: m for m in repo.points()}
    checked = 0
    for (vm, index), sha in vcsim.images.items():
        if vm not in points:
            continue  # a proxy VM or one the job skips
        out = repo.restore(points[vm].id, index, tmp_path / "disk.img")
        assert out.sha256 == sha, (vm, index)
        checked += 1
    assert checked >= 10
    r = run("verify", "--config", str(sealed.config))
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stdout + r.stderr


def test_a_wrong_passphrase_is_exit_2_in_one_line(sealed: Sealed) -> None:
    r = run("verify", "--config", str(sealed.config), passphrase="not the right passphrase")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("vsphere-proxy: error: repository.encryption: wrong passphrase (environment variable "
                        "VSP_TEST_PASSPHRASE): no key slot of the repository opens with it\n")
    r = run("restore", "disk", "--config", str(sealed.config), "--vm", "db-01", "--disk", "0", "--to",
            str(sealed.path.parent / "x.img"), passphrase="not the right passphrase")
    assert r.returncode == 2 and "wrong passphrase" in r.stderr and not (sealed.path.parent / "x.img").exists()


def test_a_flipped_byte_in_a_chunk_or_a_manifest_is_reported_broken(sealed: Sealed, tmp_path: Path) -> None:
    damaged = tmp_path / "repository"
    shutil.copytree(sealed.path, damaged)
    config = tmp_path / "c.yaml"
    config.write_text(sealed.config.read_text().replace(str(sealed.path), str(damaged)))
    repo = Repository.open(damaged, Secret("passphrase", PASSPHRASE.encode(), "test"))
    points = repo.points()
    chunk_point, manifest_point = points[0], points[1]
    chunk = next(c for d in chunk_point.disks for c in d.blocks if c is not None)
    path = repo.chunks.path(chunk)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the tag's last byte
    path.write_bytes(bytes(raw))
    manifest = damaged / "points" / f"{manifest_point.id}.json"
    text = manifest.read_text()
    i = text.index('"data": "') + 20
    manifest.write_text(text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:])

    r = run("verify", "--config", str(config), "--json")
    assert r.returncode == 4, r.stderr
    report = json.loads(r.stdout)
    assert report["corrupt"] == [chunk]
    assert "fails authentication" in report["problems"][0]["detail"]
    assert chunk_point.id in report["damaged"]
    assert {"id": manifest_point.id, "reason": "manifest fails authentication"} in report["broken_points"]
    r = run("restore", "disk", "--config", str(config), "--vm", manifest_point.vm.name, "--point",
            manifest_point.id, "--disk", "0", "--to", str(tmp_path / "m.img"))
    assert r.returncode != 0 and "manifest fails authentication" in r.stderr
    assert not (tmp_path / "m.img").exists()


def test_retention_after_a_complete_backup_forgets_and_prunes(sealed: Sealed) -> None:
    first = {m.id for m in sealed.open().points()}
    assert sealed.report["retention"]["forgotten"] == []  # one point per VM: keep_last 1 keeps them
    r = run("backup", "--config", str(sealed.config), "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    retention = json.loads(r.stdout)["retention"]
    assert retention["rules"] == "last 1" and sorted(retention["forgotten"]) == sorted(first)
    assert retention["prune"] is not None and retention["prune_skipped"] is None
    repo = sealed.open()
    assert not first & {m.id for m in repo.points()}
    assert repo.verify().ok
