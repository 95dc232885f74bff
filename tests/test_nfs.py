"""Layer 7: stores on an NFS server (nfs://), through the built-in libnfs client.

A real server: nfs-ganesha + rpcbind in a network namespace the test creates
(tests/nfs_server.py).  Our daemon and CLI run in that namespace too (nsenter
--net only); the hog reaches the daemon through its pathname Unix socket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import need, need_root, uswap
from test_region_daemon import corrupt_slots, finish_holder, start_holder
from test_fuse import blockverify_result, direct_io_loop
from uswap.nfs.ganesha import NfsServer
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.store.header import StoreHeader

pytestmark = pytest.mark.kernel


SQUASHED_EXPORT = """
EXPORT {{ Export_Id = 3; Path = "{path}"; Pseudo = /export-squash; Protocols = 3; Transports = TCP;
  Access_Type = RW; Squash = All_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
"""


@pytest.fixture
def nfs(tmp_path):
    need_root()
    need(shutil.which("ganesha.nfsd") and shutil.which("rpcbind") and shutil.which("nfs-ls"),
         "nfs-ganesha, rpcbind or libnfs-utils not installed (scripts/install-deps)")
    squashed = tmp_path / "nfs" / "export-squash"   # every client is "nobody" here: root's 0600 store is closed
    server = NfsServer(str(tmp_path / "nfs"), extra_config=SQUASHED_EXPORT.format(path=squashed))
    _make_store_file(server.export_ro_dir, "store")   # before start: ganesha must not see changes behind its back
    _make_store_file(str(squashed), "store")
    os.chmod(squashed / "store", 0o600)
    os.makedirs(server.export_dir)
    with open(os.path.join(server.export_dir, "notes.txt"), "w") as f:
        f.write("not a store\n")
    with server:   # starts it
        yield server


def _make_store_file(directory: str, name: str, slots: int = 255) -> None:
    os.makedirs(directory, exist_ok=True)
    header = StoreHeader(page_size=PAGE_SIZE, slot_count=slots, uuid=uuid.uuid4(), created=0,
                         host="test", created_by="test")
    with open(os.path.join(directory, name), "wb") as f:
        f.write(header.pack() + bytes(slots * PAGE_SIZE))


def cli(server: NfsServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(server.netns_cmd([sys.executable, "-m", "uswap", *args]), capture_output=True,
                          text=True, timeout=timeout)


def mkswap(server: NfsServer, name: str = "store", size: str = "64M") -> str:
    url = server.url(name)
    r = cli(server, "mkswap", url, "--size", size)
    assert r.returncode == 0, r.stderr
    return url


def start_daemon(uswapd, server: NfsServer, url: str, *, resident: str = "4M", timeout: float = 60,
                 stable: str = "file_sync"):
    return uswapd(store=url, resident=resident, prefix=server.netns_cmd([]),
                  extra=("--nfs-timeout", str(timeout), "--nfs-stable", stable))


def run_hog(hog: str, daemon, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([hog, *args], capture_output=True, text=True, env=daemon.env(), timeout=timeout)


# -- URLs and errors ---------------------------------------------------------------------

@pytest.mark.parametrize("url, message", [
    ("nfs://", "no server in the URL"),
    ("nfs://127.0.0.1/store", "needs an export and a file name"),
    ("nfs://127.0.0.1/export/store?version=4", "use version=3"),
    ("nfs://127.0.0.1/export/store?mode=fast", "unknown URL parameter(s) mode"),
    ("nfs://127.0.0.1/export/store?nfsport=x", "nfsport must be one number"),
    ("nfs://no-such-host.invalid/export/store", "unknown NFS server host 'no-such-host.invalid'"),
])
def test_bad_urls_get_one_line(url, message):
    r = subprocess.run([sys.executable, "-m", "uswap", "check", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_mkswap_and_check_over_nfs(nfs):
    url = mkswap(nfs, size="8M")
    stored = os.path.join(nfs.export_dir, "store")
    assert os.path.getsize(stored) == 8 << 20
    assert os.stat(stored).st_mode & 0o777 == 0o600
    assert os.stat(stored).st_blocks * 512 >= 8 << 20              # written in full: no holes
    r = cli(nfs, "check", url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NFSv3 server 127.0.0.1" in r.stdout and "nfs_swap_activate" in r.stdout
    assert "2047 slots" in r.stdout and "usable" in r.stdout
    # an idle store is replaced; a file that is not a store only with --force
    r = cli(nfs, "mkswap", nfs.url("store"), "--size", "8M")
    assert r.returncode == 0, r.stderr
    r = cli(nfs, "mkswap", nfs.url("notes.txt"), "--size", "1M")
    assert r.returncode == 1 and "exists and is not a uswap store; use --force" in r.stderr, r.stderr
    with open(os.path.join(nfs.export_dir, "notes.txt")) as f:
        assert f.read() == "not a store\n"
    r = cli(nfs, "mkswap", nfs.url("notes.txt"), "--size", "1M", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(nfs.export_dir)) == ["notes.txt", "store"]   # no temporary or lock file left


def test_server_errors_get_one_line(nfs):
    cases = [
        (("check", nfs.url("missing")), "no file /missing in export /export"),
        (("check", "nfs://127.0.0.1/nope/store?version=3"), "refused to mount /nope (no such export"),
        (("mkswap", nfs.ro_url("new"), "--size", "1M"), "ROFS"),
        (("check", "nfs://127.0.0.1/export-squash/store?version=3"), "permission denied reading /store"),
        (("daemon", "--store", "nfs://127.0.0.1/export-squash/store?version=3", "--socket",
          os.path.join(nfs.base_dir, "sq.sock")), "cannot open /store for writing"),
    ]
    for args, message in cases:
        r = cli(nfs, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    # a store on a read-only export: check can read it, the daemon cannot use it
    r = cli(nfs, "check", nfs.ro_url("store"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli(nfs, "daemon", "--store", nfs.ro_url("store"), "--socket", os.path.join(nfs.base_dir, "ro.sock"))
    assert r.returncode == 1
    assert "read-only export" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # a server that is not running
    url = mkswap(nfs, size="1M")
    nfs.kill()
    r = cli(nfs, "check", url)
    assert r.returncode == 1
    assert "cannot reach NFS server 127.0.0.1" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_store_in_use(nfs, uswapd):
    url = mkswap(nfs, size="8M")
    daemon = start_daemon(uswapd, nfs, url)
    r = cli(nfs, "check", url)
    assert r.returncode == 1
    assert f"in use by PID {daemon.proc.pid} on" in r.stdout
    r = cli(nfs, "daemon", "--store", url, "--socket", os.path.join(nfs.base_dir, "second.sock"))
    assert r.returncode == 1 and f"in use by PID {daemon.proc.pid}" in r.stderr, r.stderr
    daemon.stop()
    r = cli(nfs, "check", url)                                     # the lock went with the daemon
    assert r.returncode == 0, r.stdout + r.stderr


def test_stale_lock_of_a_killed_daemon_is_taken_over(nfs, uswapd):
    url = mkswap(nfs, size="8M")
    first = start_daemon(uswapd, nfs, url)
    first.stop(signal.SIGKILL)
    second = start_daemon(uswapd, nfs, url)
    assert second.status()["nfs"]["state"] == "up"


def test_several_requests_in_flight_on_one_connection(nfs):
    url = mkswap(nfs, size="1M")
    r = subprocess.run(nfs.netns_cmd([sys.executable, os.path.join(os.path.dirname(__file__),
                                                                   "nfs_concurrent_reads.py"), url]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split(":")[1]) > 1, r.stdout


# -- paging through it -------------------------------------------------------------------

@pytest.mark.parametrize("stable", ["file_sync", "commit"])
def test_integrity_hog_6x_budget_on_nfs(nfs, uswapd, hog, stable):
    url = mkswap(nfs)
    daemon = start_daemon(uswapd, nfs, url, stable=stable)
    # 6 MiB each: one process alone is over the 4M budget, so it swaps even if the four run one after
    # another (at 4 MiB each, CI under heavy load once swapped nothing)
    r = run_hog(hog, daemon, "-s", "6", "-p", "4", "-r", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" 0 mismatches") == 4, r.stdout
    status = daemon.status()
    d = status["daemon"]
    assert d["io"] == "nfs" and d["pswpout"] > 0 and d["pswpin"] > 0
    assert d["engine_faults"] > d["slow_path_faults"], d      # the engines read the server (csrc/nfs/uswap_nfs_io.h)
    assert d["read_errors"] == d["write_errors"] == 0
    assert d["slots_used"] == 0
    assert status["nfs"]["state"] == "up" and status["nfs"]["stable"] == stable
    assert status["encryption"] == "aes-256-gcm"                # the default: the server holds ciphertext only
    r = uswap("status", "--socket", daemon.socket)
    assert "NFS server 127.0.0.1: up since" in r.stdout, r.stdout


def test_uswap_run_on_an_nfs_store(nfs, uswapd, hog):
    """`uswap run` with an nfs:// store: the run's fault threads read the store through the C NFS connection
    (the codec view's remote store), for its fork children too; every word verified."""
    from test_run_probes import released
    from uswap.child import uswap_argv
    url = mkswap(nfs)
    daemon = start_daemon(uswapd, nfs, url, resident="32M")
    before = len(released(daemon))
    r = subprocess.run(uswap_argv("run", "--resident", "4M", "--socket", daemon.socket, "--",
                                  hog, "-s", "8", "-p", "2", "-r", "2", "-a"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" 0 mismatches") == 2, r.stdout
    deadline = time.monotonic() + 10
    while daemon.status()["runs"] and time.monotonic() < deadline:
        time.sleep(0.05)
    runs = released(daemon)[before:]
    assert len(runs) == 3, runs                                  # the parent and its 2 fork children
    assert sum(x["engine_faults"] for x in runs) > 0, runs     # served in C, not forwarded to Python
    assert sum(x["pswpout"] for x in runs) > 0 and sum(x["pswpin"] for x in runs) > 0, runs
    d = daemon.status()["daemon"]
    assert d["io"] == "nfs" and d["read_errors"] == d["write_errors"] == 0 and d["slots_used"] == 0, d


def test_compressed_pool_in_front_of_an_nfs_store(nfs, uswapd, workload):
    """`--pool` on an nfs:// store: pages that compress stay in the daemon, the pool writes its oldest back to
    the server through the C connection when full, and every word of a region's random workload (half of each
    page random, so the 4 MiB pool overflows) verifies."""
    url = mkswap(nfs)
    daemon = uswapd(store=url, resident="8M", prefix=nfs.netns_cmd([]), extra=("--pool", "4M"))
    r = subprocess.run([workload, "random", "-s", "32", "-n", "30000", "-f", "0.5"], capture_output=True,
                       text=True, env=daemon.env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + daemon.log()[-3000:]
    assert "mismatches=0" in r.stdout, r.stdout
    status = daemon.status()
    pool, d = status["pool"], status["daemon"]
    assert pool["stores"] > 0 and pool["loads"] > 0 and pool["written_back"] > 0, pool   # both tiers used
    assert pool["corrupted"] == 0 and d["read_errors"] == d["write_errors"] == 0, (pool, d)
    assert status["nfs"]["writes"] > 0 and status["nfs"]["reads"] > 0, status["nfs"]


def test_slot_corrupted_on_the_server_is_caught(nfs, uswapd):
    """Negative control: flip a bit in each used slot of the file on the server's disk."""
    url = mkswap(nfs)
    daemon = start_daemon(uswapd, nfs, url)
    victim = start_holder(daemon, 16 << 20)
    used = daemon.status()["daemon"]["slots_used"]
    assert used > 0
    corrupt_slots(os.path.join(nfs.export_dir, "store"), 0, used)
    code, out, err = finish_holder(victim)
    assert code == -signal.SIGBUS, (code, out, err)
    assert "CORRUPT" not in out and "intact" not in out     # wrong data was never handed back
    assert "failed authentication (aes-256-gcm)" in daemon.log()   # sealed slots (the default)


def test_server_killed_and_restarted_mid_run(nfs, uswapd, hog):
    url = mkswap(nfs)
    daemon = start_daemon(uswapd, nfs, url)
    proc = subprocess.Popen([hog, "-s", "4", "-p", "4", "-r", "12"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.env())
    try:
        restarts = 0
        written = 0
        while restarts < 3 and proc.poll() is None:
            deadline = time.monotonic() + 60
            while daemon.status()["daemon"]["pswpout"] < written + 500 and time.monotonic() < deadline:
                time.sleep(0.05)
            written = daemon.status()["daemon"]["pswpout"]
            nfs.kill()
            time.sleep(0.5)                 # eviction pauses; faults on evicted pages wait
            nfs.restart()
            restarts += 1
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert restarts == 3
    assert proc.returncode == 0, out + err
    assert out.count(" 0 mismatches") == 4, out
    status = daemon.status()
    assert status["nfs"]["connects"] > 1 and status["nfs"]["state"] == "up", status["nfs"]
    assert status["daemon"]["read_errors"] == 0 or status["daemon"]["pswpin"] > 0


def test_server_down_longer_than_the_timeout(nfs, uswapd, hog):
    url = mkswap(nfs)
    daemon = start_daemon(uswapd, nfs, url, resident="2M", timeout=3)
    victim = subprocess.Popen([hog, "-s", "8", "-r", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=daemon.env())
    try:
        deadline = time.monotonic() + 60
        while daemon.status()["daemon"]["pswpout"] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        nfs.kill()
        t0 = time.monotonic()
        victim.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode in (-signal.SIGBUS, 128 + signal.SIGBUS), victim.returncode   # the faulting client
    assert waited >= 2.5, waited                                          # it waited (hard-mount-like) first
    status = daemon.status()                                              # the daemon survives
    assert status["nfs"]["state"] != "up"
    assert status["daemon"]["read_errors"] > 0
    # meanwhile, a client that never needs the store is served (eviction paused)
    r = run_hog(hog, daemon, "-s", "1", "-r", "2")
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout + r.stderr
    nfs.restart()     # the daemon goes on serving once the server is back
    r = run_hog(hog, daemon, "-s", "4", "-p", "2", "-r", "2")
    assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr


def test_fuse_mount_on_an_nfs_store(nfs, tmp_path):
    url = mkswap(nfs, size="16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = cli(nfs, "mount", str(mnt), "--store", url, "--size", "8M")
    assert r.returncode == 0, r.stderr
    try:
        data = os.urandom(1 << 20)
        buf = AlignedBuffer(1 << 20)
        buf.view[:] = data
        fd = os.open(mnt / "swap0", os.O_RDWR | os.O_DIRECT)    # as the loop device does
        try:
            assert os.pwritev(fd, [buf.view], 4 * PAGE_SIZE) == len(data)
            buf.view[:] = bytes(len(data))
            assert os.preadv(fd, [buf.view], 4 * PAGE_SIZE) == len(data)
            assert bytes(buf.view) == data
        finally:
            os.close(fd)
        status = json.loads((mnt / ".status").read_text())
        assert status["store"] == url and status["pages_written"] >= 256
        assert status["nfs"]["state"] == "up" and status["read_errors"] == status["write_errors"] == 0
        assert status["encryption"] == "aes-256-gcm"
    finally:
        assert uswap("umount", str(mnt)).returncode == 0


# -- concurrent requests through the FUSE store (security finding 8) --------------------

_FUSE_OPS_CONCURRENTLY = """
import collections, json, sys
import pyfuse3, trio
from uswap.core import PAGE_SIZE
from uswap.fuse.ops import SwapStoreOps
from uswap.nfs.store import NfsStore

def page(p, version=0):
    return bytes([p + 1, version]) * (PAGE_SIZE // 2)

async def main(url):
    store = await NfsStore.open(url)
    try:
        ops = SwapStoreOps(store, files=1, file_pages=64)
        for p in range(16):
            await ops.write(2, p * PAGE_SIZE, page(p))
        pairs = collections.Counter()
        same_slot = collections.Counter()

        async def read(p, into):
            try:
                into[p] = await ops.read(2, p * PAGE_SIZE, PAGE_SIZE)
            except Exception as e:      # FUSEError (EIO), or anything else, which would end the mount
                into[p] = "EIO" if isinstance(e, pyfuse3.FUSEError) else type(e).__name__

        for n in range(200):            # two reads in flight at once, of different pages
            got = {}
            a, b = n % 16, (n + 5) % 16
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, a, got)
                nursery.start_soon(read, b, got)
            for p in (a, b):
                pairs["own" if got[p] == page(p) else "other page" if isinstance(got[p], bytes) else got[p]] += 1
        for n in range(1, 51):          # a write and a read of one slot at once
            got = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ops.write, 2, 3 * PAGE_SIZE, page(3, n))
                nursery.start_soon(read, 3, got)
            same_slot["old" if got[3] == page(3, n - 1) else "new" if got[3] == page(3, n)
                      else "other" if isinstance(got[3], bytes) else got[3]] += 1
        print(json.dumps({"pairs": pairs, "same_slot": same_slot,
                          "io_buffers": json.loads(ops.status_json()).get("io_buffers"),
                          "most_in_flight": store.nfs_status()["most_in_flight"]}))
    finally:
        await store.aclose()

trio.run(main, sys.argv[1])
"""


def test_fuse_ops_concurrent_reads_on_an_nfs_store(nfs):
    """Finding 8 in process, where an nfs:// store really awaits the server: two
    reads in flight at once must each get their own page.  With one buffer
    shared by every request (the old code), both replies landed in it and the
    reads got each other's page or failed their check (EIO); a read of a slot
    being written found it "not written" (a ValueError that would end the mount)."""
    url = mkswap(nfs, size="1M")
    r = subprocess.run(nfs.netns_cmd([sys.executable, "-c", _FUSE_OPS_CONCURRENTLY, url]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["pairs"] == {"own": 400}, result
    assert set(result["same_slot"]) <= {"old", "new"}, result        # one or the other, whole, never an error
    assert result["io_buffers"]["most_in_use"] >= 2 and result["most_in_flight"] >= 2, result  # really concurrent
    assert result["io_buffers"]["in_use"] == 0, result


def _progress(out: str) -> list[tuple[float, int]]:
    """(time, ops) of blockverify's progress lines."""
    return [(float(t), int(n)) for t, n in re.findall(r"^progress t=([\d.]+) ops=(\d+) ", out, re.M)]


def test_blockverify_through_a_loop_device_on_an_nfs_store_across_a_server_restart(nfs, tmp_path, blockverify):
    """Finding 8 end to end: queue depth 16 of random 4K O_DIRECT writes and
    verified reads through a direct-I/O loop device on a FUSE mount of an
    nfs:// store, the server SIGKILLed and restarted mid-run.

    What the outage should look like: the store retries every request on a new
    connection for --nfs-timeout (20 s here) before it gives up with an error,
    and the outage lasts a few seconds, so no request fails: I/O stops while
    the server is down (no answer, no error) and goes on once it is back."""
    url = mkswap(nfs, size="20M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = cli(nfs, "mount", str(mnt), "--store", url, "--size", "8M", "--nfs-timeout", "20")
    assert r.returncode == 0, r.stderr
    try:
        with direct_io_loop(str(mnt / "swap0")) as dev:
            proc = subprocess.Popen([blockverify, "-j", "16", "-t", "9", "-i", "0.1", dev], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                lines = []
                for line in proc.stdout:                  # the fill pass first: every read checks data
                    lines.append(line)
                    if line.startswith("filled") or line.startswith("ops="):
                        break
                time.sleep(2)
                nfs.kill()
                down = time.monotonic()
                time.sleep(2)
                restarting = time.monotonic()             # nothing can be served before this
                nfs.restart()                             # returns once the server serves again
                out, err = proc.communicate(timeout=120)
                out = "".join(lines) + out
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        status = json.loads((mnt / ".status").read_text())
    finally:
        assert uswap("umount", str(mnt)).returncode == 0
    assert "filled blocks=2048 eio=0" in out, out
    ops, mismatches, eio = blockverify_result(out)
    assert (mismatches, eio) == (0, 0) and proc.returncode == 0, out + err
    progress = _progress(out)
    before = [n for t, n in progress if t < down]
    during = [n for t, n in progress if down + 0.5 <= t <= restarting]
    assert before and before[-1] > 100, out                    # it ran before the outage,
    assert len(during) >= 10 and during[0] == during[-1], (down, restarting, out)   # stood still while it lasted,
    assert ops - during[-1] > 100, out                          # then went on, without an error
    assert status["read_errors"] == status["write_errors"] == 0, status
    assert status["nfs"]["connects"] >= 2 and status["nfs"]["state"] == "up", status["nfs"]
    assert status["io_buffers"]["most_in_use"] >= 2, status    # requests were in flight together
