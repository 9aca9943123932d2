"""`vsphere-proxy restore --to`: a flat image file, or a block device written into (a loop device stands for a LUN);
every other kind of path is refused with exit 2 and left as it was. The restore point comes from a real backup of
db-01 on the session's simulator, into a repository of this module's own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vsphere_proxy.repository import Manifest, Repository, RepositoryError

pytestmark = pytest.mark.integration

VM = "db-01"
MIB = 1 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@dataclass
class Backed:
    config: Path
    repo: Repository
    point: Manifest
    hole_disk: int  # a disk of the point with at least one all-zero block (a hole in the repository)
    images: dict[tuple[str, int], str]

    def restore(self, to: Path | str, *extra: str, disk: int | None = None) -> subprocess.CompletedProcess[str]:
        return run("restore", "disk", "--config", str(self.config), "--vm", VM, "--disk", str(self.disk(disk)),
                   "--to", str(to), *extra)

    def disk(self, index: int | None = None) -> int:
        return self.hole_disk if index is None else index

    def capacity(self, index: int | None = None) -> int:
        return self.point.disk(self.disk(index)).capacity


@pytest.fixture(scope="module")
def backed(vcsim: Any, tmp_path_factory: pytest.TempPathFactory) -> Backed:
    work = tmp_path_factory.mktemp("restore-targets")
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": [VM]}
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    r = run("backup", "--config", str(config), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["counts"] == {"done": 1}
    repo = Repository.open(work / "repository")
    point = repo.latest(VM)
    assert point is not None
    holes = [d.index for d in point.disks if None in d.blocks]
    assert holes, "a disk of db-01 has an all-zero block, so that holes are restored into the device"
    return Backed(config, repo, point, holes[0], vcsim.images)


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop device over a file of `size` bytes of 0xFF (so that a hole restored as a skip would show)."""
    block = b"\xff" * MIB
    with open(backing, "wb") as f:
        for offset in range(0, size, MIB):
            f.write(block[:min(MIB, size - offset)])
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"no loop device here (losetup: {r.stderr.strip() or r.returncode})")
    device = Path(r.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


def sha256_of(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left:
            data = f.read(min(MIB, left))
            assert data, f"{path} ended {left} bytes early"
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def test_a_block_device_is_written_into_not_replaced(backed: Backed, tmp_path: Path) -> None:
    capacity = backed.capacity()
    tail = MIB  # the device is larger than the disk: what lies beyond stays as it was
    with loop_device(tmp_path / "lun.img", capacity + tail) as device:
        r = backed.restore(device, "--force", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["target"] == "block device" and data["to"] == str(device) and data["bytes"] == capacity
        seeded = backed.images[(VM, backed.hole_disk)]
        assert data["sha256"] == seeded
        assert stat.S_ISBLK(os.stat(device).st_mode), "the device node is still a block device"
        assert sha256_of(device, capacity) == seeded, "the device reads back the disk bit for bit"
        with open(device, "rb") as f:
            f.seek(capacity)
            assert f.read(tail) == b"\xff" * tail, "bytes beyond the disk's capacity are untouched"
        text = backed.restore(device, "--force")
        assert text.returncode == 0, text.stderr
        assert f"into block device {device}" in text.stdout and f"last {tail} bytes left as they were" in text.stdout
    assert (tmp_path / "lun.img").stat().st_size == capacity + tail


def test_a_block_device_needs_force_and_must_not_be_in_use(backed: Backed, tmp_path: Path) -> None:
    with loop_device(tmp_path / "lun.img", backed.capacity()) as device:
        r = backed.restore(device)
        assert r.returncode == 2
        assert r.stderr == f"vsphere-proxy: error: --to: {device} is a block device; pass --force to overwrite " \
                           "its contents\n"
        held = os.open(device, os.O_RDONLY | os.O_EXCL)  # as a mounted file system holds its device
        try:
            r = backed.restore(device, "--force")
        finally:
            os.close(held)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert f"--to: {device} is in use (mounted or held open)" in r.stderr
        with open(device, "rb") as f:
            assert f.read(MIB) == b"\xff" * MIB, "nothing was written"


def test_a_device_smaller_than_the_disk_is_refused(backed: Backed, tmp_path: Path) -> None:
    capacity = backed.capacity()
    small = capacity - MIB
    with loop_device(tmp_path / "small.img", small) as device:
        r = backed.restore(device, "--force")
        assert r.returncode == 2, r.stderr
        assert r.stderr == (f"vsphere-proxy: error: --to: {device} holds {small} bytes; disk {backed.hole_disk} "
                            f"of {backed.point.id} needs {capacity}\n")
        assert sha256_of(device, small) == hashlib.sha256(b"\xff" * small).hexdigest(), "nothing was written"
        with pytest.raises(RepositoryError, match=f"the device holds {small} bytes, disk {backed.hole_disk} "
                                                  f"needs {capacity}"):
            backed.repo.restore(backed.point.id, backed.hole_disk, device)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_character_device_is_refused_and_left_a_character_device(backed: Backed, device: str) -> None:
    r = backed.restore(device, "--force")
    assert r.returncode == 2
    assert r.stderr == (f"vsphere-proxy: error: --to: {device} is a character device; restore writes a regular "
                        "file or a block device\n")
    assert stat.S_ISCHR(os.stat(device).st_mode)
    with pytest.raises(RepositoryError, match="neither a regular file nor a block device"):
        backed.repo.restore(backed.point.id, backed.hole_disk, device)
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_a_fifo_a_socket_and_a_directory_are_refused(backed: Backed, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    try:
        for path, kind in ((fifo, "a FIFO"), (sock, "a socket"), (tmp_path, "a directory")):
            r = backed.restore(path, "--force")
            assert r.returncode == 2, (kind, r.stderr)
            assert r.stderr == (f"vsphere-proxy: error: --to: {path} is {kind}; restore writes a regular file or a "
                                "block device\n")
    finally:
        listener.close()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISSOCK(os.stat(sock).st_mode)


def test_a_regular_file_is_replaced_whole_and_a_new_one_created(backed: Backed, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    r = backed.restore(out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target"] == "file"
    capacity = backed.capacity()
    assert out.stat().st_size == capacity and sha256_of(out, capacity) == backed.images[(VM, backed.hole_disk)]
    r = backed.restore(out)
    assert r.returncode == 2 and r.stderr == f"vsphere-proxy: error: --to: {out} exists; pass --force to replace it\n"
    out.write_bytes(b"x" * (capacity + 4096))  # longer than the disk: the image replaces it, it is not written into
    r = backed.restore(out, "--force", "--json", disk=0)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == backed.capacity(0)
    assert sha256_of(out, backed.capacity(0)) == backed.images[(VM, 0)]
    r = backed.restore(tmp_path / "no" / "such" / "dir.img")
    assert r.returncode == 2 and f"--to: directory {tmp_path / 'no' / 'such'} does not exist" in r.stderr


def test_a_bad_point_is_bad_input(backed: Backed, tmp_path: Path) -> None:
    out = tmp_path / "x.img"
    for point, message in (("../../etc/passwd", "--point: '../../etc/passwd' is not a restore point id"),
                           ("20990101T000000Z-00000000",
                            f"--point: no restore point '20990101T000000Z-00000000' in {backed.repo.path}")):
        r = backed.restore(out, "--point", point)
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"vsphere-proxy: error: {message}\n"
    r = run("restore", "disk", "--config", str(backed.config), "--vm", "web-01", "--disk", "0", "--to", str(out),
            "--point", backed.point.id)
    assert r.returncode == 2
    assert f"--point: {backed.point.id} is a restore point of 'db-01', not 'web-01'" in r.stderr
    assert not out.exists()


def test_a_locked_repository_is_exit_5_and_nothing_is_written(backed: Backed, tmp_path: Path) -> None:
    out = tmp_path / "x.img"
    with backed.repo.lock("exclusive", "held by this test"):
        for args in (("restore", "disk", "--config", str(backed.config), "--vm", VM, "--disk", "0", "--to", str(out)),
                     ("verify", "--config", str(backed.config))):
            r = run(*args)
            assert r.returncode == 5, (args, r.stderr)
            assert r.stderr.startswith("vsphere-proxy: error: repository is locked: ") and r.stderr.count("\n") == 1
            assert "held by this test" in r.stderr, "the line names the holder"
    assert not out.exists()
    assert run("verify", "--config", str(backed.config)).returncode == 0, "free again once the holder let go"


def test_a_disk_streams_to_stdout_raw_and_a_damaged_chunk_ends_it_short(backed: Backed, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")}
    disk = backed.disk()
    argv = [sys.executable, "-m", "vsphere_proxy", "restore", "disk", "--config", str(backed.config), "--vm", VM,
            "--disk", str(disk), "--to", "-"]
    r = subprocess.run(argv, capture_output=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == backed.capacity() and hashlib.sha256(r.stdout).hexdigest() == backed.images[(VM, disk)]
    assert f"sha256 {backed.images[(VM, disk)]}" in r.stderr.decode()
    r = subprocess.run([*argv, "--json"], capture_output=True, env=env, timeout=300, check=False)
    assert r.returncode == 2 and r.stdout == b"" and b"stdout carries the disk" in r.stderr

    damaged = tmp_path / "repository"
    shutil.copytree(backed.repo.path, damaged)
    config = tmp_path / "c.yaml"
    config.write_text(backed.config.read_text().replace(str(backed.repo.path), str(damaged)))
    chunks = [c for c in backed.point.disk(disk).blocks if c is not None]
    last = Repository.open(damaged).chunks.path(chunks[-1])
    last.write_bytes(last.read_bytes()[:-8] + b"damaged!")
    argv[argv.index(str(backed.config))] = str(config)
    r = subprocess.run(argv, capture_output=True, env=env, timeout=300, check=False)
    assert r.returncode == 4 and len(r.stdout) < backed.capacity() and b"is corrupt" in r.stderr
