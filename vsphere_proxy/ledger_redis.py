"""The ledger on Redis, shared by every coordinator and worker of a site (DESIGN §6).

Same interface and guarantees as `InMemoryLedger`, across processes and hosts: each operation is one Lua script,
so the check and the take of `acquire` are atomic in Redis. Every stream is a lease: it expires `ttl` seconds
after it was taken or last renewed (`renew_streams`: the proxy worker's heartbeat, the coordinator), and every
script first drops the expired ones — a dead worker's streams come back by themselves. Time is Redis's own clock
(`TIME`), so hosts with skewed clocks agree.

Keys, under `prefix`: `streams` (sorted set: stream id -> lease expiry, ms), `records` (hash: stream id -> JSON
{job, proxy, datastores}), and one set of stream ids per proxy (`proxy:<name>`), datastore (`ds:<name>`) and job
(`job:<id>`), and `releases`, a counter of released or expired streams.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import redis

from vsphere_proxy.ledger import Stream

_PURGE = """
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', p .. 'streams', '-inf', now)
for _, id in ipairs(expired) do
  local raw = redis.call('HGET', p .. 'records', id)
  if raw then
    local r = cjson.decode(raw)
    redis.call('SREM', p .. 'proxy:' .. r.proxy, id)
    redis.call('SREM', p .. 'job:' .. r.job, id)
    for _, ds in ipairs(r.datastores) do redis.call('SREM', p .. 'ds:' .. ds, id) end
    redis.call('HDEL', p .. 'records', id)
  end
  redis.call('ZREM', p .. 'streams', id)
  redis.call('INCR', p .. 'releases')
end
"""

# ARGV: prefix, ttl_ms, id, record json, proxy, job, proxy_limit, datastore_limit (-1: none), datastores...
_ACQUIRE = _PURGE + """
local id, proxy, job = ARGV[3], ARGV[5], ARGV[6]
if redis.call('HEXISTS', p .. 'records', id) == 1 then return -1 end
if redis.call('SCARD', p .. 'proxy:' .. proxy) >= tonumber(ARGV[7]) then return 0 end
local dslimit = tonumber(ARGV[8])
if dslimit >= 0 then
  for i = 9, #ARGV do
    if redis.call('SCARD', p .. 'ds:' .. ARGV[i]) >= dslimit then return 0 end
  end
end
redis.call('HSET', p .. 'records', id, ARGV[4])
redis.call('ZADD', p .. 'streams', now + tonumber(ARGV[2]), id)
redis.call('SADD', p .. 'proxy:' .. proxy, id)
redis.call('SADD', p .. 'job:' .. job, id)
for i = 9, #ARGV do redis.call('SADD', p .. 'ds:' .. ARGV[i], id) end
return 1
"""

# ARGV: prefix, id
_RELEASE = _PURGE + """
local id = ARGV[2]
local raw = redis.call('HGET', p .. 'records', id)
if not raw then return false end
local r = cjson.decode(raw)
redis.call('SREM', p .. 'proxy:' .. r.proxy, id)
redis.call('SREM', p .. 'job:' .. r.job, id)
for _, ds in ipairs(r.datastores) do redis.call('SREM', p .. 'ds:' .. ds, id) end
redis.call('HDEL', p .. 'records', id)
redis.call('ZREM', p .. 'streams', id)
redis.call('INCR', p .. 'releases')
return raw
"""

# ARGV: prefix, id, datastores to keep...
_NARROW = _PURGE + """
local id = ARGV[2]
local raw = redis.call('HGET', p .. 'records', id)
if not raw then return false end
local r = cjson.decode(raw)
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local kept = {}
for _, ds in ipairs(r.datastores) do
  if keep[ds] then table.insert(kept, ds) else redis.call('SREM', p .. 'ds:' .. ds, id) end
end
r.datastores = kept
local out = cjson.encode(r)
redis.call('HSET', p .. 'records', id, out)
return out
"""

# ARGV: prefix, ttl_ms, stream ids...
_RENEW_STREAMS = _PURGE + """
local renewed = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', p .. 'streams', ARGV[i]) then
    redis.call('ZADD', p .. 'streams', 'XX', now + tonumber(ARGV[2]), ARGV[i])
    table.insert(renewed, ARGV[i])
  end
end
return renewed
"""

# ARGV: prefix, stream id
_HOLDS = _PURGE + """
return redis.call('HEXISTS', p .. 'records', ARGV[2])
"""

# ARGV: prefix, kind ("proxy" | "ds" | "job"), name
_COUNT = _PURGE + """
return redis.call('SCARD', p .. ARGV[2] .. ':' .. ARGV[3])
"""

# ARGV: prefix
_ALL = _PURGE + """
return redis.call('HVALS', p .. 'records')
"""


def _record(stream: Stream) -> str:
    return json.dumps({"id": stream.id, "job": stream.job, "proxy": stream.proxy,
                       "datastores": list(dict.fromkeys(stream.datastores))}, separators=(",", ":"))


def _stream(raw: Any) -> Stream:
    r = json.loads(raw)
    return Stream(r["id"], r["job"], r["proxy"], tuple(r["datastores"] or ()))  # Lua's cjson writes [] as {}


class RedisLedger:
    """The `Ledger` interface on Redis, with leases of `ttl` seconds renewed by `renew_streams`."""

    def __init__(self, client: redis.Redis, *, prefix: str = "vsphere-proxy:ledger:", ttl: float = 60.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl: must be > 0 seconds (got {ttl})")
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._narrow = client.register_script(_NARROW)
        self._renew_streams = client.register_script(_RENEW_STREAMS)
        self._holds = client.register_script(_HOLDS)
        self._count = client.register_script(_COUNT)
        self._all = client.register_script(_ALL)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLedger:
        return cls(redis.Redis.from_url(url), **kwargs)

    def acquire(self, stream: Stream, proxy_limit: int, datastore_limit: int | None = None) -> bool:
        datastores = list(dict.fromkeys(stream.datastores))
        got = self._acquire(args=[self.prefix, self.ttl_ms, stream.id, _record(stream), stream.proxy, stream.job,
                                  proxy_limit, -1 if datastore_limit is None else datastore_limit, *datastores])
        if got == -1:
            raise ValueError(f"stream {stream.id} is already active")
        return bool(got)

    def release(self, stream_id: str) -> Stream | None:
        raw = self._release(args=[self.prefix, stream_id])
        return _stream(raw) if raw else None

    def narrow(self, stream_id: str, datastores: Collection[str]) -> Stream | None:
        raw = self._narrow(args=[self.prefix, stream_id, *dict.fromkeys(datastores)])
        return _stream(raw) if raw else None

    def renew_streams(self, stream_ids: Collection[str]) -> set[str]:
        """Extend the leases of these streams (those still held) by the ttl; the ones renewed (the others are
        gone: released by their coordinator, or expired)."""
        if not stream_ids:
            return set()
        got = self._renew_streams(args=[self.prefix, self.ttl_ms, *stream_ids])
        return {x.decode() if isinstance(x, bytes) else str(x) for x in got}

    def holds(self, stream_id: str) -> bool:
        """Whether the stream is still leased (a worker drops a task whose stream is gone)."""
        return bool(self._holds(args=[self.prefix, stream_id]))

    def releases(self) -> int:
        """How many streams were ever released or expired: a coordinator that sees it move knows that another
        job freed capacity."""
        return int(self.client.get(self.prefix + "releases") or 0)

    def proxy_active(self, proxy: str) -> int:
        return int(self._count(args=[self.prefix, "proxy", proxy]))

    def datastore_active(self, datastore: str) -> int:
        return int(self._count(args=[self.prefix, "ds", datastore]))

    def job_active(self, job: str) -> int:
        return int(self._count(args=[self.prefix, "job", job]))

    def streams(self) -> Sequence[Stream]:
        return tuple(sorted((_stream(raw) for raw in self._all(args=[self.prefix])), key=lambda s: s.id))
