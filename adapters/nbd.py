"""The `nbd` transport: the disk streams over HTTP(S) from the datastore's `/folder/` endpoint, through the VM's
host. It talks to vCenter, so it lives with the adapters; it implements `vsphere_proxy.transports.Transport`.

Each block is one Range request carrying the vCenter session cookie. A transfer that breaks (connection reset,
timeout, a 5xx) resumes from the last byte received, a bounded number of times, before the block fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self
from urllib.parse import quote

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from vsphere_proxy.transports.base import DiskSource, TransportError

_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class _Retryable(Exception):
    """A 5xx answer or a body cut short: worth asking again for the rest."""


def session_cookie(cookie: str) -> str:
    """`vmware_soap_session="…"; Path=/; HttpOnly` -> `vmware_soap_session="…"` (what a request sends)."""
    return cookie.split(";", 1)[0].strip()


class NbdTransport:
    mode = "nbd"

    def __init__(self, base_url: str, datacenter: str, cookie: str, verify: bool | str = True, *,
                 attempts: int = 4, timeout: float = 60.0, wait: Callable[[RetryCallState], float] | None = None,
                 http: Any = None) -> None:
        self._base = base_url.rstrip("/")
        self._datacenter = datacenter
        self._headers = {"Cookie": session_cookie(cookie)}
        self._verify = verify
        self._attempts = attempts
        self._timeout = timeout
        self._wait = wait or wait_exponential(multiplier=0.2, max=5)
        self._http = http if http is not None else requests.Session()
        self._url: str | None = None
        self._disk: DiskSource | None = None
        self.resumed = 0  # transfers resumed after a break, over the transport's life

    def url(self, disk: DiskSource) -> str:
        return (f"{self._base}/folder/{quote(disk.flat)}?dcPath={quote(self._datacenter)}"
                f"&dsName={quote(disk.datastore)}")

    def open(self, disk: DiskSource) -> None:
        self._disk, self._url = disk, self.url(disk)

    def read_block(self, offset: int, length: int) -> bytes:
        if self._url is None:
            raise TransportError("nbd: read before open")
        buf = bytearray()
        retrying = Retrying(stop=stop_after_attempt(self._attempts), wait=self._wait, reraise=True,
                            retry=retry_if_exception_type((*_TRANSIENT, _Retryable)))
        try:
            for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.resumed += 1
                    self._fetch(offset + len(buf), offset + length - 1, buf)
                    if len(buf) < length:
                        raise _Retryable(f"the answer ended after {len(buf)} bytes")
        except (*_TRANSIENT, _Retryable) as e:
            raise TransportError(f"{self._disk}: nbd: block at {offset} failed after {self._attempts} attempts, "
                                 f"{len(buf)} of {length} bytes received: {e}") from None
        return bytes(buf)

    def _fetch(self, first: int, last: int, buf: bytearray) -> None:
        if first > last:
            return
        headers = {**self._headers, "Range": f"bytes={first}-{last}"}
        with self._http.get(self._url, headers=headers, stream=True, timeout=self._timeout,
                            verify=self._verify) as r:
            if r.status_code >= 500:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code != 206:
                raise TransportError(f"{self._disk}: nbd: HTTP {r.status_code} for bytes {first}-{last} of "
                                     f"{self._url.split('?')[0]}")
            want = last - first + 1
            for piece in r.iter_content(chunk_size=1 << 20):
                if len(piece) > want:
                    raise TransportError(f"{self._disk}: nbd: more bytes than asked for {first}-{last}")
                buf += piece
                want -= len(piece)

    def close(self) -> None:
        self._url = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
