"""`vsphere-proxy worker --proxy NAME`: the proxy's agent on the distributed engine. A Celery worker on queue
`proxy.<NAME>` with as many threads as the proxy's stream limit; each task is one stream of a VM attempt, run by
the same code as the embedded engine (snapshot, transport, repository, snapshot removed). Attempts go to the
catalog from here; results go back to the job's coordinator through Redis; a heartbeat keeps the proxy alive
and its streams' leases renewed."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    job_failure,
    open_catalog,
    open_repository,
    read_config,
    vcenter,
)
from vsphere_proxy.config import ConfigError
from vsphere_proxy.disk_policy import choose_all
from vsphere_proxy.engine.attempt import RepositoryPreparer
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.session import Preparer
from vsphere_proxy.hooks import Hooks, before_vm_gate
from vsphere_proxy.jobs.backend import SnapshotPolicy
from vsphere_proxy.jobs.errors import JobError
from vsphere_proxy.jobs.fleet import redis_client
from vsphere_proxy.jobs.recorder import record_attempt
from vsphere_proxy.jobs.setup import throttles
from vsphere_proxy.proxies import resolve_proxies
from vsphere_proxy.scheduler import max_streams

HELP = "serve one proxy's streams to the distributed engine (a Celery worker on queue proxy.<NAME>)"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--proxy", required=True, help="the proxy this worker is (a name from the config's proxies)")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=do_worker)


def do_worker(args: argparse.Namespace) -> int:
    from vsphere_proxy.engine.celery_app import make_app, run_worker
    from vsphere_proxy.engine.worker import ProxyWorker

    config = read_config(args.config)
    names = [p.name for p in config.proxies]
    if args.proxy not in names:
        raise CommandError(f"--proxy: {args.proxy!r} is not one of the configured proxies ({', '.join(names)})",
                           EXIT_BAD_INPUT)
    dist = config.distributed
    if dist is None:
        raise CommandError("distributed: not configured; a worker needs `distributed: {broker: redis://host:6379/0}`",
                           EXIT_BAD_INPUT)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.proxy} %(levelname)s %(message)s")
    repo = open_repository(config, create=True)
    catalog = open_catalog(config)
    try:
        client, ledger = redis_client(dist)
    except JobError as e:
        raise job_failure(e) from None
    policy = config.job.policy
    pc = next(p for p in config.proxies if p.name == args.proxy)
    try:
        broker, backend_url = dist.url("broker"), dist.url("backend")
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    with vcenter(config) as found:
        try:
            proxy = next(p for p in resolve_proxies([pc], found.inventory))
        except ConfigError as e:
            raise CommandError(str(e), EXIT_BAD_INPUT) from None
        limit = max_streams(proxy, policy.to_policy().formula)
        backend = found.backend
        inventory = {"vms": {vm.name: vm for vm in found.inventory.vms}}

        def preparer(job: Mapping[str, Any]) -> Preparer:
            if job.get("repository") not in (None, str(repo.path)):
                raise RuntimeError(f"job {job['id']} writes to repository {job['repository']}, this worker to "
                                   f"{repo.path}")
            found_now = {vm.name: vm for vm in backend.discover(tags=False).vms}  # the VMs as they are now
            choices = choose_all(found_now, policy.independent_disks, policy.exclude_disks)  # as the job chose
            inventory["vms"] = vms = {name: c.vm for name, c in choices.items()}
            snapshotter = backend.snapshotter(vms, [proxy], str(job["id"]), policy=SnapshotPolicy.of(policy))
            hooks = Hooks(config.hooks, str(job["id"]), config.job.name, config.secret_env_names())
            return RepositoryPreparer(snapshotter, repo, str(job["id"]), vms,
                                      incremental=bool(job.get("incremental", True)),
                                      before=before_vm_gate(hooks) if config.hooks.before_vm else None,
                                      refused={name: c.refused for name, c in choices.items() if c.refused},
                                      require_incremental=bool(job.get("require_incremental", False)))

        def record(job_id: str, end: AttemptEnd) -> None:
            record_attempt(catalog, job_id, end, inventory["vms"].get(end.vm))

        worker = ProxyWorker(proxy.name, limit, preparer, ledger, client, record=record,
                             lease=dist.lease_seconds, heartbeat=dist.heartbeat, stall_seconds=policy.stall_seconds,
                             idle_seconds=dist.idle_seconds, stream_bytes_per_s=throttles(config).get(proxy.name))
        try:
            with backend.keep_alive():  # vCenter ends idle sessions; a worker may wait longer than that for work
                run_worker(make_app(broker, backend_url), worker, loglevel=args.log_level)
        finally:
            catalog.close()
            client.close()
    return EXIT_OK
