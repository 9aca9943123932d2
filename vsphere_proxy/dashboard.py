"""The read-only dashboard and Prometheus metrics of `vsphere-proxy serve`.

Three GET routes on one Starlette app: `/` a self-contained page (jobs, progress of running jobs, one live lane
per proxy with the VMs it backs up now, proxy and datastore streams) that re-renders itself from `/api/state`
every 2 s; `/api/state` the same data as JSON; `/metrics` the Prometheus text of a private registry. Everything
is read from the catalog and, when given, the ledger (Redis, or the embedded jobs' SQLite file; it alone knows
streams per datastore); nothing is ever written. With a token, every request must carry it
(`Authorization: Bearer …` or `?token=…`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vsphere_proxy.catalog import Catalog, now
from vsphere_proxy.ledger import Ledger
from vsphere_proxy.ledger_sqlite import LedgerUnavailable

JOBS_SHOWN = 50  # the newest jobs on the page and in /api/state
EVERY_JOB = 1_000_000  # metrics count every job of the catalog
SETTLED = timedelta(minutes=10)  # an ended job's attempts no longer change (late worker records are in by then)
REFRESH_MS = 2000


# --- the state: what the page, /api/state and the stream gauges show ------------------------------------------


def read_state(catalog: Catalog, ledger: Ledger | None = None, limits: dict[str, int] | None = None,
               *, jobs: int = JOBS_SHOWN) -> dict[str, Any]:
    """Jobs (newest first), progress of the running ones, their running VMs laid out per proxy, and active
    streams per proxy and per datastore (from the ledger when given, else the running VMs of the catalog)."""
    limits = dict(limits or {})
    shown: list[dict[str, Any]] = []
    progress: dict[str, dict[str, int]] = {}
    running: list[dict[str, Any]] = []
    for job in catalog.jobs(jobs):
        counts: dict[str, int] = dict((job.summary or {}).get("counts", {}))
        if job.status == "running":
            for proxy, n in ((job.summary or {}).get("stream_limits") or {}).items():
                limits.setdefault(proxy, int(n))  # the running job's coordinator knows every proxy's limit
            states = catalog.states(job.id)
            where = Counter(s.status for s in states.values())
            counts = dict(sorted(where.items()))
            progress[job.id] = {"done": where["done"], "total": len(states), "running": where["running"]}
            running += [{"proxy": s.proxy, "job": job.id, "vm": s.vm, "mode": s.mode, "round": s.round,
                         "attempts": s.attempts} for s in states.values() if s.status == "running" and s.proxy]
        shown.append({"id": job.id, "name": job.name, "kind": job.kind, "engine": job.engine, "status": job.status,
                      "started": _utc(job.started).isoformat(),
                      "ended": _utc(job.ended).isoformat() if job.ended else None,
                      "rounds": job.rounds, "counts": counts})
    proxy_active: Counter[str] = Counter(r["proxy"] for r in running)
    datastore_active: Counter[str] = Counter()
    source, error = "catalog", None
    if ledger is not None:
        try:
            streams = ledger.streams()
        except (redis.RedisError, LedgerUnavailable) as e:
            error = f"ledger unreachable ({type(e).__name__}); streams counted from the catalog's running VMs"
        else:
            source = "ledger"
            proxy_active = Counter(s.proxy for s in streams)
            datastore_active = Counter(ds for s in streams for ds in set(s.datastores))
    names = sorted(set(limits) | set(proxy_active) | {r["proxy"] for r in running})
    lanes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in sorted(running, key=lambda r: (r["job"], r["vm"])):
        lanes[r["proxy"]].append({k: v for k, v in r.items() if k != "proxy"})
    return {
        "jobs": shown,
        "progress": progress,
        "lanes": lanes,
        "proxies": {n: {"active": proxy_active[n], "max": limits.get(n)} for n in names},
        "datastores": dict(sorted(datastore_active.items())),
        "streams_from": source,
        "error": error,
    }


def _utc(at: datetime) -> datetime:
    """The catalog's times are UTC; SQLite gives them back without their zone."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# --- /metrics ------------------------------------------------------------------------------------------------


class _Totals:
    """Bytes read and written and attempts by status over every job of the catalog; a job ended for `SETTLED`
    is read once and remembered."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._settled: dict[str, tuple[int, int, Counter[str]]] = {}

    def read(self, catalog: Catalog) -> tuple[int, int, Counter[str], Counter[str]]:
        read = written = 0
        results: Counter[str] = Counter()
        jobs: Counter[str] = Counter()
        at = self.clock()
        for job in catalog.jobs(EVERY_JOB):
            jobs[job.status] += 1
            with self._lock:
                known = self._settled.get(job.id)
            if known is None:
                rows = catalog.results(job.id)
                known = (sum(r.bytes_read for r in rows), sum(r.bytes_written for r in rows),
                         Counter(r.status for r in rows))
                if job.ended is not None and at - _utc(job.ended) > SETTLED:
                    with self._lock:
                        self._settled[job.id] = known
            read, written = read + known[0], written + known[1]
            results.update(known[2])
        return read, written, results, jobs


class FleetCollector(Collector):
    """Read at every scrape: streams per proxy and datastore, proxies' limits, bytes, attempts and jobs."""

    def __init__(self, catalog: Catalog, ledger: Ledger | None, limits: dict[str, int] | None,
                 clock: Callable[[], datetime] = now) -> None:
        self.catalog, self.ledger, self.limits = catalog, ledger, limits or {}
        self.totals = _Totals(clock)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        state = read_state(self.catalog, self.ledger, self.limits)
        active = GaugeMetricFamily("vsphere_proxy_active_streams", "Data streams a proxy holds now", labels=["proxy"])
        limit = GaugeMetricFamily("vsphere_proxy_proxy_max_streams", "Most streams a proxy may hold at once",
                                  labels=["proxy"])
        for name, p in state["proxies"].items():
            active.add_metric([name], p["active"])
            if p["max"] is not None:
                limit.add_metric([name], p["max"])
        datastores = GaugeMetricFamily("vsphere_proxy_datastore_active_streams",
                                       "Data streams reading a datastore now (from the ledger)", labels=["datastore"])
        for name, n in state["datastores"].items():
            datastores.add_metric([name], n)
        yield from (active, limit, datastores)
        if self.ledger is not None:
            yield GaugeMetricFamily("vsphere_proxy_ledger_up", "1 when the ledger answered this scrape",
                                    value=1 if state["streams_from"] == "ledger" else 0)
        read, written, results, jobs = self.totals.read(self.catalog)
        yield CounterMetricFamily("vsphere_proxy_bytes_read", "Bytes read from VM disks by every attempt in the "
                                  "catalog", value=read)
        yield CounterMetricFamily("vsphere_proxy_bytes_written", "Bytes stored in the repository by every attempt",
                                  value=written)
        by_status = GaugeMetricFamily("vsphere_proxy_vm_results", "VM attempts in the catalog by status",
                                      labels=["status"])
        for status, n in sorted(results.items()):
            by_status.add_metric([status], n)
        job_status = GaugeMetricFamily("vsphere_proxy_jobs", "Jobs in the catalog by status", labels=["status"])
        for status, n in sorted(jobs.items()):
            job_status.add_metric([status], n)
        yield from (by_status, job_status)



# --- the page ------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#f6f8fa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:30em}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:middle}
th{background:#eaeef2}td.num{text-align:right;font-variant-numeric:tabular-nums}
#meta{color:#57606a}#error{color:#a40e26;font-weight:600}#error:empty{display:none}
.status-running{color:#0969da}.status-complete{color:#1a7f37}.status-partial{color:#9a6700}
.status-failed{color:#cf222e}
.progress{position:relative;width:12em;height:1.3em;background:#eaeef2;border-radius:3px;overflow:hidden}
.progress .fill{position:absolute;left:0;top:0;bottom:0;background:#8fd19e;transition:width .4s}
.progress .label{position:relative;padding-left:.4em;font-size:.9em}
.lane{display:flex;align-items:center;gap:.4em;margin:.25em 0;min-height:1.6em}
.lane .name{width:10em;font-weight:600;overflow:hidden;text-overflow:ellipsis}
.lane .bars{display:flex;flex-wrap:wrap;gap:.25em}.lane .idle{color:#8c959f}
.bar{display:inline-block;padding:.1em .5em;border-radius:3px;background:#0969da;color:#fff;font-size:.85em}
.bar.mode-san,.bar.mode-direct-nfs{background:#1a7f37}.bar.mode-hotadd{background:#8250df}
.bar.mode-nbd{background:#bc4c00}
.meter{display:inline-block;width:8em;height:.7em;background:#eaeef2;border-radius:2px;overflow:hidden}
.empty td{color:#8c959f;font-style:italic}
.meter span{display:block;height:100%;background:#0969da}
"""

_JS = """
(() => {
  "use strict";
  const token = new URLSearchParams(location.search).get("token");
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const width = (part, whole) => (whole ? Math.min(100, 100 * part / whole) : 0).toFixed(1) + "%";
  const fill = (table, trs, message) => {
    if (!trs.length) {
      const tr = el("tr", {"class": "empty"});
      tr.append(el("td", {"colspan": document.querySelectorAll(table + " th").length}, message));
      trs = [tr];
    }
    document.querySelector(table + " tbody").replaceChildren(...trs);
  };
  const counts = (c) => Object.keys(c).sort().map((k) => c[k] + " " + k).join(", ");
  function progress(p) {
    const box = el("div", {"class": "progress"}), bar = el("span", {"class": "fill"});
    bar.style.width = width(p.done, p.total);
    box.append(bar, el("span", {"class": "label"}, p.done + "/" + p.total + " done"));
    return box;
  }
  function render(s) {
    fill("#jobs", s.jobs.map((j) => {
      const tr = el("tr", {"class": "job", "data-job": j.id}), cell = el("td", {"class": "progress-cell"});
      if (s.progress[j.id]) cell.append(progress(s.progress[j.id]));
      tr.append(el("td", {"class": "id"}, j.id), el("td", {}, j.name), el("td", {}, j.engine),
                el("td", {"class": "status status-" + j.status}, j.status),
                el("td", {}, j.started.slice(0, 19).replace("T", " ")),
                el("td", {"class": "counts"}, counts(j.counts)), cell);
      return tr;
    }), "no jobs in the catalog yet");
    document.getElementById("lanes").replaceChildren(...Object.entries(s.lanes).map(([name, vms]) => {
      const lane = el("div", {"class": "lane", "data-proxy": name}), bars = el("div", {"class": "bars"});
      if (!vms.length) bars.append(el("span", {"class": "idle"}, "idle"));
      for (const v of vms) {
        bars.append(el("span", {"class": "bar mode-" + (v.mode || "none"), "data-job": v.job, "data-vm": v.vm,
                                "title": v.job + " · " + (v.mode || "?") + " · round " + v.round + " · attempt " +
                                         v.attempts}, v.vm));
      }
      lane.append(el("span", {"class": "name"}, name), bars);
      return lane;
    }));
    fill("#proxies", Object.entries(s.proxies).map(([name, p]) => {
      const tr = el("tr", {"class": "proxy", "data-proxy": name});
      const load = el("td", {"class": "load"}), meter = el("span", {"class": "meter"}), used = el("span");
      used.style.width = width(p.active, p.max);
      meter.append(used);
      load.append(meter);
      tr.append(el("td", {}, name), el("td", {"class": "num active"}, p.active),
                el("td", {"class": "num max"}, p.max === null ? "?" : p.max), load);
      return tr;
    }), "no proxy known yet");
    fill("#datastores", Object.entries(s.datastores).map(([name, active]) => {
      const tr = el("tr", {"class": "datastore", "data-datastore": name});
      tr.append(el("td", {}, name), el("td", {"class": "num active"}, active));
      return tr;
    }), s.streams_from === "ledger" ? "no active streams" : "only the ledger knows them (distributed engine)");
    document.getElementById("source").textContent = s.streams_from;
    document.getElementById("error").textContent = s.error || "";
    document.getElementById("updated").textContent = new Date().toISOString().slice(11, 19) + " UTC";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  }
  async function tick() {
    try {
      const r = await fetch("api/state", {headers: headers, cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
    } catch (e) {
      document.getElementById("error").textContent = "refresh failed: " + e.message;
    } finally {
      setTimeout(tick, REFRESH_MS);
    }
  }
  setTimeout(tick, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_MS))

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
_PAGE_POLICY = (f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _width(part: int, whole: int | None) -> str:
    return f"{min(100.0, 100 * part / whole) if whole else 0.0:.1f}%"


def _tbody(rows: list[str], message: str, columns: int) -> str:
    return "".join(rows) or f'<tr class="empty"><td colspan="{columns}">{_e(message)}</td></tr>'


def render_page(state: dict[str, Any]) -> str:
    """The page as of `state`; its script re-renders the same elements from /api/state."""
    jobs = []
    for j in state["jobs"]:
        p = state["progress"].get(j["id"])
        bar = "" if p is None else (
            f'<div class="progress"><span class="fill" style="width:{_width(p["done"], p["total"])}"></span>'
            f'<span class="label">{p["done"]}/{p["total"]} done</span></div>')
        counts = ", ".join(f"{n} {s}" for s, n in sorted(j["counts"].items()))
        jobs.append(f'<tr class="job" data-job="{_e(j["id"])}"><td class="id">{_e(j["id"])}</td>'
                    f'<td>{_e(j["name"])}</td><td>{_e(j["engine"])}</td>'
                    f'<td class="status status-{_e(j["status"])}">{_e(j["status"])}</td>'
                    f'<td>{_e(j["started"][:19].replace("T", " "))}</td><td class="counts">{_e(counts)}</td>'
                    f'<td class="progress-cell">{bar}</td></tr>')
    lanes = []
    for name, vms in state["lanes"].items():
        bars = "".join(
            f'<span class="bar mode-{_e(v["mode"] or "none")}" data-job="{_e(v["job"])}" data-vm="{_e(v["vm"])}" '
            f'title="{_e(v["job"])} · {_e(v["mode"] or "?")} · round {v["round"]} · attempt {v["attempts"]}">'
            f'{_e(v["vm"])}</span>' for v in vms) or '<span class="idle">idle</span>'
        lanes.append(f'<div class="lane" data-proxy="{_e(name)}"><span class="name">{_e(name)}</span>'
                     f'<div class="bars">{bars}</div></div>')
    proxies = [f'<tr class="proxy" data-proxy="{_e(name)}"><td>{_e(name)}</td><td class="num active">{p["active"]}'
               f'</td><td class="num max">{"?" if p["max"] is None else p["max"]}</td><td class="load">'
               f'<span class="meter"><span style="width:{_width(p["active"], p["max"])}"></span></span></td></tr>'
               for name, p in state["proxies"].items()]
    datastores = [f'<tr class="datastore" data-datastore="{_e(n)}"><td>{_e(n)}</td><td class="num active">{a}</td>'
                  f'</tr>' for n, a in state["datastores"].items()]
    no_datastore = ("no active streams" if state["streams_from"] == "ledger"
                    else "only the ledger knows them (distributed engine)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>vsphere-proxy</title><link rel="icon" href="data:,"><style>{_CSS}</style></head>
<body data-refreshes="0">
<h1>vsphere-proxy</h1>
<div id="meta">read-only · refreshes every {REFRESH_MS / 1000:g} s · updated <span id="updated">now</span>
 · streams from the <span id="source">{_e(state["streams_from"])}</span></div>
<div id="error">{_e(state["error"] or "")}</div>
<h2>Jobs</h2>
<table id="jobs"><thead><tr><th>job</th><th>name</th><th>engine</th><th>status</th><th>started (UTC)</th>
<th>VMs</th><th>progress</th></tr></thead><tbody>{_tbody(jobs, "no jobs in the catalog yet", 7)}</tbody></table>
<h2>Live lanes</h2>
<div id="lanes">{"".join(lanes)}</div>
<h2>Proxies</h2>
<table id="proxies"><thead><tr><th>proxy</th><th>active streams</th><th>max</th><th>load</th></tr></thead>
<tbody>{_tbody(proxies, "no proxy known yet", 4)}</tbody></table>
<h2>Datastores</h2>
<table id="datastores"><thead><tr><th>datastore</th><th>active streams</th></tr></thead>
<tbody>{_tbody(datastores, no_datastore, 2)}</tbody></table>
<script>{_JS}</script>
</body></html>
"""


# --- the app -------------------------------------------------------------------------------------------------

_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]


class _Guard:
    """Every HTTP request must carry the token (when one is set); every response gets no-store/nosniff headers."""

    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _allowed(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        offered = [given.strip()] if scheme.lower() == "bearer" else []
        offered += request.query_params.getlist("token")
        ok = False
        for candidate in offered:
            ok |= hmac.compare_digest(candidate.encode(), self.token)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        if not self._allowed(Request(scope)):
            denied = PlainTextResponse("401: send the dashboard token as `Authorization: Bearer <token>` or "
                                       "`?token=<token>`\n", 401,
                                       headers={"WWW-Authenticate": 'Bearer realm="vsphere-proxy"'})
            await denied(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def _catalog_down(_request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"503: catalog unavailable ({type(exc).__name__})\n", 503)


def make_app(catalog_url: str, *, ledger: Ledger | None = None, limits: dict[str, int] | None = None,
             token: str | None = None) -> Starlette:
    """The dashboard over the catalog at `catalog_url` (opened once, closed when the app shuts down)."""
    catalog = Catalog.open(catalog_url)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(catalog, ledger, limits))

    def page(_request: Request) -> Response:
        return HTMLResponse(render_page(read_state(catalog, ledger, limits)),
                            headers={"Content-Security-Policy": _PAGE_POLICY})

    def state(_request: Request) -> Response:
        return JSONResponse(read_state(catalog, ledger, limits))

    def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            catalog.close()

    routes = [Route("/", page, methods=["GET"]), Route("/api/state", state, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, middleware=[Middleware(_Guard, token=token)],
                    exception_handlers={SQLAlchemyError: _catalog_down}, lifespan=lifespan)
    app.state.catalog = catalog
    return app
