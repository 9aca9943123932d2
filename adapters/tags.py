"""vSphere tags through the vSphere Automation SDK (vmware-vcenter), no hand-written HTTP.

The SDK is wired the way ``vmware.vapi.vsphere.client.create_vsphere_client`` does it internally (vAPI JSON-RPC
on ``<base_url>/api``: user/password -> ``com.vmware.cis.Session.create`` -> session id), except that the base URL
is ours: ``create_vsphere_client`` hard-codes ``https://`` and the simulator serves plain http. The SDK's other
connector (``msg_protocol="rest"``) is not used: it expects ``{"value": ...}``-wrapped bodies on ``/api``, which
vCenter 7.0U2+ does not send.

Every call is bounded as the SOAP calls are (``adapters.session``): ``timeout`` seconds to connect and for each
read, ``attempts`` in all on a timeout or a lost connection, then ``VCenterUnresponsive`` ("vCenter did not answer
in N s"). A call refused as unauthenticated (vCenter restarted, the session expired or was ended) logs in again
once, with the credentials kept in memory, and is repeated; concurrent callers share that one login.
"""

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Self, TypeVar

import requests
import tenacity
from com.vmware.cis.tagging_client import Category, Tag, TagAssociation
from com.vmware.cis_client import Session
from com.vmware.vapi.std.errors_client import NotFound, Unauthenticated, Unauthorized
from com.vmware.vapi.std_client import DynamicID
from vmware.vapi.bindings.error import VapiError
from vmware.vapi.bindings.stub import StubConfiguration
from vmware.vapi.core import SecurityContext
from vmware.vapi.exception import CoreException
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.client.security_context_filter import LegacySecurityContextFilter
from vmware.vapi.security.session import create_session_security_context
from vmware.vapi.security.user_password import create_user_password_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory

from adapters.errors import AuthError, ConnectError, VCenterUnresponsive, VSphereError
from adapters.session import Secret

VM_TYPE = "VirtualMachine"
_LOST = (requests.ConnectionError, requests.Timeout)

T = TypeVar("T")


def _timed_out(e: BaseException) -> bool:
    return isinstance(e, requests.Timeout) or isinstance(e.__context__, TimeoutError) or "timed out" in str(e)


class _OwnSession(Session):
    """The client's vAPI session; once deleted through it, the client does not log in again."""

    def __init__(self, config: StubConfiguration, ended: Callable[[], None]) -> None:
        super().__init__(config)
        self._ended = ended

    def delete(self) -> None:
        self._ended()
        super().delete()


class _HTTP(requests.Session):
    """A requests session whose ``verify`` wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    The SDK calls ``session.request()`` without ``verify=``, and requests then lets those environment variables
    override ``session.verify`` (so ``verify=False`` would be silently ignored).
    """

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: Mapping[str, str],
        stream: bool | None,
        verify: bool | str | None,
        cert: Any,
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify
        return settings


class TagClient:
    """Reads vSphere tags and tag associations. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self, base_url: str, username: str, password: str, verify: bool | str = True, timeout: float = 60.0,
        attempts: int = 4, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Open a vAPI session on ``base_url`` (e.g. ``https://vc.example.com`` or ``http://127.0.0.1:PORT``).

        ``verify`` is True, False or a CA bundle path. Raises AuthError (credentials refused),
        ConnectError (unreachable), VCenterUnresponsive (no answer in ``timeout`` x ``attempts``) or VSphereError.
        """
        if attempts < 1:
            raise ValueError(f"attempts: must be >= 1, got {attempts}")
        self._base_url = base_url.rstrip("/")
        self._username = username
        self._password = Secret(password)
        self._timeout = timeout
        self._attempts = attempts
        self._sleep = sleep
        self._http = _HTTP()
        self._http.verify = verify
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._ended = False  # the session was deleted through this client: never renewed
        self._refused: str | None = None  # why logging in again was refused, once it was
        self.logins = 0  # how many times the session was renewed
        self._gave_up = False  # a call spent its attempts without an answer
        try:
            with self._errors("login"):
                self._login()
        except BaseException:
            self._http.close()
            raise

    def _login(self) -> None:
        """A new vAPI session, and the services bound to it."""
        login = self._stub_config(create_user_password_security_context(self._username, self._password.get()))
        token = self._bounded(lambda: Session(login).create(), "login")
        config = self._stub_config(create_session_security_context(token))
        self._session = _OwnSession(config, self._end)
        self._category = Category(config)
        self._tag = Tag(config)
        self._association = TagAssociation(config)

    def _end(self) -> None:
        self._ended = True

    def _bounded(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, made ``attempts`` times in all on a timeout or a lost connection; then VCenterUnresponsive
        when it timed out (a refused connection stays a requests error: ConnectError)."""
        retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(_LOST),
                                     stop=tenacity.stop_after_attempt(self._attempts),
                                     wait=tenacity.wait_exponential(multiplier=0.25, max=2), sleep=self._sleep,
                                     reraise=True)
        try:
            return retrying(fn)
        except _LOST as e:
            if _timed_out(e):
                self._gave_up = True
                made = int(retrying.statistics.get("attempt_number", self._attempts))
                raise VCenterUnresponsive(f"{what} on {self._base_url}: vCenter did not answer in "
                                          f"{self._timeout * made:.0f} s") from None
            raise

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` (a call of the services), bounded, and repeated once after a new login when the session was
        refused as unauthenticated. SDK errors are raised as they are (``_errors`` translates them)."""
        generation = self.logins
        try:
            return self._bounded(fn, what)
        except Unauthenticated:
            if self._ended:
                raise
            self._renew(generation)
        return self._bounded(fn, what)

    def _renew(self, generation: int) -> None:
        with self._lock:
            if self._refused is not None:
                raise AuthError(self._refused)
            if self.logins != generation:
                return  # another thread logged in meanwhile
            try:
                self._login()
            except Unauthenticated:
                self._refused = (f"{self._base_url}: logging in again was refused for user {self._username!r} "
                                 "(incorrect user name or password: was it changed?)")
                raise AuthError(self._refused) from None
            self.logins += 1

    def _stub_config(self, security_context: SecurityContext) -> StubConfiguration:
        connector = get_requests_connector(
            session=self._http,
            url=self._base_url + "/api",
            timeout=self._timeout,
            provider_filter_chain=[LegacySecurityContextFilter(security_context=security_context)],
        )
        return StubConfigurationFactory.new_std_configuration(connector)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate SDK and transport exceptions into adapters.errors (messages never carry the password)."""
        try:
            yield
        except Unauthenticated as e:
            raise AuthError(f"{what}: {self._base_url} refused the credentials of user {self._username!r}") from e
        except Unauthorized as e:
            raise AuthError(f"{what}: user {self._username!r} lacks the privilege on {self._base_url}") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise ConnectError(f"{what}: cannot reach {self._base_url} ({type(e).__name__})") from e
        except (VapiError, CoreException, requests.RequestException) as e:
            raise VSphereError(f"{what} on {self._base_url} failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Delete the vAPI session (best effort) and release the HTTP connections. Idempotent."""
        session, self._session = self._session, None
        if session is not None and not self._gave_up:  # a vCenter that stopped answering is not waited for
            with suppress(VapiError, CoreException, requests.RequestException):
                session.delete()  # best effort: the session expires on the server anyway
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _category_names(self, category_ids: Iterable[str] | None = None) -> dict[str, str]:
        """Category id -> name, for the given ids (default: all); ids deleted meanwhile are left out."""
        names: dict[str, str] = {}
        with self._errors("list categories"):
            ids = self._call(lambda: self._category.list(), "list categories") if category_ids is None else category_ids
            for category_id in ids:
                try:
                    names[category_id] = self._call(lambda i=category_id: self._category.get(i), "read category").name
                except NotFound:
                    continue
        return names

    def _tag_names(self, tag_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Tag id -> (category name, tag name); one Tag.get per tag and one Category.get per category."""
        tags: dict[str, Any] = {}
        with self._errors("read tags"):
            for tag_id in tag_ids:
                try:
                    tags[tag_id] = self._call(lambda i=tag_id: self._tag.get(i), "read tag")
                except NotFound:
                    continue
        categories = self._category_names({t.category_id for t in tags.values()})
        return {i: (categories[t.category_id], t.name) for i, t in tags.items() if t.category_id in categories}

    def categories(self) -> list[str]:
        """Names of all tag categories, sorted."""
        return sorted(self._category_names().values())

    def tags(self) -> list[tuple[str, str]]:
        """All tags as (category name, tag name), sorted."""
        with self._errors("list tags"):
            tag_ids = self._call(lambda: self._tag.list(), "list tags")
        return sorted(self._tag_names(tag_ids).values())

    def vm_tags(self, vm_morefs: list[str]) -> dict[str, list[tuple[str, str]]]:
        """Moref value ("vm-42") -> sorted (category, tag) pairs attached to that VM; every asked VM is a key.

        One batch association call whatever the number of VMs, plus one read per distinct tag and category.
        """
        result: dict[str, list[tuple[str, str]]] = {moref: [] for moref in vm_morefs}
        if not result:
            return result
        with self._errors("list attached tags"):
            ids = [DynamicID(type=VM_TYPE, id=moref) for moref in result]
            attached = self._call(lambda: self._association.list_attached_tags_on_objects(ids), "list attached tags")
        names = self._tag_names({tag_id for entry in attached for tag_id in entry.tag_ids})
        for entry in attached:
            if entry.object_id.type == VM_TYPE and entry.object_id.id in result:
                result[entry.object_id.id] = sorted(names[t] for t in entry.tag_ids if t in names)
        return result

    def vms_with_tag(self, category: str, tag: str) -> list[str]:
        """Moref values of the VMs carrying tag ``category``/``tag``, sorted.

        Raises VSphereError when no such tag exists (a misspelt selection must not silently select nothing).
        """
        category_ids = [i for i, name in self._category_names().items() if name == category]
        with self._errors("find tag"):
            tag_ids = [
                tag_id
                for category_id in category_ids
                for tag_id in self._call(lambda c=category_id: self._tag.list_tags_for_category(c), "list tags")
                if self._call(lambda t=tag_id: self._tag.get(t), "read tag").name == tag
            ]
        if not tag_ids:
            raise VSphereError(f"no tag {tag!r} in category {category!r} on {self._base_url}")
        with self._errors("list attached objects"):
            objects = self._call(lambda: self._association.list_attached_objects(tag_ids[0]), "list attached objects")
        return sorted(o.id for o in objects if o.type == VM_TYPE)

    def attach_tags(self, vm_moref: str, tags: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Attach each (category, tag) to the VM ``vm_moref``; the pairs no tag in vCenter matches (deleted since
        the backup) are returned, not attached."""
        wanted = set(tags)
        if not wanted:
            return []
        with self._errors("list tags"):
            tag_ids = self._call(lambda: self._tag.list(), "list tags")
        ids = {pair: tag_id for tag_id, pair in self._tag_names(tag_ids).items() if pair in wanted}
        target = DynamicID(type=VM_TYPE, id=vm_moref)
        with self._errors("attach tag"):
            for pair in sorted(ids):
                self._call(lambda t=ids[pair]: self._association.attach(t, target), "attach tag")
        return sorted(wanted - set(ids))
