"""Layer 5: the real-programs bench (uswap.bench.programs) compares outputs and reports failures, not speed.

Tiny sizes: these check the machinery (the three backends, output hashes, FAILED and UNFINISHED rows, cleanup);
speed is measured by running the bench, in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_bench import need_bench_kernel

pytestmark = pytest.mark.kernel


def run_bench(tmp_path, *args: str) -> tuple[dict, str, str]:
    out, md = tmp_path / "programs.json", tmp_path / "programs.md"
    proc = subprocess.Popen([sys.executable, "-m", "uswap.bench.programs", "--workdir", str(tmp_path / "work"),
                             "--repeat", "1", "--json", str(out), "--markdown", str(md), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert_cleaned_up(proc.pid, tmp_path)
    return json.loads(out.read_text()), md.read_text(), output


def assert_cleaned_up(bench_pid: int, tmp_path) -> None:
    """The bench's memcg, swap area and daemons are gone (other helpers' may be there: only ours are looked at)."""
    assert not os.path.exists(f"/sys/fs/cgroup/memory/uswap-bench-{bench_pid}")
    with open("/proc/swaps") as f:
        assert str(tmp_path) not in f.read()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp_path).encode() in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert not left, f"processes left running with {tmp_path} in their command line: {left}"


def test_programs_bench_outputs_identical_and_a_mismatch_reported(tmp_path):
    """python-dict (about 3x an 8M budget) completes on all three backends with the plain run's output; the
    negative control env-probe, whose output differs under a memcg and under uswap run, is reported as a
    mismatch (FAILED, outputs NO), never as a time."""
    need_bench_kernel()
    # 8M: python-dict at a quarter of its size peaks at ~23 MiB, near 3x the budget, so that the run swaps
    # well before it ends (at 16M a 0.7 s run once ended with nothing swapped in).
    result, md, output = run_bench(tmp_path, "--budget", "8M", "--scale", "0.25",
                                   "--programs", "python-dict,env-probe")
    rows = {row["program"]: row for row in result["summary"]}
    dict_row = rows["python-dict"]
    assert dict_row["peak_rss_mib"] > 2 * 8, dict_row       # it does not fit the budget, by far
    for backend in ("plain", "native", "run"):
        assert dict_row[backend]["completed"] == 1, (backend, dict_row, output)
    assert dict_row["outputs_identical"] is True
    assert dict_row["run"]["output_identical"] is True and dict_row["native"]["output_identical"] is True
    assert dict_row["run_over_native"] > 0
    runs = [r for r in result["runs"] if r["program"] == "python-dict"]
    assert len({r["output_sha256"] for r in runs}) == 1, runs
    run_row = next(r for r in runs if r["backend"] == "run")
    assert run_row["run_processes"] == 1 and run_row["run_zero_fills"] > 0, run_row   # it really ran under uswap
    # The run's swap-in count is its own (the daemon's pswpin for it), carried into the summary.  Not required
    # to be > 0: the budget counts anonymous memory only, and from a wheel's venv (no editable-install .pth
    # imports) this program's stays under 8M (the daemon's count peaked at 1,872 pages of 2,048: nothing to
    # evict), while the memcg's peak includes its file pages; swapping under `uswap run` is tested in
    # test_run_* and test_bench.
    assert run_row["swap_ins"] is not None and dict_row["run"]["swap_ins"] == run_row["swap_ins"], run_row
    native_row = next(r for r in runs if r["backend"] == "native")
    assert native_row["memcg_pgmajfault"] > 0 and native_row["swap_ins"] == native_row["memcg_pgmajfault"]

    probe = rows["env-probe"]
    assert probe["outputs_identical"] is False
    for backend in ("native", "run"):
        assert probe[backend]["median_s"] is None
        assert probe[backend]["failed"] == ["output differs from the plain run's"], probe[backend]
        assert probe[backend]["output_identical"] is False
    line = next(line for line in md.splitlines() if line.startswith("| env-probe "))
    assert line.count("FAILED: 1x output differs") == 2 and "NO: native, run" in line, line
    assert "| python-dict " in md and "| yes |" in md


def test_programs_bench_reports_a_timeout_as_unfinished(tmp_path):
    """A run killed at its timeout is UNFINISHED, with no time and no median."""
    need_bench_kernel()
    result, md, output = run_bench(tmp_path, "--budget", "16M", "--programs", "python-dict", "--scale", "0.25",
                                   "--timeout-factor", "0.01", "--timeout-floor", "0.001")
    row = result["summary"][0]
    assert row["plain"]["completed"] == 1
    for backend in ("native", "run"):
        assert row[backend]["median_s"] is None and row[backend]["unfinished"] == 1, (row[backend], output)
    assert row["run_over_native"] is None
    line = next(line for line in md.splitlines() if line.startswith("| python-dict "))
    assert line.count("UNFINISHED") == 2, line
