"""The distributed engine's connections for one job: Redis (ledger, heartbeats, event lists, the job's liveness
lease) and the Celery app that queues streams on the proxies' workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from vsphere_proxy.config import Config, ConfigError, DistributedConfig
from vsphere_proxy.engine.distributed import CeleryEngine
from vsphere_proxy.engine.worker import events_key
from vsphere_proxy.jobs.errors import BadJob, JobFailed
from vsphere_proxy.ledger_redis import RedisLedger


def redis_client(dist: DistributedConfig) -> tuple[redis.Redis, RedisLedger]:
    """Connect to the ledger's Redis (checked with a PING); one-line errors that never show a password."""
    try:
        url = dist.url("ledger")
    except ConfigError as e:
        raise BadJob(str(e)) from None
    client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as e:
        shown = dist.ledger or dist.broker
        raise JobFailed(f"distributed.ledger: {shown}: cannot reach Redis ({type(e).__name__})") from None
    return client, RedisLedger(client, ttl=dist.lease_seconds)


@dataclass
class Fleet:
    config: DistributedConfig
    job_id: str
    client: redis.Redis
    ledger: RedisLedger
    app: Any

    @classmethod
    def open(cls, config: Config, job_id: str) -> Fleet:
        from vsphere_proxy.engine.celery_app import make_app

        dist = config.distributed
        if dist is None:
            raise BadJob("distributed: not configured; `--engine celery` needs `distributed: {broker: "
                         "redis://host:6379/0}`")
        client, ledger = redis_client(dist)
        try:
            app = make_app(dist.url("broker"), dist.url("backend"))
        except ConfigError as e:
            client.close()
            raise BadJob(str(e)) from None
        return cls(dist, job_id, client, ledger, app)

    def engine(self, job_context: dict[str, Any], *, stall_seconds: float = 300.0) -> CeleryEngine:
        """The Celery engine for this job; its grace time is at least as long as a worker waits before it ends
        an attempt no one feeds (`idle_seconds`)."""
        from vsphere_proxy.engine.celery_app import send_stream

        return CeleryEngine(lambda payload, proxy: send_stream(self.app, payload, proxy), self.ledger, self.client,
                            job_context=job_context, watch_every=min(1.0, self.config.heartbeat),
                            stall_seconds=stall_seconds, grace=max(self.config.idle_seconds, 30.0))

    def drain(self, stall_seconds: float, say: Callable[[str], None] | None = None) -> None:
        """Wait until the streams a stopped coordinator left are gone: each ends on its worker (attempts no one
        feeds end after `idle_seconds`) or its lease expires; then forget that coordinator's events."""
        d = self.config
        deadline = time.monotonic() + stall_seconds + d.idle_seconds + 2 * d.lease_seconds
        held = self.ledger.job_active(self.job_id)
        if held and say is not None:
            say(f"waiting for the {held} streams job {self.job_id} still holds to end")
        while held:
            if time.monotonic() > deadline:
                raise JobFailed(f"--resume: job {self.job_id} still holds {held} streams; is its coordinator "
                                "still running?")
            time.sleep(0.25)
            held = self.ledger.job_active(self.job_id)
        self.client.delete(events_key(self.job_id))

    def job_key(self, job_id: str) -> str:
        return f"vsphere-proxy:job:{job_id}"

    def hold_job(self, holder: str, seconds: float) -> bool:
        """Take or renew the job's liveness lease in Redis (SET with a TTL); False when another holder has it."""
        key = self.job_key(self.job_id)
        current = self.client.get(key)
        if current is not None and current.decode() != holder:
            return False
        self.client.set(key, holder, px=int(seconds * 1000))
        return True

    def take_job(self, holder: str, seconds: float) -> None:
        self.client.set(self.job_key(self.job_id), holder, px=int(seconds * 1000))

    def drop_job(self) -> None:
        self.client.delete(self.job_key(self.job_id))

    def job_live(self, job_id: str) -> bool:
        return bool(self.client.exists(self.job_key(job_id)))

    def close(self) -> None:
        self.client.close()
        self.app.close()
