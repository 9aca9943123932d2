"""Transports: how a proxy reads a disk, one per access mode (DESIGN §3, §5).

Every transport implements `Transport`: `open(disk)`, `read_block(offset, length)`, an idempotent `close()`,
and the context-manager protocol. The engine picks one from the (VM, proxy) tier the scheduler assigned.
`file` (san, direct-nfs) is here; `nbd` and `hotadd` talk to vCenter and live in `adapters/`.
"""

from vsphere_proxy.transports.base import BLOCK, DiskSource, Transport, TransportError, flat_path, read_blocks

__all__ = ["BLOCK", "DiskSource", "Transport", "TransportError", "flat_path", "read_blocks"]
