"""vSphere tags through the vSphere Automation SDK (vmware-vcenter), no hand-written HTTP.

The SDK is wired the way ``vmware.vapi.vsphere.client.create_vsphere_client`` does it internally (vAPI JSON-RPC
on ``<base_url>/api``: user/password -> ``com.vmware.cis.Session.create`` -> session id), except that the base URL
is ours: ``create_vsphere_client`` hard-codes ``https://`` and the simulator serves plain http. The SDK's other
connector (``msg_protocol="rest"``) is not used: it expects ``{"value": ...}``-wrapped bodies on ``/api``, which
vCenter 7.0U2+ does not send.
"""

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Self

import requests
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

from adapters.errors import AuthError, ConnectError, VSphereError

VM_TYPE = "VirtualMachine"


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
        self, base_url: str, username: str, password: str, verify: bool | str = True, timeout: float = 60.0
    ) -> None:
        """Open a vAPI session on ``base_url`` (e.g. ``https://vc.example.com`` or ``http://127.0.0.1:PORT``).

        ``verify`` is True, False or a CA bundle path. Raises AuthError (credentials refused),
        ConnectError (unreachable) or VSphereError.
        """
        self._base_url = base_url.rstrip("/")
        self._username = username
        self._timeout = timeout
        self._http = _HTTP()
        self._http.verify = verify
        self._session: Session | None = None
        try:
            with self._errors("login"):
                login = self._stub_config(create_user_password_security_context(username, password))
                token = Session(login).create()
        except BaseException:
            self._http.close()
            raise
        config = self._stub_config(create_session_security_context(token))
        self._session = Session(config)
        self._category = Category(config)
        self._tag = Tag(config)
        self._association = TagAssociation(config)

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
        if session is not None:
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
            for category_id in self._category.list() if category_ids is None else category_ids:
                try:
                    names[category_id] = self._category.get(category_id).name
                except NotFound:
                    continue
        return names

    def _tag_names(self, tag_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Tag id -> (category name, tag name); one Tag.get per tag and one Category.get per category."""
        tags: dict[str, Any] = {}
        with self._errors("read tags"):
            for tag_id in tag_ids:
                try:
                    tags[tag_id] = self._tag.get(tag_id)
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
            tag_ids = self._tag.list()
        return sorted(self._tag_names(tag_ids).values())

    def vm_tags(self, vm_morefs: list[str]) -> dict[str, list[tuple[str, str]]]:
        """Moref value ("vm-42") -> sorted (category, tag) pairs attached to that VM; every asked VM is a key.

        One batch association call whatever the number of VMs, plus one read per distinct tag and category.
        """
        result: dict[str, list[tuple[str, str]]] = {moref: [] for moref in vm_morefs}
        if not result:
            return result
        with self._errors("list attached tags"):
            attached = self._association.list_attached_tags_on_objects(
                [DynamicID(type=VM_TYPE, id=moref) for moref in result]
            )
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
                for tag_id in self._tag.list_tags_for_category(category_id)
                if self._tag.get(tag_id).name == tag
            ]
        if not tag_ids:
            raise VSphereError(f"no tag {tag!r} in category {category!r} on {self._base_url}")
        with self._errors("list attached objects"):
            objects = self._association.list_attached_objects(tag_ids[0])
        return sorted(o.id for o in objects if o.type == VM_TYPE)
