"""Layer 4/10: the compressed pool (`uswap daemon --pool`, uswap.daemon.pool) with a real daemon, real
userfaultfd and real clients: memfd regions and `uswap run` programs.

Every workload checks every word of every page it wrote (examples/workload.c, examples/hog.c).  Page contents
(workload -f): 0, the bench's default: two header words then zeros (compressible); 0.5: half of each page random.
The hog's pages are random throughout (incompressible).  The store's reads are the daemon's own, as the kernel
counts them (/proc/PID/io read_bytes: the store is O_DIRECT, so every byte there came from the disk).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time

import pytest

from conftest import need, need_root, uswap
from test_cli import refused_daemon
from test_install import parse_exposition, sample
from test_region_daemon import run_hog, wait_for_no_regions
from test_run_probes import LIBRUN
from test_run_shared_budget import COUNT_SLACK, KERNEL_SLACK, finished, memfd_pages, rss_anon, sample_until_done
from uswap.child import uswap_argv
from uswap.core import PAGE_SIZE
from uswap.daemon.status import render_pool

pytestmark = pytest.mark.kernel

MiB = 1 << 20
SIZE_MIB = 32
BUDGET = "8M"                  # a quarter of the workload
POOL = "4M"                    # at most half the budget
FILLS = ["0", "0.5"]           # compressible (the bench's default), half random


def read_bytes(pid: int) -> int:
    """Bytes the process (all its threads, io_uring's workers included) fetched from the storage layer."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def workload_in_region(workload, daemon, fill: str, *args: str) -> list[dict]:
    """examples/workload.c random on a 32 MiB region, every word verified; the pool's status every 100 ms
    while it ran (empty without a pool)."""
    proc = subprocess.Popen([workload, "random", "-s", str(SIZE_MIB), "-n", "30000", "-f", fill, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())
    pools = []
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        if (pool := daemon.status()["pool"]) is not None:
            pools.append(pool)
        time.sleep(0.1)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err + daemon.log()[-3000:]
    fields = dict(kv.split("=") for kv in out.split())
    assert fields["mismatches"] == "0", out
    return pools


def pooled(uswapd, name: str = "pooled", *, resident: str = BUDGET, pool: str = POOL, **kw):
    return uswapd(name, resident=resident, store_size="256M", extra=("--pool", pool, *kw.pop("extra", ())), **kw)


def empty_charge(daemon) -> int:
    """What the pool holds with nothing in it (its index), right after start."""
    pool = daemon.status()["pool"]
    assert pool["stored_pages"] == 0 and pool["stores"] == 0, pool
    return pool["charged_bytes"]


# -- (a) regions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", FILLS)
def test_regions_through_the_pool_keep_every_word_and_read_the_store_less(uswapd, workload, fill):
    plain = uswapd("plain", resident=BUDGET, store_size="256M")
    before = read_bytes(plain.proc.pid)
    workload_in_region(workload, plain, fill)
    plain_reads = read_bytes(plain.proc.pid) - before
    off = plain.status()
    assert off["pool"] is None
    assert "POOL off" in uswap("status", "--socket", plain.socket).stdout.splitlines()
    families = parse_exposition(uswap("status", "--format", "prometheus", "--socket", plain.socket).stdout)
    assert sample(families, "uswap_pool_enabled") == 0 and "uswap_pool_stores" not in families

    daemon = pooled(uswapd)
    assert "a lz4 pool of 1024 pages" in daemon.log()
    before = read_bytes(daemon.proc.pid)
    running = workload_in_region(workload, daemon, fill)
    reads = read_bytes(daemon.proc.pid) - before
    wait_for_no_regions(daemon)
    status = daemon.status()
    pool, d = status["pool"], status["daemon"]
    full = max(running, key=lambda p: p["stored_pages"])
    print(f"fill {fill}: store reads {plain_reads >> 10} KiB without the pool, {reads >> 10} KiB with it; at "
          f"most {full}; at the end {pool}")
    assert pool["compressor"] == "lz4" and pool["max_bytes"] == 4 * MiB
    assert pool["stores"] > SIZE_MIB * 256 // 2 and pool["loads"] > 1000, pool
    assert pool["corrupted"] == 0 and d["read_errors"] == d["write_errors"] == 0
    assert reads < plain_reads, (reads, plain_reads)
    assert full["pool_bytes"] <= full["max_bytes"] + 64 * PAGE_SIZE, full     # a write-back's buffer over it
    if fill == "0":          # everything fits compressed: the store is hardly read at all
        assert full["ratio"] > 10 and pool["rejected"] == 0, full
        assert reads < plain_reads // 10, (reads, plain_reads)
    else:                    # half random: the pool fills up and writes its oldest pages back
        assert 1.5 < full["ratio"] < 2.5 and pool["written_back"] > 0, full
    # The client is gone, and so are its pooled slots.
    assert d["slots_used"] == 0 and pool["stored_pages"] == pool["charged_bytes"] == 0, (d, pool)


def test_status_and_metrics_show_the_pool(uswapd, workload):
    """With zstd, and async I/O: writeback's four threads store into the pool while the engine loads."""
    daemon = pooled(uswapd, io="async", extra=("--pool-compressor", "zstd"))
    running = workload_in_region(workload, daemon, "0.5")
    assert max(p["stored_pages"] for p in running) > 0 and all(p["corrupted"] == 0 for p in running)
    wait_for_no_regions(daemon)
    pool = daemon.status()["pool"]          # the client is gone: the pool is empty
    text = uswap("status", "--socket", daemon.socket).stdout
    assert re.search(r"^POOL zstd \S+ of 4M: 0 pages \(0 same-filled\) in 0B, ratio -; stores "
                     rf"{pool['stores']}, loads {pool['loads']}, rejected \d+, written back \d+, corrupted 0$",
                     text, re.M), text
    full = max(running, key=lambda p: p["stored_pages"])       # and while it held pages:
    assert re.fullmatch(rf"POOL zstd \S+ of 4M: {full['stored_pages']} pages \(0 same-filled\) in \S+, ratio "
                        r"\d\.\d\d; stores \d+, loads \d+, rejected \d+, written back \d+, corrupted 0",
                        render_pool(full, PAGE_SIZE)), render_pool(full, PAGE_SIZE)
    out = uswap("status", "--format", "prometheus", "--socket", daemon.socket)
    assert out.returncode == 0, out.stderr
    families = parse_exposition(out.stdout)
    assert sample(families, "uswap_pool_enabled", compressor="zstd") == 1
    assert sample(families, "uswap_pool_max_bytes") == 4 * MiB
    for name, key in [("uswap_pool_stores_total", "stores"), ("uswap_pool_loads_total", "loads"),
                      ("uswap_pool_written_back_total", "written_back"), ("uswap_pool_rejected_total", "rejected")]:
        assert families[name.removesuffix("_total")].type == "counter"
        assert sample(families, name) == pool[key], name        # nothing runs between the two reads
    for name in ("uswap_pool_stored_pages", "uswap_pool_compressed_bytes", "uswap_pool_charged_bytes"):
        assert families[name].type == "gauge"


# -- (b) a `uswap run` program --------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", FILLS)
def test_a_run_through_the_pool_keeps_every_word(uswapd, workload, fill):
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    daemon = pooled(uswapd)
    empty = empty_charge(daemon)
    r = subprocess.run(uswap_argv("run", "--socket", daemon.socket, "--", workload, "random", "-s", str(SIZE_MIB),
                                  "-a", "-n", "30000", "-f", fill), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "mismatches=0" in r.stdout, r.stdout + r.stderr + daemon.log()[-3000:]
    deadline = time.monotonic() + 10
    while daemon.status()["runs"]:
        assert time.monotonic() < deadline, "the daemon did not release the run"
        time.sleep(0.05)
    status = daemon.status()
    pool, d = status["pool"], status["daemon"]
    print(f"fill {fill}: {pool}")
    assert pool["stores"] > SIZE_MIB * 256 // 2 and pool["loads"] > 1000, pool
    assert pool["corrupted"] == 0 and d["read_errors"] == d["write_errors"] == 0
    assert d["slots_used"] == 0 and pool["stored_pages"] == 0 and pool["charged_bytes"] == empty, pool


# -- (c) the pool's memory within the budget, under pressure --------------------------------------------------

def test_regions_a_run_and_the_pool_stay_within_the_daemons_budget(uswapd, workload):
    """tests/test_run_shared_budget.py's load (a region and a run, 48 MiB each under 32 MiB), half-random pages,
    with a pool of 8 MiB: regions + runs + the pool's charge stay under H, as the daemon counts them and as the
    kernel does (the memfds' blocks, the run's RssAnon, plus the pool's charge), with that test's allowances
    and one more: a batch in flight, whose pages are in the pool before they leave their client (3/4 of a run's
    batch of 1,024 pages and of a region's of 64), and the pool's write-back buffer (64 pages: budget.py)."""
    need_root()
    budget_mib, size_mib = 32, 48
    b = budget_mib * 256
    h = b + b // 32
    in_flight = 3 * (1024 + 64) // 4 + 64
    daemon = pooled(uswapd, resident=f"{budget_mib}M", pool="8M")
    run = subprocess.Popen(uswap_argv("run", "--socket", daemon.socket, "--", workload, "random", "-s",
                                      str(size_mib), "-a", "-n", "30000", "-S", "5", "-f", "0.5"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    region = subprocess.Popen([workload, "random", "-s", str(size_mib), "-n", "30000", "-f", "0.5"],
                              env=daemon.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = sample_until_done(daemon, [run, region], run.pid, workload)
    finished(run)
    finished(region)                          # every word of every page verified by the workloads
    charged = [s[2]["pool"]["charged_bytes"] // PAGE_SIZE for s in samples]
    counted = max(s[0] + c for s, c in zip(samples, charged))
    kernel = max(s[1] + c for s, c in zip(samples, charged))
    print(f"budget {b} hard {h}: max counted {counted}, max kernel {kernel}, pool up to {max(charged)} pages, "
          f"{len(samples)} samples")
    assert kernel <= h + KERNEL_SLACK + in_flight, (kernel, h)
    assert counted <= h + COUNT_SLACK + in_flight, (counted, h)
    assert max(charged) >= 1024, max(charged)             # the pool did hold memory (8 MiB: 2,048 pages)
    assert counted >= b - b // 16                          # and the budget was under pressure
    # The clients paid for it: while the pool held most of its 2,048 pages, regions and runs together held
    # about B minus that (were the pool not charged, they would hold B, and the sum above would still pass
    # within its allowances).
    squeezed = [s[0] for s, c in zip(samples, charged) if c >= 1536]
    print(f"regions + runs while the pool held 1,536 pages or more: median {statistics.median(squeezed or [0])}")
    assert len(squeezed) >= 10 and statistics.median(squeezed) <= b - 1024, (len(squeezed), squeezed[:50])
    for s in samples:           # the budget's own view: the pool's pages come off the top
        d = s[2]["daemon"]
        assert d["hard_pages"] == h and d["pool_pages"] >= 0
        if d["shares"]["regions"]["clients"] and d["shares"]["runs"]["clients"]:
            fair = d["shares"]["regions"]["fair_pages"] + d["shares"]["runs"]["fair_pages"]
            assert b - d["pool_pages"] - 1 <= fair <= b - d["pool_pages"], d     # what divides evenly


# -- (d) a client's exit frees its pooled slots ---------------------------------------------------------------

def test_a_killed_client_leaves_nothing_in_the_pool(uswapd, workload):
    daemon = pooled(uswapd)
    empty = empty_charge(daemon)
    proc = subprocess.Popen([workload, "random", "-s", str(SIZE_MIB), "-n", "10000000"], env=daemon.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while daemon.status()["pool"]["stored_pages"] < SIZE_MIB * 256 // 2:
            assert proc.poll() is None and time.monotonic() < deadline, daemon.status()["pool"]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)             # mid-run, likely mid-fault
        proc.wait()
    wait_for_no_regions(daemon)
    status = daemon.status()
    pool, d = status["pool"], status["daemon"]
    assert pool["stored_pages"] == pool["same_filled_pages"] == pool["compressed_bytes"] == 0, pool
    assert pool["charged_bytes"] == empty and d["slots_used"] == 0 and d["resident_pages"] == 0, (pool, d)
    workload_in_region(workload, daemon, "0")       # and the pool serves the next client
    assert daemon.status()["pool"]["charged_bytes"] == empty


# -- (e) incompressible pages ---------------------------------------------------------------------------------

def test_incompressible_pages_are_rejected_and_still_correct(uswapd, hog):
    daemon = pooled(uswapd, resident="4M", pool="2M")
    empty = empty_charge(daemon)
    r = run_hog(hog, daemon, "-s", "16", "-p", "2", "-r", "3")
    assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    status = daemon.status()
    pool, d = status["pool"], status["daemon"]
    print(pool)
    assert pool["rejected"] >= d["pswpout"] > 0, (pool, d)     # every page the store took, the pool refused first
    assert pool["stores"] == pool["loads"] == 0 and pool["charged_bytes"] == empty, pool
    assert d["read_errors"] == d["write_errors"] == 0


# -- (f) option errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--resident", "4M", "--pool", "3M"], "--pool 3M is out of range: give 0 (off) or 4K to 2M (at most half of "
                                           "--resident 4M: the pool is paid for out of the budget, and the rest "
                                           "keeps room for pages)"),
    (["--resident", "4M", "--pool", "1K"], "--pool 1K is out of range: give 0 (off) or 4K to 2M (at most half of "
                                           "--resident 4M: the pool is paid for out of the budget, and the rest "
                                           "keeps room for pages)"),
    (["--pool-compressor", "bogus"], "--pool-compressor 'bogus': give lz4 or zstd"),
], ids=["above-half", "below-a-page", "compressor"])
def test_daemon_refuses_a_pool_it_cannot_serve_before_making_anything(capsys, tmp_path, args, message):
    assert refused_daemon(capsys, tmp_path, *args) == f"uswap daemon: error: {message}"
    assert os.listdir(tmp_path) == []
