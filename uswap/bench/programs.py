"""Real, unmodified programs under `uswap run`, beside kernel swap under a memcg of the same limit.

    python3 -m uswap.bench.programs [--budget 32M] [--programs python-dict,sqlite,sort,xz,java]
                                    [--repeat 3] [--scale 1] [--timeout-factor 10] [--timeout-cap 600]
                                    [--workdir DIR] [--json FILE] [--markdown FILE]

Each program runs as it is shipped (python3, sqlite through python's sqlite3 module, GNU sort, xz, a JVM) on an
input made in ``--workdir`` from a fixed seed, sized so that its peak RSS is about 3-4x ``--budget`` (the plain
run's peak RSS is reported as the working set).  Per round and program, interleaved:

- ``plain``: no limit, the reference for time and output;
- ``native``: a memcg v1 group with memory.limit_in_bytes = budget, kernel swap to a swapfile in the workdir,
  page-cluster 3 (uswap.bench.backends.KernelSwap; the input file's page cache is charged to the group too);
- ``run``: a uswap daemon (--resident budget, --io sync) on a store in the workdir and
  ``uswap run --resident BUDGET -- PROGRAM`` (uswap.bench.backends.UswapRun; the budget counts the program's
  anonymous pages, not the page cache).

A run's output is its stdout and, where the program writes one, its output file: a run whose hash differs from
the plain run's of the same round has failed ("output differs").  A run killed by a signal, by the memcg's OOM
killer, or ended by a non-zero exit is FAILED; one killed at its timeout (``--timeout-factor`` x that round's plain
wall, at least ``--timeout-floor``, at most ``--timeout-cap`` seconds) is UNFINISHED; neither has a time.  Medians
over the rounds that completed.  pswpin/pswpout of native rows are /proc/vmstat's, system-wide (memcg v1 has no
per-group swap counts); the table's swap-ins are the program's own: the memcg's major faults (memory.stat
pgmajfault: swap-ins and input-file reads) and the daemon's slot reads (pswpin) for the run rows.

Programs not in the default set: ``env-probe`` prints what differs between backends (its environment's USWAP
variables, its memory cgroup): a negative control whose outputs must be reported as differing.  Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from uswap.bench.backends import (KernelSwap, PeakSampler, RunResult, UswapRun, _status_kib, read_vmstat,
                                  run_failure, run_to_end)
from uswap.config import DEFAULTS
from uswap.core import PAGE_SIZE
from uswap.store.mkswap import mkswap
from uswap.units import format_size, parse_size

MiB = 1 << 20
DEFAULT_BUDGET = 32 * MiB
DEFAULT_PROGRAMS = ("python-dict", "sqlite", "sort", "xz", "java")
BACKENDS = ("plain", "native", "run")
UNFINISHED = "UNFINISHED"

# -- the programs ------------------------------------------------------------------------------------------------

# A 64-bit LCG (Knuth's MMIX constants): the same sequence in the Python and Java programs, from a seed.
LCG_MUL, LCG_ADD, MASK64 = 6364136223846793005, 1442695040888963407, (1 << 64) - 1

PYTHON_DICT = """\
import hashlib, sys
n, x0 = int(sys.argv[1]), int(sys.argv[2])
d = {}
x = x0
for i in range(n):
    x = (x * %(mul)d + %(add)d) & %(mask)d
    d[f"k{x:016x}"] = i
total = 0
x = x0
for i in range(n):
    x = (x * %(mul)d + %(add)d) & %(mask)d
    v = d[f"k{x:016x}"]
    if v != i:
        sys.exit(f"python-dict: key {i} holds {v}")
    total += v
h = hashlib.sha256()
for k in sorted(d)[::max(1, n // 1000)]:
    h.update(k.encode())
print(len(d), total, h.hexdigest())
""" % {"mul": LCG_MUL, "add": LCG_ADD, "mask": MASK64}

PYTHON_SQLITE = """\
import hashlib, sqlite3, sys
n, x0 = int(sys.argv[1]), int(sys.argv[2])
db = sqlite3.connect(":memory:")
db.execute("PRAGMA cache_size=-4000000")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, grp INTEGER, name TEXT, payload TEXT)")
def rows():
    x = x0
    for i in range(n):
        x = (x * %(mul)d + %(add)d) & %(mask)d
        yield (i, x %% 1000, f"n{x:016x}", f"{x:x}" * 4)
db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows())
db.execute("CREATE INDEX t_name ON t(name)")
h = hashlib.sha256()
for row in db.execute("SELECT grp, count(*), sum(length(payload)), min(name), max(name) FROM t "
                      "GROUP BY grp ORDER BY grp"):
    h.update(repr(row).encode())
for row in db.execute("SELECT id, name FROM t ORDER BY name LIMIT 5 OFFSET ?", (n // 2,)):
    h.update(repr(row).encode())
print(n, h.hexdigest())
""" % {"mul": LCG_MUL, "add": LCG_ADD, "mask": MASK64}

JAVA_SOURCE = """\
import java.util.*;
public class UswapBenchHeap {
    public static void main(String[] a) {
        int n = Integer.parseInt(a[0]);
        long x = Long.parseLong(a[1]);
        long[] big = new long[n];
        for (int i = 0; i < n; i++) { x = x * %(mul)dL + %(add)dL; big[i] = x; }
        HashMap<Long, Integer> m = new HashMap<>();
        for (int i = 0; i < n / 16; i++) m.put(big[(int) Long.remainderUnsigned(big[i], n)], i);
        Arrays.sort(big);
        long s = 0;
        for (int i = 0; i < n; i += 7) s += big[i] ^ i;
        for (int i = 0; i < n / 16; i++) { Integer v = m.get(big[i * 16]); if (v != null) s += v; }
        System.out.println(n + " " + m.size() + " " + Long.toHexString(s));
    }
}
""" % {"mul": LCG_MUL, "add": LCG_ADD}

ENV_PROBE = """\
import os
print(sorted(k for k in os.environ if k.startswith("USWAP")))
print([line for line in open("/proc/self/cgroup") if ":memory:" in line])
"""


@dataclass(frozen=True)
class Invocation:
    argv: list[str]
    output: str | None = None      # a file the program writes, hashed with its stdout; removed before each run


def text_file(path: str, size: int, seed: int) -> str:
    """``size`` bytes of lines of words from a seeded vocabulary (compressible like text, unsorted), made once:
    written beside and renamed, so that an interrupted bench leaves no short file behind."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    r = random.Random(seed)
    vocabulary = ["".join(r.choices("abcdefghijklmnopqrstuvwxyz", k=r.randint(3, 10))) for _ in range(5000)]
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
        written = 0
        while written < size:
            line = " ".join(r.choices(vocabulary, k=8)) + "\n"
            line = line[:size - written]
            f.write(line)
            written += len(line)
    os.rename(f.name, path)
    return path


class Program:
    """One program: what it is, and its command line for a budget (inputs made in the workdir).  ``per_mib``
    is its size per MiB of budget, chosen so that the plain run's peak RSS is about 3.5x the budget."""
    name = ""
    what = ""
    per_mib = 0

    def size(self, budget: int, scale: float) -> int:
        return max(1, int(self.per_mib * budget / MiB * scale))

    def invocation(self, workdir: str, budget: int, scale: float, seed: int) -> Invocation:
        raise NotImplementedError


class PythonScript(Program):
    """A ``python3 -c`` program, given its size and the seed."""
    script = ""

    def invocation(self, workdir, budget, scale, seed):
        return Invocation([sys.executable, "-c", self.script, str(self.size(budget, scale)), str(seed)])


class PythonDict(PythonScript):
    name = "python-dict"
    what = "python3 -c: a dict of N str keys, every key read back and checked, a sample of sorted keys hashed"
    per_mib = 20_000
    script = PYTHON_DICT


class Sqlite(PythonScript):
    name = "sqlite"
    what = "python3's sqlite3, :memory:: N rows inserted, an index built, GROUP BY and ORDER BY queries hashed"
    per_mib = 13_000
    script = PYTHON_SQLITE


class Sort(Program):
    name = "sort"
    what = "GNU sort -S 1G --parallel=1 of a text file (in memory: one run, no temporary files)"
    per_mib = int(1.8 * MiB)     # bytes of input per MiB of budget

    def invocation(self, workdir, budget, scale, seed):
        size = self.size(budget, scale)
        src = text_file(os.path.join(workdir, f"sort-{size}-{seed}.txt"), size, seed)
        out = os.path.join(workdir, "sort.out")
        return Invocation(["sort", "-S", "1G", "--parallel=1", "-o", out, src], out)


class Xz(Program):
    name = "xz"
    what = "xz -9 -T1 of a text file (the .xz compared); its match finder's hash table is ~30 MiB at any size"
    per_mib = int(0.25 * MiB)

    def invocation(self, workdir, budget, scale, seed):
        size = self.size(budget, scale)
        src = text_file(os.path.join(workdir, f"xz-{size}-{seed}.txt"), size, seed)
        return Invocation(["xz", "-9", "-T1", "-k", "-f", src], src + ".xz")


class Java(Program):
    name = "java"
    what = ("java 17 (SerialGC, -Xms = -Xmx = 4x budget): a long[N] filled, a HashMap of N/16 boxed entries, "
            "the array sorted, both summed; compiled with javac once, outside the timing")
    per_mib = 150_000

    def invocation(self, workdir, budget, scale, seed):
        classes = os.path.join(workdir, "java")
        if not os.path.exists(os.path.join(classes, "UswapBenchHeap.class")):
            os.makedirs(classes, exist_ok=True)
            source = os.path.join(classes, "UswapBenchHeap.java")
            with open(source, "w") as f:
                f.write(JAVA_SOURCE)
            subprocess.run(["javac", "-d", classes, source], check=True)
        heap = f"{max(16 * MiB, 4 * budget) // MiB}m"
        return Invocation(["java", "-XX:+UseSerialGC", "-XX:-UsePerfData", f"-Xms{heap}", f"-Xmx{heap}",
                           "-cp", classes, "UswapBenchHeap", str(self.size(budget, scale)), str(seed)])


class EnvProbe(PythonScript):
    name = "env-probe"
    what = "negative control: prints its USWAP variables and memory cgroup, which differ between backends"
    script = ENV_PROBE     # its size and seed arguments unused


PROGRAMS: dict[str, Program] = {p.name: p for p in (PythonDict(), Sqlite(), Sort(), Xz(), Java(), EnvProbe())}

# -- running -----------------------------------------------------------------------------------------------------


def run_plain(cmd: list[str], timeout: float) -> tuple[RunResult, int]:
    """The reference run, no limit: its result and peak RSS in bytes (VmHWM of the program's own process,
    sampled until it exits: wait4's ru_maxrss would count the bench's RSS, which the child had before exec)."""
    before = read_vmstat()
    sampler = PeakSampler(lambda: {}, interval=0.01)

    def sampling(proc) -> PeakSampler:
        sampler.read = lambda: {"hwm": _vm_hwm(proc.pid)}
        return sampler

    proc, wall = run_to_end(cmd, timeout, during=sampling, stdin=subprocess.DEVNULL)
    after = read_vmstat()
    return RunResult(proc.returncode, proc.stdout, proc.stderr, wall, after["pswpin"] - before["pswpin"],
                     after["pswpout"] - before["pswpout"]), sampler.peak.get("hwm", 0)


def _vm_hwm(pid: int) -> int:
    """A process's peak RSS so far in bytes (0 once it has been reaped)."""
    try:
        return _status_kib(pid, "VmHWM:") * 1024
    except OSError:
        return 0


def memcg_faults(group: str) -> dict:
    """The group's own fault counts (memcg v1 memory.stat; the group is the run's alone, made for it): major
    faults are its swap-ins and the reads of its input file, unlike /proc/vmstat's pswpin, which is the
    machine's."""
    stat = {}
    with open(os.path.join(group, "memory.stat")) as f:
        for line in f:
            key, value = line.split()
            stat[key] = int(value)
    return {"memcg_pgmajfault": stat.get("pgmajfault"), "memcg_pgfault": stat.get("pgfault")}


def output_hash(stdout: str, output: str | None) -> str:
    h = hashlib.sha256(stdout.encode())
    if output is not None:
        h.update(b"\0file\0")
        try:
            with open(output, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            h.update(b"(none)")
    return h.hexdigest()


@dataclass
class Config:
    budget: int = DEFAULT_BUDGET
    programs: list[str] = field(default_factory=lambda: list(DEFAULT_PROGRAMS))
    repeat: int = 3
    scale: float = 1.0
    seed: int = 1
    timeout_factor: float = 10.0
    timeout_floor: float = 30.0
    timeout_cap: float = 600.0
    workdir: str = "/var/tmp/uswap-bench-programs"

    @property
    def swap_size(self) -> int:
        """The native swapfile and the daemon's store: room for 8x the budget, and 64 MiB more."""
        return 8 * self.budget + 64 * MiB


def timeout_for(cfg: Config, plain_wall: float | None) -> float:
    if plain_wall is None:
        return cfg.timeout_cap
    return min(cfg.timeout_cap, max(cfg.timeout_floor, cfg.timeout_factor * plain_wall))


def record(program: str, backend: str, round_: int, r: RunResult, digest: str, plain_digest: str | None,
           timeout: float) -> dict:
    why = run_failure(r.returncode, r.oom_kills, r.stderr)
    unfinished = why is not None and why.startswith("timed out")
    identical = None     # a run that failed otherwise has no output to compare
    if why is None and plain_digest is not None:
        identical = digest == plain_digest
        if not identical:
            why = "output differs from the plain run's"
    return {"program": program, "backend": backend, "round": round_, "wall_s": round(r.wall_s, 3),
            "exit_code": r.returncode, "oom_kills": r.oom_kills, "failed": why, "unfinished": unfinished,
            "output_sha256": digest, "output_identical": identical,
            "timeout_s": round(timeout, 1), "pswpin": r.pswpin, "pswpout": r.pswpout, **r.extra,
            # the program's own swap-ins: the memcg's major faults (native), the daemon's slot reads (run)
            "swap_ins": r.extra.get("memcg_pgmajfault") if backend == "native" else
            r.pswpin if backend == "run" else None,
            "stderr_tail": r.stderr.strip().splitlines()[-3:] if why else []}


def run_bench(cfg: Config, progress=print) -> dict:
    os.makedirs(cfg.workdir, exist_ok=True)
    store = os.path.join(cfg.workdir, "programs.store")
    if not os.path.exists(store) or os.path.getsize(store) != cfg.swap_size + PAGE_SIZE:
        mkswap(store, cfg.swap_size + PAGE_SIZE, force=True)   # as many slots as the swapfile has pages
    invocations = {name: PROGRAMS[name].invocation(cfg.workdir, cfg.budget, cfg.scale, cfg.seed)
                   for name in cfg.programs}
    runs: list[dict] = []
    load_before = os.getloadavg()
    started = time.time()
    for round_ in range(cfg.repeat):
        for name, inv in invocations.items():
            plain_digest = plain_wall = None
            for backend in BACKENDS:
                if inv.output and os.path.exists(inv.output):
                    os.unlink(inv.output)
                timeout = round(timeout_for(cfg, plain_wall), 1)
                if backend == "plain":
                    result, rss = run_plain(inv.argv, timeout)
                elif backend == "native":
                    with KernelSwap(cfg.workdir, budget=cfg.budget, swap_size=cfg.swap_size, page_cluster=3) as swap:
                        result = swap.run(inv.argv, timeout)
                        result.extra.update(memcg_faults(swap.group))
                else:
                    with UswapRun(cfg.workdir, store, budget=cfg.budget, io="sync",
                                  readahead=DEFAULTS.readahead) as daemon:
                        result = daemon.run(inv.argv, timeout)
                digest = output_hash(result.stdout, inv.output)
                rec = record(name, backend, round_, result, digest, plain_digest, timeout)
                if backend == "plain":
                    rec["peak_rss_mib"] = round(rss / MiB, 1)
                    if rec["failed"] is None:
                        plain_digest, plain_wall = digest, result.wall_s
                runs.append(rec)
                progress(f"round {round_ + 1}/{cfg.repeat} {name} {backend}: "
                         + (f"{rec['wall_s']} s" if rec["failed"] is None else
                            f"{UNFINISHED if rec['unfinished'] else 'FAILED'} ({rec['failed']})"))
            if inv.output and os.path.exists(inv.output):
                os.unlink(inv.output)
    return {"budget": cfg.budget, "budget_human": format_size(cfg.budget), "repeat": cfg.repeat, "scale": cfg.scale,
            "seed": cfg.seed, "workdir": cfg.workdir, "load_before": load_before, "load_after": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "commit": _commit(),
            "programs": {name: {"what": PROGRAMS[name].what, "argv": _shown(invocations[name].argv)}
                         for name in cfg.programs},
            "summary": summarize(runs, cfg.programs, cfg.budget), "runs": runs}


def _shown(argv: list[str]) -> list[str]:
    return [a if len(a) < 80 else a[:60] + f"... ({len(a)} chars)" for a in argv]


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    except OSError:
        return None
    return r.stdout.strip() or None


def summarize(runs: list[dict], programs: list[str], budget: int) -> list[dict]:
    """Per program: the working set (the largest plain peak RSS), each backend's median wall over its completed
    rounds, or why none completed."""
    out = []
    for name in programs:
        row: dict = {"program": name}
        rss = [r["peak_rss_mib"] for r in runs if r["program"] == name and r["backend"] == "plain"]
        row["peak_rss_mib"] = max(rss) if rss else None
        row["working_set_x_budget"] = round(max(rss) * MiB / budget, 2) if rss else None
        for backend in BACKENDS:
            mine = [r for r in runs if r["program"] == name and r["backend"] == backend]
            done = [r["wall_s"] for r in mine if r["failed"] is None]
            bad = [r for r in mine if r["failed"] is not None]
            row[backend] = {"median_s": round(statistics.median(done), 2) if done else None,
                            "completed": len(done), "rounds": len(mine),
                            "failed": sorted({r["failed"] for r in bad}),
                            "unfinished": sum(r["unfinished"] for r in bad),
                            "unfinished_after_s": min((r["timeout_s"] for r in bad if r["unfinished"]), default=None),
                            "oom_killed": sum(bool(r["oom_kills"]) for r in bad),
                            "all": [r["wall_s"] if r["failed"] is None else None for r in mine],
                            "output_identical": _all_identical(mine) if backend != "plain" else None,
                            "swap_ins": _median([_swap_ins(r) for r in mine
                                                 if r["failed"] is None and _swap_ins(r) is not None])}
        n, u = row["native"]["median_s"], row["run"]["median_s"]
        row["run_over_native"] = round(u / n, 2) if n and u else None
        row["run_over_plain"] = round(u / row["plain"]["median_s"], 2) if u and row["plain"]["median_s"] else None
        row["outputs_identical"] = _all_identical([r for r in runs if r["program"] == name])
        out.append(row)
    return out


def _swap_ins(r: dict) -> int | None:
    if "swap_ins" in r:
        return r["swap_ins"]
    return r["pswpin"] if r["backend"] == "run" else None   # a --json from before native rows counted their own


def _all_identical(runs: list[dict]) -> bool | None:
    """Whether every completed run's output was the plain run's (None: no run was compared)."""
    compared = [r["output_identical"] for r in runs if r["output_identical"] is not None]
    return all(compared) if compared else None


def _median(xs: list[int]) -> int | None:
    return int(statistics.median(xs)) if xs else None


def _failures(b: dict) -> str:
    """The rounds that did not complete, by kind: memcg OOM kills, timeouts (the shortest), other failures."""
    parts = []
    if b["oom_killed"]:
        parts.append(f"FAILED: {b['oom_killed']}x OOM-killed")
    if b["unfinished"]:
        parts.append(f"{UNFINISHED}: {b['unfinished']}x at > {b['unfinished_after_s']:g} s")
    other = b["rounds"] - b["completed"] - b["oom_killed"] - b["unfinished"]
    if other:
        reasons = [f for f in b["failed"] if "memcg OOM" not in f and not f.startswith("timed out")]
        parts.append(f"FAILED: {other}x {'; '.join(reasons)}")
    return ", ".join(parts)


def _cell(b: dict) -> str:
    if b["median_s"] is None:
        return _failures(b) or "-"
    cell = f"{b['median_s']:.2f}"
    if b["completed"] < b["rounds"]:
        cell += f" ({b['completed']} of {b['rounds']}; {_failures(b)})"
    return cell


def _identical_cell(row: dict) -> str:
    if row["outputs_identical"] is None:
        return "- (nothing completed to compare)"
    if not row["outputs_identical"]:
        return "NO: " + ", ".join(b for b in ("native", "run") if row[b]["output_identical"] is False)
    return "yes"


def markdown(result: dict) -> str:
    lines = ["| program | working set (plain peak RSS) | plain s | native s | uswap run s | uswap run / native "
             "| uswap run / plain | outputs identical | swap-ins native / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        ratio = f"{row['run_over_native']:.2f}" if row["run_over_native"] else "-"
        over_plain = f"{row['run_over_plain']:.1f}" if row["run_over_plain"] else "-"
        ws = f"{row['peak_rss_mib']:.0f} MiB ({row['working_set_x_budget']:.1f}x)" if row["peak_rss_mib"] else "-"
        swapins = " / ".join("-" if row[b]["swap_ins"] is None else str(row[b]["swap_ins"]) for b in ("native", "run"))
        lines.append(f"| {row['program']} | {ws} | {_cell(row['plain'])} | {_cell(row['native'])} | "
                     f"{_cell(row['run'])} | {ratio} | {over_plain} | "
                     f"{_identical_cell(row)} | {swapins} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m uswap.bench.programs", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=parse_size, default=DEFAULT_BUDGET,
                   help="memcg limit and uswap run --resident (default 32M)")
    p.add_argument("--programs", default=",".join(DEFAULT_PROGRAMS),
                   help=f"comma-separated, of {', '.join(PROGRAMS)} (default: {','.join(DEFAULT_PROGRAMS)})")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0,
                   help="input sizes times this (1: peak RSS about 3.5x the budget)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-factor", type=float, default=10.0, help="timeout: this x the round's plain wall")
    p.add_argument("--timeout-floor", type=float, default=30.0)
    p.add_argument("--timeout-cap", type=float, default=600.0)
    p.add_argument("--workdir", default="/var/tmp/uswap-bench-programs")
    p.add_argument("--keep-workdir", action="store_true", help="keep the generated inputs and the store")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--report", metavar="JSON", help="print the table of a saved --json again, run nothing")
    args = p.parse_args(argv)
    unknown = [n for n in args.programs.split(",") if n not in PROGRAMS]
    if unknown:
        p.error(f"unknown program(s): {', '.join(unknown)}; known: {', '.join(PROGRAMS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        saved["summary"] = summarize(saved["runs"], list(saved["programs"]), saved["budget"])
        print(markdown(saved), end="")
        return 0
    cfg = Config(budget=args.budget, programs=args.programs.split(","), repeat=args.repeat, scale=args.scale,
                 seed=args.seed, timeout_factor=args.timeout_factor, timeout_floor=args.timeout_floor,
                 timeout_cap=args.timeout_cap, workdir=os.path.abspath(args.workdir))
    made = not os.path.exists(cfg.workdir)
    try:
        result = run_bench(cfg, progress=lambda line: print(line, flush=True))
    finally:
        if made and not args.keep_workdir:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
    result["config"] = asdict(cfg)
    table = markdown(result)
    print(f"\nbudget {result['budget_human']}, medians of {cfg.repeat}, load average before "
          f"{', '.join(f'{x:.2f}' for x in result['load_before'])}, after "
          f"{', '.join(f'{x:.2f}' for x in result['load_after'])}\n")
    print(table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
