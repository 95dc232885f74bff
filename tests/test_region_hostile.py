"""Layer 8: hostile clients.  The daemon's socket is open to a group of users; whatever one of them sends,
the daemon stays up, every other client keeps its data, and it holds no fd it was handed afterwards.

Each test is one finding of the review, reproduced with tests/rogue.py: protocol attacks come from
another uid (65534, in the daemon's --group 64000, through a socket directory others may traverse);
memfd attacks from root clients (they need a real userfaultfd).  Every test runs a well-behaved root
client next to the attack (``Arena``): an 8 MiB numpy region filled before the attack and verified
after a round of the integrity hog has pushed every region's pages through reclaim; then the daemon
must be alive, with the fds it had before the attack and no traceback in its log.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import need, need_root
from rogue import RogueProcess
from test_region_daemon import HOLDER
from uswap.core import PAGE_SIZE
from uswap.protocol import OP_MAP, OP_STATUS, OP_UNMAP

pytestmark = pytest.mark.kernel

MiB = 1 << 20
GROUP = 64000
NOBODY = {"uid": 65534, "gid": 65534, "groups": (GROUP,)}
# What a refused MAP may answer (the texts are asserted separately).
MAP_REFUSED = ("EINVAL", "EBADF", "EACCES", "EPERM", "EBUSY")
UNHANDLED_FEATURES = ("EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "SIGBUS")


@pytest.fixture
def socket_dir():
    """A directory others may traverse but not list or write (pytest's tmp_path is 0700)."""
    need_root()
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    path = tempfile.mkdtemp(prefix="uswap-hostile-", dir="/tmp")
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fd_kinds(targets: list[str]) -> collections.Counter:
    """socket:[123] -> socket, /memfd:uswap (deleted) -> /memfd:uswap: kinds to compare, not inodes."""
    return collections.Counter(re.sub(r":\[\d+\]$", "", t).removesuffix(" (deleted)") for t in targets)


def settled_fds(daemon, *, quiet: float = 0.3, timeout: float = 5) -> collections.Counter:
    """The daemon's fd kinds once they stop changing (a connection it is closing is not part of them)."""
    last, since = None, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        now = fd_kinds(daemon.open_fds())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.05)
    return last


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Arena:
    """A daemon under attack, with a well-behaved client whose data must come through it intact."""

    def __init__(self, daemon, hog, workdir):
        self.daemon = daemon
        self.hog = hog
        self.workdir = workdir
        self.rogues: list[RogueProcess] = []
        self.fds_before = settled_fds(daemon)
        self.holder = self._start_holder(8 * MiB)

    def _start_holder(self, size: int, timeout: float = 60) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(size)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.daemon.env())
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if line != "filled\n":
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"the holder did not fill its region: {line!r} {err}\n{tail(self.daemon.log())}")
        return proc

    def rogue(self, *, nobody: bool = True, prefix=()) -> RogueProcess:
        r = RogueProcess(self.daemon.socket, **(NOBODY if nobody else {}), prefix=prefix,
                         log_path=str(self.workdir / f"rogue{len(self.rogues)}.err"))
        self.rogues.append(r)
        if nobody:
            who = r.call("whoami")
            assert (who["uid"], who["groups"]) == (65534, [GROUP]), who
        return r

    def alive(self, when: str) -> None:
        """The daemon answers a STATUS (a round trip: a daemon on its way out fails it)."""
        try:
            self.daemon.status()
        except OSError as e:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.proc.wait(5)
            raise AssertionError(f"the daemon does not answer {when} ({e}; exit status "
                                 f"{self.daemon.proc.returncode}):\n{tail(self.daemon.log())}") from None
        assert self.daemon.proc.poll() is None, \
            f"the daemon died {when} (exit {self.daemon.proc.returncode}):\n{tail(self.daemon.log())}"

    def hog_round(self, size_mib: int = 8, timeout: float = 60) -> None:
        """Pressure: the integrity hog pushes every region's pages through reclaim (4 MiB budget)."""
        try:
            r = subprocess.run([self.hog, "-s", str(size_mib), "-r", "1"], capture_output=True, text=True,
                               env=self.daemon.env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            self.alive("while the hog ran")
            raise AssertionError(f"the hog did not finish in {timeout}s:\n{tail(self.daemon.log())}") from None
        self.alive("while the hog ran")
        assert r.returncode == 0 and " 0 mismatches" in r.stdout, (r.stdout, r.stderr, tail(self.daemon.log()))

    def finish(self) -> None:
        """The attack is over: the daemon is up, the others' data is intact, the rogues' fds are gone."""
        self.alive("during the attack")
        self.hog_round()
        try:
            out, err = self.holder.communicate("go\n", timeout=120)
        finally:
            if self.holder.poll() is None:
                self.holder.kill()
                self.holder.communicate()
        assert (self.holder.returncode, out) == (0, "intact\n"), \
            (self.holder.returncode, out, err, tail(self.daemon.log()))
        self.alive("after the attack")
        for r in self.rogues:
            r.close()
        self.assert_fds_back()
        assert "Traceback" not in self.daemon.log(), self.daemon.log()

    def assert_fds_back(self, timeout: float = 10) -> None:
        before = self.fds_before
        deadline = time.monotonic() + timeout
        while True:
            now = fd_kinds(self.daemon.open_fds())
            if now == before or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert now == before, (f"the daemon's fds: {sum(before.values())} before the attack, "
                               f"{sum(now.values())} after; extra {dict(now - before)}, missing {dict(before - now)}")

    def close(self) -> None:
        for r in self.rogues:
            r.close()
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.communicate()


@pytest.fixture
def arena(socket_dir, uswapd, hog, tmp_path):   # socket_dir first: removed after the daemon stops
    """Factory: a daemon (socket group 64000, 4 MiB budget) with extra options, and its Arena."""
    made: list[Arena] = []

    def start(*extra: str, prefix=(), store_size: str = "64M") -> Arena:
        daemon = uswapd(socket_dir=socket_dir, resident="4M", store_size=store_size, prefix=prefix,
                        extra=("--group", str(GROUP), *extra))
        made.append(Arena(daemon, hog, tmp_path))
        return made[-1]
    yield start
    for a in made:
        a.close()


def refused(result: dict) -> tuple[str, str]:
    reply = result.get("reply") or {}
    return reply.get("errno", result.get("first")), reply.get("text", "")


# -- 1. one message must not kill the daemon -------------------------------------------------------

def test_more_fds_than_the_op_takes_end_only_that_connection(arena):
    """5 fds on STATUS overflowed the daemon's 4-fd control buffer (MSG_CTRUNC) and ended the daemon."""
    a = arena()
    rogue = a.rogue()
    cases = {
        "STATUS+5": dict(op=OP_STATUS, fds=["devnull", "pipe", "eventfd", "memfd", "socket"]),
        "STATUS+8": dict(op=OP_STATUS, fds=["uffd", "memfd_ro", "tmpfs", "file", "epoll", "dir", "pipe", "socket"]),
        "STATUS+1": dict(op=OP_STATUS, fds=["memfd"]),
        "UNMAP+1": dict(op=OP_UNMAP, fds=["pipe"]),
        "MAP+3": dict(op=OP_MAP, a=0x10000, b=PAGE_SIZE, fds=["uffd", "memfd", "memfd"]),
    }
    results = {}
    for name, case in cases.items():
        results[name] = rogue.call("packet", **case)
        a.alive(f"after {name}")
    a.finish()
    for name, r in results.items():
        assert r["reply"] is not None and r["reply"]["errno"] in ("EPROTO", "EINVAL"), (name, r)
        assert r["reply"]["text"] and "\n" not in r["reply"]["text"], (name, r)
        assert r["closed"], (name, "the daemon kept the connection open", r)


def test_fds_sent_with_status_requests_are_closed(arena):
    """Two /dev/null fds on each of 200 STATUS requests: each is refused, and the daemon closes every one
    (in its closing threads: a trio call there that raised TypeError left 400 of them open until restart)."""
    a = arena()
    rogue = a.rogue()
    before = settled_fds(a.daemon)
    results = [rogue.call("packet", op=OP_STATUS, fds=["devnull", "devnull"]) for _ in range(200)]
    after = settled_fds(a.daemon)
    assert after == before, (f"the daemon's fds: {sum(before.values())} before 200 requests, "
                             f"{sum(after.values())} after; extra {dict(after - before)}")
    for r in results:
        assert (refused(r), r["closed"]) == (("EINVAL", "STATUS takes 0 file descriptors, got 2"), True), r
    a.finish()


def test_oversized_packets_end_only_that_connection(arena):
    """A packet over 1 MiB (MSG_TRUNC) ended the daemon; anything but one 32-byte request is refused."""
    a = arena()
    rogue = a.rogue()
    results = {}
    for size in (33, 4096, MiB + 1, 2 * MiB):
        results[size] = rogue.call("packet", op=OP_STATUS, size=size)
        a.alive(f"after a packet of {size} bytes")
    results[0] = rogue.call("packet", data_hex="")   # an empty packet: EOF for the daemon, nothing else
    a.finish()
    for size, r in results.items():
        assert "send_error" not in r, (size, r)
        if size == 0:
            assert r["reply"] is None and r["closed"], r
            continue
        assert r["reply"] is not None and r["reply"]["errno"] in ("EPROTO", "EINVAL"), (size, r)
        assert r["closed"], (size, "the daemon kept the connection open", r)


def test_a_reset_connection_is_an_ordinary_hangup(arena):
    """A client that closes with a reply unread resets the connection: the daemon's next receive fails with
    ECONNRESET.  That is a hangup like EOF, not an error with a traceback (found by the fuzzer)."""
    a = arena()
    rogue = a.rogue()
    results = [rogue.call("packet", op=op, unread=True) for op in (OP_STATUS, 77, OP_UNMAP)]
    a.finish()                                       # no traceback, no ERROR line, no fd left
    assert all(r["reply_arrived"] for r in results), results
    assert " ERROR " not in a.daemon.log(), tail(a.daemon.log())


# -- 2. a client's own memfd must not kill the daemon ------------------------------------------------

def test_read_only_memfd_is_refused(arena):
    """A read-only fd of the mapped memfd passed every check; the first punch (EBADF) ended the daemon."""
    a = arena()
    rogue = a.rogue(nobody=False)
    r = rogue.call("map", length=8 * MiB, memfd="ro")
    if r["reply"] and r["reply"]["status"] == 0:
        rogue.call("touch", length=8 * MiB)           # twice the budget: reclaim must punch its pages
    a.finish()
    err, text = refused(r)
    assert err in MAP_REFUSED and "read-write" in text and "\n" not in text, r


def test_memfd_without_sealing_is_refused(arena):
    """A memfd made without MFD_ALLOW_SEALING cannot be sealed against resizing: refused, naming the flag."""
    a = arena()
    rogue = a.rogue(nobody=False)
    r = rogue.call("map", length=MiB, memfd="noseal")
    a.finish()
    err, text = refused(r)
    assert err in MAP_REFUSED and "MFD_ALLOW_SEALING" in text, r


def test_ftruncate_after_map_is_refused_by_seals(arena):
    """Shrinking the memfd after MAP made the daemon's reads short, which ended it.  The daemon now seals
    the memfd (SHRINK|GROW|SEAL) at MAP: the client's ftruncate fails with EPERM."""
    a = arena()
    rogue = a.rogue(nobody=False)
    r = rogue.call("map", length=2 * MiB)
    assert r["reply"]["status"] == 0, r
    rogue.call("touch", length=2 * MiB)               # resident; the hog's round will reclaim them
    seals = rogue.call("seals")
    grow = rogue.call("ftruncate", size=64 * MiB)
    shrink = rogue.call("ftruncate", size=0)         # last: the daemon's reads of the region come up short
    a.finish()
    assert seals["shrink"] and seals["grow"] and seals["seal"], seals
    assert shrink["errno"] == "EPERM" and grow["errno"] == "EPERM", (shrink, grow)


@pytest.mark.parametrize("memfd", ["other", "other_sealed"])
def test_memfd_that_is_not_the_mapped_one_is_refused(arena, memfd):
    """Another memfd of the right length passed; a write-sealed one made the punch fail (EPERM), which
    ended the daemon.  The daemon checks /proc/PID/maps: the memfd must be what is mapped there."""
    a = arena()
    rogue = a.rogue(nobody=False)
    r = rogue.call("map", length=8 * MiB, memfd=memfd)
    if r["reply"] and r["reply"]["status"] == 0:
        rogue.call("touch", length=8 * MiB)
    a.finish()
    err, text = refused(r)
    assert err in MAP_REFUSED and text and "\n" not in text, r


def test_fake_memfd_from_a_private_mount_namespace_is_refused(arena):
    """A tmpfs file named memfd:x on a detached mount in a private mount namespace: its /proc link reads
    "/memfd:x", which passed the old name check."""
    need(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    a = arena()
    rogue = a.rogue(nobody=False, prefix=("unshare", "--mount", "--propagation", "private"))
    assert rogue.call("whoami")["private_mount_ns"]
    r = rogue.call("map", length=8 * MiB, memfd="fake")
    assert r["memfd_link"].startswith("/memfd:x"), r    # control: the forgery reads like a memfd
    if r["reply"] and r["reply"]["status"] == 0:
        rogue.call("touch", length=8 * MiB)
    a.finish()
    err, text = refused(r)
    assert err in MAP_REFUSED and text and "\n" not in text, r


def test_uffd_or_memfd_of_another_region_is_refused(arena):
    """One uffd or one memfd serves one region: a second MAP with either is refused."""
    a = arena()
    rogue = a.rogue(nobody=False)
    first = rogue.call("map", name="a", length=MiB, keep_uffd=True)
    assert first["reply"]["status"] == 0, first
    same_uffd = rogue.call("map", name="b", length=MiB, send_uffd_of="a")
    same_memfd = rogue.call("map", name="c", length=MiB, backing_of="a")
    a.finish()
    for r in (same_uffd, same_memfd):
        err, text = refused(r)
        assert err in MAP_REFUSED and text, r


# -- 3. fd exhaustion must not kill the daemon ----------------------------------------------------------

def test_idle_connections_past_the_per_user_limit(arena):
    """200 connections that never send, against a daemon with 128 fds: EMFILE from accept() ended it.
    Now one uid holds at most --user-max-connections (64): the rest get EDQUOT once and are closed."""
    need(shutil.which("prlimit") is not None, "prlimit (util-linux) is not installed")
    a = arena(prefix=("prlimit", "--nofile=128:128"))
    rogue = a.rogue()
    made = rogue.call("connect", n=200, seconds=20)
    seen = rogue.call("idle_results", seconds=3)
    a.alive("after 200 idle connections")
    a.hog_round()                                    # a root client still gets in, with the 64 still open
    rogue.call("close_idle")
    a.finish()
    assert made["connected"] == 200, made
    assert seen["open"] == 64, seen
    assert seen["replies"] == {"EDQUOT": 136} and seen["closed"] == 136, seen
    assert all("--user-max-connections" in t for t in seen["texts"]), seen


def test_accept_out_of_fds_backs_off(arena):
    """Root is not limited: its 200 idle connections run the daemon out of fds (128).  accept() failing
    with EMFILE waits and retries; --map-timeout 1 closes the idle ones, and every one gets its EOF."""
    need(shutil.which("prlimit") is not None, "prlimit (util-linux) is not installed")
    a = arena("--map-timeout", "1", prefix=("prlimit", "--nofile=128:128"))
    rogue = a.rogue(nobody=False)
    made = rogue.call("connect", n=200, seconds=30)
    seen = rogue.call("idle_results", seconds=30)
    a.alive("after running out of fds")
    rogue.call("close_idle")
    a.finish()
    assert made["connected"] == 200, made
    assert seen["closed"] == 200, seen
    assert "Too many open files" in a.daemon.log()   # the control: the daemon did run out of fds


def test_fd_limit_is_raised_at_start(socket_dir, uswapd):
    """The soft RLIMIT_NOFILE goes up to the hard limit at start."""
    need(shutil.which("prlimit") is not None, "prlimit (util-linux) is not installed")
    daemon = uswapd(socket_dir=socket_dir, prefix=("prlimit", "--nofile=128:8192"))
    with open(f"/proc/{daemon.proc.pid}/limits") as f:
        soft = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
    assert soft == 8192, soft


def test_map_timeout_closes_connections_that_never_map(arena):
    """A connection that has not mapped within --map-timeout is closed; one that has mapped is kept."""
    a = arena("--map-timeout", "1")
    rogue = a.rogue()
    assert rogue.call("map", length=MiB)["reply"]["status"] == 0
    rogue.call("connect", n=3)
    seen = rogue.call("idle_results", seconds=6)
    kept = rogue.call("conn_state", wait=0.5)        # the mapped connection, 1.5 s and more after its MAP
    rogue.call("touch", length=MiB)
    a.finish()
    assert seen["closed"] == 3 and seen["open"] == 0, seen
    assert 0.7 <= seen["seconds"] <= 4, seen          # not at once, and not much after the timeout
    assert kept["state"] == "timeout", kept


def test_uffd_with_features_the_daemon_does_not_handle_is_refused(arena):
    """A uffd with EVENT_FORK made the daemon receive a new uffd on every fork of the client, never
    closed; the other event features and SIGBUS are not served either."""
    a = arena()
    rogue = a.rogue(nobody=False)
    results = {f: rogue.call("map", name=f, length=MiB, features=[f], dontfork=False)
               for f in UNHANDLED_FEATURES}
    forked = rogue.call("fork", n=20, timeout=30)    # with EVENT_FORK accepted: 20 uffds to the daemon
    a.finish()                                       # ... and they must not stay there
    assert forked["forked"] == 20
    for feature, r in results.items():
        err, text = refused(r)
        assert err == "EINVAL" and feature in text, (feature, r)


# -- 4. one uid must not starve or spy on the others ---------------------------------------------------

def test_one_uid_cannot_reserve_every_slot(arena):
    """Another uid reserved every free slot and the next root client got ENOMEM.  --user-max-size
    (default: half the store) stops it with EDQUOT; root, whose store it is, still maps."""
    a = arena()
    rogue = a.rogue()
    d = a.daemon.status()["daemon"]
    free = d["slots_total"] - d["mapped_pages"]
    grab = rogue.call("map", name="grab", length=free * PAGE_SIZE)
    chunks, refusal = 0, None
    for i in range(16):                              # then 4 MiB at a time, until refused
        r = rogue.call("map", name=f"c{i}", length=4 * MiB)
        if r["reply"]["status"]:
            refusal = r
            break
        chunks += 1
    a.finish()                                       # the hog (root, 8 MiB) maps after the rogue
    half = d["slots_total"] // 2
    err, text = refused(grab)
    assert err == "EDQUOT" and "--user-max-size" in text, grab
    assert refusal is not None, f"{chunks} chunks of 4 MiB mapped"
    err, text = refused(refusal)
    assert err == "EDQUOT" and "--user-max-size" in text, refusal
    assert half - 1024 < chunks * 1024 <= half, (chunks, half)


def test_user_limit_options(arena):
    a = arena("--user-max-size", "1M", "--user-max-regions", "3", "--user-max-connections", "6")
    rogue = a.rogue()
    too_big = rogue.call("map", name="big", length=2 * MiB)
    regions = [rogue.call("map", name=f"r{i}", length=256 << 10) for i in range(4)]
    settled_fds(a.daemon)                            # the daemon has seen the refused ones' connections close
    made = rogue.call("connect", n=5)                # 3 regions' connections + 5 > 6
    seen = rogue.call("idle_results", seconds=2)
    root = a.rogue(nobody=False)
    root_maps = [root.call("map", name=f"r{i}", length=2 * MiB) for i in range(5)]   # root: no limits
    a.finish()
    err, text = refused(too_big)
    assert err == "EDQUOT" and "--user-max-size" in text, too_big
    assert [r["reply"]["status"] for r in regions[:3]] == [0, 0, 0], regions
    err, text = refused(regions[3])
    assert err == "EDQUOT" and "--user-max-regions" in text, regions[3]
    assert made["connected"] == 5 and seen["open"] == 3 and seen["replies"] == {"EDQUOT": 2}, seen
    assert all("--user-max-connections" in t for t in seen["texts"]), seen
    assert [r["reply"]["status"] for r in root_maps] == [0] * 5, root_maps


def test_status_shows_another_uid_only_its_own_regions(arena):
    a = arena()
    rogue = a.rogue()
    mine = rogue.call("map", length=MiB)
    assert mine["reply"]["status"] == 0, mine
    seen = rogue.call("status")["status"]["regions"]
    everyone = a.daemon.status()["regions"]          # root: every region (the control)
    a.finish()
    assert {r["uid"] for r in everyone} == {0, 65534}, everyone
    assert [(r["uid"], r["address"]) for r in seen] == [(65534, mine["address"])], seen


def test_unmapped_region_leaves_the_budget(arena):
    """A client that munmaps its range but keeps its socket pinned its pages in the resident budget.
    The daemon notices the mapping is gone, drops the region and its pages, and says so."""
    a = arena()
    rogue = a.rogue()
    assert rogue.call("map", length=8 * MiB)["reply"]["status"] == 0
    rogue.call("touch", length=8 * MiB)
    before = [r for r in a.daemon.status()["regions"] if r["uid"] == 65534]
    rogue.call("munmap")
    a.hog_round()                                    # reclaim meets the vanished mapping
    status = a.daemon.status()
    a.finish()
    assert before and before[0]["resident_pages"] > 0, before
    assert [r for r in status["regions"] if r["uid"] == 65534] == [], status["regions"]
    assert status["daemon"]["resident_pages"] == sum(r["resident_pages"] for r in status["regions"]), status
    assert "mapping is gone" in a.daemon.log()


# -- the protocol fuzzer ------------------------------------------------------------------------------------

def fuzz_against(a: Arena, *, count: int, seconds: float) -> dict:
    """The fuzzer as uid 65534 while a root hog verifies its data over and over."""
    seed = int(os.environ.get("USWAP_FUZZ_SEED", time.time_ns() % 2**32))
    rogue = a.rogue()
    stop = threading.Event()
    rounds: list[subprocess.CompletedProcess] = []

    def hog_loop():
        while not stop.is_set():
            rounds.append(subprocess.run([a.hog, "-s", "4", "-r", "2"], capture_output=True, text=True,
                                         env=a.daemon.env(), timeout=120))
            if rounds[-1].returncode:
                return
    thread = threading.Thread(target=hog_loop)
    thread.start()
    try:
        stats = rogue.call("fuzz", count=count, seconds=seconds, seed=seed, timeout=seconds + 60)
    finally:
        stop.set()
        thread.join()
    print(f"fuzzer (USWAP_FUZZ_SEED={seed}): {stats}")
    a.alive(f"under the fuzzer (USWAP_FUZZ_SEED={seed})")
    bad = [r for r in rounds if r.returncode or " 0 mismatches" not in r.stdout]
    assert rounds and not bad, (seed, bad[:1])
    a.finish()
    assert stats["packets"] >= count or stats["seconds"] >= seconds, stats
    assert stats["sent"] >= stats["packets"] // 2 and stats["connects"] > 20, stats
    assert len(stats["replies"]) >= 4 and stats["maps_ok"] > 0, stats   # refusals of several kinds, and MAPs
    assert stats["touch_hung"] == 0, stats       # every accepted region's faults were served
    # MAPs whose memfd is not what is mapped at the address, or whose fds are wrong, must be refused.
    # ("uffd_unregistered" is left out: the kernel lets any uffd of the client's mm lift WP on a range
    # another uffd registered, so that MAP passes; its region then simply never sees a fault.)
    wrong = {k: n for k, n in stats["bad_maps_accepted"].items() if k != "uffd_unregistered"}
    assert not wrong, stats
    return stats


def test_protocol_fuzzer_as_another_uid(arena):
    a = arena()
    fuzz_against(a, count=20000, seconds=45)


@pytest.mark.soak
def test_soak_protocol_fuzzer(arena):
    a = arena()
    fuzz_against(a, count=10**6, seconds=240)
