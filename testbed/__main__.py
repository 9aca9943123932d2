"""`python -m testbed serve`: run a vcsim testbed with seeded disk images and a vsphere-proxy config.

`python -m testbed demo`: start the testbed, back up every VM, restore a disk and verify it, stop.

`python -m testbed generate N OUT`: write a generated topology with N VMs (for benchmarks).
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from testbed import topology as topo
from testbed.config import credentials_path_for, write_config, write_credentials
from testbed.images import sha256_file, write_images
from testbed.launcher import Vcsim, build_launcher

USERNAME = "administrator@vsphere.local"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _testbed(args: argparse.Namespace) -> Iterator[tuple[Vcsim, Path, str]]:
    """Start the launcher, seed the disk images, write config + credentials; stop on exit."""
    topology_path: Path = args.topology.resolve()
    topology = topo.load(topology_path)
    password = secrets.token_urlsafe(24)
    print("building the vcsim launcher ...", file=sys.stderr, flush=True)
    binary = build_launcher()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with Vcsim.start(
        topology_path, USERNAME, password, disk_scale=args.disk_scale, listen=args.listen, binary=binary
    ) as sim:
        images = write_images(topo.disks(topology, sim.datastores, args.disk_scale), seed=args.seed)
        config_out: Path = args.config_out.resolve()
        credentials = write_credentials(USERNAME, password, credentials_path_for(config_out))
        write_config(topology, sim.url, credentials, config_out, sim.datastores, config_out.parent / "repository")
        size = sum(d.capacity for d in topo.disks(topology, sim.datastores, args.disk_scale))
        print(
            f"vcsim {sim.url} (pid {sim.pid}): {len(topology.get('Machine') or [])} VMs, "
            f"{len(images)} disk images, {size / 2**20:.1f} MiB"
        )
        print(f"config: {config_out}\ncredentials: {credentials}", flush=True)
        yield sim, config_out, password


def demo(args: argparse.Namespace) -> int:
    """Run the product against the testbed: what vCenter holds, the plan, a backup of every VM, a restore of one
    disk checked against the image the testbed wrote, the same VM restored into vCenter as a new VM (its NICs moved
    to another network), a copy into an encrypted second repository (twice: the second writes nothing), what a
    retention policy would forget, a sampled and a full verify of the repository, the jobs in the catalog."""
    with _testbed(args) as (sim, config, _password):
        topology = topo.load(args.topology.resolve())
        disk = next(d for d in topo.disks(topology, sim.datastores, args.disk_scale) if d.vm == "db-01")
        expected = sha256_file(disk.path)
        restored = config.parent / f"{disk.vm}-disk{disk.index}.img"
        dr, dr_key = config.parent / "dr-repository", config.parent / "dr.key"  # an encrypted copy, its key file
        steps: list[tuple[list[str], set[int]]] = [
            (["discover"], {0}),
            (["plan"], {0}),
            (["backup"], {0, 3}),
            (["restore", "disk", "--vm", disk.vm, "--disk", str(disk.index), "--to", str(restored), "--force"], {0}),
            (["restore", "vm", "--vm", disk.vm, "--name", f"{disk.vm}-restored", "--network-map", "Prod-Net=DR-Net",
              "--dry-run"], {0}),
            (["restore", "vm", "--vm", disk.vm, "--name", f"{disk.vm}-restored", "--network-map", "Prod-Net=DR-Net",
              "--power-on"], {0}),
            (["copy", "--to-repository", str(dr), "--to-key-file", str(dr_key)], {0}),
            (["copy", "--to-repository", str(dr), "--to-key-file", str(dr_key)], {0}),
            (["forget", "--keep-last", "1", "--dry-run"], {0}),
            (["verify", "--sample", "10%"], {0}),
            (["verify"], {0}),
            (["jobs"], {0}),
        ]
        for command, good in steps:
            argv = [sys.executable, "-m", "vsphere_proxy", *command, "--config", str(config)]
            print(f"\n$ vsphere-proxy {' '.join(command)} --config {config.name}", flush=True)
            code = subprocess.run(argv, check=False).returncode
            if code not in good:
                print(f"vsphere-proxy {command[0]} exited with {code}", file=sys.stderr)
                return code
        got = sha256_file(restored)
        same = "equals" if got == expected else "DIFFERS FROM"
        print(f"\nrestored {disk.vm} disk {disk.index}: sha256 {got} {same} the source image's")
        new_vm = sim.datastores[disk.datastore] / f"{disk.vm}-restored" / f"{disk.vm}-restored-flat.vmdk"
        vm_same = new_vm.is_file() and sha256_file(new_vm) == expected
        print(f"restored VM {disk.vm}-restored: its disk {disk.index} in datastore {disk.datastore} "
              f"{'equals' if vm_same else 'DIFFERS FROM'} the source image")
        return 0 if got == expected and vm_same else 1


def serve(args: argparse.Namespace) -> int:
    with _testbed(args) as (sim, config, _password):
        # The password stays in the 0600 credentials file the config points to; it is never printed.
        print(f"try: vsphere-proxy plan --config {shlex.quote(str(config))}")
        print("serving; Ctrl-C to stop", flush=True)
        try:
            code = sim.process.wait()
        except KeyboardInterrupt:
            print("\nstopping", file=sys.stderr)
            return 0
        if code == 0:  # the launcher got the terminal's SIGINT first
            print("\nstopped", file=sys.stderr)
            return 0
        print(f"vcsim launcher exited unexpectedly with code {code}:\n{sim.stderr_tail()}", file=sys.stderr)
        return 1


def generate(args: argparse.Namespace) -> int:
    path = topo.write(topo.generate(args.vms, seed=args.seed), args.out)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("serve", serve, "start vcsim with seeded disk images and write a vsphere-proxy config"),
        ("demo", demo, "start the testbed; discover, plan, back up every VM, restore a disk, verify; stop"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--topology", type=Path, default=topo.DEFAULT_TOPOLOGY)
        p.add_argument("--disk-scale", type=float, default=1.0, help="multiply every disk capacity")
        p.add_argument("--config-out", type=Path, default=Path("vsphere-proxy.testbed.yaml"))
        p.add_argument("--listen", default="127.0.0.1:0", help="address to listen on (port 0: a free port)")
        p.add_argument("--seed", default="vsphere-proxy", help="disk image seed")
        p.set_defaults(func=func)
    g = sub.add_parser("generate", help="write a generated topology (reusing default.json's infrastructure)")
    g.add_argument("vms", type=int, help="number of generated VMs (proxy VMs come on top)")
    g.add_argument("out", type=Path)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=generate)
    args = parser.parse_args(argv)
    if getattr(args, "disk_scale", 1.0) <= 0:
        parser.error("--disk-scale must be > 0")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
