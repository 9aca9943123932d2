"""A throwaway PostgreSQL server (Debian's `postgresql` package, installed by testbed/setup.sh) in a temporary
directory, on a free loopback port, with trust authentication on loopback and no durability, stopped by PID.

initdb and postgres refuse to run as root: as root, both run as the `postgres` system user the package created
(Popen's user=/group=, so the PID we hold is the postmaster's own, not a wrapper's)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql

from testbed.redis_server import free_port

USER = "vsphere_proxy"  # the cluster's superuser
DATABASE = "catalog"


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and postgres, else one on PATH, else None."""

    def version(p: str) -> tuple[int, ...]:
        return tuple(int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    for initdb in [*found, *([on_path] if on_path else [])]:
        bindir = Path(initdb).parent
        if os.access(bindir / "postgres", os.X_OK):
            return bindir
    return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class PostgresServer:
    def __init__(self, process: subprocess.Popen[bytes], port: int, root: Path) -> None:
        self.process, self.port, self.root = process, port, root
        self.url = self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, timeout: float = 30.0) -> PostgresServer:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL's initdb/postgres are not installed (no /usr/lib/postgresql/*/bin/initdb);"
                               " run testbed/setup.sh")
        as_user: dict[str, Any] = {}
        root = Path(tempfile.mkdtemp(prefix="vsphere-proxy-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as;"
                                   " run testbed/setup.sh") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data, log = root / "data", root / "postgres.log"
        try:
            with open(log, "ab") as out:  # opened by us, inherited by the children: works whoever they run as
                subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", USER, "-E", "UTF8", "--no-locale",
                                "--auth-local=trust", "--auth-host=trust", "--no-sync"], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=out, cwd=root, check=True, timeout=timeout, **as_user)
                port = free_port()
                process = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-k", str(root), "-p", str(port),
                     "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=root, **as_user)
        except (OSError, subprocess.SubprocessError) as e:
            why = _tail(log) or str(e)
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"could not set up PostgreSQL from {bindir}: {type(e).__name__}: {why}") from None
        server = cls(process, port, root)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres", connect_timeout=2,
                                     autocommit=True) as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                return server
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    why = _tail(log)
                    server.stop()
                    raise RuntimeError(f"postgres did not start on port {port}: {why}") from None
                time.sleep(0.05)

    def database_url(self, name: str | None = None) -> str:
        """Create a fresh database (named `name`, or a random one) and return its SQLAlchemy URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, disconnect clients), then remove the files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
