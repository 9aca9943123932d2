"""The core stays free of vSphere I/O (DESIGN §2): only the CLI, the composition root, reaches adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "vsphere_proxy"
FORBIDDEN = ("adapters", "pyVmomi", "pyVim", "com.vmware", "vmware", "requests", "socket")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(p for p in CORE.rglob("*.py") if "cli" not in p.parts),
                         ids=lambda p: str(p.relative_to(CORE)))
def test_core_modules_do_not_import_vsphere_io(path: Path) -> None:
    bad = sorted(n for n in imports(path) if n.split(".")[0] in {f.split(".")[0] for f in FORBIDDEN})
    assert bad == [], f"{path.name} imports {bad}"


def test_adapters_import_the_model_never_the_reverse() -> None:
    adapters = CORE.parent / "adapters"
    used = set().union(*(imports(p) for p in adapters.glob("*.py")))
    assert "vsphere_proxy.model" in used
    assert not {n for n in used if n.startswith("vsphere_proxy.cli")}


def test_the_job_runner_is_core_code_and_commands_do_not_import_each_other() -> None:
    jobs = sorted(p.name for p in (CORE / "jobs").glob("*.py"))
    assert {"backup.py", "backend.py", "recorder.py", "resume.py", "setup.py"} <= set(jobs)
    cli = CORE / "cli"
    helpers = {"common", "signals", "__init__"}  # shared by every command, commands themselves are not
    commands = {p.stem for p in cli.glob("*.py")} - helpers
    for path in cli.glob("*.py"):
        if path.stem == "__init__":
            continue
        used = {n.rsplit(".", 1)[-1] for n in imports(path) if n.startswith("vsphere_proxy.cli.")}
        assert not used & commands, f"{path.name} imports the commands {sorted(used & commands)}"
    assert "adapters" not in {n.split(".")[0] for p in (CORE / "jobs").glob("*.py") for n in imports(p)}
