"""Shared fixtures: kernel-feature gates and real loop-mounted filesystems.

A test that needs a kernel feature calls :func:`need`.  Elsewhere a missing
feature skips the test; under ``USWAP_REQUIRE_KERNEL=1`` (set by .ci/run) it
fails it, so CI can never go green by skipping the paging path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REQUIRE_KERNEL = os.environ.get("USWAP_REQUIRE_KERNEL") == "1"


def need(condition: bool, what: str) -> None:
    """Skip (or, under USWAP_REQUIRE_KERNEL=1, fail) unless ``condition``."""
    if condition:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"USWAP_REQUIRE_KERNEL=1 but {what}", pytrace=False)
    pytest.skip(what)


def need_root() -> None:
    need(os.geteuid() == 0, "not running as root")


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def uswap(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run the uswap CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "uswap", *args], capture_output=True, text=True, **kw)


def _filesystem_available(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


class LoopFilesystems:
    """Creates real filesystems on loop devices; tears every one down."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.mounted: list[tuple[str, str]] = []  # (mountpoint, loop device)

    def make(self, fstype: str, *, size: str = "320M", mkfs_args: tuple[str, ...] = (),
             mount_opts: str | None = None) -> str:
        need_root()
        need(_filesystem_available(fstype), f"the kernel has no {fstype}")
        need(shutil.which(f"mkfs.{fstype}") is not None, f"mkfs.{fstype} is not installed")
        n = len(self.mounted)
        image = self.workdir / f"{fstype}-{n}.img"
        mountpoint = self.workdir / f"{fstype}-{n}"
        mountpoint.mkdir()
        run("truncate", "-s", size, str(image))
        run(f"mkfs.{fstype}", *mkfs_args, str(image))
        loop = run("losetup", "--find", "--show", str(image)).stdout.strip()
        self.mounted.append((str(mountpoint), loop))
        opts = ("-o", mount_opts) if mount_opts else ()
        run("mount", *opts, loop, str(mountpoint))
        return str(mountpoint)

    def mount_memory(self, fstype: str) -> str:
        """A tmpfs or ramfs of our own (no loop device)."""
        need_root()
        mountpoint = self.workdir / f"{fstype}-{len(self.mounted)}"
        mountpoint.mkdir()
        self.mounted.append((str(mountpoint), ""))
        run("mount", "-t", fstype, "-o", "size=64M" if fstype == "tmpfs" else "mode=0755", fstype, str(mountpoint))
        return str(mountpoint)

    def cleanup(self) -> None:
        errors = []
        for mountpoint, loop in reversed(self.mounted):
            if os.path.ismount(mountpoint):
                r = run("umount", mountpoint, check=False)
                if r.returncode:
                    errors.append(r.stderr)
            if loop:
                r = run("losetup", "-d", loop, check=False)
                if r.returncode:
                    errors.append(r.stderr)
        self.mounted.clear()
        assert not errors, errors


@pytest.fixture
def loopfs(tmp_path):
    fs = LoopFilesystems(tmp_path)
    try:
        yield fs
    finally:
        fs.cleanup()
