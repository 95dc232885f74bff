"""Layer 10 (issue 12, `uswap run`): the kernel mechanisms the design relies on, probed in C.

tests/c/run_probe.c plays daemon, client and agent thread; docs/RUN-DESIGN.md says what each
result means for the design.  The probe prints key=value lines and ``RESULT ok``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import uswap
from conftest import HERE, need, need_root, run
from uswap.run import NotPreloadable, check_preloadable

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
    # a MOVE whose source crosses a VMA split (madvise raises no event) is refused whole: runs stay in one VMA
    assert "move_across_vma_split=Invalid argument" in out and "move_within_one_vma=ok" in out
    # a libc fork and a raw SYS_fork child read every swapped page from the parent's slots
    assert "fork_libc:" in out and "fork_raw:" in out
    assert out.count("fork_events=1 child_bad_pages=0 parent_bad_pages=0") == 2
    assert " zero_fills=0 " in out
    # /proc/PID/mem reads keep pages shared; pages shared after a fork cannot be moved
    assert "procmem_read_keeps_cow_sharing=1" in out
    # a fork uffd finds its process: the first fault through it carries the child's pid (THREAD_ID)
    assert out.count("child_first_fault_thread_id_is_child_pid=1") == 2
    assert "child_alive=Device or resource busy" in out and "after_parent_rewrite=moved" in out


# ---- the preload library (csrc/uswap_run.c) against tests/c/run_server.c, a stand-in for the daemon ----

LIBRUN = os.path.join(os.path.dirname(uswap.__file__), "lib", "libuswaprun.so")
PYTHON = os.path.realpath(sys.executable)   # the binary itself: a shell wrapper would fork

BIGLIST = """
import hashlib, sys
n = int(sys.argv[1])
xs = list(range(n))
ys = [x * 3 for x in xs]
h = hashlib.sha256()
for i in range(0, n, 1000):
    h.update(repr(ys[i:i + 1000]).encode())
print(n, sum(ys), h.hexdigest())
"""

RAW_FORK = """
import ctypes, os, signal, sys, time
xs = [x * 7 for x in range(int(sys.argv[1]))]
time.sleep(0.3)                       # let the server swap most of it out
pid = ctypes.CDLL(None, use_errno=True).syscall(57)   # SYS_fork: no atfork handlers, no fork() wrapper
if pid == 0:
    print("child sum", sum(xs), flush=True)          # reads swapped pages: SIGBUS expected, never zeros
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", "signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit %d" % os.WEXITSTATUS(status))
print("parent sum", sum(xs) == 7 * sum(range(len(xs))))
"""


@pytest.fixture(scope="module")
def run_server(tmp_path_factory):
    need_root()
    need(os.path.exists("/dev/userfaultfd"), "no /dev/userfaultfd")
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    out = tmp_path_factory.mktemp("bin") / "run_server"
    run("cc", "-O2", "-Wall", "-Werror", "-pthread", "-I", os.path.join(ROOT, "csrc"),
        os.path.join(HERE, "c", "run_server.c"), "-o", str(out))
    return str(out)


def serve(run_server, tmp_path, resident_pages: int, *cmd: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run cmd under run_server; its counters as a dict."""
    r = subprocess.run([run_server, str(tmp_path / "run.sock"), str(tmp_path / "store"), str(resident_pages),
                        LIBRUN, "--", *cmd], capture_output=True, text=True, timeout=120)
    line = [x for x in r.stderr.splitlines() if x.startswith("run_server: pswpout=")]
    assert line, r.stderr
    return r, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line[0])}


def test_unmodified_python_under_a_small_budget(run_server, tmp_path):
    script = tmp_path / "biglist.py"
    script.write_text(BIGLIST)
    plain = subprocess.run([PYTHON, str(script), "300000"], capture_output=True, text=True, check=True)
    r, c = serve(run_server, tmp_path, 2048, PYTHON, str(script), "300000")
    print(r.stderr)
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert c["pswpout"] > 0 and c["pswpin"] > 0
    assert "not budgeted" not in r.stderr


def test_exec_keeps_the_run(run_server, tmp_path):
    script = tmp_path / "biglist.py"
    script.write_text(BIGLIST)
    plain = subprocess.run([PYTHON, str(script), "200000"], capture_output=True, text=True, check=True)
    r, c = serve(run_server, tmp_path, 2048, "/bin/sh", "-c", f"exec {PYTHON} {script} 200000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert c["execs"] == 1 and c["pswpout"] > 0


def test_fork_is_refused_loudly(run_server, tmp_path):
    r, _ = serve(run_server, tmp_path, 2048, PYTHON, "-c",
                 "import os\ntry:\n    os.fork()\nexcept OSError as e:\n    print('refused', e.errno)")
    assert r.stdout.strip() == "refused 38"     # ENOSYS
    assert "fork() refused" in r.stderr


def test_raw_fork_child_gets_sigbus_not_zeros(run_server, tmp_path):
    script = tmp_path / "rawfork.py"
    script.write_text(RAW_FORK)
    r, c = serve(run_server, tmp_path, 2048, PYTHON, str(script), "300000")
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert "child signal 7" in r.stdout          # SIGBUS
    assert "child sum" not in r.stdout
    assert "parent sum True" in r.stdout
    assert c["fork"] == 1 and c["poisoned"] >= 1


ORPHAN = """
import os, sys, time
print(os.getpid(), flush=True)
xs = [x * 5 for x in range(int(sys.argv[1]))]
print("built", flush=True)
time.sleep(1.0)                      # the server is killed meanwhile
print("sum", sum(xs), flush=True)    # swapped pages: SIGBUS from the agent's fallback, never zeros
"""


# A subreaper between the test and run_server: the program, orphaned when the server dies, is reaped here
# and its status printed.
REAPER = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)       # PR_SET_CHILD_SUBREAPER
srv = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
pid = int(srv.stdout.readline())
assert srv.stdout.readline() == "built\\n"
time.sleep(0.3)
srv.kill()
srv.wait()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print("program", "signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit %d" % os.WEXITSTATUS(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, signal.SIGKILL)
    print("program hung")
print("rest", srv.stdout.read().replace("\\n", " "))
"""


def test_server_killed_swapped_pages_give_sigbus_and_nothing_hangs(run_server, tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    r = subprocess.run([PYTHON, "-c", REAPER, run_server, str(tmp_path / "run.sock"), str(tmp_path / "store"), "2048",
                        LIBRUN, "--", PYTHON, str(script), "300000"], capture_output=True, text=True, timeout=60)
    print(r.stdout, r.stderr)
    assert "program signal 7" in r.stdout, r.stdout + r.stderr     # SIGBUS on a swapped page: never zeros, no hang
    assert "sum" not in r.stdout


# ---- which programs uswap run can budget (uswap/run.py) ----

def test_static_setuid_and_scripts_are_judged(tmp_path):
    assert check_preloadable("true").endswith("/true")
    assert check_preloadable(PYTHON) == PYTHON
    static = tmp_path / "static"
    src = tmp_path / "static.c"
    src.write_text("int main(void) { return 0; }\n")
    built = subprocess.run(["cc", "-static", str(src), "-o", str(static)], capture_output=True)
    if built.returncode == 0:
        with pytest.raises(NotPreloadable, match="statically linked"):
            check_preloadable(str(static))
    with pytest.raises(NotPreloadable, match="statically linked"):
        check_preloadable("/sbin/ldconfig")          # static-pie on Debian
    suid = tmp_path / "suid"
    shutil.copy("/bin/true", suid)
    os.chmod(suid, 0o4755)
    with pytest.raises(NotPreloadable, match="setuid"):
        check_preloadable(str(suid))
    script = tmp_path / "script"
    script.write_text("#!/sbin/ldconfig -p\n")
    os.chmod(script, 0o755)
    with pytest.raises(NotPreloadable, match="ldconfig: statically linked"):
        check_preloadable(str(script))
    ok = tmp_path / "ok"
    ok.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(ok, 0o755)
    assert check_preloadable(str(ok)) == str(ok)


def test_swapped_memory_behaves_like_memory(run_server, tmp_path):
    """tests/c/run_workload.c (issue 12, tests 3-5): read(2)/write(2) on swapped pages, MADV_DONTNEED, realloc
    moving with mremap, MAP_FIXED over swapped pages, 4 threads with a 1 ms signal reading swapped memory."""
    work = tmp_path / "run_workload"
    run("cc", "-O2", "-Wall", "-Werror", "-pthread", os.path.join(HERE, "c", "run_workload.c"), "-o", str(work))
    r, c = serve(run_server, tmp_path, 4096, str(work), "32", "4", "1")
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert steps == ["fill", "write2", "read2", "dontneed", "mremap", "fixed", "threads"], r.stdout
    assert c["pswpout"] > 0 and c["pswpin"] > 0 and c["remove"] > 0 and c["remap"] > 0


NUMPY = """
import hashlib, numpy as np
a = np.arange(2 << 20, dtype=np.int64)   # 16 MiB, madvise(MADV_HUGEPAGE)d by numpy
b = (a * 3 + 1) % 1000003
print(int(b.sum()), hashlib.sha256(b.tobytes()).hexdigest())
"""


def test_unmodified_numpy_under_a_small_budget(run_server, tmp_path):
    need(subprocess.run([PYTHON, "-c", "import numpy"], capture_output=True).returncode == 0, "no numpy")
    script = tmp_path / "np.py"
    script.write_text(NUMPY)
    plain = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, check=True)
    r, c = serve(run_server, tmp_path, 4096, PYTHON, str(script))
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    assert c["pswpout"] > 0 and c["overwrites"] == 0
    assert c["other_refusals"] == 0, r.stderr      # MOVE across a VMA split: the agent goes page by page
