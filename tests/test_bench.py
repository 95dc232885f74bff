"""Layer 5: `uswap bench` runs both backends and puts every global setting back.

Tiny sizes: these check the machinery (swap areas, memcg, page-cluster, JSON,
plot), not speed — speed is measured by running the bench, in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import io
import json
import os
import shutil
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
        assert run["run_engine_faults"] > 0, run                       # its fault threads served it
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


def test_striping_bench_rows(tmp_path):
    """The striping bench (uswap.bench.striping): its own servers on a private network, rate-limited links, a
    row per configuration; every run wrote out what the client wrote past the budget; nothing left mounted."""
    need_root()
    need(all(shutil.which(t) for t in ("ganesha.nfsd", "rpcbind", "ip", "tc", "unshare", "nsenter")),
         "nfs-ganesha, rpcbind or iproute2 not installed (scripts/install-deps)")
    out = tmp_path / "striping.json"
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "uswap.bench.striping", "--servers", "1,2", "--rate", "64mbit",
                        "--size", "24M", "--resident", "8M", "--repeat", "1", "--workdir", str(work),
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    configs = json.loads(out.read_text())["configs"]
    assert set(configs) == {"1 server at 64mbit", "2 servers at 64mbit", "1 server, no limit"}, configs
    for config in configs.values():
        (run,) = config["runs"]
        assert 24 - 8 - 1 <= run["written_mib"] <= 24 and run["mib_s"] > 0, run
    assert configs["1 server at 64mbit"]["median_mib_s"] < 64 / 8, configs     # the link is the limit
    assert "| 2 | 64mbit |" in r.stdout, r.stdout
    with open("/proc/self/mountinfo") as f:
        assert str(work) not in f.read()


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


def test_threads_workload_runs_in_a_region_and_natively(tmp_path):
    """`uswap bench --workloads threads`: 8 threads on one region, and the same binary in plain anonymous memory
    under the memcg limit, side by side; both verify every word."""
    need_bench_kernel()
    before = global_state()
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "16M", "--resident", "4M", "--repeat", "1",
                        "--workloads", "threads", "--io", "sync", "--against", "native", "--workdir",
                        str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    runs = json.loads(out.read_text())["runs"]
    assert {(run["backend"], run["page_cluster"]) for run in runs} == {("uswap", None), ("native", 3), ("native", 0)}
    for run in runs:
        assert run["failed"] is None and run["mismatches"] == 0 and run["pswpout"] > 0, run
    [ratio] = json.loads(out.read_text())["ratios"]
    assert ratio["workload"] == "threads" and ratio["uswap_over_native_wall"] > 0, ratio


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


def _fake_bench(tmp_path):
    """A bench whose runs are recorded from made-up RunResults (the report layer only): zswap is killed by the
    memcg OOM killer in every round of random and in one of two rounds of seq."""
    from uswap.bench.backends import RunResult
    from uswap.bench.runner import Bench, BenchConfig
    bench = Bench(BenchConfig(workloads=["seq", "random"], size=8 << 20, resident=4 << 20,
                              against=["native", "zswap"], io=["sync"], repeat=2, workdir=str(tmp_path)))
    ok = "mode=x faults=10 fault_p50_us=5.0 fault_p99_us=9.0 mismatches=0"
    for repeat in range(2):
        for workload in ("seq", "random"):
            for backend, mode, pc in bench.config.backends():
                wall = {"uswap": 1.0, "native": 2.0, "zswap": 4.0}[backend] + repeat
                killed = backend == "zswap" and (workload == "random" or repeat == 1)
                result = (RunResult(-9, "", "", 99.0, 5, 5, {"outside_budget_mib": 30.0}, oom_kills=1) if killed
                          else RunResult(0, ok, "", wall, 5, 5, {"outside_budget_mib": 7.0}))
                bench.runs.append(bench._record(workload, backend, mode, pc, repeat, result))
    return bench


def test_killed_runs_are_failed_not_times(tmp_path):
    """A run killed by a signal with an OOM kill in its memcg is FAILED (with why) in the JSON, the tables and
    the ratios, and left out of every median: 99 s, the killed runs' wall time, appears nowhere."""
    from uswap.bench.report import markdown, plot, table
    from uswap.bench.runner import Bench
    bench = _fake_bench(tmp_path)
    result = json.loads(json.dumps(bench.to_json()))
    why = "killed by SIGKILL (memcg OOM: 1 kill)"
    killed = [r for r in result["runs"] if r["failed"]]
    assert len(killed) == 3 and all(r["backend"] == "zswap" and r["failed"] == why for r in killed)
    assert all(r["failed"] is None for r in result["runs"] if r["backend"] != "zswap")
    ratios = {(r["workload"], r["io"]): r for r in result["ratios"]}
    assert ratios["random", "zswap"]["uswap_over_native_wall"] is None
    assert ratios["random", "zswap"]["failed"] == f"2 of 2 rounds failed: {why}"
    assert ratios["seq", "zswap"]["uswap_over_native_wall"] == 1.6    # 4 s (round 0 alone) over 2.5, not 99 s
    assert ratios["seq", "zswap"]["spread"] == [2.0, 2.0]               # round 0's pair alone
    assert ratios["seq", "sync"] == {"workload": "seq", "io": "sync", "uswap_over_native_wall": 0.6,
                                     "spread": [0.5, 0.667], "failed": None}
    md = markdown(Bench.from_json(result))
    assert "| random | zswap pc=3 | FAILED | - |" in md
    assert f"| random | zswap | failed | - | 2 of 2 rounds failed: {why} |" in md
    assert "| seq | zswap pc=3 | 4.00 | 7.0 |" in md and f"1 of 2 rounds failed: {why}" in md
    assert "99.00" not in md and "30.0" not in md
    from rich.console import Console
    console = Console(file=io.StringIO(), width=400)
    for t in table(bench):
        console.print(t)
    shown = console.file.getvalue()
    assert "│ random   │ zswap pc=3  │ FAILED │" in shown and "│ random   │ zswap │ failed │" in shown, shown
    assert "99.00" not in shown
    png = tmp_path / "b.png"
    plot(bench, str(png))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_old_json_failures_come_from_the_exit_code(tmp_path):
    """A --json from before runs carried "failed": a non-zero exit is still a failure, not a time."""
    from uswap.bench.report import markdown
    from uswap.bench.runner import Bench
    data = _fake_bench(tmp_path).to_json()
    for r in data["runs"]:
        del r["failed"]
    md = markdown(Bench.from_json(data))
    assert "| random | zswap pc=3 | FAILED |" in md and "2 of 2 rounds failed: exit -9" in md


def test_a_timed_out_run_is_failed_and_says_so():
    from uswap.bench.backends import run_failure, run_to_end
    proc, wall = run_to_end(["sleep", "30"], 0.2)
    assert proc.returncode == -signal.SIGKILL and wall < 20
    assert run_failure(proc.returncode, 0, proc.stderr) == "timed out after 0.2 s"
    assert run_failure(-signal.SIGKILL, 0, "") == "killed by SIGKILL"     # control: a kill from elsewhere
    assert run_failure(137, 0, "hog: a process died of signal 9\n") == "a child killed by SIGKILL"
    assert run_failure(1, 0, "x\nworkload: cannot map\n") == "exit 1: workload: cannot map"
    assert run_failure(0, 0, "") is None


def test_memcg_oom_kill_is_a_failed_run(tmp_path):
    """Real kernel: a native run whose memcg may not swap (memory.swappiness 0) is OOM-killed; the run says so."""
    need_bench_kernel()
    from uswap.bench.backends import KernelSwap, run_failure
    from uswap.bench.build import workload_binaries
    before = global_state()
    workload = workload_binaries()["workload"]
    with KernelSwap(str(tmp_path), budget=4 << 20, swap_size=32 << 20, page_cluster=3) as swap:
        with open(os.path.join(swap.group, "memory.swappiness"), "w") as f:
            f.write("0")
        killed = swap.run([workload, "seq", "-a", "-s", "16"], 120)
    with KernelSwap(str(tmp_path), budget=4 << 20, swap_size=32 << 20, page_cluster=3) as swap:   # control
        completed = swap.run([workload, "seq", "-a", "-s", "16"], 120)
    assert global_state() == before
    assert killed.returncode == -signal.SIGKILL and killed.oom_kills >= 1, killed
    assert run_failure(killed.returncode, killed.oom_kills, killed.stderr).startswith(
        "killed by SIGKILL (memcg OOM: ")
    assert completed.returncode == 0 and completed.oom_kills == 0 and completed.pswpout > 0, completed
    assert run_failure(completed.returncode, completed.oom_kills, completed.stderr) is None
    assert completed.extra["outside_budget_mib"] == 0.0


@pytest.mark.parametrize("fill", ["0", "0.5", "1"])
def test_workloads_fill_and_verify_every_fraction(fill):
    """-f FRACTION: that part of every page is random, the rest zeros, and all of it is verified."""
    from uswap.bench.build import workload_binaries
    binaries = workload_binaries()
    r = subprocess.run([binaries["workload"], "random", "-a", "-s", "4", "-n", "5000", "-f", fill],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mismatches=0" in r.stdout, r.stdout + r.stderr
    assert f"random_bytes_per_page={round(float(fill) * 510) * 8}" in r.stdout
    r = subprocess.run([binaries["workload"], "threads", "-a", "-t", "4", "-s", "4", "-n", "5000", "-f", fill],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "mismatches=0" in r.stdout and " threads=4" in r.stdout, r.stdout + r.stderr
    assert f"random_bytes_per_page={round(float(fill) * 510) * 8}" in r.stdout
    r = subprocess.run([binaries["hog"], "-a", "-s", "4", "-p", "2", "-f", fill], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr


def test_fill_half_is_half_compressible(tmp_path):
    """--fill half through zram: the pages compress about 2:1 and verify; the default (zeros past a header) is
    the negative control, compressing far better."""
    need_bench_kernel()
    need(os.path.exists("/sys/block/zram0"), "no zram0")
    before = global_state()
    ratio = {}
    for fill in ("half", "zeros"):
        out = tmp_path / f"{fill}.json"
        r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "16M", "--resident", "4M", "--repeat",
                            "1", "--workloads", "seq", "--io", "", "--against", "zram", "--fill", fill, "--workdir",
                            str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        [run] = json.loads(out.read_text())["runs"]
        assert run["failed"] is None and run["mismatches"] == 0 and run["pswpout"] > 0, run
        assert run["outside_budget_mib"] > 0 and run["pool_orig_mib"] > 0, run
        ratio[fill] = run["pool_compressed_mib"] / run["pool_orig_mib"]
    assert global_state() == before
    assert 0.4 < ratio["half"] < 0.75, ratio
    assert ratio["zeros"] < 0.1, ratio


# -- the compressed pool's rows and equal total memory (issue 21) ----------------------------------------------------

def test_bench_refuses_pool_options_it_cannot_honour(tmp_path):
    def bench(*args):
        return subprocess.run([sys.executable, "-m", "uswap", "bench", "--workdir", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)
    r = bench("--resident", "8M", "--pool", "5M")
    assert r.returncode == 1 and "--pool 5M is over half of --resident 8M" in r.stderr, r.stderr
    r = bench("--pool-compressor", "zstd")
    assert r.returncode == 1 and "--pool-compressor without --pool" in r.stderr, r.stderr
    r = bench("--resident", "8M", "--pool", "2M", "--io", "", "--run", "")
    assert r.returncode == 1 and "--pool adds rows next to the uswap rows" in r.stderr, r.stderr
    r = bench("--pool", "2M", "--pool-compressor", "lzo")
    assert r.returncode == 2 and "invalid choice: 'lzo'" in r.stderr, r.stderr
    r = bench("--workloads", "seq:half,random:lots")
    assert r.returncode == 1 and "--workloads random:lots: after the colon say zeros" in r.stderr, r.stderr
    r = bench("--workloads", "seq:half,bogus:zeros")
    assert r.returncode == 1 and "unknown workloads ['bogus']" in r.stderr, r.stderr


def test_pool_rows_interleave_after_their_plain_rows(tmp_path):
    from uswap.bench.runner import Bench, BenchConfig
    config = BenchConfig(workloads=["seq:half", "hog"], size=16 << 20, resident=8 << 20, against=["native", "zram"],
                         io=["sync"], run=["sync"], repeat=1, workdir=str(tmp_path), pool=2 << 20)
    assert config.backends() == [("uswap", "sync", None), ("uswap+pool", "sync", None), ("run", "sync", None),
                                 ("run+pool", "sync", None), ("native", None, 3), ("native", None, 0),
                                 ("zram", None, 3)]
    bench = Bench(config)
    binaries = {"workload": "W", "hog": "H"}
    assert bench.command(binaries, "seq:half", False, None)[-2:] == ["-f", "0.5"]   # its own fill
    assert "-f" not in bench.command(binaries, "hog", True, None)                 # hog's own: random
    assert bench.command(binaries, "hog", True, None)[-1] == "-a"
    config.pool = 0
    assert [b for b, _, _ in config.backends()] == ["uswap", "run", "native", "native", "zram"]


def _pool_bench(tmp_path, equal_memory=False):
    """Made-up RunResults through the real recording path: uswap, uswap+pool, zram and zswap on seq (zswap
    killed in both rounds, zram completing) and uswap+pool killed once on hog."""
    from uswap.bench.backends import RunResult
    from uswap.bench.runner import Bench, BenchConfig
    bench = Bench(BenchConfig(workloads=["seq:half", "hog"], size=16 << 20, resident=8 << 20,
                              against=["zram", "zswap"], io=["sync"], repeat=2, workdir=str(tmp_path),
                              pool=2 << 20, pool_compressor="lz4", equal_memory=equal_memory))
    ok = "mode=x faults=10 fault_p50_us=5.0 fault_p99_us=9.0 mismatches=0"
    hog_ok = "\n".join(f"hog[{i}] pid 1, 4 MiB, 3 rounds, 0 mismatches" for i in range(4))
    pool = {"pool_peak_pages": 1500, "pool_peak_compressed_mib": 3.1, "pool_ratio": 1.9, "pool_written_back": 700,
            "pool_rejected": 12, "pool_stores": 4000, "pool_loads": 3900, "pool_corrupted": 0, "pool_mib": 2.0}
    for repeat in range(2):
        for workload in ("seq:half", "hog"):
            for backend, mode, pc in bench.config.backends():
                wall = {"uswap": 2.0, "uswap+pool": 1.5, "zram": 1.0 + repeat, "zswap": 0.5}[backend]
                extra = {"outside_budget_mib": {"uswap": 40.0, "uswap+pool": 41.0, "zram": 5.0, "zswap": 3.0}[backend]}
                if backend == "uswap+pool":
                    extra.update(pool)
                killed = backend == "zswap" or (backend == "uswap+pool" and workload == "hog" and repeat == 1)
                out = hog_ok if workload == "hog" else ok
                result = (RunResult(-9, "", "", 99.0, 5, 5, {"outside_budget_mib": 77.0}, oom_kills=1) if killed
                          else RunResult(0, out, "", wall, 5, 5, extra))
                limit = None
                if equal_memory and backend == "zram":
                    limit = (3 << 20) if workload == "seq:half" else (6 << 20)
                bench.runs.append(bench._record(workload, backend, mode, pc, repeat, result, limit))
    return bench


def test_pool_columns_and_peer_ratios_from_saved_json(tmp_path):
    """The report side of the +pool rows, from a saved --json: pool columns (medians over completed runs) for
    the uswap+pool rows and '-' elsewhere; the total column = limit + outside; each uswap row over the faster
    completed peer, with both totals; killed runs still FAILED and out of every median (99 s, 77 MiB nowhere)."""
    from uswap.bench.report import markdown, plot, table
    from uswap.bench.runner import Bench
    result = json.loads(json.dumps(_pool_bench(tmp_path).to_json()))
    bench = Bench.from_json(result)
    md = markdown(bench)
    header = md.splitlines()[0]
    assert ("| wall s | outside budget MiB | total MiB | fault p50 µs |" in header
            and "| pool pages at peak | pool MiB at peak | pool ratio | pool written back | pool rejected | "
                "mismatches | failed |" in header), header
    assert "limit MiB" not in header and "equal memory" not in header
    assert ("| seq:half | uswap+pool/sync | 1.50 | 41.0 | 49.0 | 5.0 | 9.0 | 5 | 5 | 0 | - | - | 1500 | 3.1 | 1.90 "
            "| 700 | 12 | 0 | - |") in md, md
    assert "| seq:half | uswap/sync | 2.00 | 40.0 | 48.0 | 5.0 | 9.0 | 5 | 5 | 0 | - | - | - | - | - | - | - | 0 | - |" in md
    rows = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| seq:half |")]
    assert rows[:2] == ["uswap/sync", "uswap+pool/sync"], rows    # the pool row right after its plain row
    why = "killed by SIGKILL (memcg OOM: 1 kill)"
    assert f"| hog | uswap+pool/sync | 1.50 | 41.0 | 49.0 |" in md and f"1 of 2 rounds failed: {why}" in md
    assert "| seq:half | zswap pc=3 | FAILED | - | - |" in md
    peers = {(r["workload"], r["row"]): r for r in result["peer_ratios"]}
    # zswap failed every round: the faster completed peer is zram (median of 1.0 and 2.0 = 1.5)
    assert peers["seq:half", "uswap+pool/sync"] == {
        "workload": "seq:half", "row": "uswap+pool/sync", "wall_s": 1.5, "total_mib": 49.0, "peer": "zram",
        "peer_wall_s": 1.5, "peer_total_mib": 13.0, "over_peer_wall": 1.0, "failed": f"zswap: 2 of 2 rounds failed: {why}"}
    assert peers["hog", "uswap+pool/sync"]["failed"].startswith(f"1 of 2 rounds failed: {why}; zswap: ")
    assert peers["hog", "uswap/sync"]["over_peer_wall"] == round(2.0 / 1.5, 3)
    assert "| seq:half | uswap+pool/sync | 1.50 | 49.0 | zram | 1.50 | 13.0 | 1.00 |" in md
    assert "99.00" not in md and "77.0" not in md
    assert result["ratios"] == []      # no native row: nothing to be over
    from rich.console import Console
    console = Console(file=io.StringIO(), width=400)
    for t in table(bench):
        console.print(t)
    shown = console.file.getvalue()
    assert "uswap+pool/sync" in shown and "faster peer" in shown and "99.00" not in shown
    png = tmp_path / "p.png"
    plot(bench, str(png))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_equal_memory_columns_from_saved_json(tmp_path):
    """With --equal-memory each row shows the limit its runs had, its total, and whether calibration found equal
    memory for it (or why not)."""
    from uswap.bench.report import markdown
    from uswap.bench.runner import Bench
    bench = _pool_bench(tmp_path, equal_memory=True)
    bench.limits = {"seq:half zram/pc3": {"limit": 3 << 20, "note": None, "tried": [[8 << 20, 5.0], [3 << 20, 5.0]]},
                    "hog zram/pc3": {"limit": 6 << 20, "note": None, "tried": [[8 << 20, 3.0], [6 << 20, 2.5]]},
                    "seq:half uswap/sync": {"limit": 8 << 20, "note": "not arrangeable: ...", "tried": [[8 << 20, 40.0]]}}
    md = markdown(Bench.from_json(json.loads(json.dumps(bench.to_json()))))
    assert "| wall s | outside budget MiB | total MiB | limit MiB | fault p50 µs |" in md.splitlines()[0]
    assert md.splitlines()[0].endswith("| mismatches | failed | equal memory |")
    assert "| seq:half | zram pc=3 | 1.50 | 5.0 | 8.0 | 3.0 |" in md and md.count("| yes |") == 1, md
    assert "| seq:half | uswap/sync | 2.00 | 40.0 | 48.0 | 8.0 |" in md and "| not arrangeable: ... |" in md
    # calibration found 6 MiB, but the timed runs used 5 MiB outside it: 11 MiB, over 8 + 1; the row says so
    assert "| hog | zram pc=3 | 1.50 | 5.0 | 11.0 | 6.0 |" in md and ("| not in the timed runs: their total 11.0 MiB "
                                                                     "is over 9.0 MiB (the calibration runs': 8.0 + "
                                                                     "3.0, 6.0 + 2.5) |") in md, md


def test_equal_memory_calibration_lowers_limits_or_says_why():
    """uswap.bench.equal.calibrate against outside-use curves of the backends' shapes (MiB outside at a limit)."""
    from uswap.bench.equal import calibrate, floor, tolerance
    MiB = 1 << 20
    total = 64 * MiB
    assert tolerance(total) == total // 20 and floor(total) == 16 * MiB and tolerance(8 * MiB) == MiB

    def curve(f):
        tried = []

        def measure(limit):
            tried.append(limit)
            return f(limit / MiB)
        return measure, tried

    # uswap: the daemon's RSS hardly depends on its budget: one lowering
    measure, tried = curve(lambda limit: (40.0, None))
    found = calibrate(total, measure)
    assert found.limit == 24 * MiB and found.note is None and tried == [64 * MiB, 24 * MiB]
    assert found.tried == [[64 * MiB, 40.0], [24 * MiB, 40.0]]
    # zram with well-compressing pages: a small pool, growing a little as the limit drops
    measure, tried = curve(lambda limit: ((256 - limit) / 60 + 1, None))
    found = calibrate(total, measure)
    assert found.note is None and 56 * MiB < found.limit < 60 * MiB and len(tried) == 2
    assert found.limit + ((256 - found.limit / MiB) / 60 + 1) * MiB <= total + tolerance(total)
    # zram with pages that compress to half: no limit gives equal memory; the row runs at T and says why
    measure, tried = curve(lambda limit: ((256 - limit) * 0.55, None))
    found = calibrate(total, measure)
    assert found.limit == total and tried == [total] and found.note.startswith(
        "not arrangeable: it used 105.6 MiB outside a 64.0 MiB limit; equal memory would need a limit of -41.6 MiB"), \
        found.note
    # a backend that fails once lowered: its timed runs are at the lowered limit, to show the failure
    measure, tried = curve(lambda limit: (10.0, None if limit == 64 else "killed by SIGKILL (memcg OOM: 1 kill)"))
    found = calibrate(total, measure)
    assert found.limit == 54 * MiB and found.note == ("failed at the lowered limit 54.0 MiB "
                                                      "(killed by SIGKILL (memcg OOM: 1 kill))")
    # failed at T, or nothing measured: not lowered
    measure, _ = curve(lambda limit: (None, "exit 1: x"))
    assert calibrate(total, measure).limit == total and "failed at 64.0 MiB: exit 1: x" in calibrate(total, measure).note
    measure, _ = curve(lambda limit: (None, None))
    assert calibrate(total, measure).note == "what it uses outside its limit is not measured: not lowered"
    # each lowering costs as much outside as it gives: after 3 runs the last estimate, with a note
    measure, tried = curve(lambda limit: (10.0 if limit == 64 else 74 - limit, None))
    found = calibrate(total, measure)
    assert tried == [64 * MiB, 54 * MiB, 44 * MiB] and found.limit == 34 * MiB
    assert found.note == ("not within 3.2 MiB of 64.0 MiB after 3 calibration runs "
                          "(last: 30.0 MiB outside 44.0 MiB)"), found.note


def test_bench_equal_memory_calibrates_on_the_real_kernel(tmp_path):
    """--equal-memory, real runs: zram's memcg limit is lowered by its pool (pages half random: well over the
    1 MiB tolerance), uswap's daemon RSS (tens of MiB) cannot fit under a 12 MiB total and its row says so and
    runs at 12 MiB; native is not calibrated (nothing outside).  Every timed run's limit is the one calibration
    found, and its total is its limit + what it used outside."""
    need_bench_kernel()
    need(os.path.exists("/sys/block/zram0"), "no zram0")
    before = global_state()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "16M", "--resident", "12M", "--repeat", "1",
                        "--workloads", "seq:half", "--io", "sync", "--against", "native,zram", "--equal-memory",
                        "--workdir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    result = json.loads(out.read_text())
    limits = result["limits"]
    total = 12 << 20
    assert set(limits) == {"seq:half uswap/sync", "seq:half zram/pc3", "seq:half native/pc3", "seq:half native/pc0"}
    assert limits["seq:half native/pc3"] == {"limit": total, "note": None, "tried": []}
    uswap = limits["seq:half uswap/sync"]
    assert uswap["limit"] == total and uswap["note"].startswith("not arrangeable: it used "), uswap
    assert len(uswap["tried"]) == 1 and uswap["tried"][0][1] > 12, uswap
    zram = limits["seq:half zram/pc3"]
    assert zram["tried"][0][0] == total and zram["tried"][0][1] > 1, zram   # over the tolerance at T
    assert zram["tried"][1][0] < total and zram["limit"] < total, zram        # so lowered
    assert len(result["calibration"]) == 1 + len(zram["tried"])
    assert all(c["repeat"] == -1 and c["failed"] is None for c in result["calibration"])
    for run in result["runs"]:
        label = f"{run['backend']}/" + (run["io"] or f"pc{run['page_cluster']}")
        assert run["failed"] is None and run["mismatches"] == 0, run
        assert run["limit_mib"] == round(limits[f"seq:half {label}"]["limit"] / (1 << 20), 1), run
        assert run["total_mib"] == round(run["limit_mib"] + run["outside_budget_mib"], 1), run
    assert "| equal memory |" in md.read_text() and "not arrangeable" in md.read_text()



def test_bench_pool_rows_against_a_real_daemon(tmp_path):
    """--pool 4M: each round runs uswap/sync, uswap+pool/sync, run/sync, run+pool/sync in that order, the pooled
    ones against a daemon started with --pool 4M --pool-compressor lz4.  Pages zeros past a header fill the pool
    at a high ratio; half-random ones at about 2:1; the hog's random pages are rejected.  Outside budget is the
    daemon's RSS without the pool's charge (inside the budget), never more than the RSS nor less than RSS minus
    the largest charge; the plain rows' is their RSS, as before."""
    need_bench_kernel()
    need(os.path.exists("/dev/userfaultfd"), "no /dev/userfaultfd")
    from uswap.run import LIBRUN
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    before = global_state()
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    workloads = ("seq:zeros", "random:half", "hog")
    r = subprocess.run([sys.executable, "-m", "uswap", "bench", "--size", "32M", "--resident", "8M", "--repeat", "1",
                        "--workloads", ",".join(workloads), "--io", "sync", "--run", "sync", "--against", "",
                        "--pool", "4M", "--pool-compressor", "lz4", "--workdir", str(tmp_path / "work"),
                        "--json", str(out), "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert global_state() == before
    runs = json.loads(out.read_text())["runs"]
    assert [(run["workload"], run["backend"]) for run in runs] == [
        (w, b) for w in workloads for b in ("uswap", "uswap+pool", "run", "run+pool")]
    for run in runs:
        assert run["failed"] is None and run["mismatches"] == 0, run
        assert run["total_mib"] == round(run["limit_mib"] + run["outside_budget_mib"], 1) and run["limit_mib"] == 8
        if not run["backend"].endswith("+pool"):
            assert "pool_stores" not in run and run["outside_budget_mib"] == run["daemon_rss_mib"], run
            continue
        assert run["pool_mib"] == 4.0 and run["pool_compressor"] == "lz4" and run["pool_corrupted"] == 0, run
        assert run["daemon_rss_mib"] - run["pool_peak_charged_mib"] - 0.1 <= run["outside_budget_mib"] \
            <= run["daemon_rss_mib"], run
        assert run["pool_peak_compressed_mib"] <= 4.0, run
        if run["workload"] == "hog":     # random pages: offered, refused, written to the store
            assert run["pool_rejected"] > 0 and run["pool_rejected"] >= run["pool_stores"], run
        else:
            assert run["pool_stores"] > 0 and run["pool_peak_pages"] > 0 and run["pool_loads"] > 0, run
            assert run["pool_peak_charged_mib"] > 0 and run["outside_budget_mib"] < run["daemon_rss_mib"], run
            assert run["pool_ratio"] > (10 if run["workload"] == "seq:zeros" else 1.4), run
    text = md.read_text()
    assert "| pool pages at peak | pool MiB at peak | pool ratio | pool written back | pool rejected |" in text
    assert "| seq:zeros | uswap+pool/sync |" in text and "| hog | run+pool/sync |" in text
