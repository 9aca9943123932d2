"""The /api façade (testbed/vcsim/api_facade.go) with the real vSphere Automation SDK, via adapters.tags.

NOTE: this builds its own scratch launcher (below) next to a copy of api_facade.go; it will be replaced by the real
testbed fixture (testbed/vcsim/main.go) once that exists.
"""

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

from adapters.errors import AuthError, ConnectError, VSphereError
from adapters.tags import TagClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
FACADE = REPO / "testbed" / "vcsim" / "api_facade.go"
GOPATH = os.environ.get("VCSIM_GOPATH", "/usr/share/gocode")
USER, PASSWORD = "backup@vsphere.local", "s3cret!"

# Scratch launcher: VPX model, REST endpoints, façade installed; seeds category "backup" (tags "gold", "silver")
# through govmomi's /rest tags manager, attaches "gold" to the first VM, prints one JSON line, serves until SIGTERM.
LAUNCHER_GO = """\
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vapi/rest"
	_ "github.com/vmware/govmomi/vapi/simulator"
	"github.com/vmware/govmomi/vapi/tags"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	model.Service.RegisterEndpoints = true
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(os.Args[1], os.Args[2])}
	srv := model.Service.NewServer()
	srv.Config.Handler = wrapAPIFacade(srv.Config.Handler)
	defer srv.Close()

	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, srv.URL, true)
	if err != nil {
		log.Fatal(err)
	}
	rc := rest.NewClient(c.Client)
	if err := rc.Login(ctx, srv.URL.User); err != nil {
		log.Fatal(err)
	}
	m := tags.NewManager(rc)
	cat, err := m.CreateCategory(ctx, &tags.Category{Name: "backup", Cardinality: "MULTIPLE",
		AssociableTypes: []string{"VirtualMachine"}})
	if err != nil {
		log.Fatal(err)
	}
	gold, err := m.CreateTag(ctx, &tags.Tag{Name: "gold", CategoryID: cat})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := m.CreateTag(ctx, &tags.Tag{Name: "silver", CategoryID: cat}); err != nil {
		log.Fatal(err)
	}
	var vms []string
	for _, o := range simulator.Map.All("VirtualMachine") {
		vms = append(vms, o.Reference().Value)
	}
	if err := m.AttachTag(ctx, gold, types.ManagedObjectReference{Type: "VirtualMachine", Value: vms[0]}); err != nil {
		log.Fatal(err)
	}
	_ = rc.Logout(ctx)
	_ = c.Logout(ctx)

	out, _ := json.Marshal(map[string]interface{}{"url": "http://" + srv.URL.Host, "vms": vms, "gold_vm": vms[0]})
	fmt.Println(string(out))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
"""


@pytest.fixture(scope="session")
def scratch_launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the scratch launcher once per session (Go's build cache makes rebuilds ~1 s)."""
    go = shutil.which("go")
    if go is None or not (Path(GOPATH) / "src/github.com/vmware/govmomi").is_dir():
        pytest.skip("needs Debian's golang-go and golang-github-vmware-govmomi-dev (see testbed/setup.sh)")
    src = tmp_path_factory.mktemp("vcsim-scratch")
    (src / "main.go").write_text(LAUNCHER_GO)
    shutil.copy(FACADE, src / "api_facade.go")
    binary = src / "vcsim-scratch"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH}
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=src, env=env, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture(scope="session")
def vcsim(scratch_launcher: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the launcher; yields {"url", "vms", "gold_vm"}; stopped with SIGTERM by PID."""
    log = tmp_path_factory.mktemp("vcsim-log") / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([scratch_launcher, USER, PASSWORD], stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
        line = proc.stdout.readline() if ready else b""
        assert line, f"launcher printed nothing; stderr:\n{log.read_text()[-2000:]}"
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sdk_config(url: str) -> StubConfiguration:
    """A raw SDK stub configuration with a session, built like adapters.tags does (to write tags)."""

    def config(ctx: Any) -> StubConfiguration:
        connector = get_requests_connector(
            session=requests.Session(),
            url=url + "/api",
            provider_filter_chain=[LegacySecurityContextFilter(security_context=ctx)],
        )
        return StubConfigurationFactory.new_std_configuration(connector)

    token = Session(config(create_user_password_security_context(USER, PASSWORD))).create()
    return config(create_session_security_context(token))


def test_reads_tags_seeded_through_rest(vcsim: dict[str, Any]) -> None:
    with TagClient(vcsim["url"], USER, PASSWORD, verify=False) as client:
        assert "backup" in client.categories()
        assert {("backup", "gold"), ("backup", "silver")} <= set(client.tags())
        assert client.vms_with_tag("backup", "gold") == [vcsim["gold_vm"]]
        assert client.vms_with_tag("backup", "silver") == []
        tags = client.vm_tags([*vcsim["vms"], "vm-unknown"])
        assert tags[vcsim["gold_vm"]] == [("backup", "gold")]
        assert all(tags[vm] == [] for vm in [*vcsim["vms"][1:], "vm-unknown"])
        assert client.vm_tags([]) == {}
        with pytest.raises(VSphereError, match="bronze"):
            client.vms_with_tag("backup", "bronze")


def test_attach_detach_through_sdk(vcsim: dict[str, Any]) -> None:
    cfg = sdk_config(vcsim["url"])
    categories, tags, assoc = Category(cfg), Tag(cfg), TagAssociation(cfg)
    cat = categories.create(
        Category.CreateSpec(
            name="attach-test",
            description="",
            cardinality=CategoryModel.Cardinality.SINGLE,
            associable_types={"VirtualMachine"},
        )
    )
    tag = tags.create(Tag.CreateSpec(name="t1", description="d", category_id=cat))
    assert tags.list_tags_for_category(cat) == [tag]
    assert categories.get(cat).cardinality == CategoryModel.Cardinality.SINGLE
    vm_a, vm_b = vcsim["vms"][1], vcsim["vms"][2]
    try:
        for vm in (vm_a, vm_b):
            assoc.attach(tag, DynamicID(type="VirtualMachine", id=vm))
        assert tag in assoc.list_attached_tags(DynamicID(type="VirtualMachine", id=vm_a))
        [on_tag] = assoc.list_attached_objects_on_tags([tag])
        assert sorted(o.id for o in on_tag.object_ids) == sorted([vm_a, vm_b])
        with TagClient(vcsim["url"], USER, PASSWORD, verify=False) as client:
            assert client.vms_with_tag("attach-test", "t1") == sorted([vm_a, vm_b])
            assert client.vm_tags([vm_a])[vm_a] == [("attach-test", "t1")]
            assoc.detach(tag, DynamicID(type="VirtualMachine", id=vm_a))
            assert client.vms_with_tag("attach-test", "t1") == [vm_b]
            assert client.vm_tags([vm_a, vm_b]) == {vm_a: [], vm_b: [("attach-test", "t1")]}
        with pytest.raises(NotFound):
            tags.get("urn:vmomi:InventoryServiceTag:nope:GLOBAL")
    finally:
        tags.delete(tag)
        categories.delete(cat)
    assert cat not in categories.list()


def test_wrong_password_raises_auth_error(vcsim: dict[str, Any]) -> None:
    with pytest.raises(AuthError) as info:
        TagClient(vcsim["url"], USER, "wrong-password", verify=False)
    assert "wrong-password" not in str(info.value)


def test_closed_session_raises_auth_error(vcsim: dict[str, Any]) -> None:
    client = TagClient(vcsim["url"], USER, PASSWORD, verify=False)
    assert client._session is not None
    client._session.delete()  # the server forgets the session; later calls must say so
    with pytest.raises(AuthError):
        client.categories()
    client.close()


def test_unreachable_raises_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(ConnectError):
        TagClient(f"http://127.0.0.1:{port}", USER, PASSWORD, verify=False, timeout=5)


def test_rest_api_shape(vcsim: dict[str, Any]) -> None:
    """The /api/... REST front end answers like vCenter 7.0U2+ (unwrapped values, 201/204/401/404)."""
    api, http = vcsim["url"] + "/api", requests.Session()
    http.trust_env = False
    assert http.post(api + "/session", auth=(USER, "nope")).status_code == 401
    r = http.post(api + "/session", auth=(USER, PASSWORD))
    assert r.status_code == 201
    http.headers["vmware-api-session-id"] = r.json()
    r = http.post(
        api + "/cis/tagging/category",
        json={"name": "rest", "description": "", "cardinality": "SINGLE", "associable_types": []},
    )
    assert r.status_code == 201
    cat = r.json()
    assert http.get(api + f"/cis/tagging/category/{cat}").json()["name"] == "rest"
    assert http.get(api + "/cis/tagging/category/nope").json()["error_type"] == "NOT_FOUND"
    r = http.post(api + "/cis/tagging/tag", json={"name": "x", "description": "", "category_id": cat})
    assert r.status_code == 201
    tag = r.json()
    vm = {"type": "VirtualMachine", "id": vcsim["vms"][3]}
    r = http.post(api + f"/cis/tagging/tag-association/{tag}?action=attach", json={"object_id": vm})
    assert r.status_code == 204
    r = http.post(api + "/cis/tagging/tag-association?action=list-attached-tags-on-objects", json={"object_ids": [vm]})
    assert r.json() == [{"object_id": vm, "tag_ids": [tag]}]
    assert http.delete(api + f"/cis/tagging/category/{cat}").status_code == 204
    assert http.get(api + "/cis/tagging/tag").json().count(tag) == 0
    assert http.delete(api + "/session").status_code == 204
    assert http.get(api + "/cis/tagging/category").status_code == 401
    assert http.get(vcsim["url"] + "/about").status_code == 200  # other paths reach vcsim untouched
