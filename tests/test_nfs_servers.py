"""Layer 7: one daemon striping over three real NFS servers, and losing one (uswap.nfs.network, store sets).

Three nfs-ganesha servers, each in a network namespace of its own, linked to one client namespace by veth pairs
(:class:`uswap.nfs.network.NfsNetwork`); the daemon runs there with ``--store nfs://A --store nfs://B --store
nfs://C`` of one priority, so it stripes 64-slot clusters over the three.  Clients reach the daemon through its
pathname Unix socket.  A server is lost in two ways (see uswap/nfs/network.py): its whole namespace ended (the link
is gone: the server is gone for good), or its ganesha killed and started again.

Which page went to which server is read from the servers' store files themselves: the daemon runs with
``--encrypt off`` (crc slots hold the page as it is), and pagecheck (tests/c/pagecheck.c) writes words that name
their page and the run's seed.  A test of ``--copies`` is one more function on the ``servers`` fixture and
``start_striped``'s ``extra``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time

import numpy
import pytest

from conftest import HERE, build_c, need, need_root
from test_region_daemon import finish_holder, run_hog, start_holder
from test_storeset import stores_of
from uswap.core import PAGE_SIZE
from uswap.nfs.network import NfsNetwork

pytestmark = pytest.mark.kernel

MiB = 1 << 20
WORDS = PAGE_SIZE // 8
STORE_SIZE = "64M"


@pytest.fixture
def servers(tmp_path):
    """Three started NFS servers on one network (``network.servers``), an empty export each; all stopped at
    teardown, the network's namespace too, whatever the test did to them."""
    need_root()
    tools = ("ganesha.nfsd", "rpcbind", "rpcinfo", "nfs-ls", "nfs-cp", "ip", "unshare", "nsenter")
    missing = [t for t in tools if not shutil.which(t)]
    need(not missing, f"{', '.join(missing)} not installed (scripts/install-deps: nfs-ganesha, rpcbind, "
                      f"libnfs-utils, iproute2)")
    with NfsNetwork() as network:
        for name in ("a", "b", "c"):
            network.server(str(tmp_path / f"nfs-{name}")).start()
        yield network


@pytest.fixture(scope="session")
def pagecheck(tmp_path_factory):
    return build_c(tmp_path_factory, os.path.join(HERE, "c", "pagecheck.c"), "pagecheck")


def cli(network: NfsNetwork, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(network.netns_cmd([sys.executable, "-m", "uswap", *args]), capture_output=True,
                          text=True, timeout=timeout)


def mkswap_all(network: NfsNetwork, name: str = "store") -> list[str]:
    """A store of STORE_SIZE on every server; their URLs, in the servers' order."""
    urls = []
    for server in network.servers:
        urls.append(server.url(name))
        r = cli(network, "mkswap", urls[-1], "--size", STORE_SIZE)
        assert r.returncode == 0, r.stderr
    return urls


def start_striped(uswapd, network: NfsNetwork, urls: list[str], *, resident: str = "4M", timeout: float = 60,
                  extra: tuple = ()):
    """A daemon in the network's client namespace on ``urls``, one priority (striped)."""
    stores = tuple(arg for url in urls[1:] for arg in ("--store", url))
    return uswapd(store=urls[0], resident=resident, prefix=network.netns_cmd([]),
                  extra=(*stores, "--nfs-timeout", str(timeout), *extra))


def export_file(network: NfsNetwork, n: int, name: str = "store") -> str:
    return os.path.join(network.servers[n].export_dir, name)


def pages_in_store(path: str, seed: int, pages: int) -> set[int]:
    """The pagecheck pages (of ``seed``) whose every word is in a slot of the store file ``path``."""
    slots = numpy.fromfile(path, dtype=numpy.uint64).reshape(-1, WORDS)
    first = slots[:, 0] - numpy.uint64(seed)             # wraps like the C program's sum
    candidates = numpy.nonzero((first % WORDS == 0) & (first // WORDS < pages))[0]
    found = set()
    for i in candidates:
        page = int(first[i]) // WORDS
        expect = numpy.uint64(seed) + numpy.arange(page * WORDS, (page + 1) * WORDS, dtype=numpy.uint64)
        if (slots[i] == expect).all():
            found.add(page)
    return found


class PageCheck:
    """A pagecheck process of ``pages`` pages, filled; :meth:`touch` gives each listed page's outcome."""

    def __init__(self, binary: str, daemon, pages: int, spare: int):
        self.pages, self.seed = pages, random.getrandbits(63) | 1 << 62     # no page word is 0
        self.proc = subprocess.Popen([binary, str(pages), str(spare), str(self.seed)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env())
        line = self.proc.stdout.readline()
        if line != "filled\n":
            self.proc.kill()
            raise AssertionError(f"pagecheck did not fill its region: {line!r} {self.proc.communicate()[1]}")

    def touch(self, pages: list[int], timeout: float) -> dict[int, str]:
        try:
            out, err = self.proc.communicate("".join(f"{p}\n" for p in pages), timeout=timeout)
        finally:
            self.end()
        assert self.proc.returncode == 0 and out.endswith("done\n"), (self.proc.returncode, out[-500:], err)
        outcomes = dict(line.split(" ", 1) for line in out.splitlines()[:-1])
        return {int(page): what for page, what in outcomes.items()}

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def wait_evicted(daemon, at_least: int, timeout: float = 60) -> dict:
    """Until the daemon's regions have ``at_least`` pages in the store, every member has written at least its
    used slots (a batch takes its slots before it counts as in flight) and no writeback is in flight; the
    status then."""
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        d = status["daemon"]
        if d["slots_used"] >= at_least and d["writeback_pages"] == 0 and \
                all(s["write_bytes"] >= s["used_slots"] * PAGE_SIZE for s in status["stores"]):
            return status
        assert time.monotonic() < deadline, (d, status["stores"])
        time.sleep(0.05)


# -- striping ----------------------------------------------------------------------------------------------

def test_the_network_reaches_each_server_at_its_own_address(servers):
    """rpcbind and ganesha of every server answer at its veth address from the client namespace, and a server
    is not reachable at another's."""
    for n, server in enumerate(servers.servers, 1):
        assert server.address == f"10.231.{n}.2" and server.url("x").startswith(f"nfs://10.231.{n}.2/export/x")
        r = subprocess.run(servers.netns_cmd(["rpcinfo", "-p", server.address]), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and " nfs" in r.stdout and " mountd" in r.stdout, r.stdout + r.stderr
    marker = os.path.join(servers.servers[0].base_dir, "marker")
    with open(marker, "w") as f:
        f.write("on a\n")
    r = subprocess.run(servers.netns_cmd(["nfs-cp", marker, servers.servers[0].url("only-on-a")]),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for server, expect in zip(servers.servers, (True, False, False)):
        r = subprocess.run(servers.netns_cmd(["nfs-ls", server.url()]), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and ("only-on-a" in r.stdout) == expect, (server.address, r)
    assert os.path.exists(os.path.join(servers.servers[0].export_dir, "only-on-a"))


def test_equal_priorities_stripe_over_three_servers_within_ten_percent(servers, uswapd, hog):
    """A 48 MiB holder through a 4 MiB budget: every server's store takes slots, within 10% of each other, the
    slots really are in each server's file, hogs meanwhile see 0 mismatches, and the holder reads back intact."""
    urls = mkswap_all(servers)
    daemon = start_striped(uswapd, servers, urls)
    holder = start_holder(daemon, 48 * MiB)
    try:
        status = wait_evicted(daemon, (48 - 8) * MiB // PAGE_SIZE)
        stores = {s["url"]: s for s in status["stores"]}
        used = [stores[url]["used_slots"] for url in urls]
        assert sum(used) == status["daemon"]["slots_used"], (used, status["daemon"])
        assert max(used) - min(used) <= 0.1 * max(used), used
        for n, url in enumerate(urls):
            assert stores[url]["health"] == "ok" and stores[url]["nfs"]["state"] == "up", stores[url]
            # sealed slots are never all zeros; mkswap wrote zeros everywhere
            slots = numpy.fromfile(export_file(servers, n), dtype=numpy.uint64).reshape(-1, WORDS)[1:]
            assert int(slots.any(axis=1).sum()) >= used[n], (url, used[n])
        r = run_hog(hog, daemon, "-s", "8", "-p", "2", "-r", "2")
        assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    finally:
        code, out, err = finish_holder(holder)
    assert (code, out) == (0, "intact\n"), err
    status = daemon.status()
    assert status["daemon"]["read_errors"] == status["daemon"]["write_errors"] == 0
    assert all(s["reads"] > 0 and s["errors"] == 0 for s in status["stores"]), status["stores"]


# -- losing a server ---------------------------------------------------------------------------------------

def test_a_server_gone_for_good_fails_only_its_pages(servers, uswapd, hog, pagecheck):
    """One copy of each slot (no --copies): the third server's namespace ends (its link with it) while a client's pages are spread over
    the three.  Every page the client touches comes back intact, except the pages in the dead server's store:
    those, and only those, give it SIGBUS; no page reads as zeros or wrong data.  The daemon goes on serving
    another client, and status shows the dead store's health as not ok."""
    urls = mkswap_all(servers)
    daemon = start_striped(uswapd, servers, urls, timeout=1, extra=("--encrypt", "off"))
    pages, budget = 3072, 1024                       # 12 MiB: 48 clusters, 16 on each server
    client = PageCheck(pagecheck, daemon, pages, spare=budget + 64)   # all 12 MiB go out; the budget is free
    try:
        wait_evicted(daemon, pages - 64)
        where = [pages_in_store(export_file(servers, n), client.seed, pages) for n in range(3)]
        assert all(len(w) >= 64 * 15 for w in where), [len(w) for w in where]       # striped over the three
        assert not (where[0] & where[1] or where[1] & where[2] or where[0] & where[2])
        on_dead, elsewhere = sorted(where[2]), sorted(where[0] | where[1])
        resident = set(range(pages)) - where[0] - where[1] - where[2]
        assert len(resident) <= 64, sorted(resident)
        servers.servers[2].stop()                    # for good: the namespace and its link are gone

        # Swap-ins that fit in the free budget (so no writeback, which would go to the dead server in turn):
        # the first 384 pages on the live servers, and 8 on the dead one, each costing --nfs-timeout twice
        # (its window's read, then its own).
        dead_sample = on_dead[::len(on_dead) // 8]
        outcomes = client.touch(sorted({*elsewhere[:384], *resident, *dead_sample}), timeout=240)
    finally:
        client.end()
    wrong = {p: what for p, what in outcomes.items() if what not in ("ok", "sigbus")}
    assert not wrong, f"{len(wrong)} pages zero-filled or wrong: {sorted(wrong.items())[:10]}"
    sigbus = {p for p, what in outcomes.items() if what == "sigbus"}
    assert sigbus == set(dead_sample), (sorted(sigbus - set(dead_sample))[:10], sorted(set(dead_sample) - sigbus))

    r = run_hog(hog, daemon, "-s", "8", "-r", "2", timeout=300)      # served by the other two (and retries)
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout + r.stderr
    stores = stores_of(daemon)
    assert stores[urls[2]]["health"] != "ok" and stores[urls[2]]["errors"] > 0, stores[urls[2]]
    assert stores[urls[2]]["nfs"]["state"] != "up", stores[urls[2]]["nfs"]
    assert all(stores[u]["health"] == "ok" and stores[u]["errors"] == 0 for u in urls[:2]), stores
    assert daemon.status()["daemon"]["read_errors"] >= len(dead_sample)
    assert "poisoned" in daemon.log()


def test_a_restarted_server_serves_its_pages_again(servers, uswapd):
    """The second server's ganesha is killed while a holder's pages are on all three, and restarted 2 s later
    (rpcbind and the link stay): the holder's reads of its pages wait for it, then every word comes back."""
    urls = mkswap_all(servers)
    daemon = start_striped(uswapd, servers, urls, timeout=60)
    holder = start_holder(daemon, 24 * MiB)
    restarted = threading.Event()
    try:
        wait_evicted(daemon, (24 - 8) * MiB // PAGE_SIZE)
        stores = stores_of(daemon)
        assert all(stores[url]["used_slots"] > 0 for url in urls), stores
        connects = stores[urls[1]]["nfs"]["connects"]
        servers.servers[1].kill()

        def restart_later():
            time.sleep(2)
            servers.servers[1].restart()
            restarted.set()
        restarter = threading.Thread(target=restart_later)
        restarter.start()
        code, out, err = finish_holder(holder)        # reads block on the killed server until it is back
        restarter.join()
    finally:
        if holder.poll() is None:
            finish_holder(holder)
    assert restarted.is_set()
    assert (code, out) == (0, "intact\n"), err
    stores = stores_of(daemon)
    assert stores[urls[1]]["nfs"]["connects"] > connects and stores[urls[1]]["nfs"]["state"] == "up"
    assert all(s["health"] == "ok" for s in stores.values()), stores
    d = daemon.status()["daemon"]
    assert d["read_errors"] == 0 and d["pswpin"] > 0


# -- copies ------------------------------------------------------------------------------------------------

def test_two_copies_lose_nothing_when_a_server_is_gone_for_good(servers, uswapd, hog, pagecheck):
    """--copies 2 over the three: every page out is in exactly two servers' stores.  The third server's
    namespace ends; then the client touches every page, which also pushes others out (written to one copy
    where the dead server held the other): every page comes back intact, none gives SIGBUS, and a hog run
    afterwards verifies every word.  Status shows the dead store down, with the reads its copies served."""
    urls = mkswap_all(servers)
    daemon = start_striped(uswapd, servers, urls, timeout=2, extra=("--encrypt", "off", "--copies", "2"))
    pages, budget = 3072, 1024
    client = PageCheck(pagecheck, daemon, pages, spare=budget + 64)
    try:
        wait_evicted(daemon, pages - 64)
        where = [pages_in_store(export_file(servers, n), client.seed, pages) for n in range(3)]
        held = [sum(page in w for w in where) for page in range(pages)]
        assert held.count(2) >= pages - 64 and set(held) <= {0, 2}, {n: held.count(n) for n in set(held)}
        assert all(len(w) >= 64 * 15 for w in where), [len(w) for w in where]      # copies on all three
        servers.servers[2].stop()                    # for good: the namespace and its link are gone
        outcomes = client.touch(list(range(pages)), timeout=240)
    finally:
        client.end()
    wrong = {p: what for p, what in outcomes.items() if what != "ok"}
    assert not wrong, f"{len(wrong)} pages not intact: {sorted(wrong.items())[:10]}"
    assert len(outcomes) == pages

    r = run_hog(hog, daemon, "-s", "8", "-r", "2", timeout=300)      # both copies on the two left
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout + r.stderr
    stores = stores_of(daemon)
    dead = stores[urls[2]]
    assert dead["down"] and dead["fallbacks"] > 0 and dead["health"].startswith("down"), dead
    assert all(not stores[u]["down"] and stores[u]["fallbacks"] == 0 for u in urls[:2]), stores
    d = daemon.status()["daemon"]
    assert d["read_errors"] == d["write_errors"] == 0 and d["pswpin"] >= pages - 64
    assert "poisoned" not in daemon.log()
    assert daemon.log().count(f"store {urls[2]} failed") == 1
