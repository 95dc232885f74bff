"""`uswap bench`: the same C workloads on uswap and on kernel swap, interleaved.

One *round* runs every configuration once (uswap with each I/O mode, native
swap at page-cluster 3 and 0, and any --against extras), in that order; rounds
repeat ``--repeat`` times, so the backends alternate (A B A B ...) and drift
hits them alike.  Results are per run; ratios compare medians per workload.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field

from uswap.bench.backends import KernelSwap, RunResult, UswapDaemon, UswapRun, run_failure
from uswap.bench.build import workload_binaries
from uswap.config import DEFAULTS
from uswap.core import PAGE_SIZE
from uswap.store.mkswap import mkswap
from uswap.units import format_size

WORKLOADS = ("seq", "random", "zipf", "hog", "threads")

# Workloads the `uswap run` rows leave out, and why (said in the report, never a silent gap).  None since fork
# support: hog's 4 forked processes are one run, under one budget (docs/RUN-DESIGN.md).
RUN_REFUSES: dict[str, str] = {}

FILLS = {"zeros": 0.0, "half": 0.5, "random": 1.0}


def parse_fill(text: str) -> float:
    """--fill: zeros, half, random or a fraction 0..1 of each page that is random (the rest zeros)."""
    if text in FILLS:
        return FILLS[text]
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 1:
        raise ValueError(f"--fill {text!r}: say zeros, half, random or a fraction from 0 to 1")
    return fraction


def describe_fill(fill: float | None) -> str:
    if fill is None:
        return "pages: seq/random/zipf zeros past a 16-byte header, hog random"
    return f"pages {fill:.0%} random" + (" past a 16-byte header" if fill < 1 else "")


def failed(run: dict) -> str | None:
    """Why a recorded run failed (None: it completed); a --json from before failures were recorded says only
    its exit code."""
    if "failed" in run:
        return run["failed"]
    return f"exit {run['exit_code']}" if run.get("exit_code") else None


@dataclass
class BenchConfig:
    workloads: list[str]
    size: int
    resident: int
    against: list[str]
    io: list[str]
    repeat: int
    workdir: str
    readahead: int = DEFAULTS.readahead
    accesses: int | None = None
    daemon_cpu: int | None = None
    workload_cpu: int | None = None
    run: list[str] = field(default_factory=list)   # daemon --io modes for `uswap run` rows (unmodified binaries)
    fill: float | None = None   # fraction of each page random (--fill); None: each workload's own (hog: 1)

    def backends(self) -> list[tuple[str, str | None, int | None]]:
        """(backend, io, page_cluster) for one round."""
        out: list[tuple[str, str | None, int | None]] = [("uswap", io, None) for io in self.io if io]
        out += [("run", io, None) for io in self.run if io]
        if "native" in self.against:
            out += [("native", None, 3), ("native", None, 0)]
        out += [(kind, None, 3) for kind in ("fuse", "zram", "zswap") if kind in self.against]
        return out

    @property
    def placement(self) -> str:
        if self.daemon_cpu is None and self.workload_cpu is None:
            return "unpinned (the scheduler places daemon and workload on the 2 vCPUs)"
        return f"daemon on CPU {self.daemon_cpu}, workload on CPU {self.workload_cpu}"


@dataclass
class Bench:
    config: BenchConfig
    runs: list[dict] = field(default_factory=list)
    latency_files: dict[str, str] = field(default_factory=dict)
    breakdown: list[dict] = field(default_factory=list)

    def command(self, binaries: dict[str, str], workload: str, kernel: bool, dump: str | None) -> list[str]:
        mib = self.config.size >> 20
        fill = [] if self.config.fill is None else ["-f", str(self.config.fill)]
        if workload == "hog":
            return [binaries["hog"], "-s", str(max(1, mib // 4)), "-p", "4", "-r", "3", *fill,
                    *(["-a"] if kernel else [])]
        pages = self.config.size // PAGE_SIZE
        accesses = self.config.accesses or max(1000, pages * 200_000 // 262_144)
        cmd = [binaries["workload"], workload, "-s", str(mib), "-n", str(accesses), *fill]
        if kernel:
            cmd.append("-a")
        if dump:
            cmd += ["-o", dump]
        return cmd

    @property
    def swap_size(self) -> int:
        """The kernel's swapfile, and uswap's store: the working set and 64 MiB more."""
        return self.config.size + (64 << 20)

    def prepare(self) -> dict[str, str]:
        """The bench directory, its store and the workload binaries."""
        cfg = self.config
        os.makedirs(cfg.workdir, exist_ok=True)
        binaries = workload_binaries()   # built on first use, into the cache (uswap.bench.build)
        store = os.path.join(cfg.workdir, "bench.store")
        size = self.swap_size + PAGE_SIZE      # as many slots as the kernel's swapfile has pages
        if not os.path.exists(store) or os.path.getsize(store) != size:
            mkswap(store, size, force=True)
        return binaries

    def run_breakdown(self) -> None:
        from uswap.bench.breakdown import run_breakdown
        self.breakdown = run_breakdown(self, self.prepare())

    def run_all(self, progress=None) -> None:
        cfg = self.config
        binaries = self.prepare()
        total = sum(backend != "run" or w not in RUN_REFUSES for w in cfg.workloads
                    for backend, _, _ in cfg.backends()) * cfg.repeat
        done = 0
        for repeat in range(cfg.repeat):
            for workload in cfg.workloads:
                for backend, io, page_cluster in cfg.backends():
                    if backend == "run" and workload in RUN_REFUSES:
                        continue
                    label = f"{backend}" + (f"/{io}" if io else f"/pc{page_cluster}")
                    if progress:
                        progress(done, total, f"{workload} {label} (round {repeat + 1})")
                    dump = None
                    if repeat == 0 and workload != "hog":
                        dump = os.path.join(cfg.workdir, f"lat-{workload}-{label.replace('/', '-')}.u32")
                        if os.path.exists(dump):   # an earlier bench's: a failed run writes none
                            os.unlink(dump)
                    kernel = backend != "uswap"
                    cmd = self.command(binaries, workload, kernel, dump)
                    result = self._run_one(backend, io, page_cluster, cmd)
                    self.runs.append(self._record(workload, backend, io, page_cluster, repeat, result))
                    if dump and not self.runs[-1]["failed"]:
                        self.latency_files[f"{workload} {label}"] = dump
                    done += 1
        if progress:
            progress(done, total, "done")

    def _run_one(self, backend: str, io: str | None, page_cluster: int | None, cmd: list[str]) -> RunResult:
        cfg = self.config
        timeout = 3600
        if backend == "uswap":
            with UswapDaemon(cfg.workdir, os.path.join(cfg.workdir, "bench.store"), budget=cfg.resident, io=io,
                             readahead=cfg.readahead, daemon_cpu=cfg.daemon_cpu,
                             workload_cpu=cfg.workload_cpu) as daemon:
                return daemon.run(cmd, timeout)
        if backend == "run":
            with UswapRun(cfg.workdir, os.path.join(cfg.workdir, "bench.store"), budget=cfg.resident, io=io,
                          readahead=cfg.readahead, daemon_cpu=cfg.daemon_cpu,
                          workload_cpu=cfg.workload_cpu) as daemon:
                return daemon.run(cmd, timeout)
        with KernelSwap(cfg.workdir, budget=cfg.resident, swap_size=self.swap_size,
                        page_cluster=page_cluster, kind=backend, workload_cpu=cfg.workload_cpu) as swap:
            return swap.run(cmd, timeout)

    def _record(self, workload, backend, io, page_cluster, repeat, r: RunResult) -> dict:
        pages = self.config.size // PAGE_SIZE
        record = {"workload": workload, "backend": backend, "io": io, "page_cluster": page_cluster,
                  "repeat": repeat, "wall_s": round(r.wall_s, 3), "fault_p50_us": None, "fault_p99_us": None,
                  "faults": None, "pswpin": r.pswpin, "pswpout": r.pswpout,
                  "rewritten": max(0, r.pswpout - pages), "mismatches": None, "exit_code": r.returncode,
                  "oom_kills": r.oom_kills, "failed": run_failure(r.returncode, r.oom_kills, r.stderr), **r.extra}
        if workload == "hog":
            lines = [line for line in r.stdout.splitlines() if line.startswith("hog[")]
            record["mismatches"] = sum(int(line.split(", ")[3].split()[0]) for line in lines) if lines else None
        else:
            fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
            if "mismatches" in fields:   # a killed run prints nothing, or a part
                record.update(fault_p50_us=float(fields["fault_p50_us"]), fault_p99_us=float(fields["fault_p99_us"]),
                              faults=int(fields["faults"]), mismatches=int(fields["mismatches"]))
        if r.returncode != 0:
            record["error"] = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return record

    # -- summary -----------------------------------------------------------------------

    def ratios(self) -> list[dict]:
        """Median wall time of each uswap row (and of kernel swap through the FUSE
        store, io "fuse", zram and zswap; `uswap run` of the native binary, io "run/MODE") over native swap at
        page-cluster 3, with the per-round spread.  Failed runs are left out of both medians and of the spread
        (rounds pair by number); a row with no completed run on either side has ratio None and says why in
        "failed"."""
        out = []
        for workload in self.config.workloads:
            def rounds(backend, io=None, page_cluster=None):
                return [r for r in self.runs if r["workload"] == workload and r["backend"] == backend
                        and (io is None or r["io"] == io) and (page_cluster is None or r["page_cluster"] == page_cluster)]
            native = rounds("native", page_cluster=3)
            if not native:
                continue
            rows = [(io, rounds("uswap", io=io)) for io in self.config.io if io]
            rows += [(kind, rounds(kind)) for kind in ("fuse", "zram", "zswap")]
            rows += [(f"run/{io}", rounds("run", io=io)) for io in self.config.run if io]
            for io, mine in rows:
                if not mine:
                    continue
                notes = [note for side, runs in (("", mine), ("native pc=3: ", native))
                         if (note := failures(runs, side))]
                row = {"workload": workload, "io": io, "uswap_over_native_wall": None, "spread": None,
                       "failed": "; ".join(notes) or None}
                ok_mine = {r["repeat"]: r["wall_s"] for r in mine if not failed(r)}
                ok_native = {r["repeat"]: r["wall_s"] for r in native if not failed(r)}
                if ok_mine and ok_native:
                    row["uswap_over_native_wall"] = round(statistics.median(ok_mine.values())
                                                          / statistics.median(ok_native.values()), 3)
                    pairs = [ok_mine[k] / ok_native[k] for k in ok_mine if k in ok_native]
                    if pairs:
                        row["spread"] = [round(min(pairs), 3), round(max(pairs), 3)]
                out.append(row)
        return out

    def not_run(self) -> list[str]:
        """Why some workloads have no `uswap run` rows."""
        if not any(io for io in self.config.run):
            return []
        return [f"{w}: {why}" for w, why in RUN_REFUSES.items() if w in self.config.workloads]

    def machine(self) -> dict:
        model = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
                "memory": format_size(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                "workdir": self.config.workdir, "placement": self.config.placement,
                "size": format_size(self.config.size), "resident": format_size(self.config.resident),
                "readahead": self.config.readahead, "pages": describe_fill(self.config.fill)}

    def to_json(self) -> dict:
        return {"machine": self.machine(), "config": asdict(self.config), "runs": self.runs, "not_run": self.not_run(),
                "ratios": self.ratios(), "latency_files": self.latency_files, "breakdown": self.breakdown}

    @classmethod
    def from_json(cls, data: dict) -> "Bench":
        """A finished bench back from its --json file, to report again without running."""
        return cls(BenchConfig(**data["config"]), data["runs"], data.get("latency_files", {}),
                   data.get("breakdown", []))


def failures(runs: list[dict], prefix: str = "") -> str | None:
    """"2 of 3 rounds failed: killed by SIGKILL (memcg OOM: 1 kill)" for one row's runs, or None."""
    whys = [why for r in runs if (why := failed(r))]
    if not whys:
        return None
    return f"{prefix}{len(whys)} of {len(runs)} rounds failed: " + "; ".join(dict.fromkeys(whys))


def median_by(runs: list[dict], key: str) -> dict[tuple, float | None]:
    """Median of ``key`` per (workload, backend, io, page_cluster), over the runs that completed."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        if r.get(key) is not None and not failed(r):
            groups.setdefault((r["workload"], r["backend"], r["io"], r["page_cluster"]), []).append(r[key])
    return {k: statistics.median(v) for k, v in groups.items()}
