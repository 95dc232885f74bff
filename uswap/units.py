"""Sizes as people write them: 4096, 4K, 256M, 1G, 1.5G (powers of 1024)."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for '4K', '256M', '1.5G', '4096'; ValueError naming the input."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 4K, 256M, 1G)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIX[suffix.upper()]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(nbytes: int) -> str:
    """The largest unit that keeps the number short: 4K, 1.5G, 1023B."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if nbytes >= unit:
            value = nbytes / unit
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
    return f"{nbytes}B"


def format_size_exact(nbytes: int) -> str:
    """Like format_size, but a string that parses back to ``nbytes`` exactly (24105M, not 23.5G): for bounds a
    user may type back."""
    short = format_size(nbytes)
    if parse_size(short) == nbytes:
        return short
    for suffix in ("T", "G", "M", "K"):
        if nbytes % _SUFFIX[suffix] == 0:
            return f"{nbytes // _SUFFIX[suffix]}{suffix}"
    return str(nbytes)


def check_range(option: str, value, low, high, *, show=str, unit: str = "", why: str = ""):
    """``value`` if ``low <= value <= high`` (NaN is not); else ValueError, one line naming the option and the range:
    '--readahead 100 is out of range: give 1 to 64 pages (why)'."""
    if not low <= value <= high:
        raise ValueError(f"{option} {show(value)} is out of range: give {show(low)} to {show(high)}{unit}"
                         + (f" ({why})" if why else ""))
    return value
