"""Injected transport faults for tests: every VM's first attempt fails at its disk's second block, on the real
transport (hot-add really attaches, NBD really reads), so that each VM is stranded once and recovered in round 2."""

from __future__ import annotations

from typing import Any

import pytest

from vsphere_proxy.engine import attempt as attempt_module
from vsphere_proxy.transports import BLOCK, TransportError


class FailingOnce:
    """Delegates to the real transport; fails once per VM at the second block."""

    def __init__(self, inner: Any, vm: str, failed: dict[str, str]) -> None:
        self.inner, self.vm, self.mode, self.failed = inner, vm, inner.mode, failed

    def open(self, disk: Any) -> None:
        self.inner.open(disk)

    def read_block(self, offset: int, length: int) -> bytes:
        if offset == BLOCK and self.vm not in self.failed:
            self.failed[self.vm] = self.mode
            raise TransportError(f"{self.mode}: injected failure at offset {offset}")
        return bytes(self.inner.read_block(offset, length))

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FailingOnce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fail_each_vm_once(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Patch the attempt's transport; returns vm -> access mode of the read that failed (filled as it happens)."""
    failed: dict[str, str] = {}
    real = attempt_module.RepositorySession.transport

    def transport(self: Any) -> Any:
        return FailingOnce(real(self), self.assignment.vm, failed)

    monkeypatch.setattr(attempt_module.RepositorySession, "transport", transport)
    return failed
