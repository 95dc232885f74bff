"""Where a benchmark's memory goes: uswap, or kernel swap under a memory cgroup.

Each backend is a context manager around one run.  Everything global that a
native backend touches — a swap area, ``vm.page-cluster``, zswap's enabled
switch, zram0, a memcg v1 group — is recorded before and restored in
``__exit__``, which runs on success, on a failed run and on Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from uswap.child import interrupts_held, running, uswap_argv
from uswap.daemon.process import DaemonProcess
from uswap.daemon.runprocess import RunStats
from uswap.daemon.status import fetch_status
from uswap.nfs.ganesha import NfsServer
from uswap.nfs.network import NfsNetwork
from uswap.store.mkswap import mkswap

MEMCG_ROOT = "/sys/fs/cgroup/memory"
PAGE_CLUSTER = "/proc/sys/vm/page-cluster"
ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"
ZSWAP_POOL = "/sys/kernel/debug/zswap/pool_total_size"   # only where debugfs is mounted; else /proc/meminfo Zswap
ZRAM_MM_STAT = "/sys/block/zram0/mm_stat"
TOP_PRIORITY = 32767  # the bench's swap area comes before any the machine already has


def read_vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


TIMED_OUT = "bench: killed the workload: timed out"


def run_to_end(cmd: list[str], timeout: float, during=lambda proc: contextlib.nullcontext(),
               **kw) -> tuple[subprocess.CompletedProcess, float]:
    """Run a workload; whatever happens (Ctrl-C, timeout), it has fully exited on return.

    subprocess.run gives a child only 0.25 s after Ctrl-C; a workload still
    exiting keeps its memcg busy and its swap slots in use.  ``during(proc)`` is
    entered once the child has exec'd (a thread it starts is never forked with
    a lock held, into a preexec_fn) and left once it has exited.
    """
    t0 = time.perf_counter()
    with running(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as proc, during(proc):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:   # a failed run (run_failure says why), not the end of the bench
            proc.kill()
            out, err = proc.communicate()
            err += f"\n{TIMED_OUT} after {timeout:g} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - t0


def remove_memcg(path: str) -> None:
    """A memcg whose last task just exited may stay busy a moment while it is uncharged."""
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    os.rmdir(path)


def _pin(cpu: int | None):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@dataclass
class RunResult:
    returncode: int         # subprocess's: negative for a signal
    stdout: str
    stderr: str
    wall_s: float
    pswpin: int
    pswpout: int
    extra: dict = field(default_factory=dict)
    oom_kills: int = 0      # OOM kills in the run's memcg (memory.oom_control oom_kill), kernel rows only


CHILD_SIGNAL = re.compile(r"hog: a process died of signal (\d+)")   # hog's parent, for a forked child


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_failure(returncode: int, oom_kills: int, stderr: str) -> str | None:
    """Why a workload run failed, in one line, or None if it completed: a run killed by a signal, ended by a
    non-zero exit or with an OOM kill in its memcg has no wall time worth comparing."""
    if returncode == 0 and not oom_kills:
        return None
    child = CHILD_SIGNAL.search(stderr)
    last = (stderr.strip().splitlines() or [""])[-1]
    if returncode < 0 and last.startswith(TIMED_OUT):
        why = last.removeprefix("bench: killed the workload: ")
    elif returncode < 0:
        why = f"killed by {_signal_name(-returncode)}"
    elif child:
        why = f"a child killed by {_signal_name(int(child[1]))}"
    elif returncode:
        why = f"exit {returncode}: " + (stderr.strip().splitlines() or ["(no output)"])[-1]
    else:
        why = "exit 0"
    if oom_kills:
        why += f" (memcg OOM: {oom_kills} kill{'s' if oom_kills > 1 else ''})"
    return why


class PeakSampler:
    """The largest value of each of ``read()``'s numbers while a run goes on, sampled every ``interval`` s in a
    thread (the workload's exit frees its swap: a pool read afterwards is empty)."""

    def __init__(self, read, interval: float = 0.02):
        self.read = read
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for k, v in self.read().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def zram_usage() -> dict[str, int]:
    """zram0's mm_stat (Documentation/admin-guide/blockdev/zram.rst): bytes stored, compressed, and the memory
    the device uses (mem_used_total; mem_used_max is its peak since the device was set up)."""
    fields = _read(ZRAM_MM_STAT).split()
    return {"orig": int(fields[0]), "compressed": int(fields[1]), "used": int(fields[2]), "used_max": int(fields[4])}


def zswap_usage() -> dict[str, int]:
    """zswap's pool: its size (debugfs pool_total_size where debugfs is mounted, else /proc/meminfo's Zswap,
    the same number) and the bytes it holds uncompressed (meminfo's Zswapped).  System-wide: zswap has no
    per-memcg count under memcg v1."""
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("Zswap", "Zswapped"):
                meminfo[key] = int(value.split()[0]) * 1024
    if "Zswap" not in meminfo:
        return {}
    try:
        used = int(_read(ZSWAP_POOL))
    except OSError:
        used = meminfo["Zswap"]
    return {"used": used, "orig": meminfo.get("Zswapped", 0), "compressed": meminfo["Zswap"]}


def _mib(n: int) -> float:
    return round(n / (1 << 20), 1)


class Setting:
    """A global knob set for a run and put back afterwards."""

    def __init__(self, stack: contextlib.ExitStack, path: str, value: str):
        old = _read(path)
        _write(path, value)
        stack.callback(_write, path, old)


class KernelSwap:
    """Plain anonymous memory in a memcg v1 group limited to the budget, swapping to
    a swapfile on the bench directory's filesystem (or zram, or zswap in front,
    or a uswap FUSE store through a loop device)."""

    def __init__(self, workdir: str, *, budget: int, swap_size: int, page_cluster: int | None,
                 kind: str = "native", workload_cpu: int | None = None):
        self.workdir = workdir
        self.budget = budget
        self.swap_size = swap_size
        self.page_cluster = page_cluster
        self.kind = kind            # native, zram, zswap, fuse
        self.workload_cpu = workload_cpu
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "KernelSwap":
        try:
            with interrupts_held():   # a Ctrl-C between making a thing and registering its undo waits
                self._setup()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _setup(self) -> None:
        stack = self.stack
        if self.page_cluster is not None:
            Setting(stack, PAGE_CLUSTER, str(self.page_cluster))
        if self.kind == "fuse":
            self._setup_fuse(stack)
        elif self.kind == "zram":
            device = "/dev/zram0"
            if _read("/sys/block/zram0/disksize") != "0":
                raise OSError("zram0 is in use; the bench will not touch it")
            _write("/sys/block/zram0/disksize", str(self.swap_size))
            stack.callback(_write, "/sys/block/zram0/reset", "1")
        else:
            device = os.path.join(self.workdir, "native.swap")
            subprocess.run(["fallocate", "-l", str(self.swap_size), device], check=True)
            os.chmod(device, 0o600)
            stack.callback(os.unlink, device)
            if self.kind == "zswap":
                Setting(stack, ZSWAP_ENABLED, "Y")
        if self.kind != "fuse":
            subprocess.run(["mkswap", device], check=True, capture_output=True)
            subprocess.run(["swapon", "--priority", str(TOP_PRIORITY), device], check=True)
            stack.callback(subprocess.run, ["swapoff", device], check=True)
        self.group = os.path.join(MEMCG_ROOT, f"uswap-bench-{os.getpid()}")
        os.mkdir(self.group)
        stack.callback(remove_memcg, self.group)
        _write(os.path.join(self.group, "memory.limit_in_bytes"), str(self.budget))

    def _setup_fuse(self, stack: contextlib.ExitStack) -> None:
        """Kernel swap through a uswap FUSE store on the bench directory's filesystem."""
        from uswap.fuse.swap import swapoff, swapon
        mountpoint = os.path.join(self.workdir, "fuse-mnt")
        os.makedirs(mountpoint, exist_ok=True)
        r = subprocess.run(uswap_argv("mount", mountpoint, "--store", os.path.join(self.workdir, "fuse.store"),
                                      "--size", str(self.swap_size)), capture_output=True, text=True)
        if r.returncode:
            raise OSError(f"uswap mount {mountpoint}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
        stack.callback(subprocess.run, ["umount", mountpoint], check=True)
        swapfile = os.path.join(mountpoint, "swap0")
        swapon(swapfile, TOP_PRIORITY)
        stack.callback(swapoff, swapfile)

    def _enter_group(self) -> None:
        _write(os.path.join(self.group, "cgroup.procs"), str(os.getpid()))
        if self.workload_cpu is not None:
            os.sched_setaffinity(0, {self.workload_cpu})

    def _oom_kills(self) -> int:
        for line in _read(os.path.join(self.group, "memory.oom_control")).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def _usage(self):
        """What the swap device holds in memory outside the memcg, to sample during the run (None: nothing
        measurable here: native swap's pages are charged to the memcg; the FUSE server's memory is not counted)."""
        if self.kind == "zram":
            return zram_usage
        if self.kind == "zswap" and zswap_usage():
            return zswap_usage
        return None

    def run(self, cmd: list[str], timeout: float) -> RunResult:
        before = read_vmstat()
        oom_before = self._oom_kills()
        usage = self._usage()
        sampler = PeakSampler(usage or dict)
        base = usage() if usage else {}
        proc, wall = run_to_end(cmd, timeout, during=lambda _: sampler, preexec_fn=self._enter_group)
        after = read_vmstat()
        extra: dict = {"outside_budget_mib": 0.0 if self.kind == "native" else None}
        peak = sampler.peak
        if usage:
            used = peak["used_max"] if "used_max" in peak else peak["used"] - base["used"]
            extra["outside_budget_mib"] = _mib(max(0, used))
            extra["pool_orig_mib"] = _mib(peak["orig"])
            extra["pool_compressed_mib"] = _mib(peak["compressed"])
        return RunResult(proc.returncode, proc.stdout, proc.stderr, wall, after["pswpin"] - before["pswpin"],
                         after["pswpout"] - before["pswpout"], extra, self._oom_kills() - oom_before)


POOL_COUNTERS = ("stores", "loads", "rejected", "written_back", "corrupted")   # cumulative: taken as a run's delta


def pool_status(status: dict) -> dict | None:
    """The daemon's compressed pool from its status (None: the pool is off)."""
    return status.get("pool")


class DaemonSampler(PeakSampler):
    """A uswap daemon with a compressed pool, sampled while a run goes on: the pool at the sample where it held
    the most pages (it empties when the workload exits and frees its slots), the largest pool charge, and the
    largest daemon RSS less the pool's charge at the same instant (the daemon's memory outside its budget: the
    pool's is inside).  One status request per sample: 10 a second, a few hundred µs of the daemon's time each."""

    def __init__(self, socket_path: str, pid: int, interval: float = 0.1):
        super().__init__(self._read, interval)
        self.socket = socket_path
        self.pid = pid
        self.at_peak: dict = {}

    def _read(self) -> dict[str, int]:
        try:
            pool = pool_status(fetch_status(self.socket, timeout=2.0))
            rss = _status_kib(self.pid, "VmRSS:") * 1024
        except OSError:   # the daemon died: its run fails and says so; nothing to sample
            return {}
        if pool is None:
            return {"rss": rss, "rss_outside": rss}
        if pool["stored_pages"] >= self.at_peak.get("stored_pages", -1):
            self.at_peak = pool
        return {"rss": rss, "charged": pool["charged_bytes"], "rss_outside": max(0, rss - pool["charged_bytes"])}


class _NfsServers:
    """NFS servers on one private network (uswap.nfs.network), server i exporting ``stores[i]`` (a hard link
    made before it starts) as bench.store; ``urls`` in that order.  start/stop/netns_cmd as one NfsServer's."""

    def __init__(self, workdir: str, stores: list[str]):
        self.network = NfsNetwork()
        self.urls = []
        for i, store in enumerate(stores):
            server = self.network.server(os.path.join(workdir, f"nfs-{i}"))
            os.makedirs(server.export_dir, exist_ok=True)
            link = os.path.join(server.export_dir, "bench.store")
            if os.path.exists(link) and not os.path.samefile(link, store):
                os.unlink(link)
            if not os.path.exists(link):
                os.link(store, link)
            self.urls.append(server.url("bench.store"))

    def start(self) -> None:
        servers = list(self.network.servers)
        self.network.start()
        try:
            for server in servers:
                server.start()
        except BaseException:
            self.network.stop()
            raise

    def stop(self) -> None:
        self.network.stop()

    def netns_cmd(self, cmd: list[str]) -> list[str]:
        return self.network.netns_cmd(cmd)


def _store_like(path: str, size: int) -> str:
    """A store of ``size`` bytes at ``path``, made unless one of that size is there."""
    if not os.path.exists(path) or os.path.getsize(path) != size:
        mkswap(path, size, force=True)
    return path


def _status_kib(pid: int, key: str) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


class UswapDaemon(DaemonProcess):
    """A `uswap daemon` on a store in the bench directory, for one run, measured; with ``pool`` bytes of
    compressed pool (--pool, --pool-compressor) when pool is non-zero."""

    def __init__(self, workdir: str, store: str, *, budget: int, io: str, readahead: int,
                 daemon_cpu: int | None = None, workload_cpu: int | None = None, pool: int = 0,
                 pool_compressor: str | None = None):
        self.workload_cpu = workload_cpu
        self.nfs = None
        self.pool = pool
        extra: tuple[str, ...] = ()
        if pool:
            extra = ("--pool", str(pool), *(("--pool-compressor", pool_compressor) if pool_compressor else ()))
        if io in ("nfs-set", "nfs-copies"):   # two servers on one network: striped, or --copies 2 (each twice as big)
            size = os.path.getsize(store) * (2 if io == "nfs-copies" else 1)
            stores = [store if io == "nfs-set" else _store_like(os.path.join(workdir, "bench-copy-a.store"), size),
                      _store_like(os.path.join(workdir, f"bench-{io}-b.store"), size)]
            self.nfs = _NfsServers(workdir, stores)
            store = self.nfs.urls[0]
            extra += ("--store", self.nfs.urls[1], *(("--copies", "2") if io == "nfs-copies" else ()))
            io = "sync"
        elif io.startswith("nfs"):   # nfs (FILE_SYNC writes) or nfs-commit (UNSTABLE + COMMIT)
            extra += ("--nfs-stable", "commit" if io == "nfs-commit" else "file_sync")
            self.nfs = NfsServer(os.path.join(workdir, "nfs"))
            export = self.nfs.export_dir
            os.makedirs(export, exist_ok=True)
            if not os.path.exists(os.path.join(export, "bench.store")):   # before ganesha starts: see NfsServer
                os.link(store, os.path.join(export, "bench.store"))
            store = self.nfs.url("bench.store")
            io = "sync"
        elif io == "set":   # a store set: the bench store and a second one like it, equal priority, sync I/O
            extra += ("--store", _store_like(os.path.join(workdir, "bench-b.store"), os.path.getsize(store)))
            io = "sync"
        elif io == "copies":   # --copies 2 over two stores each as big as the bench store's: the same room
            size = os.path.getsize(store)
            store = _store_like(os.path.join(workdir, "bench-copy-a.store"), 2 * size)
            extra += ("--store", _store_like(os.path.join(workdir, "bench-copy-b.store"), 2 * size), "--copies", "2")
            io = "sync"
        super().__init__(store, os.path.join(workdir, "uswap.sock"), os.path.join(workdir, "daemon.log"),
                         budget=budget, io=io, readahead=readahead, cpu=daemon_cpu, extra=extra)

    def __enter__(self):
        if self.nfs:
            self.nfs.start()
            self.prefix = self.nfs.netns_cmd([])   # the daemon runs where the server is reachable
            try:
                return super().__enter__()
            except BaseException:
                self.nfs.stop()
                raise
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self.nfs:
                self.nfs.stop()

    def _cpu_seconds(self) -> float:
        fields = _read(f"/proc/{self.proc.pid}/stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _peak_rss(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM:") * 1024

    def run(self, cmd: list[str], timeout: float) -> RunResult:
        first = fetch_status(self.socket)
        before = first["daemon"]
        pool_before = pool_status(first)
        if self.pool and pool_before is None:
            raise OSError(f"uswap daemon started with --pool {self.pool} reports no pool in its status")
        cpu0 = self._cpu_seconds()
        sampler = DaemonSampler(self.socket, self.proc.pid) if self.pool else contextlib.nullcontext()
        proc, wall = run_to_end(cmd, timeout, env=dict(os.environ, USWAP_SOCKET=self.socket),
                                preexec_fn=_pin(self.workload_cpu), during=lambda _: sampler)
        last = fetch_status(self.socket)
        after = last["daemon"]
        peak_rss = self._peak_rss()
        rss = _mib(peak_rss)
        extra = {"daemon_cpu_s": round(self._cpu_seconds() - cpu0, 2), "daemon_rss_mib": rss,
                 "outside_budget_mib": rss,    # the daemon's memory (mlocked) is on top of the budget
                 "write_errors": after["write_errors"] - before["write_errors"],
                 "read_errors": after["read_errors"] - before["read_errors"]}
        if self.pool:
            # VmHWM is the kernel's high-water mark, updated lazily (when RSS is about to drop): a sample can
            # have seen more
            peak_rss = max(peak_rss, sampler.peak.get("rss", 0))
            extra["daemon_rss_mib"] = _mib(peak_rss)
            extra.update(self._pool_columns(sampler, peak_rss, pool_before, pool_status(last)))
        return RunResult(proc.returncode, proc.stdout, proc.stderr, wall, after["pswpin"] - before["pswpin"],
                         after["pswpout"] - before["pswpout"], extra)

    def _pool_columns(self, sampler: DaemonSampler, peak_rss: int, before: dict, after: dict) -> dict:
        """The pool's part of a run's record.  Outside the budget: the pool's charged memory is part of both the
        daemon's RSS and the budget, so it is taken out of the RSS, at the same instant: the largest sampled
        RSS - charged, or peak RSS (VmHWM or a larger sample; sampling can miss a peak) - the largest charge,
        whichever is larger (both are lower bounds of the true peak; with no pool they are the peak RSS)."""
        peak = sampler.peak
        outside = max(peak.get("rss_outside", 0), peak_rss - peak.get("charged", 0))
        at_peak = sampler.at_peak or after
        out = {"outside_budget_mib": _mib(outside), "pool_mib": _mib(self.pool),
               "pool_compressor": after.get("compressor"),
               "pool_peak_pages": at_peak["stored_pages"],
               "pool_peak_same_filled_pages": at_peak["same_filled_pages"],
               "pool_peak_compressed_mib": _mib(at_peak["compressed_bytes"]),
               "pool_peak_charged_mib": _mib(peak.get("charged", at_peak["charged_bytes"])),
               "pool_ratio": at_peak.get("ratio")}
        out.update({f"pool_{k}": after[k] - before[k] for k in POOL_COUNTERS})
        return out


RUN_RELEASED = re.compile(r"run \d+ released \(pid \d+\): (.*)")
RUN_ENDED = re.compile(r"run \d+ ended: max_resident_pages=(\d+)")   # once per run, when its last process goes


class UswapRun(UswapDaemon):
    """The native workload binary, unmodified (plain anonymous memory), under `uswap run --resident BUDGET`
    against a daemon of its own with the same budget (docs/RUN-DESIGN.md): its faults are served by the run
    path, not the engine.  The wall time includes `uswap run`'s own start (a Python interpreter, then exec)."""

    def __init__(self, workdir: str, store: str, *, budget: int, **kw):
        super().__init__(workdir, store, budget=budget, **kw)
        self.budget = budget

    def run(self, cmd: list[str], timeout: float) -> RunResult:
        log_before = len(self.log())
        result = super().run(uswap_argv("run", "--resident", str(self.budget), "--socket", self.socket, "--", *cmd),
                             timeout)
        result.extra.update(self._released(log_before))
        return result

    def _released(self, log_from: int, wait: float = 10.0) -> dict:
        """The run's own counters, summed over its processes (one per image: exec gives a new one, each fork
        child is one), from the daemon's log once it released them: the program has exited, the daemon notices
        within a tick (10 ms).  The largest resident count is the whole tree's (the run's budget is the
        tree's), from the line the daemon writes when the run ends; a process's own peak is not summed."""
        deadline = time.monotonic() + wait
        while self.status()["runs"] and time.monotonic() < deadline:
            time.sleep(0.02)
        keys = {f.name for f in dataclasses.fields(RunStats)} | {"engine_faults"}   # the fault thread's, on the same line
        totals: dict[str, int] = {}
        processes = 0
        for m in RUN_RELEASED.finditer(self.log()[log_from:]):   # the line server.py writes per process
            processes += 1
            for k, v in re.findall(r"(\w+)=(\d+)", m[1]):
                if k in keys:
                    n = int(v)
                    if k != "max_resident_pages":
                        totals[k] = totals.get(k, 0) + n
        ended = RUN_ENDED.findall(self.log()[log_from:])
        if ended:
            totals["max_resident_pages"] = max(int(n) for n in ended)
        return {"run_processes": processes, "run_readahead_pages": totals.get("readahead_pages"),
                "run_zero_fills": totals.get("zero_fills"), "run_engine_faults": totals.get("engine_faults"),
                "run_wp_faults": totals.get("wp_faults"), "run_forks": totals.get("fork"),
                "run_max_resident_pages": totals.get("max_resident_pages"), "run_eagain": totals.get("eagain")}
