"""Layer 10, `uswap run`: clean-page retention (the swap cache of runs).  A page swapped in by a read or by
readahead is installed write-protected and keeps its slot (CLEAN); evicting it again is a drop without a
slot write; a write to it frees the slot and makes it dirty.  tests/c/run_clean.c checks every word of every
page it reads; the counters come from the daemon's log (one line per released process)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import HERE, need, need_root, run
from test_run_probes import LIBRUN, serve_daemon
from uswap.child import uswap_argv

pytestmark = pytest.mark.kernel

PAGES = 8192          # 32 MiB
BUDGET = 2048         # pages: a quarter of it stays resident


@pytest.fixture(scope="module")
def run_clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "run_clean"
    run("cc", "-O2", "-Wall", "-Werror", os.path.join(HERE, "c", "run_clean.c"), "-o", str(out))
    return str(out)


@pytest.fixture
def daemon(uswapd):
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    return uswapd("run", resident="64M", store_size="256M")


def steps(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]


def test_pages_read_back_are_evicted_again_without_a_write(daemon, tmp_path, run_clean):
    """Three read-only passes over 32 MiB under 8 MiB: every pass swaps the whole array in and out again, but
    a page is written to a slot at most once (the fill's eviction), never again for a read.  Without
    retention each pass wrote what it evicted: pswpout above 25k here."""
    r, c = serve_daemon(daemon, tmp_path, BUDGET, run_clean, "reread", str(PAGES), "3")
    assert r.returncode == 0 and "mismatches=0" in r.stdout, r.stdout + r.stderr
    assert steps(r.stdout) == ["fill", "reread", "reread", "reread"]
    assert c["pswpin"] >= 3 * (PAGES - 2 * BUDGET), c
    assert c["pswpout"] <= PAGES + 512, c                       # each page written once at most
    assert c["dropped"] - c["pswpout"] >= 2 * (PAGES - 2 * BUDGET), c   # the rest left without a write
    print(c)
    assert c["clean_written"] < 64, c                           # only libc's few pages were written after the fill


def test_a_write_after_a_clean_swap_in_is_not_lost(daemon, tmp_path, run_clean):
    """A page read back (CLEAN), then written: the write fault un-protects it and frees its slot, so the next
    eviction writes it again; likewise a page readahead brought in.  If a written page were still taken for
    clean, its eviction would drop it without a write and it would read back as before the write."""
    r, c = serve_daemon(daemon, tmp_path, BUDGET, run_clean, "rewrite", str(PAGES))
    assert r.returncode == 0 and "mismatches=0" in r.stdout, r.stdout + r.stderr
    assert steps(r.stdout) == ["fill", "read-then-write", "write-readahead", "verify", "verify"]
    assert c["clean_written"] >= PAGES // 2, c                  # the path this test is about was taken
    # written again: the fill, then the read-then-write pass and half the pages once more, less what stayed
    assert c["pswpout"] >= PAGES + PAGES // 2 + PAGES // 4, c
    assert c["dropped"] > c["pswpout"], c                      # the verify passes dropped clean pages


def test_clean_pages_across_fork(daemon, tmp_path, run_clean):
    """Pages clean in the parent at the fork are resident in the child (the kernel shares them copy-on-write,
    the slot reference stays the parent's): each verifies every page, writes its own half, verifies again;
    the parent once more after the child exited.  Every slot is free at the end (serve_daemon)."""
    r, c = serve_daemon(daemon, tmp_path, BUDGET, run_clean, "fork", str(PAGES))
    assert r.returncode == 0 and "mismatches=0" in r.stdout, r.stdout + r.stderr
    assert "child mismatches=0" in r.stdout
    assert sorted(steps(r.stdout)) == sorted(["fill", "clean", "child-read", "child-wrote", "child-again",
                                              "parent-read", "parent-wrote", "parent-again",
                                              "parent-after-child"]), r.stdout
    assert c["fork"] == 1 and c["poisoned"] == 0, c
    assert c["clean_written"] > 0, c


def test_daemon_stop_with_clean_pages(daemon, tmp_path, run_clean):
    """SIGTERM while the program holds CLEAN pages (resident, write-protected, with slots): the daemon gives
    the swapped pages back and unregisters; the program then writes every page and reads it back right."""
    p = subprocess.Popen(uswap_argv("run", "--resident", str(BUDGET * 4096), "--socket", daemon.socket, "--",
                                    run_clean, "hold", str(PAGES)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ok fill\n"
        assert p.stdout.readline() == "ok clean\n"
        deadline = time.monotonic() + 10
        while True:             # the last pass's pages: clean, counted in the run's slots
            # one snapshot: the table's counts and the slot references move between two status calls (an
            # eviction in progress assigns slots before its references are counted)
            status = daemon.status()
            runs = status["runs"]
            if runs and runs[0]["clean_pages"] > 0 and \
                    status["daemon"]["run_slots"] >= runs[0]["clean_pages"] + runs[0]["swapped_pages"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert daemon.stop() == 0
        out, err = p.communicate("go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out + err
    assert out.splitlines()[-2:] == ["ok written", "mismatches=0"], out + err
    assert "page(s) not read back" not in daemon.log()
