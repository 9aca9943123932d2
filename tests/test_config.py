"""The configuration file: valid input loads, bad input is one line naming the field and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vsphere_proxy.config import ConfigError, Credentials, load_config, parse_config, read_yaml_mapping

LUN = "naa.600a098038303053453f463045727a02"


def valid() -> dict[str, Any]:
    return {
        "vcenter": {"url": "https://vc.lab/sdk"},
        "proxies": [
            {"name": "proxy-prod", "kind": "vm"},
            {"name": "phys-01", "kind": "physical", "cpus": 8, "ram_mb": 16384, "luns": [LUN],
             "nfs_exports": ["nas-01.lab:/export/vms1"]},
        ],
        "job": {"name": "nightly", "select": {"tags": ["BackupPolicy:gold"], "folders": ["Production"]}},
    }


def test_a_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(valid()))
    config = load_config(path)
    assert config.vcenter.insecure is False  # TLS verification is on unless written
    assert config.vcenter.credentials.password_env == "VSPHERE_PASSWORD"
    assert [p.name for p in config.job_proxies()] == ["proxy-prod", "phys-01"]


def test_a_url_without_path_gets_sdk() -> None:
    data = valid()
    data["vcenter"]["url"] = "https://vc.lab"
    assert parse_config(data).vcenter.url == "https://vc.lab/sdk"


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d["proxies"][1].update(kind="vmm"), "proxies[1].kind: Input should be 'vm' or 'physical' (got 'vmm')"),
    (lambda d: d["proxies"][1].update(luns=["sda"]),
     "proxies[1].luns[0]: must be a LUN canonical name (naa.*, eui.* or t10.*) (got 'sda')"),
    (lambda d: d["proxies"][1].pop("cpus"), "proxies[1]: a physical proxy needs cpus and ram_mb"),
    (lambda d: d["proxies"][1].update(cpus=0), "proxies[1].cpus: Input should be greater than or equal to 1 (got 0)"),
    (lambda d: d["proxies"][0].update(luns=[LUN]), "proxies[0]: luns: a VM proxy's LUNs come from vCenter"),
    (lambda d: d["proxies"].append({"name": "phys-01", "kind": "vm"}), "proxies: name 'phys-01' is used twice"),
    (lambda d: d["vcenter"].update(url="ftp://vc"), "vcenter.url: must be an https://"),
    (lambda d: d["vcenter"].update(url="http://vc/sdk"), "plain http carries no TLS; write `insecure: true`"),
    (lambda d: d["vcenter"].update(url="https://root:pw@vc/sdk"), "vcenter.url: must not contain credentials"),
    (lambda d: d["vcenter"].update(pasword="x"), "vcenter.pasword: Extra inputs are not permitted (got 'x')"),
    (lambda d: d["job"]["select"].update(tags=["gold"]), "job.select.tags: tag 'gold' is not of the form"),
    (lambda d: d["job"].update(select={}), "job.select: select at least one of"),
    (lambda d: d["job"].update(name="night ly"), "job.name: must be 1-80 letters, digits, '.', '_' or '-' (got"),
    (lambda d: d["job"].update(proxies=["nope"]), "job.proxies: 'nope' is not one of the configured proxies"),
    (lambda d: d["proxies"][1].update(nfs_exports=["nas"]),
     "proxies[1].nfs_exports[0]: must be an NFS export of the form host:/path (got 'nas')"),
])
def test_bad_values_name_the_field_and_value(edit: Any, expected: str) -> None:
    data = valid()
    edit(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "c.yaml")
    message = str(err.value)
    assert expected in message, message
    assert message.startswith("c.yaml: ") and "\n" not in message


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("vcenter: {url: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_credentials_from_env_never_echo_the_password() -> None:
    creds = Credentials()
    user, password = creds.resolve({"VSPHERE_USERNAME": "admin", "VSPHERE_PASSWORD": "s3cr3t"})
    assert user == "admin" and password.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(password)
    with pytest.raises(ConfigError, match="VSPHERE_PASSWORD is not set"):
        creds.resolve({"VSPHERE_USERNAME": "admin"})


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "creds.yaml"
    f.write_text("username: admin\npassword: s3cr3t\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others") as err:
        Credentials(file=f).resolve({})
    assert "s3cr3t" not in str(err.value)
    f.chmod(0o600)
    assert Credentials(file=f).resolve({})[0] == "admin"
    f.write_text("username: admin\n")
    with pytest.raises(ConfigError, match="needs non-empty 'username' and 'password'"):
        Credentials(file=f).resolve({})


def test_the_job_policy_has_defaults_and_becomes_the_schedulers_policy() -> None:
    from vsphere_proxy.coordinator import DiskStreams
    from vsphere_proxy.model import Proxy, ProxyKind

    default = parse_config(valid()).job.policy.to_policy()
    assert (default.max_streams, default.threshold, default.datastore_cap, default.disk_streams, default.rounds) == (
        None, 1, 4, DiskStreams.AUTO, 3)
    data = valid()
    data["job"]["policy"] = {"max_streams": 6, "threshold": 2, "datastore_cap": 3, "disk_streams": "off",
                             "streams_per_cpu": 2, "mb_per_stream": 1024}
    policy = parse_config(data).job.policy.to_policy()
    assert (policy.max_streams, policy.disk_streams) == (6, DiskStreams.OFF)
    assert policy.formula(Proxy("p", ProxyKind.PHYSICAL, 4, 8192)) == 8  # min(2 x 4, 8192 // 1024)


@pytest.mark.parametrize(("policy", "message"), [
    ({"max_streams": 0}, "job.policy.max_streams: Input should be greater than or equal to 1 (got 0)"),
    ({"disk_streams": "sometimes"}, "job.policy.disk_streams: Input should be 'auto' or 'off' (got 'sometimes')"),
    ({"threshold": 3, "datastore_cap": 2}, "job.policy: datastore_cap: must be >= threshold 3 (got 2)"),
    ({"rounds": 11}, "job.policy.rounds: Input should be less than or equal to 10 (got 11)"),
])
def test_a_bad_policy_names_the_field(policy: dict[str, Any], message: str) -> None:
    data = valid()
    data["job"]["policy"] = policy
    with pytest.raises(ConfigError) as e:
        parse_config(data, "c.yaml")
    assert str(e.value) == f"c.yaml: {message}"


def test_a_key_written_twice_is_an_error_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vcenter: {url: https://vc.lab/sdk}\n"
                    "proxies:\n"
                    "  - name: proxy-prod\n"
                    "    kind: vm\n"
                    "    name: proxy-dev\n"
                    "job: {name: nightly, select: {folders: [/]}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: not valid YAML at line 5, column 5: duplicate key 'name' (first at line 3)"
    path.write_text(yaml.safe_dump(valid(), sort_keys=False) + "vcenter: {url: https://other.lab/sdk}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'vcenter' \(first at line 1\)"):
        load_config(path)


def test_merge_keys_and_keys_that_only_look_alike_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("vcenter: {url: https://vc.lab/sdk}\n"
                    "proxies:\n"
                    "  - &p {kind: vm, name: proxy-prod}\n"
                    "  - {<<: *p, name: proxy-dev}\n"
                    "job: {name: nightly, select: {folders: [/]}}\n")
    assert [p.name for p in load_config(path).proxies] == ["proxy-prod", "proxy-dev"]  # merged keys may be overridden
    path.write_text("{1: int, '1': str, 1.5: float}\n")
    assert read_yaml_mapping(path, "anything") == {1: "int", "1": "str", 1.5: "float"}


def test_a_credentials_file_with_a_key_written_twice_names_the_key_not_the_values(tmp_path: Path) -> None:
    secret = tmp_path / "credentials.yaml"
    secret.write_text("username: admin\npassword: first-secret\npassword: second-secret\n")
    secret.chmod(0o600)
    with pytest.raises(ConfigError) as e:
        Credentials(file=secret).resolve({})
    assert str(e.value) == (f"vcenter.credentials.file: {secret}: not valid YAML: duplicate key 'password' "
                            "(first at line 2)")
