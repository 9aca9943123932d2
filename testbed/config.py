"""The vsphere-proxy YAML config (and its credentials file) for a running testbed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# topology Proxy key -> config key (physical proxies; VM proxies are described by vCenter itself)
_PROXY_KEYS = {
    "Cpu": "cpus",
    "MemoryMB": "ram_mb",
    "Lun": "luns",
    "NfsExport": "nfs_exports",
    "VsdaActive": "vsda_active",
}


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (an existing file is re-moded first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def write_credentials(username: str, password: str, out: Path) -> Path:
    """Write `username:`/`password:` YAML to `out`, mode 0600."""
    out = Path(out)
    _write_private(out, yaml.safe_dump({"username": username, "password": password}, sort_keys=False))
    return out


def proxy_entry(proxy: dict[str, Any]) -> dict[str, Any]:
    """A topology Proxy item as a config `proxies:` entry."""
    unknown = set(proxy) - {"Name", "Kind", *_PROXY_KEYS}
    if unknown:
        raise ValueError(f"proxy {proxy.get('Name')!r}: unknown keys {sorted(unknown)}")
    kind = proxy.get("Kind")
    if kind not in ("vm", "physical"):
        raise ValueError(f"proxy {proxy.get('Name')!r}: Kind must be 'vm' or 'physical', not {kind!r}")
    entry: dict[str, Any] = {"name": proxy["Name"], "kind": kind}
    if kind == "physical":
        entry |= {
            "cpus": proxy.get("Cpu", 1),
            "ram_mb": proxy.get("MemoryMB", 1024),
            "luns": list(proxy.get("Lun") or []),
            "nfs_exports": list(proxy.get("NfsExport") or []),
            "vsda_active": bool(proxy.get("VsdaActive", True)),
        }
    else:
        entry |= {cfg: proxy[key] for key, cfg in _PROXY_KEYS.items() if key in proxy}
    return entry


def config_dict(topology: dict[str, Any], url: str, credentials_file: Path,
                datastores: Mapping[str, Path] | None = None, repository: Path | None = None) -> dict[str, Any]:
    """The config for a testbed. With `datastores` (name -> the simulator's directory) every proxy mounts
    them all (the tiers still decide who reads what, and how) and VM proxies resolve hot-added disks to those
    files, as the simulator has no guest; with `repository`, backups go there."""
    proxies = [proxy_entry(p) for p in topology.get("Proxy") or []]
    if datastores:
        paths = {name: str(Path(d).resolve()) for name, d in sorted(datastores.items())}
        for p in proxies:
            p["paths"] = paths
            if p["kind"] == "vm":
                p["hotadd_devices"] = "simulated"
    config: dict[str, Any] = {
        "vcenter": {
            "url": url,
            "insecure": True,
            "credentials": {"file": str(Path(credentials_file).resolve())},
        },
        "proxies": proxies,
        "job": {"name": "testbed", "select": {"folders": ["/"]}},
    }
    if repository is not None:
        config["repository"] = {"path": str(Path(repository).resolve())}
    return config


def write_config(topology: dict[str, Any], url: str, credentials_file: Path, out: Path,
                 datastores: Mapping[str, Path] | None = None, repository: Path | None = None) -> Path:
    """Write the config for a testbed serving `topology` at `url`; the password stays in `credentials_file`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "# vsphere-proxy config for the vcsim testbed (python -m testbed serve)\n"
    text += yaml.safe_dump(config_dict(topology, url, credentials_file, datastores, repository), sort_keys=False)
    out.write_text(text, encoding="utf-8")
    return out


def credentials_path_for(config: Path) -> Path:
    """`x.yaml` -> `x.credentials.yaml`, beside it."""
    config = Path(config)
    return config.with_name(f"{config.stem}.credentials{config.suffix or '.yaml'}")
