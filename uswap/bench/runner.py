"""`uswap bench`: the same C workloads on uswap and on kernel swap, interleaved.

One *round* runs every configuration once (uswap with each I/O mode, with and
without the compressed pool, native swap at page-cluster 3 and 0, and any
--against extras), in that order; rounds repeat ``--repeat`` times, so the
backends alternate (A B A B ...) and drift hits them alike.  Results are per
run; ratios compare medians per workload.

With ``equal_memory`` a calibration comes first (uswap.bench.equal): each
backend's budget or memcg limit is lowered by the memory it uses outside it,
so that every backend runs with the same total.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field

from uswap.bench.backends import KernelSwap, RunResult, UswapDaemon, UswapRun, run_failure
from uswap.bench.equal import Limit, calibrate
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
POOL = "+pool"        # uswap+pool, run+pool: the same rows with the daemon's compressed pool on
PEERS = ("zram", "zswap")   # kernel swap with a compressed pool outside the memcg


def split_workload(spec: str) -> tuple[str, float | None]:
    """A --workloads entry, WORKLOAD or WORKLOAD:FILL (its own page contents, as --fill): ("seq", 0.5) for
    seq:half; fill None without one."""
    name, _, fill = spec.partition(":")
    if not fill:
        return name, None
    try:
        return name, parse_fill(fill)
    except ValueError:
        raise ValueError(f"--workloads {spec}: after the colon say zeros, half, random or a fraction from 0 to 1") \
            from None


def run_label(backend: str, io: str | None, page_cluster: int | None) -> str:
    """uswap/sync, uswap+pool/sync, native/pc3: a row's name in progress lines and file names."""
    return backend + (f"/{io}" if io else f"/pc{page_cluster}")


def base_backend(backend: str) -> str:
    """uswap for uswap+pool, run for run+pool: what serves the workload."""
    return backend.removesuffix(POOL)


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


def describe_fill(fill: float | None, workloads: list[str] = ()) -> str:
    """The page contents in words: --fill's, then the workloads that name their own (WORKLOAD:FILL)."""
    if fill is None:
        text = "pages: seq/random/zipf zeros past a 16-byte header, hog random"
    else:
        text = f"pages {fill:.0%} random" + (" past a 16-byte header" if fill < 1 else "")
    own = [f"{w} = {f:.0%}" for w in workloads if (f := split_workload(w)[1]) is not None]
    return text + (f"; random part by workload: {', '.join(own)}" if own else "")


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
    pool: int = 0               # the daemon's --pool for the +pool rows (0: no such rows)
    pool_compressor: str | None = None   # their --pool-compressor (None: the daemon's default)
    equal_memory: bool = False  # lower each backend's limit by what it uses outside (uswap.bench.equal)

    def backends(self) -> list[tuple[str, str | None, int | None]]:
        """(backend, io, page_cluster) for one round; each +pool row right after its plain one."""
        pooled = [""] + ([POOL] if self.pool else [])
        out: list[tuple[str, str | None, int | None]] = [("uswap" + p, io, None) for io in self.io if io
                                                          for p in pooled]
        out += [("run" + p, io, None) for io in self.run if io for p in pooled]
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
    limits: dict[str, dict] = field(default_factory=dict)    # "WORKLOAD LABEL": asdict(Limit), equal memory only
    calibration: list[dict] = field(default_factory=list)    # the runs that found them (repeat -1)

    def command(self, binaries: dict[str, str], spec: str, kernel: bool, dump: str | None) -> list[str]:
        mib = self.config.size >> 20
        workload, own_fill = split_workload(spec)
        fill_fraction = self.config.fill if own_fill is None else own_fill
        fill = [] if fill_fraction is None else ["-f", str(fill_fraction)]
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

    def rows(self) -> list[tuple[str, str, str | None, int | None]]:
        """(workload, backend, io, page_cluster) of one round, in the order they run."""
        cfg = self.config
        return [(w, backend, io, pc) for w in cfg.workloads for backend, io, pc in cfg.backends()
                if not (base_backend(backend) == "run" and split_workload(w)[0] in RUN_REFUSES)]

    def run_all(self, progress=None) -> None:
        cfg = self.config
        binaries = self.prepare()
        rows = self.rows()
        if cfg.equal_memory:
            self.calibrate(binaries, rows, progress)
        total = len(rows) * cfg.repeat
        done = 0
        for repeat in range(cfg.repeat):
            for workload, backend, io, page_cluster in rows:
                label = run_label(backend, io, page_cluster)
                if progress:
                    progress(done, total, f"{workload} {label} (round {repeat + 1})")
                dump = None
                if repeat == 0 and split_workload(workload)[0] != "hog":
                    dump = os.path.join(cfg.workdir, f"lat-{workload}-{label.replace('/', '-')}.u32")
                    if os.path.exists(dump):   # an earlier bench's: a failed run writes none
                        os.unlink(dump)
                limit = self.limit(workload, label)
                cmd = self.command(binaries, workload, base_backend(backend) != "uswap", dump)
                result = self._run_one(backend, io, page_cluster, cmd, limit)
                self.runs.append(self._record(workload, backend, io, page_cluster, repeat, result, limit))
                if dump and not self.runs[-1]["failed"]:
                    self.latency_files[f"{workload} {label}"] = dump
                done += 1
        if progress:
            progress(done, total, "done")

    def limit(self, workload: str, label: str) -> int:
        """The budget or memcg limit of a row's timed runs: --resident, or what calibration found."""
        found = self.limits.get(f"{workload} {label}")
        return found["limit"] if found else self.config.resident

    def calibrate(self, binaries: dict[str, str], rows, progress=None) -> None:
        """Equal memory (uswap.bench.equal): each row's limit, from runs recorded in self.calibration."""
        cfg = self.config
        for workload, backend, io, page_cluster in rows:
            label = run_label(backend, io, page_cluster)
            cmd = self.command(binaries, workload, base_backend(backend) != "uswap", None)

            def measure(limit: int) -> tuple[float | None, str | None]:
                if progress:
                    progress(0, None, f"calibrating {workload} {label} at {format_size(limit)}")
                result = self._run_one(backend, io, page_cluster, cmd, limit)
                record = self._record(workload, backend, io, page_cluster, -1, result, limit)
                self.calibration.append(record)
                return record.get("outside_budget_mib"), record["failed"]

            if backend == "native":   # its swap cache is charged to the memcg: nothing outside, nothing to run
                found = Limit(cfg.resident, None, [])
            elif backend == "fuse":
                found = Limit(cfg.resident, "the FUSE server's memory is not measured: not lowered", [])
            else:
                found = calibrate(cfg.resident, measure)
            self.limits[f"{workload} {label}"] = asdict(found)

    def _run_one(self, backend: str, io: str | None, page_cluster: int | None, cmd: list[str],
                 limit: int) -> RunResult:
        cfg = self.config
        timeout = 3600
        if base_backend(backend) in ("uswap", "run"):
            pool = {}
            if backend.endswith(POOL):   # the daemon refuses a pool over half its budget
                pool = {"pool": min(cfg.pool, limit // 2 // PAGE_SIZE * PAGE_SIZE),
                        "pool_compressor": cfg.pool_compressor}
            launcher = UswapDaemon if base_backend(backend) == "uswap" else UswapRun
            with launcher(cfg.workdir, os.path.join(cfg.workdir, "bench.store"), budget=limit, io=io,
                          readahead=cfg.readahead, daemon_cpu=cfg.daemon_cpu, workload_cpu=cfg.workload_cpu,
                          **pool) as daemon:
                return daemon.run(cmd, timeout)
        with KernelSwap(cfg.workdir, budget=limit, swap_size=self.swap_size,
                        page_cluster=page_cluster, kind=backend, workload_cpu=cfg.workload_cpu) as swap:
            return swap.run(cmd, timeout)

    def _record(self, workload, backend, io, page_cluster, repeat, r: RunResult, limit: int | None = None) -> dict:
        pages = self.config.size // PAGE_SIZE
        limit = self.config.resident if limit is None else limit
        record = {"workload": workload, "backend": backend, "io": io, "page_cluster": page_cluster,
                  "repeat": repeat, "wall_s": round(r.wall_s, 3), "fault_p50_us": None, "fault_p99_us": None,
                  "faults": None, "pswpin": r.pswpin, "pswpout": r.pswpout,
                  "rewritten": max(0, r.pswpout - pages), "mismatches": None, "exit_code": r.returncode,
                  "oom_kills": r.oom_kills, "failed": run_failure(r.returncode, r.oom_kills, r.stderr),
                  "limit_mib": round(limit / (1 << 20), 1), **r.extra}
        outside = record.get("outside_budget_mib")
        record["total_mib"] = None if outside is None else round(record["limit_mib"] + outside, 1)
        if split_workload(workload)[0] == "hog":
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

    def uswap_rows(self) -> list[tuple[str, str, str]]:
        """(name in the ratio tables, backend, io) of every row a uswap daemon serves: io for regions, pool/io
        with the pool, run/io and run+pool/io for `uswap run`."""
        pooled = [""] + ([POOL] if self.config.pool else [])
        out = [(f"pool/{io}" if p else io, "uswap" + p, io) for io in self.config.io if io for p in pooled]
        out += [(f"run{p}/{io}", "run" + p, io) for io in self.config.run if io for p in pooled]
        return out

    def ratios(self) -> list[dict]:
        """Median wall time of each uswap row (with the pool: io "pool/MODE"; and of kernel swap through the FUSE
        store, io "fuse", zram and zswap; `uswap run` of the native binary, io "run/MODE" and "run+pool/MODE") over
        native swap at page-cluster 3, with the per-round spread.  Failed runs are left out of both medians and of
        the spread (rounds pair by number); a row with no completed run on either side has ratio None and says why
        in "failed"."""
        out = []
        for workload in self.config.workloads:
            def rounds(backend, io=None, page_cluster=None):
                return [r for r in self.runs if r["workload"] == workload and r["backend"] == backend
                        and (io is None or r["io"] == io) and (page_cluster is None or r["page_cluster"] == page_cluster)]
            native = rounds("native", page_cluster=3)
            if not native:
                continue
            mine_rows = self.uswap_rows()
            rows = [(name, rounds(backend, io=io)) for name, backend, io in mine_rows if base_backend(backend) == "uswap"]
            rows += [(kind, rounds(kind)) for kind in ("fuse", "zram", "zswap")]
            rows += [(name, rounds(backend, io=io)) for name, backend, io in mine_rows if base_backend(backend) == "run"]
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

    def peer_ratios(self) -> list[dict]:
        """The issue's comparison: each uswap row's median wall time over the faster of zram and zswap (the
        lower median wall time of their completed runs, per workload), with the total memory of both (limit +
        what each used outside it, medians): a faster row that used more memory says so in its numbers.  Empty
        without a zram or zswap row."""
        peers = [p for p in PEERS if p in self.config.against]
        if not peers:
            return []
        wall = median_by(self.runs, "wall_s")
        total = median_by(self.runs, "total_mib")
        out = []
        for workload in self.config.workloads:
            done = {p: wall[k] for p in peers if (k := (workload, p, None, 3)) in wall}
            best = min(done, key=done.get) if done else None
            peer_failed = "; ".join(f"{p}: {why}" for p in peers if (why := failures(
                [r for r in self.runs if r["workload"] == workload and r["backend"] == p])))
            for name, backend, io in self.uswap_rows():
                mine = [r for r in self.runs if r["workload"] == workload and r["backend"] == backend
                        and r["io"] == io]
                if not mine:
                    continue
                key = (workload, backend, io, None)
                row = {"workload": workload, "row": f"{backend}/{io}", "wall_s": wall.get(key),
                       "total_mib": total.get(key), "peer": best, "peer_wall_s": done.get(best),
                       "peer_total_mib": total.get((workload, best, None, 3)), "over_peer_wall": None,
                       "failed": "; ".join(n for n in (failures(mine), peer_failed) if n) or None}
                if row["wall_s"] is not None and row["peer_wall_s"]:
                    row["over_peer_wall"] = round(row["wall_s"] / row["peer_wall_s"], 3)
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
                "readahead": self.config.readahead, "pages": describe_fill(self.config.fill, self.config.workloads),
                "pool": (format_size(self.config.pool) + f" {self.config.pool_compressor or 'default compressor'}"
                         if self.config.pool else "off")}

    def to_json(self) -> dict:
        return {"machine": self.machine(), "config": asdict(self.config), "runs": self.runs, "not_run": self.not_run(),
                "ratios": self.ratios(), "peer_ratios": self.peer_ratios(), "latency_files": self.latency_files,
                "breakdown": self.breakdown, "limits": self.limits, "calibration": self.calibration}

    @classmethod
    def from_json(cls, data: dict) -> "Bench":
        """A finished bench back from its --json file, to report again without running."""
        return cls(BenchConfig(**data["config"]), data["runs"], data.get("latency_files", {}),
                   data.get("breakdown", []), data.get("limits", {}), data.get("calibration", []))


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
