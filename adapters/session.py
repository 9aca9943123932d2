"""A pyvmomi session to vCenter: TLS verified by default, bounded retries on transient faults, and a
count of the SOAP calls made through it (discovery reports it; the tests bound it)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tenacity
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from adapters.errors import AuthError, ConnectError, VCenterUnresponsive, VSphereError

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.RemoteDisconnected,
             http.client.IncompleteRead)


@dataclass
class CallCounter:
    """Counts the SOAP calls (round trips) made through one pyvmomi stub."""

    calls: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def install(self, stub: Any) -> None:
        invoke = stub.InvokeMethod

        def counted(mo: Any, info: Any, args: Any, *rest: Any) -> Any:
            self.calls[info.wsdlName] += 1
            return invoke(mo, info, args, *rest)

        stub.InvokeMethod = counted


_PROPERTY_READS = frozenset({"RetrieveProperties", "RetrievePropertiesEx", "ContinueRetrievePropertiesEx"})


def _unauthenticated(result: Any) -> bool:
    """A property read whose every answer is "missing: NotAuthenticated" (how a dead session's reads come back)."""
    objects = getattr(result, "objects", result) if result is not None else None
    if not objects or isinstance(objects, str | bytes):
        return False
    try:
        missing = [m for o in objects for m in (getattr(o, "missingSet", None) or [])]
    except TypeError:
        return False
    faults = [getattr(m, "fault", None) for m in missing]
    return any(isinstance(getattr(f, "fault", f), vim.fault.NotAuthenticated) for f in faults)


class Relogin:
    """Logs in again, once, when vCenter says the session is gone (`NotAuthenticated`: vCenter restarted, the
    session expired or was terminated; the simulator says `NoPermission`), then repeats the call. Installed on
    the stub's `InvokeMethod`, so every SOAP call of every thread goes through it; concurrent callers wait for one
    login and reuse it. The password stays in this object's closure only (never in a repr, a message or a log)."""

    def __init__(self, login: Callable[[], None]) -> None:
        self._login = login
        self._lock = threading.Lock()
        self._local = threading.local()
        self.logins = 0  # how many times the session was renewed

    def install(self, stub: Any) -> None:
        invoke = stub.InvokeMethod

        def renewing(mo: Any, info: Any, args: Any, *rest: Any) -> Any:
            generation = self.logins
            try:
                result = invoke(mo, info, args, *rest)
            except (vim.fault.NotAuthenticated, vim.fault.NoPermission):
                # A session vCenter forgot: NotAuthenticated (vCenter), NoPermission (the simulator). A real
                # lack of privilege costs one login and fails the same way again.
                if getattr(self._local, "busy", False):
                    raise
                self.renew(generation)
                return invoke(mo, info, args, *rest)
            if info.wsdlName in _PROPERTY_READS and _unauthenticated(result) and not getattr(self._local, "busy",
                                                                                               False):
                self.renew(generation)  # the properties came back "missing: NotAuthenticated", not raised
                return invoke(mo, info, args, *rest)
            return result

        stub.InvokeMethod = renewing

    def renew(self, generation: int) -> None:
        with self._lock:
            if self.logins != generation:
                return  # another thread logged in meanwhile
            self._local.busy = True
            try:
                self._login()
            except vim.fault.InvalidLogin:
                raise AuthError("vCenter: logging in again was refused (the password changed?)") from None
            finally:
                self._local.busy = False
            self.logins += 1


@dataclass
class Session:
    """A logged-in vCenter session."""

    url: str
    username: str
    si: vim.ServiceInstance
    content: vim.ServiceInstanceContent
    counter: CallCounter
    verify: bool | str = True
    relogin: Relogin | None = None
    timeout: float = 60.0  # seconds any one call may wait for vCenter (SOAP and datastore HTTP alike)

    @contextlib.contextmanager
    def keep_alive(self, interval: float = 600.0) -> Iterator[None]:
        """While the block runs, a daemon thread asks vCenter its time every `interval` seconds, so an idle
        session does not expire under a long job (a session vCenter dropped anyway is renewed by `relogin`)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.si.CurrentTime()
                except Exception as e:  # the next real call reports a vCenter that is gone
                    log.warning("vCenter keep-alive failed: %s", type(e).__name__)

        thread = threading.Thread(target=beat, name="vcenter-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()

    @property
    def base_url(self) -> str:
        """scheme://host:port, the root of the REST (Automation API) endpoints."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def cookie(self) -> str:
        """The session cookie, for datastore HTTP access."""
        return str(self.si._stub.cookie)

    def close(self) -> None:
        # Logging out of a dead session is not an error worth raising.
        with contextlib.suppress(Exception):
            Disconnect(self.si)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ssl_context(insecure: bool, ca_file: Path | None) -> ssl.SSLContext:
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def connect(
    url: str,
    username: str,
    password: str,
    *,
    insecure: bool = False,
    ca_file: Path | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Session:
    """Log in to vCenter at `url` (https://host[:port]/sdk, or http for the simulator).

    Transient faults (refused or reset connections, timeouts) are retried `retries` times in all, with
    exponential back-off; a refused login is not retried. Errors name the server and the user, never
    the password.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    where = f"vCenter {parts.scheme}://{parts.netloc}"

    def login() -> vim.ServiceInstance:
        kwargs: dict[str, Any] = {}
        if scheme == "https":
            kwargs["sslContext"] = _ssl_context(insecure, ca_file)
        else:
            kwargs["disableSslCertValidation"] = True
        # httpConnectionTimeout is the socket's timeout: every connect and every read of every SOAP call is
        # bounded by it (connectionPoolTimeout only closes idle pooled connections).
        # SmartConnect first reads the server's API versions over a connection of its own, made without a
        # timeout: the process-wide default bounds it (only while logging in).
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            return SmartConnect(host=parts.hostname, port=port, user=username, pwd=password, protocol=scheme,
                                path=parts.path or "/sdk", connectionPoolTimeout=max(timeout, 60.0),
                                httpConnectionTimeout=timeout, **kwargs)
        finally:
            socket.setdefaulttimeout(previous)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TRANSIENT),
        stop=tenacity.stop_after_attempt(retries),
        wait=tenacity.wait_exponential(multiplier=0.25, max=4),
        sleep=sleep,
        reraise=True,
    )
    try:
        si = retrying(login)
    except vim.fault.InvalidLogin:
        raise AuthError(f"{where}: login refused for user {username!r} (incorrect user name or password)") from None
    except ssl.SSLError as e:
        raise ConnectError(f"{where}: TLS verification failed ({e.reason or e}); set vcenter.ca_file, "
                           "or insecure: true for a lab") from None
    except TimeoutError:
        raise VCenterUnresponsive(f"{where}: vCenter did not answer in {timeout * retries:.0f} s "
                                  f"({retries} attempts of {timeout:g} s)") from None
    except TRANSIENT as e:
        raise ConnectError(f"{where}: unreachable after {retries} attempts ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ConnectError(f"{where}: unreachable ({e.strerror or e})") from None
    except vim.fault.VimFault as e:
        raise VSphereError(f"{where}: {e.msg or type(e).__name__}") from None

    try:
        content = si.RetrieveContent()
    except TimeoutError:
        raise VCenterUnresponsive(f"{where}: vCenter did not answer in {timeout:.0f} s after the login") from None
    counter = CallCounter()
    counter.install(si._stub)
    manager = content.sessionManager
    relogin = Relogin(lambda: manager.Login(userName=username, password=password))
    relogin.install(si._stub)
    verify: bool | str = False if insecure else (str(ca_file) if ca_file else True)
    return Session(url=url, username=username, si=si, content=content, counter=counter, verify=verify,
                   relogin=relogin, timeout=timeout)
