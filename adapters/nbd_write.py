"""The `nbd` write tier (DESIGN §8): the new disk's flat extent uploaded with one datastore HTTP PUT, streamed.

A background thread runs the PUT with a chunked body that a bounded queue feeds (a few blocks: never the whole
disk in memory). `write_block` first sends zeros for the hole up to its offset (pieces of one shared zero
buffer), then the block; `close(complete=True)` pads zeros up to the capacity, ends the body and waits for the
answer, raising on anything but 2xx; `close(False)` breaks the upload off (the half-written file is the caller's
to delete). Every wait is bounded: a datastore that stops taking bytes or does not answer raises
`DatastoreUnresponsive` ("vCenter did not answer in N s"), which ends the job like any unresponsive vCenter.
The endpoint overwrites the whole file; whether the zeros sent for holes are stored as holes is the datastore's
(a thin-provisioned one keeps them unallocated).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self

import requests

from adapters.nbd import DatastoreUnresponsive, folder_url, session_cookie
from vsphere_proxy.transports.base import BLOCK, DiskSource, TransportError

if TYPE_CHECKING:
    from adapters.session import Session

_ZEROS = memoryview(bytes(BLOCK))
_END = object()
_ABORT = object()


class _Aborted(Exception):
    pass


class NbdWriter:
    mode = "nbd"

    def __init__(self, base_url: str, datacenter: str, cookie: str, verify: bool | str = True, *,
                 timeout: float = 60.0, depth: int = 4, http: Any = None) -> None:
        self._base = base_url.rstrip("/")
        self._datacenter = datacenter
        self._cookie = cookie
        self._verify = verify
        self._timeout = timeout  # seconds the datastore may take to accept a block, and to answer at the end
        self._depth = depth
        self._http = http if http is not None else requests.Session()
        self._disk: DiskSource | None = None
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._thread: threading.Thread | None = None
        self._answer: requests.Response | None = None
        self._error: BaseException | None = None
        self._position = 0

    @classmethod
    def for_session(cls, session: Session, datacenter: str, **kwargs: Any) -> NbdWriter:
        return cls(session.base_url, datacenter, session.cookie, session.verify, timeout=session.timeout, **kwargs)

    def open(self, disk: DiskSource) -> None:
        self.close(False)
        self._disk, self._position = disk, 0
        self._queue = queue.Queue(self._depth)
        self._answer = self._error = None
        url = folder_url(self._base, self._datacenter, disk.datastore, disk.flat)
        headers = {"Cookie": session_cookie(self._cookie), "Content-Type": "application/octet-stream"}
        self._thread = threading.Thread(target=self._upload, args=(url, headers), name=f"nbd-put-{disk.vm}",
                                        daemon=True)
        self._thread.start()

    def _body(self, q: queue.Queue[Any]) -> Iterator[bytes | memoryview]:
        while True:
            item = q.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    def _upload(self, url: str, headers: dict[str, str]) -> None:
        try:
            self._answer = self._http.put(url, data=self._body(self._queue), headers=headers, verify=self._verify,
                                          timeout=(self._timeout, self._timeout))
        except BaseException as e:
            self._error = e

    def _send(self, item: Any) -> None:
        if self._error is not None:
            raise self._failed(self._error)
        try:
            self._queue.put(item, timeout=self._timeout)
        except queue.Full:
            raise DatastoreUnresponsive(f"{self._disk}: nbd: the datastore took no data for {self._timeout:g} s: "
                                        f"vCenter did not answer in {self._timeout:g} s") from None

    def _failed(self, e: BaseException) -> TransportError:
        if isinstance(e, requests.Timeout):
            return DatastoreUnresponsive(f"{self._disk}: nbd: upload: vCenter did not answer in {self._timeout:g} s")
        return TransportError(f"{self._disk}: nbd: upload failed: {type(e).__name__}: {str(e)[:200]}")

    def _zeros_to(self, offset: int) -> None:
        while self._position < offset:
            n = min(BLOCK, offset - self._position)
            self._send(_ZEROS[:n])
            self._position += n

    def write_block(self, offset: int, data: bytes) -> None:
        if self._disk is None or self._thread is None:
            raise TransportError("nbd: write before open")
        if offset < self._position:
            raise TransportError(f"{self._disk}: nbd: block at {offset} after {self._position}: writes go forward")
        self._zeros_to(offset)
        self._send(data)
        self._position = offset + len(data)

    def close(self, complete: bool = True) -> None:
        thread, disk = self._thread, self._disk
        if thread is None or disk is None:
            return
        self._thread = None
        try:
            if complete:
                self._zeros_to(disk.capacity)
                self._send(_END)
            else:
                with contextlib.suppress(queue.Full):  # a stuck upload ends by its read timeout
                    self._queue.put_nowait(_ABORT)
            thread.join(self._timeout + 5 if complete else 5)
            if not complete:
                return
            if thread.is_alive():
                raise DatastoreUnresponsive(f"{disk}: nbd: upload: vCenter did not answer in {self._timeout:g} s")
            if self._error is not None:
                raise self._failed(self._error)
            answer = self._answer
            if answer is None or answer.status_code >= 300:
                code = answer.status_code if answer is not None else "no answer"
                raise TransportError(f"{disk}: nbd: upload of {disk.flat} to {disk.datastore}: HTTP {code}")
        finally:
            self._disk = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(False)
