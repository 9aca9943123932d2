"""The catalog: what every job did, kept in SQL (SQLite file by default, PostgreSQL by URL).

Jobs with their status and policy, the rounds they ran, one row per VM attempt (proxy, mode, round, bytes read
and written, seconds, error, fall-back), the restore points they made, and the coordinator/controller roles the
job's proxies held. The rest of the product reaches the database only through this module.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class CatalogError(Exception):
    """The catalog could not be opened or written; one line, naming the database (never its password)."""


def now() -> datetime:
    return datetime.now(UTC)


class _Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}  # noqa: RUF012 - SQLAlchemy's declared mapping


class JobRow(_Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(80), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="backup", server_default="backup")  # backup | restore
    status: Mapped[str] = mapped_column(String(20))  # running | complete | partial | failed | interrupted
    engine: Mapped[str] = mapped_column(String(20))
    policy: Mapped[dict[str, Any]]
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict[str, Any]]


class RoundRow(_Base):
    __tablename__ = "rounds"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    vms: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RoleRow(_Base):
    __tablename__ = "roles"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    proxy: Mapped[str] = mapped_column(String(80), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))  # coordinator | controller
    granted: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rescinded: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ResultRow(_Base):
    __tablename__ = "vm_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    vm: Mapped[str] = mapped_column(String(255), index=True)
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    proxy: Mapped[str | None] = mapped_column(String(80))
    mode: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))  # done | stranded | failed | unprotected | skipped
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_written: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    fell_back: Mapped[str] = mapped_column(Text, default="")
    point_id: Mapped[str | None] = mapped_column(String(80))
    ended: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PointRow(_Base):
    __tablename__ = "restore_points"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    vm: Mapped[str] = mapped_column(String(255), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    disks: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)


class JobVmRow(_Base):
    """Where each VM of a job stands, kept by its coordinator as it goes, so that another coordinator can take the
    job over (`backup --resume`)."""

    __tablename__ = "job_vms"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    vm: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(20))  # pending | running | stranded | done | failed | unprotected
    round: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    proxy: Mapped[str | None] = mapped_column(String(80))
    mode: Mapped[str | None] = mapped_column(String(20))
    error: Mapped[str] = mapped_column(Text, default="")
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StreamRow(_Base):
    """One stream: a disk of a VM attempt read on a proxy over [started, ended) (the window report's bars)."""

    __tablename__ = "streams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    stream: Mapped[str] = mapped_column(String(400))
    vm: Mapped[str] = mapped_column(String(255))
    disk: Mapped[int] = mapped_column(Integer)
    proxy: Mapped[str] = mapped_column(String(80))
    mode: Mapped[str] = mapped_column(String(20))
    datastore: Mapped[str] = mapped_column(String(255))
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[str] = mapped_column(String(20))  # read | failed | aborted


class DecisionRow(_Base):
    """The coordinator's decisions with their reasons, in order (`plan --explain`'s, for a job that ran)."""

    __tablename__ = "decisions"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(20))
    vm: Mapped[str | None] = mapped_column(String(255))
    proxy: Mapped[str | None] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(Text)


class JobLeaseRow(_Base):
    """A running job's liveness: its coordinator renews `expires`; a lease past it belongs to a dead job."""

    __tablename__ = "job_leases"
    job_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))  # host:pid of the coordinator holding it
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VmClaimRow(_Base):
    """A VM in a running backup: at most one job holds a VM's claim (a claim of a dead job may be taken over)."""

    __tablename__ = "vm_claims"
    vm: Mapped[str] = mapped_column(String(400), primary_key=True)  # "<vCenter host>/<VM moref>"
    name: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str] = mapped_column(String(80), index=True)
    claimed: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def lease_holder() -> str:
    """This process as a lease holder: host:pid."""
    return f"{platform.node()}:{os.getpid()}"


def holder_gone(holder: str) -> bool:
    """A holder on this host whose process has ended (its lease is dead before it expires)."""
    host, _, pid = holder.rpartition(":")
    if host != platform.node() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite gives naive UTC back


@dataclass(frozen=True)
class StreamRecord:
    stream: str
    vm: str
    disk: int
    proxy: str
    mode: str
    datastore: str
    round: int
    attempt: int
    started: datetime
    ended: datetime
    bytes: int
    outcome: str


@dataclass(frozen=True)
class VmState:
    """One VM's place in a running job."""

    vm: str
    status: str
    round: int = 0
    attempts: int = 0
    proxy: str | None = None
    mode: str | None = None
    error: str = ""


@dataclass(frozen=True)
class VmResult:
    """One VM attempt as the catalog keeps it."""

    vm: str
    round: int
    attempt: int
    proxy: str | None
    mode: str | None
    status: str
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    error: str = ""
    fell_back: str = ""
    point_id: str | None = None


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a file path (a path means SQLite)."""
    text = str(target)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class Catalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, target: str | Path) -> Catalog:
        """Open (creating the tables when missing) the catalog at a URL or SQLite file path."""
        url = database_url(target)
        # Every statement is bounded: a locked SQLite file waits at most 15 s, a PostgreSQL server that does not
        # answer fails the connection after 10 s and a statement after 30 s.
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 15}
        elif url.startswith("postgresql"):
            connect_args = {"connect_timeout": 10, "options": "-c statement_timeout=30000"}
        try:
            engine = create_engine(url, future=True, connect_args=connect_args, pool_timeout=30)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            _Base.metadata.create_all(engine)
            _add_missing_columns(engine)
        except SQLAlchemyError as e:
            raise CatalogError(f"catalog {_safe(url)}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        return cls(engine)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._session() as s, s.begin():
            yield s

    def start_job(self, job_id: str, name: str, *, engine: str, policy: dict[str, Any],
                  coordinator: str | None, controllers: Sequence[str] = (),
                  summary: dict[str, Any] | None = None, kind: str = "backup") -> None:
        at = now()
        with self._tx() as s:
            s.add(JobRow(id=job_id, name=name, kind=kind, status="running", engine=engine, policy=policy, started=at,
                         ended=None, rounds=0, summary=dict(summary or {})))
            s.flush()
            if coordinator is not None:
                s.add(RoleRow(job_id=job_id, proxy=coordinator, role="coordinator", granted=at, rescinded=None))
            for proxy in controllers:
                if proxy != coordinator:
                    s.add(RoleRow(job_id=job_id, proxy=proxy, role="controller", granted=at, rescinded=None))

    def start_round(self, job_id: str, number: int, vms: int) -> None:
        with self._tx() as s:
            s.merge(RoundRow(job_id=job_id, number=number, vms=vms, started=now()))
            job = s.get(JobRow, job_id)
            if job is not None:
                job.rounds = max(job.rounds, number)

    def record(self, job_id: str, result: VmResult) -> None:
        with self._tx() as s:
            s.add(ResultRow(job_id=job_id, ended=now(), **result.__dict__))

    def set_states(self, job_id: str, states: Sequence[VmState]) -> None:
        """Record where these VMs of the job stand now (one transaction)."""
        at = now()
        with self._tx() as s:
            for st in states:
                s.merge(JobVmRow(job_id=job_id, updated=at, **st.__dict__))

    def states(self, job_id: str) -> dict[str, VmState]:
        with self._session() as s:
            rows = s.scalars(select(JobVmRow).where(JobVmRow.job_id == job_id).order_by(JobVmRow.vm))
            return {r.vm: VmState(r.vm, r.status, r.round, r.attempts, r.proxy, r.mode, r.error) for r in rows}

    def add_stream(self, job_id: str, record: StreamRecord) -> None:
        with self._tx() as s:
            s.add(StreamRow(job_id=job_id, **record.__dict__))

    def streams(self, job_id: str) -> list[StreamRow]:
        with self._session() as s:
            return list(s.scalars(select(StreamRow).where(StreamRow.job_id == job_id).order_by(StreamRow.id)))

    def add_decisions(self, job_id: str, decisions: Sequence[tuple[int, str, str | None, str | None, str]]) -> None:
        """Append (round, verdict, vm, proxy, reason) after the job's decisions already kept."""
        with self._tx() as s:
            last = s.scalar(select(DecisionRow.seq).where(DecisionRow.job_id == job_id)
                            .order_by(DecisionRow.seq.desc()).limit(1))
            base = -1 if last is None else last
            s.add_all(DecisionRow(job_id=job_id, seq=base + 1 + i, round=r, verdict=v, vm=vm, proxy=p, reason=why)
                      for i, (r, v, vm, p, why) in enumerate(decisions))

    def decisions(self, job_id: str) -> list[DecisionRow]:
        with self._session() as s:
            return list(s.scalars(select(DecisionRow).where(DecisionRow.job_id == job_id).order_by(DecisionRow.seq)))

    def reopen_job(self, job_id: str, coordinator: str) -> None:
        """Another coordinator takes the running job over: the coordinator role moves to it."""
        at = now()
        with self._tx() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise CatalogError(f"job {job_id}: not in the catalog")
            for role in s.scalars(select(RoleRow).where(RoleRow.job_id == job_id, RoleRow.role == "coordinator",
                                                        RoleRow.rescinded.is_(None))):
                role.rescinded = at
            s.flush()
            old = s.get(RoleRow, (job_id, coordinator))
            if old is not None:
                s.delete(old)
                s.flush()
            s.add(RoleRow(job_id=job_id, proxy=coordinator, role="coordinator", granted=at, rescinded=None))

    def add_point(self, job_id: str, point_id: str, vm: str, disks: int, size: int) -> None:
        with self._tx() as s:
            s.add(PointRow(id=point_id, job_id=job_id, vm=vm, created=now(), disks=disks, bytes=size))

    def finish_job(self, job_id: str, status: str, summary: dict[str, Any]) -> None:
        """End the job and rescind its roles."""
        at = now()
        with self._tx() as s:
            job = s.get(JobRow, job_id)
            if job is None:
                raise CatalogError(f"job {job_id}: not in the catalog")
            job.status, job.ended, job.summary = status, at, json.loads(json.dumps(summary, default=str))
            for role in s.scalars(select(RoleRow).where(RoleRow.job_id == job_id, RoleRow.rescinded.is_(None))):
                role.rescinded = at

    # ---- job liveness and VM claims (DESIGN §9) --------------------------------------------------------------

    def take_lease(self, job_id: str, holder: str, seconds: float) -> None:
        """Hold the job's liveness lease for `seconds` (taking over a dead coordinator's)."""
        with self._tx() as s:
            s.merge(JobLeaseRow(job_id=job_id, holder=holder, expires=now() + timedelta(seconds=seconds)))

    def renew_lease(self, job_id: str, holder: str, seconds: float) -> bool:
        """Extend the lease; False when `holder` no longer holds it (another coordinator took the job over)."""
        with self._tx() as s:
            lease = s.get(JobLeaseRow, job_id)
            if lease is None or lease.holder != holder:
                return False
            lease.expires = now() + timedelta(seconds=seconds)
            return True

    def end_lease(self, job_id: str) -> None:
        """The job ended: its lease and its VMs' claims go."""
        with self._tx() as s:
            lease = s.get(JobLeaseRow, job_id)
            if lease is not None:
                s.delete(lease)
            for claim in s.scalars(select(VmClaimRow).where(VmClaimRow.job_id == job_id)):
                s.delete(claim)

    def lease(self, job_id: str) -> JobLeaseRow | None:
        with self._session() as s:
            return s.get(JobLeaseRow, job_id)

    def live(self, job_id: str) -> bool:
        """Whether the job's coordinator holds an unexpired lease (and, when it ran on this host, still runs)."""
        lease = self.lease(job_id)
        return lease is not None and _aware(lease.expires) > now() and not holder_gone(lease.holder)

    def claim_vms(self, job_id: str, vms: dict[str, str]) -> dict[str, str]:
        """Claim VMs (key -> name) for the job; returns key -> the live job already backing up each VM not
        claimed. Claims of jobs whose lease expired are taken over. Two jobs racing for a VM: one gets it."""
        for _ in range(5):
            try:
                return self._claim(job_id, vms)
            except SQLAlchemyError:  # another job inserted the same claim, or held the database: look again
                continue
        return self._claim(job_id, vms)

    def _claim(self, job_id: str, vms: dict[str, str]) -> dict[str, str]:
        busy: dict[str, str] = {}
        at = now()
        with self._tx() as s:
            held = {c.vm: c for c in s.scalars(select(VmClaimRow).where(VmClaimRow.vm.in_(list(vms))))}
            owners = {c.job_id for c in held.values() if c.job_id != job_id}
            live = {lease.job_id for lease in s.scalars(select(JobLeaseRow).where(JobLeaseRow.job_id.in_(owners)))
                    if _aware(lease.expires) > at and not holder_gone(lease.holder)}
            for key, name in vms.items():
                claim = held.get(key)
                if claim is not None and claim.job_id == job_id:
                    continue
                if claim is not None and claim.job_id in live:
                    busy[key] = claim.job_id
                    continue
                if claim is not None:
                    s.delete(claim)
                    s.flush()
                s.add(VmClaimRow(vm=key, name=name, job_id=job_id, claimed=at))
            s.flush()
        return busy

    def release_claims(self, job_id: str, keys: Sequence[str]) -> None:
        with self._tx() as s:
            for claim in s.scalars(select(VmClaimRow).where(VmClaimRow.job_id == job_id,
                                                            VmClaimRow.vm.in_(list(keys)))):
                s.delete(claim)

    def jobs(self, limit: int = 50) -> list[JobRow]:
        with self._session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.started.desc()).limit(limit)))

    def job(self, job_id: str) -> JobRow | None:
        with self._session() as s:
            return s.get(JobRow, job_id)

    def results(self, job_id: str) -> list[ResultRow]:
        with self._session() as s:
            return list(s.scalars(select(ResultRow).where(ResultRow.job_id == job_id).order_by(ResultRow.id)))

    def roles(self, job_id: str) -> list[RoleRow]:
        with self._session() as s:
            return list(s.scalars(select(RoleRow).where(RoleRow.job_id == job_id).order_by(RoleRow.proxy)))

    def points(self, vm: str | None = None) -> list[PointRow]:
        with self._session() as s:
            q = select(PointRow).order_by(PointRow.created)
            if vm is not None:
                q = q.where(PointRow.vm == vm)
            return list(s.scalars(q))

    def close(self) -> None:
        self.engine.dispose()


_ADDED_COLUMNS = {"jobs": {"kind": "VARCHAR(20) NOT NULL DEFAULT 'backup'"}}


def _add_missing_columns(engine: Engine) -> None:
    """Columns added since a catalog was created: added to its tables in place (existing jobs are backups)."""
    tables = inspect(engine)
    for table, columns in _ADDED_COLUMNS.items():
        have = {c["name"] for c in tables.get_columns(table)}
        for name, ddl in columns.items():
            if name not in have:
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (a dashboard, `jobs`) never block the running job
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
