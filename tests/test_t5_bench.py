"""Layer 5: `uswap bench` runs both backends and puts every global setting back.

Tiny sizes: these check the machinery (swap areas, memcg, page-cluster, JSON,
plot), not speed — speed is measured by running the bench, in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import need, need_root
from uswap.child import running

pytestmark = pytest.mark.kernel


def global_state() -> dict:
    with open("/proc/swaps") as f:
        swaps = f.read().splitlines()[1:]
    with open("/proc/sys/vm/page-cluster") as f:
        page_cluster = f.read().strip()
    groups = sorted(name for name in os.listdir("/sys/fs/cgroup/memory") if name.startswith("uswap-bench"))
    with open("/proc/mounts") as f:
        mounts = sorted(line.split()[1] for line in f if line.startswith("uswap "))
    loops = subprocess.run(["losetup", "--list", "--noheadings"], capture_output=True, text=True).stdout
    return {"swaps": swaps, "page_cluster": page_cluster, "groups": groups, "mounts": mounts, "loops": loops}


def need_bench_kernel() -> None:
    need_root()
    need(os.path.isdir("/sys/fs/cgroup/memory"), "no memcg v1 hierarchy at /sys/fs/cgroup/memory")


def test_bench_runs_both_backends_and_restores_everything(tmp_path):
    need_bench_kernel()
    before = global_state()
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "8M", "--resident", "4M", "--repeat", "2",
                        "--workloads", "seq,hog", "--io", "sync", "--against", "native,fuse", "--workdir",
                        str(tmp_path / "work"), "--json", str(out), "--plot", str(plot)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    result = json.loads(out.read_text())
    assert {"machine", "runs", "ratios"} <= set(result)
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 4  # repeats x workloads x (uswap/sync, native pc3, native pc0, fuse)
    for run in runs:
        assert {"workload", "backend", "io", "page_cluster", "repeat", "wall_s", "fault_p50_us", "fault_p99_us",
                "pswpin", "pswpout", "rewritten", "mismatches"} <= set(run)
        assert run["exit_code"] == 0 and run["mismatches"] == 0
    assert any(r["backend"] == "native" and r["pswpout"] > 0 for r in runs)  # the memcg made it swap
    assert any(r["backend"] == "fuse" and r["pswpout"] > 0 for r in runs)    # through the FUSE store
    assert any(r["backend"] == "uswap" and r["pswpout"] > 0 for r in runs)
    assert {(r["workload"], r["io"]) for r in result["ratios"]} == {
        ("seq", "sync"), ("hog", "sync"), ("seq", "fuse"), ("hog", "fuse")}
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "┃ ratio ┃" in r.stdout and "│ fuse │" in r.stdout


def test_bench_uswap_run_rows_beside_native(tmp_path):
    """--run sync: the native binaries, unmodified, under `uswap run` against a daemon the bench starts,
    beside kernel swap under a memcg in the same invocation; hog's 4 forked processes are one run."""
    need_bench_kernel()
    need(os.path.exists("/dev/userfaultfd"), "no /dev/userfaultfd")
    from uswap.run import LIBRUN
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    before = global_state()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    # 32 MiB through 8 MiB: long enough (~2 s a run) that the daemon's 10 ms rescan sees the memory and
    # evicts; at 8 MiB the program can end before the first tick and swap nothing.
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "32M", "--resident", "8M", "--repeat", "1",
                        "--workloads", "seq,random,hog", "--io", "", "--run", "sync", "--against", "native",
                        "--workdir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    result = json.loads(out.read_text())
    runs = result["runs"]
    rows = {(run["workload"], run["backend"]) for run in runs}
    assert rows == {(w, b) for w in ("seq", "random", "hog") for b in ("run", "native")}
    assert not any(run["backend"] == "uswap" for run in runs)      # --io "": no region rows
    for run in runs:
        assert run["exit_code"] == 0 and run["mismatches"] == 0, run
    line = (8 << 20) // 4096
    for run in (run for run in runs if run["backend"] == "run"):
        assert run["io"] == "sync" and run["pswpout"] > 0 and run["pswpin"] > 0, run   # the daemon swapped it
        assert 0 < run["run_max_resident_pages"] <= 2 * line, run     # the run's peak, near its budget line
        if run["workload"] == "hog":   # the parent and its 4 fork children: one released line each, one tree
            assert run["run_processes"] == 5 and run["run_forks"] == 4, run
            assert run["run_zero_fills"] >= 4 * (8 << 20) // 4096, run  # every child's first touches, summed
        else:
            assert run["run_processes"] == 1 and run["run_forks"] == 0 and run["faults"] > 0, run
    assert {(x["workload"], x["io"]) for x in result["ratios"]} == {
        (w, "run/sync") for w in ("seq", "random", "hog")}
    assert result["not_run"] == []
    assert "| hog | run/sync |" in md.read_text() and "Not run under `uswap run`" not in md.read_text()
    assert "│ run/sync │" in r.stdout


def test_bench_refuses_an_unknown_run_mode(tmp_path):
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--run", "sync,bogus", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "unknown --run io modes ['bogus']" in r.stderr


def test_bench_nfs_rows(tmp_path):
    """uswap over NFS: the bench starts its own ganesha (network namespace) and stops it."""
    need_bench_kernel()
    before = global_state()
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "8M", "--resident", "4M", "--repeat", "1",
                        "--workloads", "seq", "--io", "nfs,nfs-commit", "--against", "native", "--workdir",
                        str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    assert not _ganesha_running(tmp_path)     # the bench stopped the server it started
    runs = json.loads(out.read_text())["runs"]
    nfs = [run for run in runs if run["backend"] == "uswap"]
    assert {run["io"] for run in nfs} == {"nfs", "nfs-commit"}
    for run in nfs:
        assert run["exit_code"] == 0 and run["mismatches"] == 0 and run["pswpout"] > 0


def _ganesha_running(tmp_path) -> bool:
    pid_file = tmp_path / "work" / "nfs" / "ganesha.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def test_ctrl_c_restores_everything(tmp_path):
    need_bench_kernel()
    before = global_state()
    # Kernel rows only (--io ""), long enough to be caught mid-run; its own
    # session, so that whatever happens every process it started can be ended.
    proc = subprocess.Popen([sys.executable, "-m", "uswap", "bench", "--size", "64M", "--resident", "8M",
                             "--repeat", "1", "--workloads", "random", "--accesses", "100000000", "--io", "",
                             "--against", "native", "--workdir", str(tmp_path / "work")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while global_state()["swaps"] == before["swaps"] and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert global_state()["groups"], "the native run did not start"
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode != 0
    assert global_state() == before, err


def test_ctrl_c_while_a_child_starts_still_ends_it(tmp_path):
    """The Ctrl-C lands while Popen waits for the exec (the child sends it): the
    child must still be ended and reaped, not left running with no one to end it."""
    pid_file = tmp_path / "pid"

    def interrupt_parent():
        pid_file.write_text(str(os.getpid()))
        os.kill(os.getppid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with running(["sleep", "600"], preexec_fn=interrupt_parent):
            time.sleep(30)   # not reached: the interrupt is raised before the body runs
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_unknown_workload_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--workloads", "seq,bogus", "--workdir",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "unknown workloads ['bogus']" in r.stderr


def test_breakdown_splits_a_fault(tmp_path):
    need(os.geteuid() == 0 or os.path.exists("/dev/userfaultfd"), "no userfaultfd access")
    out = tmp_path / "bd.json"
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--breakdown", "--size", "16M", "--workdir",
                        str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    parts = {row["part"]: row["p50_us"] for row in json.loads(out.read_text())["breakdown"]}
    assert set(parts) == {"round trip", "store read", "install", "swap-in", "daemon, rest of the swap-in",
                          "store read, --encrypt off", "seal 4K (aes-256-gcm)", "open 4K (aes-256-gcm)",
                          "crc32c 4K on write", "crc32c 4K check on read", "C floor: random swap-in (this run)"}
    assert all(v > 0 for k, v in parts.items() if k != "daemon, rest of the swap-in")
    assert parts["swap-in"] > parts["install"]
    assert parts["C floor: random swap-in (this run)"] > parts["install"]   # a read and a round trip more
    assert "one swap-in fault" in r.stdout
