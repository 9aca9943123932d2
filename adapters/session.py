"""A pyvmomi session to vCenter: TLS verified by default, every call bounded, the session renewed when vCenter
forgets it, and a count of the SOAP calls made through it (discovery reports it; the tests bound it).

Three layers wrap the stub's `InvokeMethod`, so every SOAP call of every thread goes through them:

- `CallCounter` counts the round trips;
- `Bounded` gives each call `timeout` seconds to connect and as long for each read of its answer (the socket's
  timeout), and repeats a call that timed out or lost its connection, `attempts` times in all with a short
  back-off. A call that changes vCenter (a task, an inventory change) is repeated only when its request never
  left (the connection could not be made): its effect may already be under way. When the attempts are spent,
  `VCenterUnresponsive` ("vCenter did not answer in N s", N = timeout x attempts) ends the job; until a call is
  answered again, each later call gets a single attempt, so that ending the job does not wait as long per call;
- `Relogin` logs in again, once, when vCenter says the session is gone (vCenter restarted, the session expired
  or was terminated), on the same stub, so every managed object reference keeps working, then repeats the call.
  Concurrent callers wait for that one login and reuse it. The datastore HTTP transport asks for a new cookie the
  same way when it is refused (`Session.renew_cookie`).

The password is kept in memory only, wrapped so that no repr, message or log shows it.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import tenacity
from pyVmomi import SoapStubAdapter, VmomiSupport, vim, vmodl

from adapters.errors import AuthError, ConnectError, VCenterUnresponsive, VSphereError

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.RemoteDisconnected,
             http.client.IncompleteRead)

# Calls that are not repeated once their request was sent: besides every `*_Task` method, those that change the
# inventory at once.
_SENT_ONCE = frozenset({"CreateFolder", "AddCustomFieldDef", "RemoveCustomFieldDef", "RenameCustomFieldDef",
                        "UnregisterVM", "MarkAsTemplate", "MarkAsVirtualMachine", "AddStandaloneHost_Task"})
# Calls that never renew the session: the session calls themselves, and what needs none.
_NO_RENEWAL = frozenset({"Login", "Logout", "LoginByToken", "LoginExtensionByCertificate", "SessionIsActive",
                         "RetrieveServiceContent", "TerminateSession"})
_PROPERTY_READS = frozenset({"RetrieveProperties", "RetrievePropertiesEx", "ContinueRetrievePropertiesEx"})


class Secret:
    """A password held in memory; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


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


def _repeatable(method: str) -> bool:
    """True for a call that may be sent again after its answer was lost (reads, idempotent calls)."""
    return not method.endswith("_Task") and method not in _SENT_ONCE


class Bounded:
    """Bounds every SOAP call of a stub: `timeout` seconds to connect and for each read, `attempts` in all on a
    timeout or a lost connection (see the module's docstring), then `VCenterUnresponsive`."""

    def __init__(self, timeout: float, attempts: int, *, wait: tenacity.wait.wait_base | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1:
            raise ValueError(f"attempts: must be >= 1, got {attempts}")
        self.timeout = timeout
        self.attempts = attempts
        self.wait = wait or tenacity.wait_exponential(multiplier=0.25, max=2)
        self.sleep = sleep
        self.gave_up = False  # a call got no answer in its attempts, and none answered since
        self._local = threading.local()

    @property
    def bound(self) -> float:
        """The longest one call waits for vCenter, back-off aside."""
        return self.timeout * self.attempts

    @contextlib.contextmanager
    def single_attempt(self) -> Any:
        """Calls of this thread in the block are made once (logging out: nobody waits for it)."""
        before = getattr(self._local, "single", False)
        self._local.single = True
        try:
            yield
        finally:
            self._local.single = before

    def install(self, stub: Any) -> None:
        invoke = stub.InvokeMethod
        get_connection = stub.GetConnection
        local = self._local

        def connecting() -> Any:
            conn = get_connection()  # connects (TLS included) when no pooled connection is free
            local.connected = True
            return conn

        def bounded(mo: Any, info: Any, args: Any, *rest: Any) -> Any:
            method = str(info.wsdlName)
            # while vCenter is known not to answer, each call gets one attempt: a job ending on it (removing
            # snapshots, detaching disks) is not held up attempts x timeout per call
            attempts = 1 if getattr(local, "single", False) or self.gave_up else self.attempts

            def attempt() -> Any:
                local.connected = False
                return invoke(mo, info, args, *rest)

            def again(e: BaseException) -> bool:
                return isinstance(e, TRANSIENT) and (_repeatable(method) or not local.connected)

            retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(again),
                                         stop=tenacity.stop_after_attempt(attempts), wait=self.wait,
                                         sleep=self.sleep, reraise=True)
            started = time.monotonic()
            try:
                result = retrying(attempt)
            except TRANSIENT as e:
                made = int(retrying.statistics.get("attempt_number", 1))
                if isinstance(e, TimeoutError):
                    self.gave_up = True
                    raise VCenterUnresponsive(f"{method}: vCenter did not answer in "
                                              f"{self.timeout * made:.0f} s") from e
                if made >= attempts and attempts > 1:
                    self.gave_up = True
                    raise VCenterUnresponsive(
                        f"{method}: vCenter did not answer in {time.monotonic() - started:.0f} s ({made} attempts, "
                        f"{type(e).__name__})") from e
                raise  # a change sent once, its connection lost: the caller's policy decides
            self.gave_up = False  # it answers again
            return result

        stub.GetConnection = connecting
        stub.InvokeMethod = bounded


def _unauthenticated(result: Any) -> bool:
    """A property read whose answers are "missing: NotAuthenticated" (how some servers answer a dead session)."""
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
    """Logs in again, once, when vCenter says the session is gone, then repeats the call (see the module's
    docstring). `NotAuthenticated` renews at once; `NoPermission` (what some servers answer for a forgotten session,
    and what a real lack of privilege raises) only when the session is found dead. A refused login raises
    `AuthError`, then and for every later renewal, without logging in again."""

    def __init__(self, stub: Any, login: Callable[[], None], alive: Callable[[], bool], where: str) -> None:
        self._stub = stub
        self._login = login
        self._alive = alive
        self._where = where
        self._lock = threading.Lock()
        self._local = threading.local()
        self._failed: str | None = None  # why logging in again was refused, once it was
        self.logins = 0  # how many times the session was renewed: its generation

    @property
    def busy(self) -> bool:
        """This thread is logging in (or probing the session): its calls are not renewed again."""
        return bool(getattr(self._local, "busy", False))

    def install(self, stub: Any) -> None:
        invoke = stub.InvokeMethod

        def renewing(mo: Any, info: Any, args: Any, *rest: Any) -> Any:
            method = str(info.wsdlName)
            if method in _NO_RENEWAL or self.busy:
                return invoke(mo, info, args, *rest)
            generation = self.logins
            try:
                result = invoke(mo, info, args, *rest)
            except vim.fault.NotAuthenticated:
                self.renew(generation)
                return self._again(invoke, mo, info, args, rest)
            except vim.fault.NoPermission:
                if not self._dead():
                    raise  # a privilege the user lacks: logging in again would not give it
                self.renew(generation)
                return self._again(invoke, mo, info, args, rest)
            if method in _PROPERTY_READS and _unauthenticated(result):
                self.renew(generation)
                return self._again(invoke, mo, info, args, rest)
            return result

        stub.InvokeMethod = renewing

    def _again(self, invoke: Callable[..., Any], mo: Any, info: Any, args: Any, rest: tuple[Any, ...]) -> Any:
        try:
            return invoke(mo, info, args, *rest)
        except vim.fault.NotAuthenticated:
            raise AuthError(f"{self._where}: {info.wsdlName} not authenticated even after logging in again") from None

    def _dead(self) -> bool:
        self._local.busy = True
        try:
            return not self._alive()
        except (vim.fault.NotAuthenticated, vim.fault.NoPermission):
            return True
        finally:
            self._local.busy = False

    def renew(self, generation: int) -> None:
        """Log in again unless another thread did since `generation` was read."""
        with self._lock:
            if self._failed is not None:
                raise AuthError(self._failed)
            if self.logins == generation:
                self._renew_locked()

    def renew_cookie(self, stale: str) -> str:
        """Log in again unless the session's cookie is no longer `stale` (another thread did); the cookie now."""
        with self._lock:
            if self._failed is not None:
                raise AuthError(self._failed)
            if str(self._stub.cookie) == stale:
                self._renew_locked()
            return str(self._stub.cookie)

    def _renew_locked(self) -> None:
        stale = self._stub.cookie
        self._stub.cookie = ""  # vCenter refuses a login made inside a session it still knows
        self._local.busy = True
        try:
            self._login()
        except vim.fault.InvalidLogin:
            self._stub.cookie = stale
            # never tried again: a password changed under the job would only lock the account
            self._failed = (f"{self._where}: logging in again was refused (incorrect user name or password: was "
                            "it changed?)")
            raise AuthError(self._failed) from None
        except BaseException:
            self._stub.cookie = stale
            raise
        finally:
            self._local.busy = False
        log.info("%s: session renewed", self._where)
        self.logins += 1


class KeepAlive:
    """A daemon thread asking vCenter its time every `interval` seconds while a long job runs, so that its
    session never sits idle long enough to expire. A context manager, or call `stop()`."""

    def __init__(self, session: Session, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval: must be > 0, got {interval}")
        self._stop = threading.Event()
        self._session = session
        self._interval = interval
        self.beats = 0
        self._thread = threading.Thread(target=self._run, name="vcenter-keepalive", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._session.si.CurrentTime()
                self.beats += 1
            except Exception as e:  # the job's next real call reports a vCenter that is gone
                log.warning("vCenter keep-alive failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ends the thread at its next wake-up (it never delays the caller)."""
        self._stop.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class Session:
    """A logged-in vCenter session; `connect` makes one."""

    url: str
    username: str
    si: vim.ServiceInstance
    content: vim.ServiceInstanceContent = field(repr=False)
    counter: CallCounter = field(repr=False)
    verify: bool | str = True
    relogin: Relogin | None = None
    timeout: float = 60.0  # seconds any one call may wait for vCenter (SOAP, datastore HTTP and SDK alike)
    attempts: int = 4  # attempts of a call that timed out or lost its connection
    bounded: Bounded | None = None
    password: Secret | None = field(default=None, repr=False, compare=False)

    def keep_alive(self, interval: float = 600.0) -> KeepAlive:
        """Keep the session alive: `with session.keep_alive(): ...`, or `k = session.keep_alive(); ...; k.stop()`.
        vCenter ends sessions idle for 30 minutes by default; a session dropped anyway is renewed by `relogin`."""
        return KeepAlive(self, interval)

    @property
    def unresponsive(self) -> bool:
        """A call got no answer within its bound and none was answered since: cleanup may keep to one attempt."""
        return self.bounded is not None and self.bounded.gave_up

    @property
    def base_url(self) -> str:
        """scheme://host:port, the root of the REST (Automation API) endpoints."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def cookie(self) -> str:
        """The session cookie, for datastore HTTP access; it changes when the session is renewed."""
        return str(self.si._stub.cookie)

    def renew_cookie(self, stale: str) -> str:
        """The datastore refused `stale` (401/403): log in again (once for all threads) and return the new
        cookie. Raises `AuthError` when the login is refused."""
        if self.relogin is None:
            return self.cookie
        return self.relogin.renew_cookie(stale)

    fresh_cookie = renew_cookie

    def tag_client(self) -> Any:
        """An `adapters.tags.TagClient` for this vCenter's Automation API, logged in with this session's
        credentials and bounded as its calls are."""
        from adapters.tags import TagClient

        if self.password is None:
            raise VSphereError(f"{self.base_url}: this session keeps no credentials for the Automation API")
        return TagClient(self.base_url, self.username, self.password.get(), verify=self.verify,
                         timeout=self.timeout, attempts=self.attempts)

    def close(self) -> None:
        """Log out, once and without waiting on a vCenter that stopped answering; logging out of a dead session is
        not an error worth raising."""
        stub = self.si._stub
        if self.bounded is None or not self.bounded.gave_up:
            single = self.bounded.single_attempt() if self.bounded is not None else contextlib.nullcontext()
            with single, contextlib.suppress(Exception):
                self.content.sessionManager.Logout()
        with contextlib.suppress(Exception):
            stub.DropConnections()

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


def _api_version(scheme: str, host: str, port: int, path: str, context: ssl.SSLContext | None,
                 timeout: float) -> str | None:
    """The newest vSphere API version both pyVmomi and the server speak, from `<path>/vimServiceVersions.xml`
    (what pyVim's SmartConnect reads, here with a timeout); None when the server does not publish it."""
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path.rstrip("/") + "/vimServiceVersions.xml")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    served = {v.text for ns in root.iter("namespace") if ns.findtext("name") == "urn:vim25"
              for v in [ns.find("version"), *ns.findall("priorVersions/version")] if v is not None}
    for version in VmomiSupport.GetServiceVersions("vim25"):  # newest first
        if VmomiSupport.versionIdMap.get(version) in served:
            return str(version)
    return None


def connect(
    url: str,
    username: str,
    password: str,
    *,
    insecure: bool = False,
    ca_file: Path | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    attempts: int = 4,
    sleep: Callable[[float], None] = time.sleep,
) -> Session:
    """Log in to vCenter at `url` (https://host[:port]/sdk, or http for the simulator).

    Reaching vCenter (refused or reset connections, timeouts) is tried `retries` times in all, with exponential
    back-off; a refused login is not retried. Afterwards every call waits at most `timeout` seconds to connect and
    for each read, and is made `attempts` times in all (see the module's docstring). Errors name the server and
    the user, never the password: `AuthError`, `ConnectError`, `VCenterUnresponsive` (one that did not answer).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or "localhost"
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path or "/sdk"
    where = f"vCenter {scheme}://{parts.netloc}"
    context = _ssl_context(insecure, ca_file) if scheme == "https" else None

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TRANSIENT),
        stop=tenacity.stop_after_attempt(retries),
        wait=tenacity.wait_exponential(multiplier=0.25, max=4),
        sleep=sleep,
        reraise=True,
    )
    try:
        version = retrying(lambda: _api_version(scheme, host, port, path, context, timeout))
    except ssl.SSLError as e:
        raise ConnectError(f"{where}: TLS verification failed ({e.reason or e}); set vcenter.ca_file, "
                           "or insecure: true for a lab") from None
    except TimeoutError:
        raise VCenterUnresponsive(f"log in to {scheme}://{parts.netloc}: vCenter did not answer in "
                                  f"{timeout * retries:.0f} s ({retries} attempts of {timeout:g} s)") from None
    except TRANSIENT as e:
        raise ConnectError(f"{where}: unreachable after {retries} attempts ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ConnectError(f"{where}: unreachable ({e.strerror or e})") from None
    if version is None:
        raise ConnectError(f"{where}: not a vSphere API endpoint (no usable {path}/vimServiceVersions.xml)")

    stub = SoapStubAdapter(host=host, port=-port if scheme == "http" else port, version=version, path=path,
                           sslContext=context, httpConnectionTimeout=timeout,
                           connectionPoolTimeout=max(timeout, 60.0))
    si = vim.ServiceInstance("ServiceInstance", stub)
    counter = CallCounter()
    counter.install(stub)
    bounded = Bounded(timeout, attempts, sleep=sleep)
    bounded.install(stub)
    secret = Secret(password)
    service: list[vim.ServiceInstanceContent] = []  # read once, below; never through lazy attribute access

    def login() -> None:
        service[0].sessionManager.Login(userName=username, password=secret.get())

    def alive() -> bool:
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=service[0].sessionManager, skip=False)],
                             propSet=[pc.PropertySpec(type=vim.SessionManager, pathSet=["currentSession"])])
        result = service[0].propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        return bool(result and any(p.val is not None for o in result.objects for p in o.propSet or []))

    relogin = Relogin(stub, login, alive, where)
    relogin.install(stub)
    try:
        content = si.RetrieveContent()
        service.append(content)
        login()
    except vim.fault.InvalidLogin:
        stub.DropConnections()
        raise AuthError(f"{where}: login refused for user {username!r} (incorrect user name or password)") from None
    except VCenterUnresponsive as e:
        stub.DropConnections()
        raise VCenterUnresponsive(f"log in to {scheme}://{parts.netloc}: {e}") from None
    except ssl.SSLError as e:
        raise ConnectError(f"{where}: TLS verification failed ({e.reason or e}); set vcenter.ca_file, "
                           "or insecure: true for a lab") from None
    except TRANSIENT as e:
        raise ConnectError(f"{where}: unreachable after {attempts} attempts ({type(e).__name__}: {e})") from None
    except vim.fault.VimFault as e:
        raise VSphereError(f"{where}: {e.msg or type(e).__name__}") from None
    verify: bool | str = False if insecure else (str(ca_file) if ca_file else True)
    return Session(url=url, username=username, si=si, content=content, counter=counter, verify=verify,
                   relogin=relogin, timeout=timeout, attempts=attempts, bounded=bounded, password=secret)
