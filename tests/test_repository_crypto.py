"""Encryption at rest (`docs/repository.md`, "Repository version 2"): keyed chunk ids, AES-256-GCM chunks and
sealed manifests and holds, key slots (passphrase and key file), and what a wrong key, a tampered file or a chunk
moved to another name does. Through the `Repository` API and the CLI, on synthetic disks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vsphere_proxy.cli import main
from vsphere_proxy.repository import (
    KdfCost,
    KeyProblem,
    Manifest,
    Repository,
    RepositoryError,
    Secret,
    VmIdentity,
    WrongKey,
    new_key_file,
    read_key_file,
)
from vsphere_proxy.repository.format import dump_record
from vsphere_proxy.repository.keys import MasterKey, make_slot

BLOCK = 4 << 20
CHEAP = KdfCost(time_cost=1, memory_kib=8192)  # a real argon2id, at its smallest allowed cost: fast tests
PASS = Secret("passphrase", b"correct horse battery staple", "test")
T0 = datetime(2026, 11, 1, 1, 0, tzinfo=UTC)


def image(seed: int, blocks: int = 3) -> bytes:
    """Blocks of pseudo-random bytes and one all-zero block, with a short last block."""
    rng = hashlib.sha256(str(seed).encode()).digest()
    body = [(rng * (BLOCK // 32))[:BLOCK] if i % 2 == 0 else bytes(BLOCK) for i in range(blocks)]
    body[0] = os.urandom(BLOCK)
    return b"".join(body) + b"tail" * 100


def backup(repo: Repository, vm: str, data: bytes, started: datetime = T0) -> Manifest:
    with repo.begin("job-1", VmIdentity(name=vm), {"cpus": 1}, started) as point:
        disk = point.disk(0, "Hard disk 1", len(data))
        for offset in range(0, len(data), BLOCK):
            disk.write(offset, data[offset:offset + BLOCK])
        return point.commit()


@pytest.fixture
def sealed(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", PASS, cost=CHEAP)


def test_an_encrypted_repository_restores_bit_for_bit_and_names_chunks_by_a_keyed_hmac(sealed: Repository,
                                                                                      tmp_path: Path) -> None:
    data = image(1)
    point = backup(sealed, "vm-1", data)
    config = json.loads((sealed.path / "config").read_text())
    assert config["version"] == 2 and config["chunk_hash"] == "hmac-sha256"
    assert config["encryption"]["cipher"] == "aes-256-gcm" and config["encryption"]["key_size"] == 64
    plain_ids = {hashlib.sha256(data[o:o + BLOCK]).hexdigest() for o in range(0, len(data), BLOCK)}
    stored = {p.name for p in (sealed.path / "chunks").rglob("*") if p.is_file()}
    assert stored and not stored & plain_ids  # names leak no content
    again = Repository.open(sealed.path, PASS)
    out = again.restore(point.id, 0, tmp_path / "out.img")
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert again.verify().ok
    text = (sealed.path / "points" / f"{point.id}.json").read_text()
    assert "vm-1" not in text and "Hard disk 1" not in text and json.loads(text)["sealed"] == 1


def test_a_wrong_or_missing_passphrase_is_refused_in_one_line(sealed: Repository) -> None:
    with pytest.raises(WrongKey, match=r"^wrong passphrase \(env X\): no key slot of the repository opens with it$"):
        Repository.open(sealed.path, Secret("passphrase", b"not the passphrase", "env X"))
    with pytest.raises(KeyProblem, match="the repository is encrypted: a passphrase or a key file is needed"):
        Repository.open(sealed.path)
    with pytest.raises(KeyProblem, match="at least 8 characters"):
        Secret("passphrase", b"short", "env Y")


def test_a_key_file_slot_opens_the_repository_and_only_its_own(sealed: Repository, tmp_path: Path) -> None:
    key = new_key_file(tmp_path / "repo.key", sealed.config.id)
    assert (tmp_path / "repo.key").stat().st_mode & 0o777 == 0o600
    slot = sealed.add_key(key, "dr-site")
    opened = Repository.open(sealed.path, read_key_file(tmp_path / "repo.key"))
    assert opened.slot == slot.id
    other = Repository.init(tmp_path / "other", PASS, cost=CHEAP)
    with pytest.raises(WrongKey, match=f"belongs to repository {sealed.config.id}, not {other.config.id}"):
        Repository.open(other.path, read_key_file(tmp_path / "repo.key"))
    (tmp_path / "repo.key").chmod(0o644)
    with pytest.raises(KeyProblem, match=r"readable by group or others \(mode 644\); chmod 600 it"):
        read_key_file(tmp_path / "repo.key")


def test_key_slots_never_drop_to_none_nor_the_one_in_use(sealed: Repository) -> None:
    second = Secret("passphrase", b"a second passphrase", "test")
    slot = sealed.add_key(second, "ops", CHEAP)
    assert [s.id for s in sealed.key_slots()] == [sealed.slot, slot.id]
    with pytest.raises(KeyProblem, match="is the one this command opened the repository with"):
        sealed.remove_key(sealed.slot)
    via_second = Repository.open(sealed.path, second)
    via_second.remove_key(sealed.slot)
    with pytest.raises(WrongKey):
        Repository.open(sealed.path, PASS)
    with pytest.raises(KeyProblem, match="is the one this command opened"):
        via_second.remove_key(slot.id)
    assert [s.id for s in via_second.key_slots()] == [slot.id]
    assert PASS.value.decode() not in "".join(p.read_text() for p in (sealed.path / "keys").iterdir())


def test_a_flipped_byte_in_a_chunk_is_detected_quarantined_and_never_restored(sealed: Repository,
                                                                            tmp_path: Path) -> None:
    point = backup(sealed, "vm-1", image(2))
    chunk = point.disks[0].blocks[0]
    assert chunk is not None
    path = sealed.chunks.path(chunk)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    report = sealed.verify()
    assert report.corrupt == (chunk,) and report.broken == {point.id: (0,)}
    assert "fails authentication" in report.problems[0].detail
    assert not path.exists()  # quarantined
    with pytest.raises(RepositoryError, match=f"cannot restore {point.id} disk 0 block 0: chunk {chunk} is missing"):
        sealed.restore(point.id, 0, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_a_chunk_moved_onto_another_chunks_name_fails_authentication(sealed: Repository) -> None:
    point = backup(sealed, "vm-1", image(3))
    first, second = point.disks[0].blocks[0], point.disks[0].blocks[2]
    assert first and second and first != second
    sealed.chunks.path(second).write_bytes(sealed.chunks.path(first).read_bytes())
    report = sealed.verify()
    assert report.corrupt == (second,) and "fails authentication" in report.problems[0].detail


def test_a_tampered_manifest_is_a_broken_point_never_data(sealed: Repository) -> None:
    kept = backup(sealed, "vm-1", image(4))
    hit = backup(sealed, "vm-2", image(5), T0 + timedelta(hours=1))
    path = sealed.points_dir / f"{hit.id}.json"
    envelope = json.loads(path.read_text())
    data = bytearray(base64.b64decode(envelope["data"]))
    data[10] ^= 0x80
    envelope["data"] = base64.b64encode(bytes(data)).decode()
    path.write_text(json.dumps(envelope))
    points, broken = sealed.scan()
    assert [m.id for m in points] == [kept.id]
    assert [(b.id, b.reason) for b in broken] == [(hit.id, "manifest fails authentication")]
    with pytest.raises(RepositoryError, match=f"restore point {hit.id} is broken: .*manifest fails authentication"):
        sealed.manifest(hit.id)
    # a manifest copied under another point's name does not authenticate either
    (sealed.points_dir / f"{hit.id}.json").write_bytes((sealed.points_dir / f"{kept.id}.json").read_bytes())
    assert [b.reason for b in sealed.scan()[1]] == ["manifest fails authentication"]


def test_concurrent_encrypted_inits_end_with_one_repository_and_one_slot(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    found: list[str] = []
    errors: list[BaseException] = []

    def init() -> None:
        try:
            found.append(Repository.init(target, PASS, cost=CHEAP).config.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=init) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(found)) == 1
    assert len(list((target / "keys").iterdir())) == 1


def test_holds_are_sealed_too(sealed: Repository) -> None:
    point = backup(sealed, "vm-1", image(6))
    sealed.protect(point.id, reason="case 4711")
    text = (sealed.holds_dir / f"{point.id}.json").read_text()
    assert "4711" not in text and json.loads(text)["sealed"] == 1
    assert sealed.holds()[point.id].hold.reason == "case 4711"  # type: ignore[union-attr]


# -- through the CLI -------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, repository: Path, encryption: dict[str, object] | None) -> Path:
    config = tmp_path / "c.yaml"
    repo: dict[str, object] = {"path": str(repository)}
    if encryption is not None:
        repo["encryption"] = {**encryption, "kdf_memory_mib": 8, "kdf_time_cost": 1}
    config.write_text(json.dumps({
        "vcenter": {"url": "https://vcenter.invalid"},
        "proxies": [{"name": "p1", "kind": "physical", "cpus": 4, "ram_mb": 8192}],
        "job": {"select": {"names": ["*"]}},
        "repository": repo,
    }))
    return config


def test_init_key_list_add_remove_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    secret = "a passphrase from the environment"
    monkeypatch.setenv("VSP_PASSPHRASE", secret)
    config = write_config(tmp_path, tmp_path / "repo", {"passphrase_env": "VSP_PASSPHRASE", "label": "admins"})
    assert main(["init", "--config", str(config), "--encryption", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["encrypted"] is True and created["version"] == 2
    assert main(["init", "--config", str(config)]) == 2
    assert "is already a repository" in capsys.readouterr().err

    second = tmp_path / "second.pass"
    second.write_text("the second passphrase\n")
    second.chmod(0o600)
    assert main(["key", "add", "--config", str(config), "--new-passphrase-file", str(second), "--label", "ops",
                 "--json"]) == 0
    added = json.loads(capsys.readouterr().out)["id"]
    assert main(["key", "list", "--config", str(config), "--json"]) == 0
    slots = json.loads(capsys.readouterr().out)
    assert [(s["label"], s["in_use"]) for s in slots] == [("admins", True), ("ops", False)]
    assert main(["key", "remove", "--config", str(config), created["key_slot"]]) == 2
    assert "the one this command opened the repository with" in capsys.readouterr().err
    assert main(["key", "remove", "--config", str(config), added]) == 0
    capsys.readouterr()

    monkeypatch.setenv("VSP_PASSPHRASE", "a wrong passphrase")
    assert main(["verify", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong passphrase (environment variable VSP_PASSPHRASE)" in err
    assert secret not in err and "a wrong passphrase" not in err

    monkeypatch.delenv("VSP_PASSPHRASE")
    assert main(["verify", "--config", str(config)]) == 2
    assert "environment variable VSP_PASSPHRASE (the repository passphrase) is not set" in capsys.readouterr().err


def test_a_configured_key_file_is_created_by_init_and_opens_the_repository(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "keys" / "repo.key"
    key.parent.mkdir()
    config = write_config(tmp_path, tmp_path / "repo", {"key_file": str(key)})
    assert main(["init", "--config", str(config)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    repo = Repository.open(tmp_path / "repo", read_key_file(key))
    assert json.loads(key.read_text())["repository"] == repo.config.id
    assert main(["verify", "--config", str(config)]) == 0
    capsys.readouterr()


def test_a_clear_repository_where_encryption_is_configured_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    Repository.init(tmp_path / "repo")
    monkeypatch.setenv("VSP_PASSPHRASE", "a good long passphrase")
    config = write_config(tmp_path, tmp_path / "repo", {"passphrase_env": "VSP_PASSPHRASE"})
    assert main(["verify", "--config", str(config)]) == 2
    assert "repository.encryption: is set, but the repository" in capsys.readouterr().err
    sealed = Repository.init(tmp_path / "sealed", PASS, cost=CHEAP)
    clear = write_config(tmp_path, sealed.path, None)
    assert main(["verify", "--config", str(clear)]) == 2
    assert "the repository is encrypted: a passphrase or a key file is needed (repository.encryption)" \
        in capsys.readouterr().err


def test_a_slot_left_by_an_interrupted_init_never_opens_the_repository(tmp_path: Path) -> None:
    """An init killed after writing its slot but before `config` leaves a slot wrapping a master key nobody uses;
    with the same repository id (a key file made for it) and passphrase it decrypts, to the wrong key, and is
    passed over (`encryption.key_check`)."""
    repo = Repository.init(tmp_path / "repo", PASS, cost=CHEAP)
    data = image(7)
    point = backup(repo, "vm-1", data)
    stale = make_slot(repo.config.id, MasterKey.new(), PASS, "", CHEAP)
    stale = stale.model_copy(update={"id": "0000000000000000"})  # tried first
    (repo.keys_dir / f"{stale.id}.json").write_bytes(dump_record(stale))
    again = Repository.open(repo.path, PASS)
    assert again.slot == repo.slot
    assert again.restore(point.id, 0, tmp_path / "x.img").sha256 == hashlib.sha256(data).hexdigest()
