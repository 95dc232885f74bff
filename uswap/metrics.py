"""`uswap status --format prometheus`: the status as Prometheus text exposition (format 0.0.4).

For node_exporter's textfile collector (write to a temporary file in its
directory, then rename) or any scrape that runs a command.  Names start with
``uswap_``, carry their unit (``_bytes``, ``_seconds``, ``_pages``), and
counters are counters (``_total``): the kernel-named ones keep their kernel
names (``uswap_pswpin_pages_total`` is the daemon's pswpin, in pages, as in
/proc/vmstat).  Sizes the status gives in pages are shown in bytes.

The mapping below is the whole contract; a status key not listed is not
exported (docs/DESIGN.md lists the keys).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# (status key, metric name without "uswap_", type, help, how: "pages" = times the page size, "" = as is)
DAEMON = [
    ("budget_pages", "budget_bytes", "gauge", "Resident budget: beyond it, cold pages are written out.", "pages"),
    ("resident_pages", "resident_bytes", "gauge", "Pages of client regions held in memory.", "pages"),
    ("run_resident_pages", "runs_resident_bytes", "gauge", "Pages of `uswap run` processes held in memory, as their "
     "counts say.", "pages"),
    ("total_resident_pages", "total_resident_bytes", "gauge", "Pages of regions and runs together held in memory: "
     "the budget covers them all.", "pages"),
    ("hard_pages", "budget_hard_bytes", "gauge", "The daemon's hard line: at it, faults wait for reclaim.", "pages"),
    ("writeback_pages", "writeback_bytes", "gauge", "Pages being written to the store now.", "pages"),
    ("mapped_pages", "mapped_bytes", "gauge", "Size of every client region together.", "pages"),
    ("slots_total", "store_size_bytes", "gauge", "Store capacity (its slots).", "pages"),
    ("slots_used", "store_used_bytes", "gauge", "Store slots holding a page.", "pages"),
    ("page_size", "page_size_bytes", "gauge", "Page (and slot) size.", ""),
    ("readahead", "readahead_window_pages", "gauge", "Largest swap-in readahead window.", ""),
    ("pswpin", "pswpin_pages", "counter", "Pages read back from the store (as the kernel's pswpin).", ""),
    ("pswpout", "pswpout_pages", "counter", "Pages written out to the store (as the kernel's pswpout).", ""),
    ("read_errors", "read_errors", "counter", "Store reads that failed.", ""),
    ("write_errors", "write_errors", "counter", "Store writes that failed.", ""),
    ("writeback_waits", "writeback_waits", "counter", "Faults that waited for a page under writeback.", ""),
    ("throttled", "throttled_faults", "counter", "Faults held at the hard budget line until reclaim progressed.", ""),
    ("faults", "faults", "counter", "Page faults of every region and run process (engine_faults + slow_path_faults).",
     ""),
    ("engine_faults", "engine_faults", "counter", "Faults the C engines served.", ""),
    ("slow_path_faults", "slow_path_faults", "counter", "Faults the engines forwarded to the daemon's Python.", ""),
    ("readahead_pages", "readahead_pages", "counter", "Pages async readahead installed before their fault.", ""),
    ("write_ios", "write_ios", "counter", "Writeback writes issued to the store.", ""),
    ("punches", "punches", "counter", "Hole punches that dropped written-out pages from memory.", ""),
]
REGION = [
    ("size_pages", "region_size_bytes", "gauge", "Size of the region.", "pages"),
    ("resident_pages", "region_resident_bytes", "gauge", "Part of the region in memory.", "pages"),
    ("swapped_pages", "region_swapped_bytes", "gauge", "Part of the region in the store.", "pages"),
    ("poisoned", "region_poisoned_pages", "gauge", "Pages that could not be read back (a touch gets SIGBUS).", ""),
    ("faults", "region_faults", "counter", "Page faults of the region (engine_faults + slow_path_faults).", ""),
    ("engine_faults", "region_engine_faults", "counter", "Page faults the region's C engine served.", ""),
    ("slow_path_faults", "region_slow_path_faults", "counter", "Page faults the engine forwarded to Python.", ""),
    ("throttled", "region_throttled_faults", "counter", "Faults held at the hard budget line.", ""),
    ("zero_fills", "region_zero_fills", "counter", "First touches served with a zero page.", ""),
    ("wp_faults", "region_wp_faults", "counter", "Write-protect faults (a clean page written).", ""),
    ("writeback_waits", "region_writeback_waits", "counter", "Faults that waited for writeback.", ""),
    ("pswpin", "region_pswpin_pages", "counter", "Pages of the region read back from the store.", ""),
    ("pswpout", "region_pswpout_pages", "counter", "Pages of the region written to the store.", ""),
    ("read_errors", "region_read_errors", "counter", "Store reads for the region that failed.", ""),
    ("write_errors", "region_write_errors", "counter", "Store writes for the region that failed.", ""),
]
RUN = [   # one process of `uswap run`
    ("budget_pages", "run_budget_bytes", "gauge", "Budget of the run (process tree) the process is in.", "pages"),
    ("resident_pages", "run_resident_bytes", "gauge", "Registered memory of the process in memory, at its last "
     "count.", "pages"),
    ("swapped_pages", "run_swapped_bytes", "gauge", "Memory of the process in the store.", "pages"),
    ("clean_pages", "run_clean_bytes", "gauge", "Memory of the process read back from the store and not written "
     "since: in memory and in the store alike, evicted again without a write.", "pages"),
    ("poisoned", "run_poisoned_pages", "gauge", "Pages that could not be read back (a touch gets SIGBUS).", ""),
    ("faults", "run_faults", "counter", "Page faults of the process (engine_faults + slow_path_faults).", ""),
    ("engine_faults", "run_engine_faults", "counter", "Page faults its fault thread served in C.", ""),
    ("slow_path_faults", "run_slow_path_faults", "counter", "Page faults its fault thread handed to Python.", ""),
    ("pswpin", "run_pswpin_pages", "counter", "Pages of the process read back from the store.", ""),
    ("pswpout", "run_pswpout_pages", "counter", "Pages of the process written to the store.", ""),
    ("dropped", "run_dropped_pages", "counter", "Pages moved out of the process (written to the store for it, "
     "or clean: no write).", ""),
]
SHARE = [   # one kind of client of the daemon's budget (uswap.daemon.budget): regions, runs
    ("clients", "share_clients", "gauge", "Clients of this kind sharing the budget (the regions count as one).", ""),
    ("resident_pages", "share_resident_bytes", "gauge", "Memory this kind of client holds.", "pages"),
    ("fair_pages", "share_fair_bytes", "gauge", "This kind's fair share of the budget.", "pages"),
    ("line_pages", "share_line_bytes", "gauge", "This kind's line: above it, its pages are reclaimed.", "pages"),
]
POOL = [   # the compressed pool (uswap.daemon.pool), when the daemon runs one
    ("stored_pages", "pool_stored_pages", "gauge", "Pages the compressed pool holds, same-filled ones included.", ""),
    ("same_filled_pages", "pool_same_filled_pages", "gauge", "Pages the pool holds as one repeated word (no data).",
     ""),
    ("compressed_bytes", "pool_compressed_bytes", "gauge", "Compressed data the pool holds.", ""),
    ("charged_bytes", "pool_charged_bytes", "gauge", "Memory the pool takes, paid for out of the budget.", ""),
    ("max_bytes", "pool_max_bytes", "gauge", "The pool's size (uswap daemon --pool).", ""),
    ("ratio", "pool_compression_ratio", "gauge", "Pages the pool holds over the compressed bytes they take.", ""),
    ("stores", "pool_stores", "counter", "Pages taken into the pool.", ""),
    ("loads", "pool_loads", "counter", "Pages read back from the pool.", ""),
    ("rejected", "pool_rejected", "counter", "Pages offered that did not compress enough (written to the store).",
     ""),
    ("skipped", "pool_skipped", "counter", "Rejected pages not even tried: an incompressible run (1 in 16 is tried).",
     ""),
    ("written_back", "pool_written_back", "counter", "Pages the pool wrote to the store to make room.", ""),
    ("corrupted", "pool_corrupted", "counter", "Pool loads that failed their check (never handed back).", ""),
]
NFS = [
    ("timeout_s", "nfs_timeout_seconds", "gauge", "How long a request waits for a server that is down.", ""),
    ("since", "nfs_state_change_time_seconds", "gauge", "Unix time the server's state last changed.", ""),
    ("connects", "nfs_connects", "counter", "Successful connects to the server, the first included.", ""),
    ("retries", "nfs_retries", "counter", "Requests sent again after a failure.", ""),
    ("most_in_flight", "nfs_most_in_flight_requests", "gauge", "Most requests awaiting an answer at once.", ""),
    ("reads", "nfs_reads", "counter", "READ requests the data connection completed.", ""),
    ("writes", "nfs_writes", "counter", "WRITE requests the data connection completed.", ""),
    ("read_bytes", "nfs_read_bytes", "counter", "Bytes read from the server.", ""),
    ("write_bytes", "nfs_written_bytes", "counter", "Bytes written to the server.", ""),
]
SET_STORE = [      # each member of a store set (label store: its path or URL)
    ("prio", "set_store_priority", "gauge", "The store's priority in the set (higher fills first).", ""),
    ("slots", "set_store_size_bytes", "gauge", "What the store gives the set (its whole stripe clusters).", "pages"),
    ("used_slots", "set_store_used_bytes", "gauge", "The store's slots holding a page.", "pages"),
    ("reads", "set_store_reads", "counter", "Reads from the store (a transfer split across stores counts in "
     "each).", ""),
    ("writes", "set_store_writes", "counter", "Writes to the store.", ""),
    ("read_bytes", "set_store_read_bytes", "counter", "Bytes read from the store.", ""),
    ("write_bytes", "set_store_written_bytes", "counter", "Bytes written to the store.", ""),
    ("errors", "set_store_errors", "counter", "Transfers to or from the store that failed.", ""),
    # with --copies 2 only (absent otherwise: add_table skips them)
    ("stale_slots", "set_store_stale_bytes", "gauge", "Slots of the store that missed a write while it was down "
     "(copied back by the resync).", "pages"),
    ("fallbacks", "set_store_fallbacks", "counter", "Reads the store failed or skipped that another copy "
     "served.", ""),
    ("resynced_slots", "set_store_resynced_bytes", "counter", "Slots copied back to the store by the resync.",
     "pages"),
]
MOUNT = [
    ("files", "mount_files", "gauge", "Swap files the mount serves.", ""),
    ("file_bytes", "mount_file_size_bytes", "gauge", "Size of each swap file.", ""),
    ("reads", "mount_reads", "counter", "Read requests from the kernel.", ""),
    ("writes", "mount_writes", "counter", "Write requests from the kernel.", ""),
    ("pages_read", "mount_read_pages", "counter", "Pages read from the store.", ""),
    ("pages_written", "mount_written_pages", "counter", "Pages written to the store.", ""),
    ("zero_reads", "mount_zero_reads", "counter", "Reads of never-written pages (served as zeros).", ""),
    ("read_errors", "mount_read_errors", "counter", "Store reads that failed (the kernel got EIO).", ""),
    ("write_errors", "mount_write_errors", "counter", "Store writes that failed (the kernel got EIO).", ""),
]
MOUNT_BUFFERS = [
    ("count", "mount_io_buffers", "gauge", "I/O buffers the mount allocated at start.", ""),
    ("in_use", "mount_io_buffers_in_use", "gauge", "I/O buffers in use now.", ""),
    ("waits", "mount_io_buffer_waits", "counter", "Requests that waited for a free I/O buffer.", ""),
]


@dataclass
class Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[dict, float]] = field(default_factory=list)

    def render(self) -> list[str]:
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        lines = [f"# HELP {sample} {self.help}", f"# TYPE {sample} {self.kind}"]
        for labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{sample}{{{text}}} {_number(value)}" if text else f"{sample} {_number(value)}")
        return lines


class Exposition:
    def __init__(self):
        self.families: dict[str, Family] = {}

    def add(self, name: str, kind: str, help: str, value: float, labels: dict | None = None) -> None:
        """A sample of family ``name``.  One family per name, of one kind: a reader names a counter's family
        without its ``_total``, so no other family may end in it."""
        if name.endswith("_total"):
            raise ValueError(f"uswap_{name}: only a counter's samples end in _total")
        family = self.families.setdefault(name, Family(f"uswap_{name}", kind, help))
        if (family.kind, family.help) != (kind, help):
            raise ValueError(f"uswap_{name} is already a {family.kind} ({family.help!r})")
        family.samples.append((labels or {}, value))

    def add_table(self, table: list, values: dict, labels: dict, page_size: int) -> None:
        for key, name, kind, help, how in table:
            if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool):
                self.add(name, kind, help, values[key] * (page_size if how == "pages" else 1), labels)

    def render(self) -> str:
        return "\n".join(line for family in self.families.values() for line in family.render()) + "\n"


def prometheus(status: dict | None, mounts: dict[str, dict], *, page_size: int) -> str:
    """The exposition for a daemon's status (None: no daemon answered) and the FUSE mounts'."""
    out = Exposition()
    out.add("daemon_up", "gauge", "1 if the daemon answered uswap status.", 1 if status else 0)
    if status:
        d = status["daemon"]
        ps = d.get("page_size", page_size)
        out.add("daemon_info", "gauge", "The daemon's store, socket, I/O mode and encryption (value 1).", 1,
                {"store": d["store"], "socket": d["socket"], "io": d["io"],
                 "encryption": status.get("encryption", "")})
        out.add("store_healthy", "gauge", "1 if writeback runs; 0 if paused by store errors.",
                1 if d["store_health"] == "ok" else 0)
        out.add_table(DAEMON, d, {}, ps)
        for kind, share in d.get("shares", {}).items():
            out.add_table(SHARE, share, {"kind": kind}, ps)
        if "pool" in status:
            pool = status["pool"]
            out.add("pool_enabled", "gauge", "1 if the daemon runs a compressed pool (label: its compressor).",
                    0 if pool is None else 1, {} if pool is None else {"compressor": pool["compressor"]})
            if pool is not None:
                out.add_table(POOL, pool, {}, ps)
        if "uptime_s" in d:
            out.add("start_time_seconds", "gauge", "Unix time the daemon started.", round(time.time() - d["uptime_s"]))
        nfs = status.get("nfs")
        if nfs:
            server = {"server": nfs["server"]}
            out.add("nfs_up", "gauge", "1 if the NFS server is connected.", 1 if nfs["state"] == "up" else 0, server)
            out.add_table(NFS, nfs, server, ps)
        for store in status.get("stores", []):
            labels = {"store": store["url"]}
            out.add("set_store_healthy", "gauge", "1 if the store's last transfer succeeded (with --copies 2: and it "
                    "is neither down nor behind).", 1 if store["health"] == "ok" else 0, labels)
            out.add_table(SET_STORE, store, labels, ps)
            if store.get("nfs") and not nfs:        # several on NFS: each with its store
                server = {"server": store["nfs"]["server"], **labels}
                out.add("nfs_up", "gauge", "1 if the NFS server is connected.",
                        1 if store["nfs"]["state"] == "up" else 0, server)
                out.add_table(NFS, store["nfs"], server, ps)
        for region in status.get("regions", []):
            labels = {"region": region["id"], "pid": region["pid"], "uid": region.get("uid", "")}
            out.add_table(REGION, region, labels, ps)
        for run in status.get("runs", []):
            labels = {"run": run["run"], "process": run["id"], "pid": run["pid"] or "", "uid": run["uid"]}
            out.add_table(RUN, run, labels, ps)
    for mountpoint, m in mounts.items():
        labels = {"mountpoint": mountpoint}
        out.add("mount_up", "gauge", "1 if the FUSE mount answered (its .status file).", 0 if "error" in m else 1,
                labels)
        if "error" not in m:
            out.add_table(MOUNT, m, {**labels, "store": m.get("store", "")}, page_size)
            out.add_table(MOUNT_BUFFERS, m.get("io_buffers", {}), {**labels, "store": m.get("store", "")}, page_size)
    return out.render()


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
