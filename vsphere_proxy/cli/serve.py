"""`vsphere-proxy serve`: the read-only dashboard (jobs, progress, live lanes per proxy, streams per proxy and
datastore) and Prometheus metrics at /metrics, over the catalog and the ledger (Redis with `distributed:`, else
the embedded jobs' file).

It listens on loopback by default. Any other address needs a token that every client must send; the
configuration's `dashboard` section says where it comes from (a file readable by its owner only, or an environment
variable), never the command line or the configuration itself."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    job_failure,
    read_config,
)
from vsphere_proxy.config import Config, ConfigError
from vsphere_proxy.jobs.errors import JobError
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.scheduler import max_streams

HELP = "serve a read-only dashboard of jobs and streams, and Prometheus metrics at /metrics"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_TOKEN_ENV = "VSPHERE_PROXY_DASHBOARD_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def build_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help=f"address to listen on (default: the config's dashboard.listen, else {DEFAULT_LISTEN}; "
                        "any non-loopback host needs a token)")
    p.add_argument("--token-env", metavar="NAME",
                   help="environment variable holding the token clients must send as `Authorization: Bearer` or "
                        f"?token= (default: the config's dashboard.token_env, else {DEFAULT_TOKEN_ENV}; "
                        "dashboard.token_file, when set, comes first)")
    p.set_defaults(func=do_serve)


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:8080) into (host, port); one-line CommandError otherwise."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host:
        host = ""  # an IPv6 address must be bracketed so that its port is unambiguous
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CommandError(f"--listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)",
                           EXIT_BAD_INPUT)
    return host, int(port)


def check_bindable(host: str, port: int, shown: str) -> None:
    """Fail in one line, before serving, when the address cannot be listened on (unknown host, port in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise CommandError(f"--listen: cannot listen on {shown} ({e.strerror or type(e).__name__})",
                           EXIT_BAD_INPUT) from None


def physical_limits(config: Config) -> dict[str, int]:
    """Stream limits of the physical proxies (their CPUs and memory are in the configuration; a VM proxy's would
    need vCenter, so it shows no limit)."""
    formula = config.job.policy.to_policy().formula
    return {p.name: max_streams(Proxy(p.name, ProxyKind.PHYSICAL, p.cpus, p.ram_mb), formula) for p in config.proxies
            if p.kind == "physical" and p.cpus is not None and p.ram_mb is not None}


def do_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vsphere_proxy.catalog import CatalogError
    from vsphere_proxy.dashboard import make_app

    config = read_config(args.config)
    dash = config.dashboard
    listen = args.listen or dash.listen
    token_env = args.token_env or dash.token_env
    host, port = parse_listen(listen)
    try:
        token = (dash.token() if args.token_env is None else os.environ.get(token_env)) or None
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    if host not in LOOPBACK and token is None:
        raise CommandError(f"--listen: {host} is not loopback; set {token_env} (a token clients must send)"
                           " or dashboard.token_file", EXIT_BAD_INPUT)
    if config.repository is None:
        raise CommandError("repository: not configured; the catalog lives beside it", EXIT_BAD_INPUT)
    check_bindable(host, port, listen)
    client = ledger = None
    if config.distributed is not None:
        from vsphere_proxy.jobs.fleet import redis_client

        try:
            client, ledger = redis_client(config.distributed)
        except JobError as e:
            raise job_failure(e) from None
    elif config.repository.ledger_path().exists():  # the embedded jobs' streams, backups and restores alike
        from vsphere_proxy.ledger_sqlite import LedgerUnavailable, SqliteLedger

        try:
            ledger = SqliteLedger(config.repository.ledger_path())
        except LedgerUnavailable as e:
            raise CommandError(f"repository.ledger: {e}", EXIT_BAD_INPUT) from None
    try:
        try:
            app = make_app(config.repository.catalog_target(), ledger=ledger, limits=physical_limits(config),
                           token=token)
        except CatalogError as e:
            raise CommandError(f"repository.catalog: {e}", EXIT_BAD_INPUT) from None
        shown = f"[{host}]" if ":" in host else host
        print(f"vsphere-proxy: dashboard on http://{shown}:{port}/ (metrics at /metrics"
              + ("; clients must send its token)" if token else ")"), flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
    finally:
        if client is not None:
            client.close()
    return EXIT_OK
