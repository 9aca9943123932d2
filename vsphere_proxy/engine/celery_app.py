"""The Celery side of the distributed engine (DESIGN §6): one app, one task (`vsphere_proxy.stream`, a stream of a
VM attempt), one queue per proxy (`proxy.<name>`), consumed by that proxy's worker with a thread pool as large as
its stream limit. JSON only; a worker takes one task per free thread (no prefetch beyond it)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from vsphere_proxy.engine.worker import ProxyWorker, queue_name

STREAM_TASK = "vsphere_proxy.stream"


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("vsphere_proxy", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        worker_prefetch_multiplier=1, task_acks_late=False, result_expires=86_400,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        worker_redirect_stdouts=False, task_default_queue="proxy.unrouted", broker_transport_options={
            "visibility_timeout": 3600}, result_extended=False,
    )
    return app


def send_stream(app: Celery, payload: dict[str, Any], proxy: str) -> Any:
    """Queue one stream for `proxy`'s worker."""
    return app.send_task(STREAM_TASK, args=[payload], queue=queue_name(proxy))


def run_worker(app: Celery, worker: ProxyWorker, *, loglevel: str = "WARNING") -> None:
    """Serve `worker.proxy`'s queue until stopped (SIGTERM: the running streams finish first)."""

    @app.task(name=STREAM_TASK)
    def stream(payload: dict[str, Any]) -> dict[str, Any]:
        return worker.handle(payload)

    logging.getLogger("celery").setLevel(loglevel)
    worker.start()
    try:
        app.worker_main(["worker", "-Q", queue_name(worker.proxy), "-c", str(max(1, worker.limit)), "-P", "threads",
                         "-n", f"{worker.proxy}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
                         "-l", loglevel])
    finally:
        worker.stop()
