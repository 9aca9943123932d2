"""The `nbd` transport: the disk streams over HTTP(S) from the datastore's `/folder/` endpoint, through the VM's
host. It talks to vCenter, so it lives with the adapters; it implements `vsphere_proxy.transports.Transport`.

Each block is one Range request carrying the vCenter session cookie, with a connect and a read timeout. A transfer
that breaks (connection reset, timeout, a 5xx) resumes from the last byte received, `attempts` times in all,
before the block fails; when every attempt timed out, `DatastoreUnresponsive` ("vCenter did not answer in N s")
ends the job. A cookie refused (401/403: vCenter forgot the session) is renewed once through `renew` and the
request repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from adapters.errors import VCenterUnresponsive
from vsphere_proxy.transports.base import DiskSource, TransportError

if TYPE_CHECKING:
    from adapters.session import Session

_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class DatastoreUnresponsive(VCenterUnresponsive, TransportError):
    """Datastore HTTP did not answer within its bound: the job ends (`vsphere_proxy.faults.Unresponsive`)."""


def _timed_out(e: BaseException) -> bool:
    """A timeout, raised as such or wrapped (a read that timed out mid-body comes as a ConnectionError)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, requests.Timeout | Urllib3Timeout | TimeoutError):
            return True
        todo += [a for a in x.args if isinstance(a, BaseException)] + [x.__cause__, x.__context__]
    return False


class _Retryable(Exception):
    """A 5xx answer or a body cut short: worth asking again for the rest."""


def session_cookie(cookie: str) -> str:
    """`vmware_soap_session="…"; Path=/; HttpOnly` -> `vmware_soap_session="…"` (what a request sends)."""
    return cookie.split(";", 1)[0].strip()


def folder_url(base_url: str, datacenter: str, datastore: str, path: str) -> str:
    """The datastore HTTP URL of `path` inside `datastore`: `/folder/<path>?dcPath=<dc>&dsName=<ds>`."""
    return (f"{base_url.rstrip('/')}/folder/{quote(path)}?dcPath={quote(datacenter)}&dsName={quote(datastore)}")


class NbdTransport:
    mode = "nbd"

    def __init__(self, base_url: str, datacenter: str, cookie: str, verify: bool | str = True, *,
                 attempts: int = 4, timeout: float = 60.0, wait: Callable[[RetryCallState], float] | None = None,
                 http: Any = None, renew: Callable[[str], str] | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._cookie = cookie
        self._renew = renew  # (the refused cookie) -> a cookie of a new session, after a 401/403
        self._datacenter = datacenter
        self._headers = {"Cookie": session_cookie(cookie)}
        self._verify = verify
        self._attempts = attempts
        self._timeout = timeout  # seconds to connect, and for each read
        self._wait = wait or wait_exponential(multiplier=0.2, max=5)
        self._http = http if http is not None else requests.Session()
        self._url: str | None = None
        self._disk: DiskSource | None = None
        self.resumed = 0  # transfers resumed after a break, over the transport's life

    @classmethod
    def for_session(cls, session: Session, datacenter: str, *, attempts: int | None = None,
                    **kwargs: Any) -> NbdTransport:
        """Through `session`'s cookie (renewed with it), certificate check and timeout; `attempts` defaults to the
        session's."""
        return cls(session.base_url, datacenter, session.cookie, session.verify,
                   attempts=session.attempts if attempts is None else attempts, timeout=session.timeout,
                   renew=session.renew_cookie, **kwargs)

    def url(self, disk: DiskSource) -> str:
        return folder_url(self._base, self._datacenter, disk.datastore, disk.flat)

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
            if _timed_out(e):
                raise DatastoreUnresponsive(f"{self._disk}: nbd: block at {offset}: vCenter did not answer in "
                                            f"{self._timeout * self._attempts:.0f} s") from None
            raise TransportError(f"{self._disk}: nbd: block at {offset} failed after {self._attempts} attempts, "
                                 f"{len(buf)} of {length} bytes received: {e}") from None
        return bytes(buf)

    def _fetch(self, first: int, last: int, buf: bytearray, *, renewed: bool = False) -> None:
        if first > last:
            return
        headers = {**self._headers, "Range": f"bytes={first}-{last}"}
        with self._http.get(self._url, headers=headers, stream=True, timeout=(self._timeout, self._timeout),
                            verify=self._verify) as r:
            if r.status_code in (401, 403) and self._renew is not None and not renewed:
                self._cookie = self._renew(self._cookie)  # vCenter forgot the session: log in again, once
                self._headers = {"Cookie": session_cookie(self._cookie)}
                r.close()
                self._fetch(first, last, buf, renewed=True)
                return
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
