"""Sizes and durations as operators write and read them."""

from __future__ import annotations

import re

DAY = 86400.0
_DECIMAL = re.compile(r"[0-9]{1,18}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKMGT]i?B?|B)?")
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """`20GB`, `500MiB`, `1.5T`, `1000000` -> bytes (kB, MB... are powers of 1000, KiB, MiB... of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (write e.g. 20GB, 500MiB)")
    number, unit = float(m[1]), (m[2] or "")
    base = unit[:1].upper()
    factor = 1024 ** "KMGT".index(base) * 1024 if "i" in unit else _UNITS[base]
    return int(number * factor)


def size(n: float) -> str:
    """Bytes as a person reads them: `532 B`, `1.2 MB`, `3.4 GB` (powers of 1000)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def decimal(text: str) -> int | None:
    """A plain decimal number (ASCII digits, at most 18 of them), else None. Not `str.isdigit()`:
    it takes "²", which `int()` refuses, and a number of thousands of digits, which `int()`
    refuses too (or spends its time on)."""
    return int(text) if _DECIMAL.fullmatch(text) else None
