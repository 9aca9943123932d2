"""The `vsphere-proxy` command end to end against the live launcher: output, exit codes, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True,
                          env=base | (env or {}), timeout=120, check=False)


def env_config(tmp_path: Path, vcsim: Any, **vcenter: Any) -> Path:
    """The testbed config, with credentials from the environment instead of the file."""
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["vcenter"].pop("credentials")
    data["vcenter"].update(vcenter)
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_discover_json_summary(vcsim: Any) -> None:
    r = run("discover", "--json", "--config", str(vcsim.config_path))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["hosts"] == len(vcsim.topology["Host"]) and s["vms"] == len(vcsim.topology["Machine"])
    assert s["hbas"] == {"Block": 6, "FibreChannel": 6, "iSCSI": 3}
    assert s["datastores"] == {"local": 2, "nfs": 2, "vmfs": 5}
    assert s["luns"] == len(vcsim.topology["Lun"])
    assert s["round_trips"] <= 5


def test_discover_table_on_a_terminal_less_run(vcsim: Any) -> None:
    r = run("discover", "--config", str(vcsim.config_path))
    assert r.returncode == 0, r.stderr
    assert "2 clusters, 6 hosts, 9 datastores" in r.stdout and "vmfs-fc-01" in r.stdout


def test_plan_json_lists_tiers_reasons_and_round_one(vcsim: Any) -> None:
    r = run("plan", "--json", "--config", str(vcsim.config_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    vms = {v["vm"]: v for v in plan["vms"]}
    assert vms["db-01"]["best_tier"] == "san" and vms["db-01"]["eligible"] == ["proxy-prod"]
    assert vms["db-01"]["proxies"]["proxy-prod"]["mode"] == "san"
    assert vms["dev-05"]["proxies"]["phys-01"]["mode"] == "nbd"
    assert "no active path" in vms["dev-05"]["proxies"]["phys-01"]["reason"]
    assert vms["proxy-prod"]["skipped"] == "a proxy of this job"
    assert plan["unprotected"] == []
    r3 = run("plan", "--json", "--round", "3", "--config", str(vcsim.config_path))
    # app-01 in round 3: its hot-add proxy first (tier 2), then the NBD ones (tier 3) by name
    assert json.loads(r3.stdout)["vms"][0]["eligible"] == ["proxy-dev", "phys-01", "proxy-prod"]
    assert vcsim.password not in r.stdout + r.stderr + r3.stdout


def test_plan_table(vcsim: Any) -> None:
    r = run("plan", "--config", str(vcsim.config_path))
    assert r.returncode == 0, r.stderr
    assert "Access tiers" in r.stdout and "pairs by mode:" in r.stdout
    assert "Priority list" in r.stdout and "First assignments" in r.stdout and "Decisions" not in r.stdout


def test_plan_predicts_the_first_wave_with_reasons(vcsim: Any) -> None:
    r = run("plan", "--json", "--config", str(vcsim.config_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    vms = {v["vm"]: v for v in plan["vms"] if "skipped" not in v}
    counts = [e["eligible"] for e in plan["priority_list"]]
    assert counts == sorted(counts) and counts[0] == 1  # fewest eligible proxies first
    assert plan["job_limit"] == 2 * len({ds for v in vms.values() for ds in v["datastores"]})
    wave = plan["first_assignments"]
    assert 0 < len(wave) <= plan["job_limit"]
    for a in wave:
        assert a["proxy"] in vms[a["vm"]]["eligible"], a
        assert "next available" in a["reason"] or "spare job streams" in a["reason"]
    verdicts = {d["verdict"] for d in plan["decisions"]}
    assert {"round", "assign"} <= verdicts
    explained = run("plan", "--explain", "--config", str(vcsim.config_path))
    assert "Decisions" in explained.stdout and "round 1: " in explained.stdout
    assert "datastore score 0 < threshold 1" in explained.stdout


def test_credentials_from_the_environment(vcsim: Any, tmp_path: Path) -> None:
    path = env_config(tmp_path, vcsim)
    ok = run("discover", "--json", "--config", str(path),
             env={"VSPHERE_USERNAME": vcsim.username, "VSPHERE_PASSWORD": vcsim.password})
    assert ok.returncode == 0, ok.stderr
    missing = run("discover", "--config", str(path), env={"VSPHERE_USERNAME": vcsim.username})
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("vsphere-proxy: error: vcenter.credentials.password_env: "
                                      "environment variable VSPHERE_PASSWORD is not set")


def test_wrong_password_is_exit_2_with_one_clear_line(vcsim: Any, tmp_path: Path) -> None:
    path = env_config(tmp_path, vcsim)
    wrong = "not-" + vcsim.password
    r = run("plan", "--config", str(path), env={"VSPHERE_USERNAME": vcsim.username, "VSPHERE_PASSWORD": wrong})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "login refused for user 'administrator@vsphere.local'" in r.stderr
    assert wrong not in r.stderr + r.stdout


def test_unreachable_vcenter_is_exit_4(vcsim: Any, tmp_path: Path) -> None:
    path = env_config(tmp_path, vcsim, url="http://127.0.0.1:9/sdk", connect_retries=2)
    r = run("discover", "--config", str(path), env={"VSPHERE_USERNAME": "u", "VSPHERE_PASSWORD": "p"})
    assert r.returncode == 4
    assert r.stderr.startswith("vsphere-proxy: error: vCenter http://127.0.0.1:9: unreachable after 2 attempts")
    assert r.stderr.count("\n") == 1


def test_malformed_config_is_exit_2_naming_field_and_value(vcsim: Any, tmp_path: Path) -> None:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["proxies"][2]["ram_mb"] = "lots"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = run("plan", "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr == (f"vsphere-proxy: error: {bad}: proxies[2].ram_mb: Input should be a valid integer, "
                        "unable to parse string as an integer (got 'lots')\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("vcenter: [unclosed\n")
    r = run("discover", "--config", str(broken))
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr
    r = run("discover", "--config", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_unknown_vm_proxy_and_bad_arguments(vcsim: Any, tmp_path: Path) -> None:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["proxies"].append({"name": "proxy-gone", "kind": "vm"})
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(data))
    r = run("plan", "--config", str(path))
    assert r.returncode == 2 and "proxies[4].name: no VM named 'proxy-gone' in vCenter" in r.stderr
    r = run("plan", "--round", "0", "--config", str(vcsim.config_path))
    assert r.returncode == 2 and "--round: must be 1 or more (got 0)" in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2 and r.stderr.startswith("vsphere-proxy: error: argument command")


def test_a_config_with_a_key_written_twice_is_exit_2_naming_it(vcsim: Any, tmp_path: Path) -> None:
    text = vcsim.config_path.read_text()
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(text + "job: {name: other, select: {names: ['*']}}\n")
    first = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("job:"))
    last = len(text.splitlines()) + 1
    r = run("plan", "--config", str(doubled))
    assert r.returncode == 2
    assert r.stderr == (f"vsphere-proxy: error: {doubled}: not valid YAML at line {last}, column 1: duplicate key "
                        f"'job' (first at line {first})\n")


def _closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command with its stdout a pipe whose reader has gone away, as `... | head -1` leaves it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")}
    p = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=base)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read()
    code = p.wait(timeout=120)
    return subprocess.CompletedProcess(p.args, code, "", err)


@pytest.mark.parametrize("fmt", ["--json", "text"])
def test_output_into_a_closed_pipe_ends_quietly(vcsim: Any, fmt: str) -> None:
    scenario = Path(__file__).resolve().parents[1] / "testbed" / "scenarios" / "skewed.yaml"
    for args in (("simulate", "--scenario", str(scenario)), ("discover", "--config", str(vcsim.config_path))):
        r = _closed_stdout(*args, *([fmt] if fmt == "--json" else []))
        assert (r.returncode, r.stderr) == (141, ""), args


def test_json_piped_into_head_ends_quietly(vcsim: Any) -> None:
    shell = (f"{sys.executable} -m vsphere_proxy discover --json --config {vcsim.config_path} | head -1; "
             "echo \"exit ${PIPESTATUS[0]}\" >&2")
    base = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")}
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=base, timeout=120, check=False)
    assert r.stdout == "{\n"
    assert r.stderr in ("exit 0\n", "exit 141\n"), r.stderr  # 0 if it all fitted in the pipe before head left


def test_sigint_is_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from vsphere_proxy.cli import main, simulate

    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "compare", interrupted)
    scenario = Path(__file__).resolve().parents[1] / "testbed" / "scenarios" / "skewed.yaml"
    assert main(["simulate", "--scenario", str(scenario)]) == 130
    assert capsys.readouterr().err == "vsphere-proxy: interrupted\n"
