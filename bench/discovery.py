"""Discovery cost: the PropertyCollector read vs. the naive per-VM attribute walk, side by side.

Starts the vcsim launcher on a generated topology (default 1,000 VMs), then reads the same VM facts
twice: once with `adapters.discovery.discover` (one ContainerView, one paged RetrievePropertiesEx),
once the way pyvmomi's lazy attributes invite (iterate the view, read each property per VM). Prints
round trips and wall time for both, the ratios last. Nothing is hard-coded: every figure is measured.

    python3 bench/discovery.py [--vms 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyVmomi import vim

from adapters.discovery import discover
from adapters.session import Session, connect
from testbed import topology as topo
from testbed.launcher import Vcsim


def naive_walk(session: Session) -> int:
    """What a first script does: iterate the view and touch each VM's attributes (one call each)."""
    content = session.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        seen = 0
        for vm in view.view:
            _ = (vm.name, vm.parent, vm.config.uuid, vm.config.changeTrackingEnabled, vm.config.hardware.device,
                 vm.runtime.host, vm.runtime.powerState)
            seen += 1
        return seen
    finally:
        view.DestroyView()


def measure(session: Session, fn: Callable[[], Any], repeat: int) -> tuple[int, float]:
    calls, times = [], []
    for _ in range(repeat):
        before = session.counter.total
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        calls.append(session.counter.total - before)
    assert len(set(calls)) == 1, f"round trips varied between runs: {calls}"
    return calls[0], statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    password = secrets.token_urlsafe(18)
    with tempfile.TemporaryDirectory() as tmp:
        path = topo.write(topo.generate(args.vms), Path(tmp) / "bench.json")
        t0 = time.perf_counter()
        sim = Vcsim.start(path, "bench", password, timeout=600)
        print(f"launcher: {args.vms} VMs built in {time.perf_counter() - t0:.1f} s")
        try:
            with connect(sim.url, "bench", password, insecure=True) as session:
                inventory = discover(session)
                assert len([v for v in inventory.vms]) >= args.vms
                pc_calls, pc_time = measure(session, lambda: discover(session), args.repeat)
                naive_calls, naive_time = measure(session, lambda: naive_walk(session), args.repeat)
        finally:
            sim.stop()
    n = len(inventory.vms)
    print(f"vms discovered: {n}")
    print(f"property collector: {pc_calls} round trips, {pc_time * 1000:.0f} ms (median of {args.repeat})")
    print(f"naive attribute walk: {naive_calls} round trips, {naive_time * 1000:.0f} ms (median of {args.repeat})")
    print(f"round trips ratio naive/property collector: {naive_calls / pc_calls:.1f}x")
    print(f"wall time ratio naive/property collector: {naive_time / pc_time:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
