"""Layer 10 (issue 12, `uswap run`): the kernel mechanisms the design relies on, probed in C.

tests/c/run_probe.c plays daemon, client and agent thread; docs/RUN-DESIGN.md says what each
result means for the design.  The probe prints key=value lines and ``RESULT ok``.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import HERE, need, need_root, run

pytestmark = pytest.mark.kernel

ROOT = os.path.join(HERE, os.pardir)


@pytest.fixture(scope="module")
def run_probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "run_probe"
    run("cc", "-O2", "-Wall", "-Werror", "-pthread", "-I", os.path.join(ROOT, "csrc"),
        os.path.join(HERE, "c", "run_probe.c"), "-o", str(out))
    return str(out)


def test_daemon_serves_a_client_through_its_uffd(run_probe):
    need_root()
    need(os.path.exists("/dev/userfaultfd"), "no /dev/userfaultfd")
    r = subprocess.run([run_probe], capture_output=True, text=True, timeout=60)
    print(r.stdout)
    assert r.returncode == 0 and "RESULT ok" in r.stdout, r.stdout + r.stderr
    out = r.stdout
    # the daemon registered the client's ranges and negotiated EVENT_FORK on the client's uffd
    assert "cross_process_register=1" in out and "fork_negotiated=1" in out
    # the agent's move raised no event; a drop through a staging area on the shared uffd raises REMOVE
    assert "other_events_during_moves=0" in out
    # a libc fork and a raw SYS_fork child read every swapped page from the parent's slots
    assert "fork_libc:" in out and "fork_raw:" in out
    assert out.count("fork_events=1 child_bad_pages=0 parent_bad_pages=0") == 2
    assert " zero_fills=0 " in out
    # /proc/PID/mem reads keep pages shared; pages shared after a fork cannot be moved
    assert "procmem_read_keeps_cow_sharing=1" in out
    assert "child_alive=Device or resource busy" in out and "after_parent_rewrite=moved" in out
