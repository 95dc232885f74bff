"""Which uswap FUSE stores are mounted (from /proc/mounts; needs no FUSE library)."""

from __future__ import annotations

FSNAME = "uswap"


def uswap_mounts() -> list[str]:
    """Mount points of uswap FUSE stores."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            if source == FSNAME and fstype.startswith("fuse"):
                out.append(target.replace("\\040", " "))
    return out
