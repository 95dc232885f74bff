"""Layer 4: the daemon with real clients, real userfaultfd, real O_DIRECT stores.

Budgets are small (4 MiB) and regions 4x larger, so every test pages for real
in a few seconds.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import HERE, build_c, run, uswap
from uswap.core import PAGE_SIZE
from uswap.protocol import OP_MAP, OP_STATUS, REQUEST, Reply, Request

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def run_hog(hog: str, daemon, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([hog, *args], capture_output=True, text=True, env=daemon.env(), timeout=timeout)


@pytest.mark.parametrize("io", ["sync", "async"])
def test_integrity_hog_four_processes_at_6x_budget(uswapd, hog, io):
    daemon = uswapd(io=io, resident="4M")
    r = run_hog(hog, daemon, "-s", "6", "-p", "4", "-r", "3")      # each alone over the budget (test_nfs's twin)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" 0 mismatches") == 4, r.stdout
    d = daemon.status()["daemon"]
    assert d["pswpout"] > 0 and d["pswpin"] > 0
    assert d["read_errors"] == d["write_errors"] == 0
    assert d["slots_used"] == 0 and d["mapped_pages"] == 0  # every region gave its slots back


def test_threads_fault_the_same_region(uswapd, hog):
    daemon = uswapd(resident="4M")
    r = run_hog(hog, daemon, "-s", "16", "-t", "4", "-r", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 mismatches" in r.stdout


def test_writer_hammering_pages_under_writeback(uswapd, hammer):
    daemon = uswapd(resident="4M", io="async")
    r = subprocess.run([hammer, "16", "8"], capture_output=True, text=True, env=daemon.env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.endswith(" 0 wrong\n")
    assert daemon.status()["daemon"]["writeback_waits"] > 0  # writes did land on pages under writeback


@pytest.mark.parametrize("io", ["sync", "async"])
def test_writer_hammering_a_tiny_budget_with_one_page_batches(uswapd, hammer, io):
    """Batch 1: every write is one page, so pages sit under writeback alone and often."""
    daemon = uswapd(resident="512K", io=io, extra=("--writeback-batch", "1"))
    assert "writeback batch 1" in daemon.log()
    r = subprocess.run([hammer, "4", "8"], capture_output=True, text=True, env=daemon.env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.endswith(" 0 wrong\n"), r.stdout
    d = daemon.status()["daemon"]
    assert d["writeback_waits"] > 0               # writes did land on pages under writeback
    assert d["write_ios"] >= d["pswpout"] > 0      # one page per write: the option took effect
    assert d["read_errors"] == d["write_errors"] == 0


def test_eight_threads_through_four_fault_threads_keep_every_word(uswapd, workload):
    """8 threads of one client write and verify random pages of one shared 16 MiB region through a 4 MiB budget,
    served by 4 fault threads: no read sees a lost write or a wrong page, every word verifies at the end, the
    fault counters add up, and every slot and page goes back when the client exits."""
    daemon = uswapd(resident="4M", extra=("--fault-threads", "4"))
    assert "readahead 32, 4 fault threads per region" in daemon.log()
    r = subprocess.run([workload, "threads", "-t", "8", "-s", "16", "-n", "40000"], capture_output=True, text=True,
                       env=daemon.env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " mismatches=0 " in r.stdout and " threads=8" in r.stdout, r.stdout
    d = daemon.status()["daemon"]
    assert d["fault_threads"] == 4
    assert d["pswpout"] > 4096 and d["pswpin"] > 4096, d        # the region paged through the budget, both ways
    assert d["faults"] == d["engine_faults"] + d["slow_path_faults"] and d["engine_faults"] > d["slow_path_faults"]
    assert d["read_errors"] == d["write_errors"] == 0
    assert d["slots_used"] == 0 and d["mapped_pages"] == 0 and d["resident_pages"] == 0, d


@pytest.mark.parametrize("mode", ["seq", "random", "zipf"])
def test_workloads_verify_every_page(uswapd, workload, mode):
    daemon = uswapd(resident="4M")
    r = subprocess.run([workload, mode, "-s", "16", "-n", "4000"], capture_output=True, text=True,
                       env=daemon.env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    fields = dict(kv.split("=") for kv in r.stdout.split())
    assert fields["mismatches"] == "0" and int(fields["faults"]) > 0
    if mode == "seq":    # a forward stream: most pages come in read ahead, before their fault
        d = daemon.status()["daemon"]
        assert d["readahead_pages"] > d["pswpin"] // 2, d


NUMPY_CLIENT = textwrap.dedent("""
    import numpy, sys, uswap
    words = int(sys.argv[1]) // 8
    with uswap.Region(words * 8) as region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
        a[:] = numpy.arange(words, dtype=numpy.uint64) * 3
        for _ in range(3):
            a[::512] += 1          # one word per page: writes to clean pages
        expect = numpy.arange(words, dtype=numpy.uint64) * 3
        expect[::512] += 3
        bad = int((a != expect).sum())
        del a
    print(f"mismatches {bad}")
""")


def test_numpy_client_larger_than_budget(uswapd):
    daemon = uswapd(resident="4M")
    r = subprocess.run([sys.executable, "-c", NUMPY_CLIENT, str(16 * MiB)], capture_output=True, text=True,
                       env=daemon.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mismatches 0"
    d = daemon.status()["daemon"]
    assert d["pswpout"] >= (16 - 4) * MiB // PAGE_SIZE


def test_numpy_example(uswapd):
    daemon = uswapd(resident="4M")
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "numpy_region.py")
    r = subprocess.run([sys.executable, example, "--size", "16M"], capture_output=True, text=True,
                       env=daemon.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "0 mismatches" in r.stdout


HOLDER = textwrap.dedent("""
    import numpy, sys, uswap
    words = int(sys.argv[1]) // 8
    region = uswap.Region(words * 8)
    a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
    a[:] = numpy.arange(words, dtype=numpy.uint64)
    print("filled", flush=True)
    sys.stdin.readline()            # the test does something to the daemon or the store
    ok = bool((a == numpy.arange(words, dtype=numpy.uint64)).all())
    print("intact" if ok else "CORRUPT", flush=True)
""")


def start_holder(daemon, size: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())
    line = proc.stdout.readline()
    if line != "filled\n":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"holder did not fill its region: {line!r} {err}")
    return proc


def finish_holder(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:  # hung: end it, so nothing outlives the test
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def corrupt_slots(store: str, first: int, count: int) -> None:
    """Flip one bit in each of the given slots, with O_DIRECT like the daemon."""
    from uswap.core import AlignedBuffer
    from uswap._core import lib
    fd = os.open(store, os.O_RDWR | os.O_DIRECT)
    try:
        buf = AlignedBuffer(count * PAGE_SIZE)
        offset = (first + 1) * PAGE_SIZE
        assert lib.uswap_pread_full(fd, buf.ptr, count * PAGE_SIZE, offset) == count * PAGE_SIZE
        for i in range(count):
            buf.view[i * PAGE_SIZE + 100] ^= 0x01
        assert lib.uswap_pwrite_full(fd, buf.ptr, count * PAGE_SIZE, offset) == count * PAGE_SIZE
    finally:
        os.close(fd)


@pytest.mark.parametrize("encrypt,message", [("on", "failed authentication (aes-256-gcm)"),
                                             ("off", "checksum mismatch in slot")])
def test_flipped_bit_on_disk_poisons_only_that_client(uswapd, hog, encrypt, message):
    """Negative control: corrupt the victim's slots behind the daemon's back."""
    daemon = uswapd(resident="4M", extra=("--encrypt", encrypt))
    victim = start_holder(daemon, 16 * MiB)       # its evicted pages fill the first slots
    used = daemon.status()["daemon"]["slots_used"]
    assert used > 0
    corrupt_slots(daemon.store, 0, used)
    bystander = run_hog(hog, daemon, "-s", "16", "-r", "2")  # slots written after the damage
    assert bystander.returncode == 0 and " 0 mismatches" in bystander.stdout, bystander.stderr
    code, out, err = finish_holder(victim)
    assert code == -signal.SIGBUS, (code, out, err)
    assert "CORRUPT" not in out and "intact" not in out  # wrong data was never handed back
    deadline = time.monotonic() + 10
    while daemon.status()["regions"] and time.monotonic() < deadline:
        time.sleep(0.05)                               # the daemon sees the victim's connection close
    d = daemon.status()["daemon"]
    assert d["read_errors"] >= 3                       # retried before giving up
    assert message in daemon.log()
    assert "poisoned" in daemon.log()
    assert d["slots_used"] == 0


@pytest.fixture(scope="module")
def badslots(tmp_path_factory):
    """tests/c/badslots.c: fills a region, then reads every page back counting SIGBUS and wrong data."""
    return build_c(tmp_path_factory, os.path.join(HERE, "c", "badslots.c"), "badslots")


@pytest.mark.parametrize("encrypt", ["on", "off"])
def test_a_stretch_of_corrupted_slots_fails_fast_with_one_line(uswapd, badslots, encrypt):
    """512 consecutive slots corrupted: each of their pages is read once more, then poisoned (SIGBUS, never
    other data) without a wait or a log line each; every other page reads back intact."""
    pages, bad = 4096, 512
    daemon = uswapd(resident="4M", extra=("--encrypt", encrypt))
    proc = subprocess.Popen([badslots, str(pages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.env())
    try:
        assert proc.stdout.readline() == "filled\n", proc.stderr.read()
        assert daemon.status()["daemon"]["slots_used"] >= 2 * bad   # the stretch lies among used slots
        corrupt_slots(daemon.store, 0, bad)
        t0 = time.monotonic()
        out, err = proc.communicate("go\n", timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.split() == ["ok", str(pages - bad), "sigbus", str(bad), "wrong", "0"], out
    d = daemon.status()["daemon"]
    errors = [line for line in daemon.log().splitlines() if " ERROR " in line]
    print(f"{bad} bad slots read back in {elapsed:.2f} s; {d['read_errors']} read errors; ERROR lines: {errors}")
    assert 1 <= len(errors) <= 3, errors                      # one per run of bad slots (and per second at most)
    assert "poisoned" in errors[0] and ("failed authentication" if encrypt == "on" else "checksum mismatch") \
        in errors[0], errors
    assert 2 * bad <= d["read_errors"] <= 3 * bad, d          # each bad slot: a read and one retry (no three)


MARKER_HOLDER = textwrap.dedent("""
    import numpy, sys, uswap
    size, text = int(sys.argv[1]), sys.argv[2].encode()
    marker = numpy.frombuffer((text * (size // len(text) + 1))[:size], dtype=numpy.uint8)
    region = uswap.Region(len(marker))
    a = numpy.frombuffer(region.buffer, dtype=numpy.uint8)
    a[:] = marker
    print("filled", flush=True)
    sys.stdin.readline()            # the test reads the store file meanwhile
    print("intact" if bool((a == marker).all()) else "CORRUPT", flush=True)
""")


@pytest.mark.parametrize("encrypt", ["on", "off"])
def test_encrypted_store_holds_no_client_data(uswapd, hog, encrypt):
    """With --encrypt on (the default) a client's data is intact and never readable in the store file;
    with it off the same marker is there (the test's own control)."""
    marker = "uswap-t4-secret-marker-0123456789abcdef-"   # 40 bytes: 4096 is no multiple, pages differ
    daemon = uswapd(resident="4M", **({} if encrypt == "on" else {"extra": ("--encrypt", "off")}))
    assert daemon.status()["encryption"] == ("aes-256-gcm" if encrypt == "on" else "off")
    holder = subprocess.Popen([sys.executable, "-c", MARKER_HOLDER, str(16 * MiB), marker], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())
    try:
        assert holder.stdout.readline() == "filled\n", holder.stderr.read()
        assert daemon.status()["daemon"]["pswpout"] >= 8 * MiB // PAGE_SIZE   # most of it is in the store
        with open(daemon.store, "rb") as f:
            found = marker.encode() in f.read()
        code, out, err = finish_holder(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert (code, out) == (0, "intact\n"), err
    assert found == (encrypt == "off")
    if encrypt == "on":   # the xorshift integrity hog, on top, through the same sealed slots
        r = run_hog(hog, daemon, "-s", "8", "-p", "2", "-r", "2")
        assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    d = daemon.status()["daemon"]
    assert d["read_errors"] == d["write_errors"] == 0


def test_store_write_errors_keep_pages_resident(loopfs, uswapd):  # loopfs first: torn down last
    """The kernel's policy on a failed swap write: the page stays, dirty; nothing is lost."""
    mnt = loopfs.make("ext4", size="64M", mkfs_args=("-q", "-F", "-b", "4096"))
    daemon = uswapd(store=os.path.join(mnt, "store"), store_size="32M", resident="4M")
    run("xfs_io", "-x", "-c", "shutdown", mnt)        # every I/O on this fs now fails with EIO
    r = subprocess.run([sys.executable, "-c", NUMPY_CLIENT, str(16 * MiB)], capture_output=True, text=True,
                       env=daemon.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "mismatches 0"
    d = daemon.status()["daemon"]
    assert d["write_errors"] > 0 and d["pswpout"] == 0
    assert "errno 5" in daemon.log() and "writeback" in daemon.log()


def test_status_reports_a_failing_store(loopfs, uswapd):
    mnt = loopfs.make("ext4", size="64M", mkfs_args=("-q", "-F", "-b", "4096"))
    daemon = uswapd(store=os.path.join(mnt, "store"), store_size="32M", resident="4M")
    run("xfs_io", "-x", "-c", "shutdown", mnt)
    holder = start_holder(daemon, 16 * MiB)
    try:
        status = daemon.status()
        assert status["daemon"]["store_health"].startswith("writeback failed: errno 5")
        assert status["regions"][0]["write_errors"] > 0
        assert status["daemon"]["resident_pages"] >= 16 * MiB // PAGE_SIZE  # all kept
        text = uswap("status", "--socket", daemon.socket).stdout
        assert "writeback failed" in text and "REGION" in text
    finally:
        code, out, _ = finish_holder(holder)
    assert (code, out) == (0, "intact\n")


def wait_for_no_regions(daemon, timeout: float = 10) -> None:
    """Until the daemon has seen every client's connection close."""
    deadline = time.monotonic() + timeout
    while daemon.status()["regions"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_store_read_errors_give_sigbus_to_the_toucher_only(loopfs, uswapd):  # loopfs first: torn down last
    """Injected read errors (the store's filesystem shut down under the daemon): the client whose pages
    are in the store dies of SIGBUS at the first one it touches, never sees zeros or finishes its verify;
    the daemon keeps serving, and a client that starts afterwards keeps its data."""
    mnt = loopfs.make("ext4", size="64M", mkfs_args=("-q", "-F", "-b", "4096"))
    daemon = uswapd(store=os.path.join(mnt, "store"), store_size="32M", resident="4M")
    holder = start_holder(daemon, 16 * MiB)
    try:
        assert daemon.status()["regions"][0]["swapped_pages"] >= 8 * MiB // PAGE_SIZE
        run("xfs_io", "-x", "-c", "shutdown", mnt)     # every read of a slot now fails with EIO
    finally:
        code, out, err = finish_holder(holder)
    assert code == -signal.SIGBUS, (code, out, err)
    assert out == ""                                   # neither "intact" nor "CORRUPT": no page came back
    assert daemon.answers()
    wait_for_no_regions(daemon)
    d = daemon.status()["daemon"]
    assert d["read_errors"] >= 3                       # retried before giving up
    log = daemon.log()
    assert "failed, attempt 1: [Errno 5]" in log and "poisoned" in log
    # Writes fail too now, so the next client gets a region it can keep resident.
    r = subprocess.run([sys.executable, "-c", NUMPY_CLIENT, str(2 * MiB)], capture_output=True, text=True,
                       env=daemon.env(), timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "mismatches 0"), r.stderr
    assert daemon.status()["daemon"]["pid"] == daemon.proc.pid


def test_client_sigkill_frees_its_slots(uswapd, hog):
    daemon = uswapd(resident="4M")
    proc = subprocess.Popen([hog, "-s", "16", "-r", "50"], env=daemon.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while daemon.status()["daemon"]["pswpout"] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status()["daemon"]["slots_used"] > 0
    finally:
        proc.kill()                                    # mid-run, likely mid-fault
        proc.wait()
    deadline = time.monotonic() + 10
    while daemon.status()["regions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    d = daemon.status()
    assert d["regions"] == []
    assert d["daemon"]["slots_used"] == 0 and d["daemon"]["resident_pages"] == 0
    assert d["daemon"]["mapped_pages"] == 0
    r = run_hog(hog, daemon, "-s", "16", "-r", "1")    # and the daemon still serves
    assert r.returncode == 0


def daemon_fds(daemon) -> list[str]:
    """What the daemon's fds are (sorted), so a leak says what leaked."""
    fds = f"/proc/{daemon.proc.pid}/fd"
    out = []
    for fd in os.listdir(fds):
        try:
            out.append(os.readlink(os.path.join(fds, fd)).split("[")[0])
        except FileNotFoundError:
            pass
    return sorted(out)


def test_a_hundred_clients_killed_mid_fault_leave_nothing(uswapd, hog):
    """Engines serving faults while their clients die: every slot, region and fd comes back."""
    daemon = uswapd(resident="8M", store_size="128M")
    time.sleep(0.5)                                    # the launcher's readiness probe has hung up
    start_fds = daemon_fds(daemon)
    for _ in range(5):
        procs = [subprocess.Popen([hog, "-s", "1", "-t", "2", "-r", "1000000"], env=daemon.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(20)]
        try:
            deadline = time.monotonic() + 30
            while len(daemon.status()["regions"]) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)                                # all swapping now: 20 MiB through 8 MiB
        finally:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
    deadline = time.monotonic() + 30
    while daemon.status()["regions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    d = daemon.status()["daemon"]
    assert d["pswpout"] > 0 and d["engine_faults"] > 0
    assert (d["slots_used"], d["mapped_pages"], d["resident_pages"]) == (0, 0, 0)
    while daemon_fds(daemon) != start_fds and time.monotonic() < deadline:
        time.sleep(0.05)                               # the last connections are closing
    assert daemon_fds(daemon) == start_fds
    r = run_hog(hog, daemon, "-s", "16", "-r", "1")     # and it still serves
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout + r.stderr


def test_daemon_sigkill_makes_clients_fail_loudly(uswapd):
    daemon = uswapd(resident="4M")
    holder = start_holder(daemon, 16 * MiB)
    daemon.stop(signal.SIGKILL)
    code, out, err = finish_holder(holder)
    assert code == -signal.SIGBUS, (code, out, err)    # evicted pages: SIGBUS, never zeros
    assert "lost the daemon" in err
    assert out == ""


def test_daemon_sigterm_gives_every_page_back(uswapd):
    daemon = uswapd(resident="4M")
    holder = start_holder(daemon, 16 * MiB)
    assert daemon.status()["regions"][0]["swapped_pages"] > 0
    assert daemon.stop(signal.SIGTERM) == 0
    code, out, err = finish_holder(holder)
    assert (code, out) == (0, "intact\n"), err
    assert "read back" in daemon.log()


def start_swapping(daemon, commands: list[list[str]]) -> list[subprocess.Popen]:
    """A client per command, returned once the daemon has both written and read a good part
    of their pages since they all mapped (its engines are mid-I/O from then on)."""
    procs = [subprocess.Popen(cmd, env=daemon.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    try:
        deadline = time.monotonic() + 30
        while len(daemon.status()["regions"]) < len(procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        d = daemon.status()["daemon"]
        start_in, start_out = d["pswpin"], d["pswpout"]
        while time.monotonic() < deadline:
            d = daemon.status()["daemon"]
            if d["pswpin"] - start_in > 1000 and d["pswpout"] - start_out > 1000:
                break
            time.sleep(0.02)
        assert d["pswpin"] - start_in > 1000 and d["pswpout"] - start_out > 1000, d
        assert [p.poll() for p in procs] == [None] * len(procs)    # all still paging
    except BaseException:
        end_clients(procs)
        raise
    return procs


def end_clients(procs: list[subprocess.Popen], timeout: float = 30) -> list[tuple[int, str, str]]:
    """Each client's (exit code, stdout, stderr); one still running at the deadline is killed (code -9)."""
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


# Writes a word of every page and checks every word of the region, pass after pass, until it dies:
# a page handed back wrong (zeros where data was) is reported at once, as CORRUPT.
CHECKER = textwrap.dedent("""
    import numpy, sys, uswap
    words = int(sys.argv[1]) // 8
    region = uswap.Region(words * 8)
    a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
    expect = numpy.arange(words, dtype=numpy.uint64)
    a[:] = expect
    for n in range(int(sys.argv[2])):
        a[::512] += 1
        expect[::512] += 1
        if not (a == expect).all():
            print(f"CORRUPT after {n} passes: {int((a != expect).sum())} words", flush=True)
            sys.exit(3)
    print("intact", flush=True)
""")


def test_daemon_sigkill_while_engines_swap(uswapd, hog):
    """Clients paging hard when the daemon dies: each dies of SIGBUS at a page the daemon held (or
    exits with an error), and none reports a mismatch or gets wrong data."""
    daemon = uswapd(resident="4M", store_size="128M")
    procs = start_swapping(daemon, [[hog, "-s", "8", "-t", "2", "-r", "100000"]] * 2      # hours at this budget
                           + [[sys.executable, "-c", CHECKER, str(8 * MiB), "100000"]])
    daemon.stop(signal.SIGKILL)
    results = end_clients(procs, timeout=20)
    for code, out, err in results:
        assert "mismatches" not in out and "CORRUPT" not in out and "intact" not in out, results
        assert code == -signal.SIGBUS or (code > 0 and err), results
        assert "lost the daemon" in err, results
    assert any(code == -signal.SIGBUS for code, _, _ in results), results


def test_daemon_sigterm_while_engines_swap(uswapd, hog):
    """swapoff with engines running: the daemon stops them, reads every page back and exits 0;
    the clients go on in plain shared memory and verify every word."""
    daemon = uswapd(resident="4M", store_size="128M")
    procs = start_swapping(daemon, [[hog, "-s", "8", "-t", "2", "-r", "200"]] * 2
                           + [[sys.executable, "-c", CHECKER, str(8 * MiB), "200"]])
    try:
        swapped = sum(r["swapped_pages"] for r in daemon.status()["regions"])
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        results = end_clients(procs)
    assert swapped > 0
    assert [(code, out.count(" 0 mismatches") + out.count("intact")) for code, out, _ in results] == [(0, 1)] * 3, \
        results
    assert daemon.log().count("page(s) read back") == 3
    assert "could not be read back" not in daemon.log()


# What a new user writes: the array outlives the with block.  Closing under it once unmapped the region
# and the print below segfaulted; close now refuses (BufferError, as mmap's) and nothing is unmapped.
VIEW_OUTLIVES_REGION = textwrap.dedent("""
    import numpy, uswap
    with uswap.Region(1 << 20) as region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
        a[:] = 7
    print(int(a.sum()))
""")

# Close works once the views are gone; an exception leaving a with block is not masked, and that
# region goes with its last view.
VIEWS_RELEASED = textwrap.dedent("""
    import os, numpy, uswap
    from uswap.daemon.status import fetch_status
    def mine():
        return sum(r["pid"] == os.getpid() for r in fetch_status()["regions"])
    region = uswap.Region(1 << 20)
    tail = memoryview(region.buffer)[8:]
    a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
    a[:] = 7
    for holder in ("a", "tail"):
        try:
            region.close()
        except BufferError as e:
            print("refused:", e)
        print("regions", mine(), "sum", int(numpy.frombuffer(region.buffer, dtype=numpy.uint64).sum()))
        exec(f"del {holder}")
    region.close()
    print("closed: regions", mine())
    try:
        region.buffer
    except ValueError as e:
        print(e)
    try:
        with uswap.Region(1 << 20) as other:
            b = numpy.frombuffer(other.buffer, dtype=numpy.uint8)
            raise KeyError("the body's error")
    except KeyError as e:
        print("raised:", e)
    print("while b lives: regions", mine(), "byte", int(b[4095]))
    del b
    print("after del b: regions", mine())
""")


def test_a_view_outliving_its_region_gets_an_error_not_a_segfault(uswapd):
    daemon = uswapd(resident="4M")
    r = subprocess.run([sys.executable, "-c", VIEW_OUTLIVES_REGION], capture_output=True, text=True,
                       env=daemon.env(), timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)        # -SIGSEGV when close unmapped under the array
    assert r.stdout == ""
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("BufferError: cannot close the uswap region at 0x"), r.stderr
    assert last.endswith(": 1 reference(s) to its buffer remain (NumPy arrays or memoryviews over region.buffer): "
                         "delete them (del a) before the region closes"), r.stderr


def test_a_region_closes_once_its_views_are_released(uswapd):
    daemon = uswapd(resident="4M")
    r = subprocess.run([sys.executable, "-c", VIEWS_RELEASED], capture_output=True, text=True,
                       env=daemon.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9, r.stdout
    assert lines[0].startswith("refused: cannot close") and "2 reference(s)" in lines[0]   # the array, the slice
    assert lines[1] == f"regions 1 sum {7 * (1 << 17)}"                                     # nothing was released
    assert lines[2].startswith("refused: cannot close") and "1 reference(s)" in lines[2]   # the slice alone
    assert lines[3] == f"regions 1 sum {7 * (1 << 17)}"
    assert lines[4:] == ["closed: regions 0", "region is closed", "raised: \"the body's error\"",
                         "while b lives: regions 1 byte 0", "after del b: regions 0"]
    assert daemon.answers()


def test_fork_child_does_not_inherit_regions(uswapd):
    daemon = uswapd(resident="4M")
    script = textwrap.dedent("""
        import ctypes, os, uswap
        region = uswap.Region(1 << 20)
        region.buffer[0:5] = b"hello"
        pid = os.fork()
        if pid == 0:
            ctypes.string_at(region.address, 5)  # not mapped in the child (MADV_DONTFORK)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), bytes(region.buffer[0:5]).decode())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=daemon.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(-signal.SIGSEGV), "hello"]


# -- bad input ------------------------------------------------------------------------

def map_in_client(daemon, length: int) -> subprocess.CompletedProcess:
    script = f"import uswap\ntry:\n    uswap.Region({length})\nexcept OSError as e:\n    print(e.errno, e.strerror)\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=daemon.env(),
                          timeout=60)


@pytest.mark.parametrize("length,err,text", [
    (0, errno.EINVAL, "length 0 is not a positive multiple of the page size"),
    (PAGE_SIZE + 1, errno.EINVAL, "is not a positive multiple of the page size"),
    (1 << 40, errno.ENOMEM, "does not fit: the store has room for"),
])
def test_bad_lengths_get_clear_errors(uswapd, length, err, text):
    daemon = uswapd()
    r = map_in_client(daemon, length)
    errno_text, _, message = r.stdout.strip().partition(" ")
    assert int(errno_text) == err, r.stdout + r.stderr
    assert text in message


def test_no_daemon(tmp_path):
    script = f"import uswap\ntry:\n    uswap.Region(4096, socket={str(tmp_path / 'none.sock')!r})\n" \
             f"except OSError as e:\n    print(e.errno, e.strerror)\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith(f"{errno.ENOENT} cannot reach the uswap daemon at")


def raw_request(daemon, packet: bytes, fds=()) -> Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(daemon.socket)
        if fds:
            s.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            s.send(packet)
        return Reply.unpack(s.recv(65536))


@pytest.mark.parametrize("packet,err,text", [
    (b"garbage", errno.EPROTO, "request of 7 bytes"),
    (b"X" * REQUEST.size, errno.EPROTO, "bad magic"),
    (REQUEST.pack(b"USWP", 9, OP_STATUS, 0, 0, 0), errno.EPROTONOSUPPORT, "protocol version 9 not supported"),
    (REQUEST.pack(b"USWP", 1, 77, 0, 0, 0), errno.EOPNOTSUPP, "unknown operation 77"),
    (Request(OP_MAP, 0x10000, PAGE_SIZE).pack(), errno.EINVAL, "MAP takes 2 file descriptors, got 0"),
])
def test_garbage_on_the_socket(uswapd, packet, err, text):
    daemon = uswapd()
    reply = raw_request(daemon, packet)
    assert reply.status == err and text in reply.text
    assert daemon.status()["regions"] == []            # and it keeps serving


def test_wrong_descriptors_are_refused(uswapd):
    daemon = uswapd()
    r, w = os.pipe()
    memfd = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, PAGE_SIZE)
    try:
        reply = raw_request(daemon, Request(OP_MAP, 0x10000, PAGE_SIZE).pack(), [r, w])
        assert reply.status == errno.EBADF and "not a userfaultfd" in reply.text
        from uswap.uffd import Userfaultfd
        with Userfaultfd.open() as fd:
            reply = raw_request(daemon, Request(OP_MAP, 0x10000, PAGE_SIZE).pack(), [fd.fd, w])
            assert reply.status == errno.EBADF and "not a memfd" in reply.text
            reply = raw_request(daemon, Request(OP_MAP, 0x10000, PAGE_SIZE).pack(), [fd.fd, memfd])
            assert reply.status == errno.EINVAL and "the memfd is not what pid" in reply.text  # nothing mapped
    finally:
        for fd in (r, w, memfd):
            os.close(fd)
    assert daemon.status()["regions"] == []


def test_socket_and_store_in_use(uswapd, tmp_path):
    daemon = uswapd()
    other = tmp_path / "other.store"
    assert uswap("mkswap", str(other), "--size", "1M").returncode == 0
    second = subprocess.run([sys.executable, "-m", "uswap", "daemon", "--store", str(other),
                             "--socket", daemon.socket], capture_output=True, text=True, timeout=60)
    # the whole of stderr: raised inside the daemon's nursery, the error must not arrive as a group's traceback
    assert (second.returncode, second.stderr) == \
        (1, f"uswap daemon: error: {daemon.socket}: another uswap daemon is listening here\n")
    third = subprocess.run([sys.executable, "-m", "uswap", "daemon", "--store", daemon.store,
                            "--socket", str(tmp_path / "third.sock")], capture_output=True, text=True, timeout=60)
    assert third.returncode == 1
    assert f"store is in use by PID {daemon.proc.pid}" in third.stderr
    assert daemon.answers()


def test_status_json_keys(uswapd, hog):
    daemon = uswapd()
    assert run_hog(hog, daemon, "-s", "16", "-r", "1").returncode == 0
    out = uswap("status", "--socket", daemon.socket, "--json")
    import json
    status = json.loads(out.stdout)
    assert {"pid", "store", "store_health", "io", "budget_pages", "resident_pages", "writeback_pages",
            "slots_total", "slots_used", "pswpin", "pswpout", "read_errors", "write_errors"} <= set(status["daemon"])
    assert status["daemon"]["pswpin"] > 0 and status["daemon"]["pswpout"] > 0
    text = uswap("status", "--socket", daemon.socket).stdout
    assert text.splitlines()[0].split()[:3] == ["STORE", "SIZE", "USED"]


def test_demo_main_job(tmp_path):
    """The README's main job, on a small store of its own."""
    store = tmp_path / "store"
    assert uswap("mkswap", str(store), "--size", "64M").returncode == 0
    r = subprocess.run([sys.executable, "-m", "uswap", "demo", "--store", str(store), "--resident", "4M"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "16M through a 4M budget" in r.stdout and "0 mismatches" in r.stdout
    assert "verify   100%" in r.stderr
    assert not os.path.exists(str(store) + ".sock")


@pytest.mark.soak
@pytest.mark.parametrize("io", ["sync", "async"])
def test_soak_hog_eight_times_the_budget(uswapd, hog, io):
    """Longer: 4 processes x 32 MiB through 16 MiB, 10 rounds (pytest -m soak)."""
    daemon = uswapd(io=io, resident="16M", store_size="256M")
    r = run_hog(hog, daemon, "-s", "32", "-p", "4", "-r", "10", "-t", "2", timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" 0 mismatches") == 4
    d = daemon.status()["daemon"]
    assert d["slots_used"] == 0 and d["read_errors"] == d["write_errors"] == 0


def test_stopping_and_continuing_the_daemon_loses_no_read(uswapd, workload):
    """SIGSTOP (a debugger or py-spy attaching, a cgroup freezer) interrupts a fault thread waiting on its
    io_uring with EINTR while its reads are in flight.  Waiting again is the only correct answer: a thread
    that gave up left reads landing in its buffer under the next fault's window, whose check then failed
    (seen: thousands of EBADMSG from the engine while py-spy sampled the daemon)."""
    daemon = uswapd(resident="4M", readahead=32)
    proc = subprocess.Popen([workload, "random", "-s", "32", "-n", "40000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=daemon.env())
    stops = 0
    try:
        while proc.poll() is None:
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            time.sleep(0.0005)
            os.kill(daemon.proc.pid, signal.SIGCONT)
            stops += 1
            time.sleep(0.002)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    fields = dict(kv.split("=") for kv in out.split())
    assert fields["mismatches"] == "0" and int(fields["faults"]) > 1000, out
    d = daemon.status()["daemon"]
    assert stops > 100 and d["pswpin"] > 4096, (stops, d)
    assert d["read_errors"] == 0, d      # the engine's reads all verified: none was cut short by a stop
