"""Shared fixtures: kernel-feature gates and real loop-mounted filesystems.

A test that needs a kernel feature calls :func:`need`.  Elsewhere a missing
feature skips the test; under ``USWAP_REQUIRE_KERNEL=1`` (set by .ci/run) it
fails it, so CI can never go green by skipping the paging path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

from uswap.daemon.process import DaemonDidNotStop
from uswap.daemon.process import DaemonProcess as Launcher

REQUIRE_KERNEL = os.environ.get("USWAP_REQUIRE_KERNEL") == "1"

# A suite started in the background by a shell without job control (`cmd &` in a script) inherits SIGINT
# ignored, and so would every program it starts: a Python program then never sees KeyboardInterrupt, and the
# Ctrl-C tests (mkswap, bench) fail for a reason that is not theirs.  A handled signal is reset to the default
# at exec, an ignored one stays ignored: handling it here gives the programs the tests start a default SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def this_uswap_env() -> dict:
    """The environment for children that must import the uswap this process imported (this checkout, or
    the one installed in the interpreter's site-packages: the suite runs on both, see the Makefile) even
    when they start with -P or from "/": its directory first on PYTHONPATH."""
    import uswap
    where = os.path.dirname(os.path.dirname(os.path.abspath(uswap.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (where, os.environ.get("PYTHONPATH")) if x)}


def uswap(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run the uswap CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "uswap", *args], capture_output=True, text=True, **kw)


_STORE_HOLDER = """
import sys
from uswap.store.swapfile import SwapStore
store = SwapStore.open(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def store_held_elsewhere(path: str):
    """Another process holding the store open for use; yields its Popen."""
    with subprocess.Popen([sys.executable, "-c", _STORE_HOLDER, str(path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            yield holder
        finally:
            holder.stdin.close()
            holder.wait(10)


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


# -- the daemon ------------------------------------------------------------------------

class DaemonProcess(Launcher):
    """The package's daemon launcher (uswap.daemon.process: ready on READY=1, stopped with
    SIGTERM), on ``NAME.store``, ``NAME.sock`` and ``NAME.log`` in ``workdir``; a missing store
    is made first (``store_size``).  io and readahead left None are the daemon's defaults."""

    def __init__(self, workdir, name: str, *, store: str | None = None, store_size: str = "64M",
                 resident: str = "4M", io: str | None = None, readahead: int | None = None, prefix: tuple = (),
                 extra: tuple = (), socket_dir=None):
        # socket_dir: a directory other uids can traverse (pytest's tmp_path is 0700)
        super().__init__(store or str(workdir / f"{name}.store"), os.path.join(socket_dir or workdir, f"{name}.sock"),
                         str(workdir / f"{name}.log"), budget=resident, io=io, readahead=readahead, extra=extra,
                         prefix=prefix)   # prefix: e.g. the NFS test server's network namespace
        self.store_size = store_size

    def start(self) -> "DaemonProcess":
        if not self.store.startswith("nfs://") and not os.path.exists(self.store):
            r = uswap("mkswap", self.store, "--size", self.store_size)
            assert r.returncode == 0, r.stderr
        try:
            return super().start()
        except OSError as e:
            raise AssertionError(f"{e}\n{self.log()}") from None

    def stop(self, sig=None, timeout: float | None = None) -> int:
        import signal
        try:
            return super().stop(sig or signal.SIGTERM, timeout)
        except DaemonDidNotStop:
            raise AssertionError(f"daemon ignored {sig or 'SIGTERM'}:\n{self.log()}") from None

    def answers(self) -> bool:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def open_fds(self) -> list[str]:
        """What the daemon process has open (/proc/PID/fd link targets); prefix commands must exec."""
        fds = []
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                fds.append(os.readlink(f"/proc/{self.proc.pid}/fd/{fd}"))
            except FileNotFoundError:
                pass
        return fds


@pytest.fixture
def uswapd(tmp_path):
    """Factory for daemons; every one is stopped (SIGTERM, then SIGKILL) at teardown,
    and a traceback in its log fails the test."""
    made: list[DaemonProcess] = []

    def start(name: str = "d", **kw) -> DaemonProcess:
        need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no userfaultfd access")
        daemon = DaemonProcess(tmp_path, name, **kw)
        made.append(daemon)
        return daemon.start()
    yield start
    problems = []
    for daemon in made:
        try:
            daemon.stop()
        except AssertionError as e:
            problems.append(str(e))
        if "Traceback" in daemon.log():
            problems.append(f"traceback in the daemon's log:\n{daemon.log()}")
    assert not problems, "\n".join(problems)


def build_c(tmp_path_factory, source: str, name: str) -> str:
    """Compile a C client against libuswap; returns the binary's path."""
    out = tmp_path_factory.mktemp("bin") / name
    flags = uswap("config", "--cflags", "--libs").stdout.split()
    run("cc", "-O2", "-Wall", "-Werror", "-pthread", source, *flags, "-lm", "-o", str(out))
    return str(out)


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def hog(tmp_path_factory):
    """The integrity hog (examples/hog.c), built against libuswap."""
    return build_c(tmp_path_factory, os.path.join(HERE, os.pardir, "examples", "hog.c"), "hog")


@pytest.fixture(scope="session")
def hammer(tmp_path_factory):
    return build_c(tmp_path_factory, os.path.join(HERE, "c", "hammer.c"), "hammer")


@pytest.fixture(scope="session")
def blockverify(tmp_path_factory):
    """Concurrent random 4K O_DIRECT writes and verified reads on a device (tests/c/blockverify.c)."""
    return build_c(tmp_path_factory, os.path.join(HERE, "c", "blockverify.c"), "blockverify")


@pytest.fixture(scope="session")
def workload(tmp_path_factory):
    return build_c(tmp_path_factory, os.path.join(HERE, os.pardir, "examples", "workload.c"), "workload")
