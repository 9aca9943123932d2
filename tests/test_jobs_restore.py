"""The restore job runner (`vsphere_proxy.jobs.restore.RestoreRun`) on the in-memory `FakeBackend`, a real
repository and a real SQLite catalog: restored disks equal their source bit for bit with holes never written, a
VM whose write fails is removed and tried again in the next round, one that fails in every round leaves nothing,
and the job's streams never exceed a proxy's limit in the ledger they share with a backup."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.redis_server import RedisServer
from tests.test_jobs_backup import config_for
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.config import DistributedConfig
from vsphere_proxy.jobs.backup import BackupRun
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.fake_backend import FakeBackend
from vsphere_proxy.jobs.restore import RestoreRun
from vsphere_proxy.jobs.restore_plan import RestoreOptions
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.ledger_redis import RedisLedger
from vsphere_proxy.repository import Repository
from vsphere_proxy.transports import BLOCK


@pytest.fixture
def backed(tmp_path: Path) -> Iterator[tuple[FakeBackend, Repository, Catalog]]:
    backend = FakeBackend.build(vms=4, disks=(2 * BLOCK + 4096, BLOCK), datastores=("ds-1", "ds-2"))
    first = next(iter(backend.contents))  # a disk with a hole: its second block all zeros
    data = bytearray(backend.contents[first])
    data[BLOCK:2 * BLOCK] = bytes(BLOCK)
    backend.contents[first] = bytes(data)
    repo = Repository.init(tmp_path / "repo")
    catalog = Catalog.open(tmp_path / "catalog.sqlite")
    report = BackupRun(config_for(backend, repo), backend, repo, catalog, ledger=InMemoryLedger()).run()
    assert report.status == "complete"
    yield backend, repo, catalog
    catalog.close()


def restore(backend: FakeBackend, repo: Repository, catalog: Catalog, vms: list[str],
            options: RestoreOptions | None = None) -> tuple[RestoreRun, object]:
    points = [p for p in (repo.latest(v) for v in vms) if p is not None]
    run = RestoreRun.vms(config_for(backend, repo), backend, repo, catalog, points, options or RestoreOptions(),
                         ledger=InMemoryLedger())
    return run, run.run()


def test_every_disk_comes_back_bit_for_bit_and_holes_are_never_written(backed: tuple) -> None:
    backend, repo, catalog = backed
    run, report = restore(backend, repo, catalog, ["vm-01", "vm-02", "vm-03", "vm-04"])
    assert report.status == "complete"  # type: ignore[attr-defined]
    for plan in run.plans:
        created = backend.restored[plan.create_as]
        source = backend.vm(plan.source)
        for index, disk in created.disks.items():
            image = backend.contents[source.disks[index].file]  # a fake disk reads zeros past its contents
            assert bytes(backend.written[disk.file]) == image + bytes(disk.capacity - len(image))
    assert backend.nvram_put.keys() == {p.create_as for p in run.plans}, "every VM got its NVRAM back"
    assert catalog.job(run.job_id).kind == "restore"  # type: ignore[union-attr]


def test_a_failed_write_removes_the_vm_and_the_next_round_restores_it(backed: tuple) -> None:
    backend, repo, catalog = backed
    failed: set[str] = set()

    def once(vm: str, offset: int) -> bool:
        if offset == 0 and vm not in failed:
            failed.add(vm)
            return True
        return False

    backend.write_fails = once
    _, report = restore(backend, repo, catalog, ["vm-01"], RestoreOptions(name="vm-01-again"))
    assert report.status == "complete", report.to_json()  # type: ignore[attr-defined]
    [line] = report.vms  # type: ignore[attr-defined]
    assert line.attempts == 2 and line.round == 2
    assert "vm-01-again" in backend.restored and len(backend.restored) == 1


def test_a_vm_failing_in_every_round_leaves_nothing(backed: tuple) -> None:
    backend, repo, catalog = backed
    backend.write_fails = lambda vm, offset: True
    _, report = restore(backend, repo, catalog, ["vm-02"], RestoreOptions(name="doomed"))
    assert report.status == "failed"  # type: ignore[attr-defined]
    [line] = report.vms  # type: ignore[attr-defined]
    assert "injected write failure" in line.error
    assert any("were removed" in n for n in line.notes)
    assert backend.restored == {} and not any("doomed" in f for f in backend.written)


def test_bad_input_creates_nothing(backed: tuple) -> None:
    backend, repo, catalog = backed
    with pytest.raises(BadJob, match="--name: a VM named 'vm-02' already exists"):
        restore(backend, repo, catalog, ["vm-01"], RestoreOptions(name="vm-02"))
    with pytest.raises(BadJob, match="--datastore: no datastore 'ds-9'"):
        restore(backend, repo, catalog, ["vm-01"], RestoreOptions(datastore="ds-9"))
    assert backend.restored == {}


def test_with_a_distributed_fleet_a_restore_takes_its_streams_in_redis(backed: tuple, tmp_path: Path) -> None:
    backend, repo, catalog = backed
    with RedisServer.start() as server:
        config = config_for(backend, repo)
        config = config.model_copy(update={"distributed": DistributedConfig(broker=server.url)})
        held: list[str] = []
        ledger = RedisLedger(server.client(), ttl=config.distributed.lease_seconds)  # type: ignore[union-attr]
        real = backend.restorer

        def watching(*args: object) -> object:
            restorer = real(*args)  # type: ignore[arg-type]
            create = restorer.create

            def created(plan: object) -> object:
                held.extend(s.job for s in ledger.streams())  # the VM's first stream is in Redis by now
                return create(plan)  # type: ignore[arg-type]

            restorer.create = created  # type: ignore[method-assign]
            return restorer

        backend.restorer = watching  # type: ignore[method-assign]
        point = repo.latest("vm-03")
        assert point is not None
        run = RestoreRun.vms(config, backend, repo, catalog, [point], RestoreOptions())
        assert run.run().status == "complete"
        assert set(held) == {run.job_id}, "the restore's stream was in the fleet's Redis ledger"
        assert ledger.streams() == () and ledger.releases() >= 1
def test_restore_and_backup_streams_together_stay_under_every_proxy_limit(backed: tuple) -> None:
    backend, repo, catalog = backed
    ledger = InMemoryLedger()
    worst: list[int] = []
    real = ledger.acquire

    def watched(stream, proxy_limit, datastore_limit=None):  # type: ignore[no-untyped-def]
        taken = real(stream, proxy_limit, datastore_limit)
        worst.append(ledger.proxy_active(stream.proxy) - proxy_limit)
        return taken

    ledger.acquire = watched  # type: ignore[method-assign]
    config = config_for(backend, repo)
    done: dict[str, object] = {}

    def backup() -> None:
        try:
            done["backup"] = BackupRun(config, backend, repo, catalog, ledger=ledger).run()
        except BaseException as e:
            done["error"] = e

    thread = threading.Thread(target=backup)
    thread.start()
    points = [p for p in (repo.latest(v) for v in ("vm-01", "vm-02", "vm-03")) if p is not None]
    report = RestoreRun.vms(config, backend, repo, catalog, points, RestoreOptions(), ledger=ledger).run()
    thread.join(60)
    assert "error" not in done, done
    assert report.status == "complete" and done["backup"].status == "complete"  # type: ignore[attr-defined]
    assert worst and max(worst) <= 0, "a proxy never held more streams than its limit"
