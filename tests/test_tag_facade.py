"""The /api façade (testbed/vcsim/api_facade.go) with the real vSphere Automation SDK, via adapters.tags.

Runs against the session's launcher (tests/conftest.py `vcsim`, testbed/topology/default.json). That simulator
is shared by the whole test session: whatever a test here creates (categories, tags, attachments) it removes
again in a `finally`, and it never touches the declared categories and tags.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from com.vmware.cis.tagging_client import Category, CategoryModel, Tag, TagAssociation
from com.vmware.cis_client import Session
from com.vmware.vapi.std.errors_client import NotFound
from com.vmware.vapi.std_client import DynamicID
from vmware.vapi.bindings.stub import StubConfiguration
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.client.security_context_filter import LegacySecurityContextFilter
from vmware.vapi.security.session import create_session_security_context
from vmware.vapi.security.user_password import create_user_password_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory

from adapters.discovery import discover
from adapters.errors import AuthError, ConnectError, VSphereError
from adapters.session import connect
from adapters.tags import TagClient

pytestmark = pytest.mark.integration

UNKNOWN_TAG = "urn:vmomi:InventoryServiceTag:nope:GLOBAL"


def base_url(vcsim: Any) -> str:
    """scheme://host:port of the launcher (its `url` ends in /sdk; the façade lives under /api)."""
    parts = urlsplit(vcsim.url)
    return f"{parts.scheme}://{parts.netloc}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def morefs(vcsim: Any) -> dict[str, str]:
    """VM name -> moref value, read with pyvmomi (the tag API only knows morefs)."""
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as session:
        inventory = discover(session)
    names = {vm.name: vm.moref for vm in inventory.vms}
    assert sorted(names) == sorted(m["Name"] for m in vcsim.topology["Machine"])
    return names


@pytest.fixture(scope="module")
def declared(vcsim: Any) -> dict[str, list[tuple[str, str]]]:
    """VM name -> sorted (category, tag) pairs the topology attaches to it."""
    pairs = {m["Name"]: [t.partition(":") for t in m.get("Tag", [])] for m in vcsim.topology["Machine"]}
    return {name: sorted((category, tag) for category, _, tag in tags) for name, tags in pairs.items()}


@pytest.fixture
def sdk(vcsim: Any) -> Iterator[StubConfiguration]:
    """A raw SDK stub configuration with a session, built like adapters.tags does (to write tags)."""
    http = requests.Session()
    http.trust_env = False

    def config(ctx: Any) -> StubConfiguration:
        connector = get_requests_connector(
            session=http,
            url=base_url(vcsim) + "/api",
            provider_filter_chain=[LegacySecurityContextFilter(security_context=ctx)],
        )
        return StubConfigurationFactory.new_std_configuration(connector)

    token = Session(config(create_user_password_security_context(vcsim.username, vcsim.password))).create()
    cfg = config(create_session_security_context(token))
    try:
        yield cfg
    finally:
        with suppress(Exception):
            Session(cfg).delete()
        http.close()


def test_reads_the_declared_tags(vcsim: Any, morefs: dict[str, str], declared: dict[str, Any]) -> None:
    categories = vcsim.topology["Category"]
    with TagClient(base_url(vcsim), vcsim.username, vcsim.password, verify=False) as client:
        assert client.categories() == sorted(c["Name"] for c in categories)
        assert client.tags() == sorted((c["Name"], t) for c in categories for t in c["Tag"])

        by_moref = client.vm_tags([*morefs.values(), "vm-unknown"])
        assert by_moref.pop("vm-unknown") == []
        assert {name: by_moref[moref] for name, moref in morefs.items()} == declared
        assert client.vm_tags([]) == {}

        for c in categories:
            for t in c["Tag"]:
                carriers = sorted(morefs[name] for name, pairs in declared.items() if (c["Name"], t) in pairs)
                assert client.vms_with_tag(c["Name"], t) == carriers, f"{c['Name']}:{t}"
        with pytest.raises(VSphereError, match="platinum"):
            client.vms_with_tag("BackupPolicy", "platinum")
        with pytest.raises(VSphereError, match="NoSuchCategory"):
            client.vms_with_tag("NoSuchCategory", "gold")


def test_declared_cardinality_through_sdk(vcsim: Any, sdk: StubConfiguration) -> None:
    categories = Category(sdk)
    read = {c.name: c.cardinality for c in map(categories.get, categories.list())}
    assert read == {c["Name"]: CategoryModel.Cardinality(c["Cardinality"]) for c in vcsim.topology["Category"]}


def test_attach_detach_through_sdk(
    vcsim: Any, sdk: StubConfiguration, morefs: dict[str, str], declared: dict[str, Any]
) -> None:
    categories, tags, assoc = Category(sdk), Tag(sdk), TagAssociation(sdk)
    cat_name = unique("attach-test")
    name_a, name_b = sorted(morefs)[:2]
    vm_a, vm_b = morefs[name_a], morefs[name_b]
    cat = categories.create(
        Category.CreateSpec(
            name=cat_name,
            description="",
            cardinality=CategoryModel.Cardinality.SINGLE,
            associable_types={"VirtualMachine"},
        )
    )
    tag = None
    try:
        tag = tags.create(Tag.CreateSpec(name="t1", description="d", category_id=cat))
        assert tags.list_tags_for_category(cat) == [tag]
        assert categories.get(cat).cardinality == CategoryModel.Cardinality.SINGLE
        for vm in (vm_a, vm_b):
            assoc.attach(tag, DynamicID(type="VirtualMachine", id=vm))
        assert tag in assoc.list_attached_tags(DynamicID(type="VirtualMachine", id=vm_a))
        [on_tag] = assoc.list_attached_objects_on_tags([tag])
        assert sorted(o.id for o in on_tag.object_ids) == sorted([vm_a, vm_b])
        with TagClient(base_url(vcsim), vcsim.username, vcsim.password, verify=False) as client:
            assert client.vms_with_tag(cat_name, "t1") == sorted([vm_a, vm_b])
            assert client.vm_tags([vm_a])[vm_a] == sorted([*declared[name_a], (cat_name, "t1")])
            assoc.detach(tag, DynamicID(type="VirtualMachine", id=vm_a))
            assert client.vms_with_tag(cat_name, "t1") == [vm_b]
            assert client.vm_tags([vm_a, vm_b]) == {
                vm_a: declared[name_a],
                vm_b: sorted([*declared[name_b], (cat_name, "t1")]),
            }
        with pytest.raises(NotFound):
            tags.get(UNKNOWN_TAG)
        with pytest.raises(NotFound):
            assoc.attach(UNKNOWN_TAG, DynamicID(type="VirtualMachine", id=vm_a))
    finally:
        if tag is not None:
            for vm in (vm_a, vm_b):
                with suppress(Exception):
                    assoc.detach(tag, DynamicID(type="VirtualMachine", id=vm))
            tags.delete(tag)
        categories.delete(cat)
    assert cat not in categories.list()
    with TagClient(base_url(vcsim), vcsim.username, vcsim.password, verify=False) as client:
        assert client.vm_tags([vm_a, vm_b]) == {vm_a: declared[name_a], vm_b: declared[name_b]}


def test_wrong_password_raises_auth_error(vcsim: Any) -> None:
    with pytest.raises(AuthError) as info:
        TagClient(base_url(vcsim), vcsim.username, "wrong-password", verify=False)
    assert "wrong-password" not in str(info.value)


def test_closed_session_raises_auth_error(vcsim: Any) -> None:
    client = TagClient(base_url(vcsim), vcsim.username, vcsim.password, verify=False)
    try:
        assert client._session is not None
        client._session.delete()  # the server forgets the session; later calls must say so
        with pytest.raises(AuthError):
            client.categories()
    finally:
        client.close()


def test_unreachable_raises_connect_error(vcsim: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(ConnectError):
        TagClient(f"http://127.0.0.1:{port}", vcsim.username, vcsim.password, verify=False, timeout=5)


def test_rest_api_shape(vcsim: Any, morefs: dict[str, str], declared: dict[str, Any]) -> None:
    """The /api/... REST front end answers like vCenter 7.0U2+ (unwrapped values, 201/204/401/404)."""
    api, http = base_url(vcsim) + "/api", requests.Session()
    http.trust_env = False
    untagged = sorted(name for name, pairs in declared.items() if not pairs)
    assert untagged, "the topology leaves some VM untagged"
    vm = {"type": "VirtualMachine", "id": morefs[untagged[0]]}
    cat_name = unique("rest")
    cat = tag = None
    try:
        assert http.post(api + "/session", auth=(vcsim.username, "nope")).status_code == 401
        r = http.post(api + "/session", auth=(vcsim.username, vcsim.password))
        assert r.status_code == 201
        http.headers["vmware-api-session-id"] = r.json()
        r = http.post(
            api + "/cis/tagging/category",
            json={"name": cat_name, "description": "", "cardinality": "SINGLE", "associable_types": []},
        )
        assert r.status_code == 201
        cat = r.json()
        assert http.get(api + f"/cis/tagging/category/{cat}").json()["name"] == cat_name
        r = http.get(api + "/cis/tagging/category/nope")
        assert r.status_code == 404 and r.json()["error_type"] == "NOT_FOUND"
        r = http.post(api + "/cis/tagging/tag", json={"name": "x", "description": "", "category_id": cat})
        assert r.status_code == 201
        tag = r.json()
        r = http.post(api + f"/cis/tagging/tag-association/{tag}?action=attach", json={"object_id": vm})
        assert r.status_code == 204
        on_objects = api + "/cis/tagging/tag-association?action=list-attached-tags-on-objects"
        assert http.post(on_objects, json={"object_ids": [vm]}).json() == [{"object_id": vm, "tag_ids": [tag]}]
        r = http.post(api + f"/cis/tagging/tag-association/{tag}?action=detach", json={"object_id": vm})
        assert r.status_code == 204
        assert http.post(on_objects, json={"object_ids": [vm]}).json() == [{"object_id": vm, "tag_ids": []}]
        assert http.delete(api + f"/cis/tagging/category/{cat}").status_code == 204  # takes its tags along
        deleted_tag, cat, tag = tag, None, None
        assert http.get(api + "/cis/tagging/tag").json().count(deleted_tag) == 0
        assert http.delete(api + "/session").status_code == 204
        assert http.get(api + "/cis/tagging/category").status_code == 401
        assert http.get(base_url(vcsim) + "/about").status_code == 200  # other paths reach vcsim untouched
    finally:
        if cat is not None:  # something above failed: clean up with a fresh session
            cleanup = requests.Session()
            cleanup.trust_env = False
            r = cleanup.post(api + "/session", auth=(vcsim.username, vcsim.password))
            cleanup.headers["vmware-api-session-id"] = r.json()
            if tag is not None:
                cleanup.post(api + f"/cis/tagging/tag-association/{tag}?action=detach", json={"object_id": vm})
                cleanup.delete(api + f"/cis/tagging/tag/{tag}")
            cleanup.delete(api + f"/cis/tagging/category/{cat}")
            cleanup.delete(api + "/session")
            cleanup.close()
        http.close()
