"""The catalog on a real PostgreSQL server (by URL): the same records as on SQLite, read back equal, and errors
that never show the URL's password. One throwaway server per module, one fresh database per test."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from testbed.postgres_server import PostgresServer, postgres_bindir
from testbed.redis_server import free_port
from vsphere_proxy.catalog import Catalog, CatalogError, ResultRow, VmResult


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    if postgres_bindir() is None and not os.environ.get("VSPHERE_PROXY_REQUIRE_SERVICES"):
        pytest.skip("PostgreSQL is not installed; run testbed/setup.sh")
    with PostgresServer.start() as s:
        yield s


@pytest.fixture
def catalog(server: PostgresServer) -> Iterator[Catalog]:
    cat = Catalog.open(server.database_url())
    yield cat
    cat.close()


def as_result(row: ResultRow) -> VmResult:
    return VmResult(**{f.name: getattr(row, f.name) for f in dataclasses.fields(VmResult)})


def test_a_job_is_recorded_and_read_back_equal(server: PostgresServer, catalog: Catalog) -> None:
    assert catalog.engine.dialect.name == "postgresql"
    policy = {"max_streams": None, "modes": ["san", "hotadd", "nbd"], "window": {"hours": 6}}
    catalog.start_job("nightly-1", "nightly", engine="embedded", policy=policy,
                      coordinator="proxy-prod", controllers=["proxy-prod", "phys-01"])
    catalog.start_round("nightly-1", 1, vms=2)
    attempts = [
        VmResult("db-01", 1, 1, "phys-01", "san", "stranded", 4096, 0, 1.5, "proxy down"),
        VmResult("web-01", 1, 1, "proxy-prod", "hotadd", "done", 2048, 512, 0.25, point_id="p-0"),
        VmResult("db-01", 2, 2, "proxy-prod", "hotadd", "done", 8192, 1024, 2.0,
                 fell_back="fell back from san to hotadd: phys-01 down", point_id="p-1"),
        VmResult("ghost-01", 2, 1, None, None, "unprotected", error="no proxy can reach vmfs-x (naïve ünïcode)"),
    ]
    catalog.record("nightly-1", attempts[0])
    catalog.record("nightly-1", attempts[1])
    catalog.add_point("nightly-1", "p-0", "web-01", disks=1, size=2048)
    catalog.start_round("nightly-1", 2, vms=2)
    catalog.start_round("nightly-1", 2, vms=2)  # a repeated round is merged, not duplicated
    catalog.record("nightly-1", attempts[2])
    catalog.record("nightly-1", attempts[3])
    catalog.add_point("nightly-1", "p-1", "db-01", disks=2, size=8192)
    roles = {r.proxy: (r.role, r.rescinded) for r in catalog.roles("nightly-1")}
    assert roles == {"proxy-prod": ("coordinator", None), "phys-01": ("controller", None)}
    catalog.finish_job("nightly-1", "partial", {"done": 2, "unprotected": ["ghost-01"]})
    catalog.close()

    again = Catalog.open(catalog.engine.url.render_as_string(hide_password=False))  # a second client, same database
    try:
        job = again.job("nightly-1")
        assert job is not None
        assert (job.name, job.status, job.engine, job.rounds) == ("nightly", "partial", "embedded", 2)
        assert job.policy == policy and job.summary == {"done": 2, "unprotected": ["ghost-01"]}
        assert job.started.tzinfo is not None and job.ended is not None and job.ended >= job.started
        roles_after = again.roles("nightly-1")
        assert {r.proxy: r.role for r in roles_after} == {"proxy-prod": "coordinator", "phys-01": "controller"}
        assert all(r.rescinded == job.ended for r in roles_after)  # rescinded when the job ends
        assert [as_result(r) for r in again.results("nightly-1")] == attempts
        assert [(p.id, p.vm, p.disks, p.bytes) for p in again.points()] == [("p-0", "web-01", 1, 2048),
                                                                              ("p-1", "db-01", 2, 8192)]
        assert [p.id for p in again.points("db-01")] == ["p-1"] and again.points("app-01") == []
        assert [j.id for j in again.jobs()] == ["nightly-1"] and again.job("nope") is None
    finally:
        again.close()


def test_jobs_newest_first_and_unknown_job_is_a_catalog_error(catalog: Catalog) -> None:
    for n in range(3):
        catalog.start_job(f"j{n}", "hourly", engine="embedded", policy={}, coordinator=None)
    assert [j.id for j in catalog.jobs()] == ["j2", "j1", "j0"] and [j.id for j in catalog.jobs(limit=1)] == ["j2"]
    assert catalog.roles("j0") == []
    with pytest.raises(CatalogError, match="job ghost: not in the catalog"):
        catalog.finish_job("ghost", "complete", {})


def test_byte_counts_of_real_disks_fit(catalog: Catalog) -> None:
    catalog.start_job("big", "nightly", engine="embedded", policy={}, coordinator=None)
    size = 40 * 2**30  # a 40 GiB disk
    catalog.record("big", VmResult("db-01", 1, 1, "phys-01", "san", "done", size, size, 60.0, point_id="p-big"))
    catalog.add_point("big", "p-big", "db-01", disks=1, size=size)
    assert [r.bytes_read for r in catalog.results("big")] == [size]


def test_errors_are_one_line_and_never_show_the_password(server: PostgresServer) -> None:
    url = f"postgresql+psycopg://backup:s3cret@127.0.0.1:{free_port()}/catalog"  # nothing listens there
    with pytest.raises(CatalogError) as e:
        Catalog.open(url)
    message = str(e.value)
    assert "s3cret" not in message and "\n" not in message and "127.0.0.1" in message
    assert "OperationalError" in message
    with pytest.raises(CatalogError) as e:  # the server is up, the database is not there
        Catalog.open(server.url_for("no_such_db").replace("@", ":s3cret@", 1))
    assert "s3cret" not in str(e.value) and "no_such_db" in str(e.value) and "\n" not in str(e.value)
