"""The catalog on SQLite: jobs, rounds, per-VM attempts, restore points and roles, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsphere_proxy.catalog import Catalog, CatalogError, VmResult, database_url


def test_a_job_is_recorded_with_rounds_results_points_and_roles(tmp_path: Path) -> None:
    cat = Catalog.open(tmp_path / "catalog.db")
    cat.start_job("nightly-1", "nightly", engine="embedded", policy={"max_streams": None},
                  coordinator="proxy-prod", controllers=["proxy-prod", "phys-01"])
    cat.start_round("nightly-1", 1, vms=2)
    cat.record("nightly-1", VmResult("db-01", 1, 1, "phys-01", "san", "stranded", 4096, 0, 1.5, "proxy down"))
    cat.start_round("nightly-1", 2, vms=1)
    cat.record("nightly-1", VmResult("db-01", 2, 2, "proxy-prod", "hotadd", "done", 8192, 1024, 2.0,
                                     fell_back="fell back from san to hotadd: phys-01 down", point_id="p-1"))
    cat.add_point("nightly-1", "p-1", "db-01", disks=2, size=8192)
    roles = {r.proxy: (r.role, r.rescinded) for r in cat.roles("nightly-1")}
    assert roles == {"proxy-prod": ("coordinator", None), "phys-01": ("controller", None)}
    cat.finish_job("nightly-1", "complete", {"done": 1})
    cat.close()

    again = Catalog.open(database_url(tmp_path / "catalog.db"))  # survives a reopen, by URL too
    job = again.job("nightly-1")
    assert job is not None and (job.status, job.rounds, job.summary) == ("complete", 2, {"done": 1})
    assert all(r.rescinded is not None for r in again.roles("nightly-1"))  # rescinded when the job ends
    results = again.results("nightly-1")
    assert [(r.round, r.status, r.mode) for r in results] == [(1, "stranded", "san"), (2, "done", "hotadd")]
    assert results[1].fell_back.startswith("fell back from san to hotadd")
    assert [p.id for p in again.points("db-01")] == ["p-1"] and again.points("web-01") == []
    assert [j.id for j in again.jobs()] == ["nightly-1"]


def test_errors_are_one_line_and_never_show_a_password(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as e:
        Catalog.open("postgresql+nosuchdriver://backup:s3cret@db.lab/catalog")
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value) and "db.lab" in str(e.value)
    cat = Catalog.open(tmp_path / "c.db")
    with pytest.raises(CatalogError, match="job ghost: not in the catalog"):
        cat.finish_job("ghost", "complete", {})
