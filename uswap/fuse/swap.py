"""`uswap swapon/swapoff/umount`: kernel swap on a FUSE store file, through a loop device.

swapon refuses a FUSE file itself (no bmap/swap_activate), so the file goes
behind a loop device with direct I/O (no page cache between the loop device
and our file), which gets a swap signature and is swapped on.  Every step is
undone if a later one fails: no loop device or swap area is left behind.
"""

from __future__ import annotations

import errno
import os
import subprocess

from uswap.fuse.mounts import uswap_mounts


class SwapError(OSError):
    pass


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SwapError(errno.EIO, f"{' '.join(cmd)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout.strip()


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SwapError(errno.EPERM, f"{what} needs root (losetup, mkswap, swapon)")


def store_file(path: str) -> str:
    """The absolute path of ``path`` if it is a file in a uswap FUSE mount."""
    path = os.path.abspath(path)
    mounts = uswap_mounts()
    if not any(os.path.dirname(path) == m for m in mounts):
        raise SwapError(errno.EINVAL, "not a file in a uswap mount (uswap mount MOUNTPOINT first)", path)
    if not os.path.isfile(path):
        raise SwapError(errno.ENOENT, "no such swap file in the uswap mount", path)
    return path


def loop_devices(path: str) -> list[str]:
    out = _run("losetup", "--noheadings", "--output", "NAME", "--associated", path)
    return [line.strip() for line in out.splitlines() if line.strip()]


def active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:]]


def swapon(path: str, priority: int | None = None) -> str:
    _need_root("swapon")
    path = store_file(path)
    swaps = active_swaps()
    for dev in loop_devices(path):
        if dev in swaps:
            raise SwapError(errno.EBUSY, f"already swapped on as {dev}", path)
    dev = _run("losetup", "--find", "--show", "--direct-io=on", path)
    try:
        _run("mkswap", dev)
        _run("swapon", *(["--priority", str(priority)] if priority is not None else []), dev)
    except BaseException:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)
        raise
    return dev


def swapoff(path: str) -> str:
    _need_root("swapoff")
    path = store_file(path)
    swaps = active_swaps()
    devices = [d for d in loop_devices(path) if d in swaps]
    if not devices:
        raise SwapError(errno.EINVAL, "not swapped on", path)
    for dev in devices:
        _run("swapoff", dev)
        _run("losetup", "--detach", dev)
    return devices[0]


def umount(mountpoint: str) -> None:
    mountpoint = os.path.abspath(mountpoint)
    if mountpoint not in uswap_mounts():
        raise SwapError(errno.EINVAL, "not a uswap mount", mountpoint)
    swaps = active_swaps()
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        if name.startswith("swap"):
            on = [d for d in loop_devices(path) if d in swaps]
            if on:
                raise SwapError(errno.EBUSY, f"{path} is swapped on ({on[0]}): uswap swapoff it first", mountpoint)
    _run("umount", mountpoint)
