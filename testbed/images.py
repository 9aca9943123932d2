"""Deterministic flat disk images for the simulator's 0-byte disk files.

Each image is a sequence of regions whose kinds and boundaries come from a PRNG seeded by (seed, vm, index):
  - random: PRNG bytes (incompressible, unique);
  - pattern: one of a few patterns shared by every image of the same seed, tiled on absolute disk offsets,
    so a 4 MiB-aligned pattern block is byte-identical wherever it occurs (dedup across disks and VMs);
  - zero: a hole (the file is sparse there).
Region boundaries fall on 4 MiB block boundaries and in the middle of blocks. Same inputs, same bytes.

`nvram_bytes` is the NVRAM file the launcher writes beside each VM's .vmx (testbed/vcsim/vmconfig.go).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Literal

from testbed.topology import DiskImage

BLOCK = 4 << 20
_ZEROS = memoryview(bytes(BLOCK))
_PATTERN_UNITS = (1, 512, 4096, 65536)  # all divide BLOCK, so aligned pattern blocks repeat exactly

NVRAM_SIZE = {"bios": 8 << 10, "efi": 128 << 10}  # bytes of the NVRAM file the launcher writes, per firmware

Kind = Literal["random", "pattern", "zero"]
_KINDS: tuple[Kind, ...] = ("random", "pattern", "zero")


def _rng(*parts: object) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed (version 2): stable across runs and PYTHONHASHSEED.
    return random.Random("/".join(map(str, parts)))


@cache
def _pattern_tile(seed: str, k: int) -> bytes:
    """Pattern k of `seed`, repeated to BLOCK + one unit so any phase can be sliced out of it."""
    unit_len = _PATTERN_UNITS[k]
    unit = bytes([0xA5]) if unit_len == 1 else _rng("pattern", seed, k).randbytes(unit_len)
    return unit * (BLOCK // unit_len + 1)


def layout(capacity: int, rng: random.Random) -> Iterator[tuple[int, int, Kind]]:
    """(offset, length, kind) regions covering [0, capacity). The first three use each kind once."""
    first: list[Kind] = list(_KINDS)
    rng.shuffle(first)
    offset = 0
    while offset < capacity:
        r = rng.random()
        if offset % BLOCK == 0 and r < 0.6:
            length = BLOCK * rng.choice((1, 1, 1, 2))  # whole aligned blocks
        elif offset % BLOCK and r < 0.5:
            length = BLOCK - offset % BLOCK  # up to the next boundary
        else:
            length = rng.randrange(1, BLOCK + BLOCK // 2)  # unaligned, may straddle a boundary
        length = min(length, capacity - offset)
        kind = first.pop() if first else rng.choices(_KINDS, weights=(4, 3, 3))[0]
        yield offset, length, kind
        offset += length


def image_layout(disk: DiskImage, seed: str | int) -> list[tuple[int, int, Kind]]:
    """The regions `write_image(disk, seed)` writes."""
    return list(layout(disk.capacity, _rng("layout", seed, disk.vm, disk.index)))


def write_image(disk: DiskImage, seed: str | int) -> str:
    """Write `disk.path` as a deterministic image of exactly `disk.capacity` bytes; return its SHA-256 hex."""
    seed = str(seed)
    pattern_rng = _rng("pattern-choice", seed, disk.vm, disk.index)
    data_rng = _rng("data", seed, disk.vm, disk.index)
    digest = hashlib.sha256()
    disk.path.parent.mkdir(parents=True, exist_ok=True)
    with open(disk.path, "wb") as f:
        for offset, length, kind in image_layout(disk, seed):
            if kind == "zero":
                for chunk in _chunks(length):
                    digest.update(_ZEROS[:chunk])
                f.seek(offset + length)
                continue
            if kind == "random":
                parts: Iterable[bytes | memoryview] = (data_rng.randbytes(n) for n in _chunks(length))
            else:
                k = pattern_rng.randrange(len(_PATTERN_UNITS))
                parts = _pattern(_pattern_tile(seed, k), _PATTERN_UNITS[k], offset, length)
            for part in parts:
                digest.update(part)
                f.write(part)
        f.truncate(disk.capacity)
    return digest.hexdigest()


def write_images(disks: Iterable[DiskImage], seed: str | int = "vsphere-proxy") -> dict[tuple[str, int], str]:
    """Write every disk's image; return {(vm, index): sha256 hex}."""
    return {(d.vm, d.index): write_image(d, seed) for d in disks}


def nvram_bytes(vm: str, firmware: str = "bios") -> bytes:
    """The launcher's `<vm dir>/<vm>.nvram` of VM `vm` (nvramBytes in testbed/vcsim/vmconfig.go): NVRAM_SIZE[firmware]
    bytes of SHA-256 in counter mode, block i being SHA-256 of "vsphere-proxy/nvram/<firmware>/<vm>/<i>"."""
    size = NVRAM_SIZE[firmware]
    blocks = (hashlib.sha256(f"vsphere-proxy/nvram/{firmware}/{vm}/{i}".encode()).digest()
              for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(length: int) -> Iterator[int]:
    while length > 0:
        n = min(length, BLOCK)
        yield n
        length -= n


def _pattern(tile: bytes, unit: int, offset: int, length: int) -> Iterator[memoryview]:
    view = memoryview(tile)
    pos = offset
    for n in _chunks(length):
        phase = pos % unit
        yield view[phase : phase + n]
        pos += n
