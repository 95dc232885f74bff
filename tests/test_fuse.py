"""Layer 6: the FUSE swap store, with the kernel's own swap running through it.

Real FUSE mounts, real loop devices with direct I/O, real swap areas, a real
memcg v1 limit: nothing mocked.  Every fixture undoes what it did (swapoff,
loop detach, umount, cgroup removal, the serving process) on failure too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time

import pytest
import trio

from conftest import need, need_root, run, uswap
from uswap.bench.backends import remove_memcg
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.fuse.ops import SwapStoreOps
from uswap.store.swapfile import SwapStore

pytestmark = pytest.mark.kernel

MEMCG = "/sys/fs/cgroup/memory"
TOP_PRIORITY = "32767"  # our swap area comes first, whatever other areas the machine has


def swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:]]


def vmstat(key: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name == key:
                return int(value)
    raise KeyError(key)


class FuseStore:
    def __init__(self, workdir, name: str, *, size: str, files: int, store: str | None = None):
        self.mountpoint = str(workdir / name)
        os.mkdir(self.mountpoint)
        self.store = store or str(workdir / f"{name}.store")
        r = uswap("mount", self.mountpoint, "--store", self.store, "--size", size, "--files", str(files),
                  timeout=120)
        assert r.returncode == 0, r.stderr
        self.pid = int(re.search(r"served by process (\d+)", r.stdout).group(1))

    def file(self, i: int = 0) -> str:
        return os.path.join(self.mountpoint, f"swap{i}")

    def status(self) -> dict:
        with open(os.path.join(self.mountpoint, ".status")) as f:
            return json.load(f)

    def cleanup(self) -> list[str]:
        problems = []
        if os.path.ismount(self.mountpoint):
            for name in os.listdir(self.mountpoint):
                if not name.startswith("swap"):
                    continue
                path = os.path.join(self.mountpoint, name)
                devs = run("losetup", "--noheadings", "--output", "NAME", "--associated", path,
                           check=False).stdout.split()
                for dev in devs:
                    if dev in swaps():
                        problems.append(f"{dev} was still swapped on")
                        run("swapoff", dev, check=False)
                    run("losetup", "--detach", dev, check=False)
            r = run("umount", self.mountpoint, check=False)
            if r.returncode:
                problems.append(r.stderr)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            pass
        else:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(self.pid, signal.SIGKILL)
                problems.append("the serving process outlived its mount")
        return problems


@pytest.fixture
def fuse_store(tmp_path):
    need_root()
    need(os.path.exists("/dev/fuse"), "no /dev/fuse")
    made: list[FuseStore] = []

    def mount(name: str = "mnt", *, size: str = "16M", files: int = 1, store: str | None = None) -> FuseStore:
        m = FuseStore(tmp_path, name, size=size, files=files, store=store)
        made.append(m)
        return m
    yield mount
    problems = []
    for m in made:
        problems += m.cleanup()
    assert not problems, problems


@pytest.fixture
def memcg():
    need_root()
    need(os.path.isdir(MEMCG), "no memcg v1 hierarchy")
    made = []

    def group(limit: int) -> str:
        path = os.path.join(MEMCG, f"uswap-test-{os.getpid()}-{len(made)}")
        os.mkdir(path)
        made.append(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        return path
    yield group
    for path in made:
        remove_memcg(path)


@contextlib.contextmanager
def direct_io_loop(path: str):
    """A loop device with direct I/O over ``path`` (as `uswap swapon` makes one), detached at the end."""
    dev = run("losetup", "--find", "--show", "--direct-io=on", path).stdout.strip()
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            assert f.read().strip() == "1", f"{dev} did not get direct I/O"
        yield dev
    finally:
        run("losetup", "--detach", dev, check=False)


FUSECTL = "/sys/fs/fuse/connections"


@contextlib.contextmanager
def fuse_requests_waiting(mountpoint: str):
    """Samples, every 10 ms, how many requests the kernel has waiting on the FUSE
    mount (fusectl's ``waiting``: queued or being served); yields the list of samples.
    Mounts fusectl for the while if it is not mounted."""
    import threading
    mounted_here = not os.path.ismount(FUSECTL)
    if mounted_here:
        run("mount", "-t", "fusectl", "fusectl", FUSECTL)
    st = os.stat(mountpoint)
    waiting = os.path.join(FUSECTL, str(os.major(st.st_dev) << 20 | os.minor(st.st_dev)), "waiting")
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            with open(waiting) as f:
                samples.append(int(f.read()))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()
        if mounted_here:
            run("umount", FUSECTL, check=False)


BLOCKVERIFY_RESULT = re.compile(r"^ops=(\d+) mismatches=(\d+) eio=(\d+)$", re.M)


def blockverify_result(out: str) -> tuple[int, int, int]:
    """(ops, mismatches, eio) from blockverify's last line."""
    found = BLOCKVERIFY_RESULT.findall(out)
    assert len(found) == 1, out
    return tuple(int(n) for n in found[0])


def in_group(path: str):
    def enter():
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return enter


# -- the filesystem ------------------------------------------------------------

def test_fixed_size_files_and_refusals(fuse_store):
    m = fuse_store(size="8M", files=2)
    assert sorted(os.listdir(m.mountpoint)) == [".status", "swap0", "swap1"]
    st = os.stat(m.file(1))
    assert st.st_size == 8 << 20 and st.st_mode & 0o777 == 0o600
    for action in (lambda: open(os.path.join(m.mountpoint, "new"), "w"),
                   lambda: os.unlink(m.file(0)),
                   lambda: os.truncate(m.file(0), 4096),
                   lambda: os.rename(m.file(0), os.path.join(m.mountpoint, "x"))):
        with pytest.raises(PermissionError):
            action()
    assert os.path.getsize(m.file(0)) == 8 << 20


def test_direct_io_round_trip_and_bad_requests(fuse_store):
    m = fuse_store(size="8M")
    fd = os.open(m.file(0), os.O_RDWR | os.O_DIRECT)
    try:
        buf = AlignedBuffer(2 * PAGE_SIZE)
        assert os.preadv(fd, [buf.view], 0) == 2 * PAGE_SIZE
        assert bytes(buf.view) == bytes(2 * PAGE_SIZE)             # a fresh swap file reads as zeros
        buf.view[:] = os.urandom(2 * PAGE_SIZE)
        data = bytes(buf.view)
        assert os.pwritev(fd, [buf.view], 5 * PAGE_SIZE) == 2 * PAGE_SIZE
        buf.view[:] = bytes(2 * PAGE_SIZE)
        assert os.preadv(fd, [buf.view], 5 * PAGE_SIZE) == 2 * PAGE_SIZE
        assert bytes(buf.view) == data
        assert os.preadv(fd, [buf.view], 8 << 20) == 0              # at the end: nothing
        with pytest.raises(OSError) as info:
            os.pwritev(fd, [buf.view], (8 << 20) - PAGE_SIZE)       # would run past the end
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    fd = os.open(m.file(0), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 100, 10)                                   # not page-aligned
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    status = m.status()
    assert status["pages_written"] == 2 and status["pages_read"] >= 2
    text = uswap("status").stdout
    assert m.mountpoint in text


def test_corrupted_slot_reads_as_eio(fuse_store, tmp_path):
    """Negative control: a bit flipped in the store behind the mount's back."""
    m = fuse_store(size="8M")
    fd = os.open(m.file(0), os.O_RDWR | os.O_DIRECT)
    try:
        buf = AlignedBuffer(PAGE_SIZE)
        buf.view[:] = b"\xab" * PAGE_SIZE
        os.pwritev(fd, [buf.view], 0)
        store = os.open(m.store, os.O_RDWR | os.O_DIRECT)
        try:
            os.preadv(store, [buf.view], PAGE_SIZE)                 # slot 0 sits after the header page
            buf.view[7] ^= 0x20
            os.pwritev(store, [buf.view], PAGE_SIZE)
        finally:
            os.close(store)
        with pytest.raises(OSError) as info:
            os.preadv(fd, [buf.view], 0)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert m.status()["read_errors"] == 1


# -- concurrent requests ---------------------------------------------------------------

def _own_pages_read_concurrently(store_path: str, *, io_buffers: int, readers: int, rounds: int):
    """In process: pages 0..readers-1 written through the FUSE operations, then
    read back by ``readers`` concurrent requests per round.  Returns (reads that
    got another page's data, reads in all, the buffer pool's statistics)."""
    store = SwapStore.open(store_path)
    try:
        ops = SwapStoreOps(store, files=1, file_pages=64, io_buffers=io_buffers)
        fh = 2                                   # swap0
        page = [bytes([p + 1]) * PAGE_SIZE for p in range(readers)]

        async def main():
            for p in range(readers):
                assert await ops.write(fh, p * PAGE_SIZE, page[p]) == PAGE_SIZE
            wrong = 0
            for _ in range(rounds):
                got = {}

                async def read(p):
                    got[p] = await ops.read(fh, p * PAGE_SIZE, PAGE_SIZE)
                async with trio.open_nursery() as nursery:
                    for p in range(readers):
                        nursery.start_soon(read, p)
                wrong += sum(got[p] != page[p] for p in range(readers))
            return wrong
        wrong = trio.run(main)
        return wrong, readers * rounds, json.loads(ops.status_json())["io_buffers"]
    finally:
        store.close()


def test_concurrent_reads_get_their_own_pages(tmp_path):
    """Finding 8, in process: two reads in flight at once.  With one buffer shared
    by every request (the old code), the read that resumed second copied out the
    page the other had just read into it: half the reads got the other's page,
    every round, and passed the crc32c check (it ran before the await)."""
    path = str(tmp_path / "store")
    assert uswap("mkswap", path, "--size", "1M").returncode == 0
    wrong, total, pool = _own_pages_read_concurrently(path, io_buffers=16, readers=2, rounds=200)
    assert (wrong, total) == (0, 400)
    assert pool["most_in_use"] == 2 and pool["in_use"] == 0      # both were in flight at once, and both gave back
    # More requests than buffers: the rest wait for one, none shares.
    wrong, total, pool = _own_pages_read_concurrently(path, io_buffers=2, readers=8, rounds=50)
    assert (wrong, total) == (0, 400)
    assert pool["most_in_use"] == 2 and pool["waits"] > 0 and pool["in_use"] == 0


def test_blockverify_catches_wrong_data(blockverify, tmp_path):
    """Negative control for the checker: blocks holding generations it did not
    expect (it is told they were never written) are mismatches, and fail it."""
    image = tmp_path / "image"
    image.write_bytes(bytes(1 << 20))
    r = run(blockverify, "-j", "4", "-n", "2000", str(image), check=False)
    assert r.returncode == 0 and blockverify_result(r.stdout) == (2000, 0, 0), r.stdout + r.stderr
    r = run(blockverify, "-j", "4", "-n", "200", "-w", "0", "-Z", str(image), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert blockverify_result(r.stdout) == (200, 200, 0)
    assert "generation 0: word 0 holds" in r.stdout and "another generation" in r.stdout


def test_blockverify_through_a_direct_io_loop_device(fuse_store, blockverify):
    """Finding 8 end to end on a local store: 16 threads of random 4K O_DIRECT
    writes and verified reads (queue depth 16) through a direct-I/O loop
    device on a FUSE file."""
    m = fuse_store(size="16M")
    with direct_io_loop(m.file(0)) as dev, fuse_requests_waiting(m.mountpoint) as waiting:
        r = run(blockverify, "-j", "16", "-t", "6", dev, check=False, timeout=120)
    ops, mismatches, eio = blockverify_result(r.stdout)
    assert (mismatches, eio) == (0, 0) and r.returncode == 0, r.stdout + r.stderr
    assert "filled blocks=4096 eio=0" in r.stdout
    assert ops > 1000, r.stdout
    # The kernel had many requests out to the mount at once (a local store's
    # I/O does not await, so our handlers still ran one after another).
    assert max(waiting) >= 8, waiting
    status = m.status()
    assert status["read_errors"] == status["write_errors"] == 0
    assert status["pages_written"] >= 4096 and status["pages_read"] > 0


# -- kernel swap through it ------------------------------------------------------------

def test_kernel_swap_through_the_store_keeps_data(fuse_store, memcg, hog):
    m = fuse_store(size="256M")
    r = uswap("swapon", m.file(0), "--priority", TOP_PRIORITY)
    assert r.returncode == 0, r.stderr
    dev = r.stdout.strip()
    try:
        assert dev in swaps()
        group = memcg(16 << 20)          # 8x below the workload
        before = vmstat("pswpout")
        h = subprocess.run([hog, "-a", "-s", "32", "-p", "4", "-r", "3"], capture_output=True, text=True,
                           timeout=600, preexec_fn=in_group(group))
        assert h.returncode == 0, h.stdout + h.stderr
        assert h.stdout.count(" 0 mismatches") == 4
        assert vmstat("pswpout") - before > 0
        status = m.status()
        assert status["pages_written"] > 0 and status["pages_read"] > 0
        assert status["read_errors"] == status["write_errors"] == 0
    finally:
        r = uswap("swapoff", m.file(0))
    assert r.returncode == 0, r.stderr
    assert dev not in swaps()


def test_swapon_swapoff_umount_ordering(fuse_store, tmp_path):
    m = fuse_store(size="8M")
    first = uswap("swapon", m.file(0))
    assert first.returncode == 0, first.stderr
    dev = first.stdout.strip()
    try:
        again = uswap("swapon", m.file(0))
        assert again.returncode == 1 and f"already swapped on as {dev}" in again.stderr
        refused = uswap("umount", m.mountpoint)
        assert refused.returncode == 1
        assert "is swapped on" in refused.stderr and "uswap swapoff it first" in refused.stderr
        assert os.path.ismount(m.mountpoint)
    finally:
        assert uswap("swapoff", m.file(0)).returncode == 0
    off = uswap("swapoff", m.file(0))
    assert off.returncode == 1 and "not swapped on" in off.stderr
    assert run("losetup", "--associated", m.file(0)).stdout == ""
    assert uswap("umount", m.mountpoint).returncode == 0
    assert not os.path.ismount(m.mountpoint)


def test_swapon_errors_leave_nothing_behind(fuse_store, tmp_path):
    small = fuse_store("small", size="16K")      # too small for a swap area: mkswap refuses
    loops_before = run("losetup", "--list", "--noheadings").stdout
    r = uswap("swapon", small.file(0))
    assert r.returncode == 1 and "mkswap" in r.stderr
    assert run("losetup", "--list", "--noheadings").stdout == loops_before
    other = tmp_path / "plain"
    other.write_bytes(bytes(1 << 20))
    r = uswap("swapon", str(other))
    assert r.returncode == 1 and "not a file in a uswap mount" in r.stderr


def test_swapon_needs_root(fuse_store):
    m = fuse_store(size="8M")
    from test_cli import run_cli_as_nobody
    status, err = run_cli_as_nobody("swapon", m.file(0))
    assert status == 1 and "needs root" in err


def _swap_with_failing_store(fuse_store, loopfs, memcg, cmd: list[str], *, fail_before: bool):
    """Kernel swap through a FUSE store whose filesystem is shut down
    (xfs_io shutdown: every I/O then fails with EIO), before the workload
    starts or once its pages are out.  Returns (hog result, store status)."""
    fs = loopfs.make("ext4", size="400M", mkfs_args=("-q", "-F", "-b", "4096"))
    m = fuse_store(size="256M", store=os.path.join(fs, "store"))
    assert uswap("swapon", m.file(0), "--priority", TOP_PRIORITY).returncode == 0  # no other swap area takes pages
    group = memcg(16 << 20)
    if fail_before:
        run("xfs_io", "-x", "-c", "shutdown", fs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=in_group(group))
    try:
        if not fail_before:
            deadline = time.monotonic() + 120
            while m.status()["pages_written"] < 8192 and time.monotonic() < deadline:
                time.sleep(0.05)
            run("xfs_io", "-x", "-c", "shutdown", fs)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        status = m.status()
        uswap("swapoff", m.file(0))
    return proc.returncode, status


def test_store_read_errors_kill_the_swapping_process(loopfs, fuse_store, memcg, workload):
    """What the kernel does with EIO on swap-in (documented in docs/DESIGN.md):
    'Read-error on swap-device', and the process touching the page dies.
    The accesses after the fill only read, so reclaim needs (almost) no writes."""
    cmd = [workload, "random", "-a", "-s", "64", "-n", "100000000", "-w", "0"]
    code, status = _swap_with_failing_store(fuse_store, loopfs, memcg, cmd, fail_before=False)
    assert status["read_errors"] > 0
    # SIGBUS from the failed swap-in (SIGSEGV when the kernel's own access on
    # the process's behalf hit it); SIGKILL if a failing write made the memcg OOM first.
    assert code in (-signal.SIGBUS, -signal.SIGSEGV, -signal.SIGKILL), code


def test_store_write_errors_end_in_memcg_oom(loopfs, fuse_store, memcg, hog):
    """EIO on swap-out: the kernel keeps the pages ('Write-error on swap-device'),
    cannot reclaim the group below its limit, and the memcg OOM killer ends the
    process: no data is silently lost."""
    cmd = [hog, "-a", "-s", "64", "-r", "20"]
    code, status = _swap_with_failing_store(fuse_store, loopfs, memcg, cmd, fail_before=True)
    assert status["write_errors"] > 0
    assert code == -signal.SIGKILL, code


@pytest.mark.soak
def test_soak_kernel_swap_through_the_store(fuse_store, memcg, hog):
    """Longer: 4 x 64 MiB under a 16 MiB memcg (16x), 10 rounds, through the FUSE store (pytest -m soak)."""
    m = fuse_store(size="512M")
    assert uswap("swapon", m.file(0), "--priority", TOP_PRIORITY).returncode == 0
    try:
        group = memcg(16 << 20)
        h = subprocess.run([hog, "-a", "-s", "64", "-p", "4", "-r", "10"], capture_output=True, text=True,
                           timeout=3600, preexec_fn=in_group(group))
        assert h.returncode == 0, h.stdout + h.stderr
        assert h.stdout.count(" 0 mismatches") == 4
        assert m.status()["read_errors"] == m.status()["write_errors"] == 0
    finally:
        assert uswap("swapoff", m.file(0)).returncode == 0
