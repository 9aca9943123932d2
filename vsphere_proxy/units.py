"""Sizes for people: bytes in binary units."""

from __future__ import annotations


def human_size(n: float) -> str:
    """`512 B`, `3.0 MiB`, `1.2 TiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
