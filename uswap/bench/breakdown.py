"""`uswap bench --breakdown`: one swap-in fault split into its parts.

Each part is measured on its own, on this machine, now:
  round trip   a first-touch fault served by the daemon with a zero page
               (fault → daemon wakes → UFFDIO_ZEROPAGE → client resumes;
               so it includes one page install)
  store read   one 4 KiB slot read: O_DIRECT pread + crc32c, from Python
  install      one UFFDIO_COPY of a page into a registered shmem region, from Python
  swap-in      a random read fault on a swapped page, end to end, readahead off
and the rest of the swap-in, after the round trip and the read, is what the
daemon itself adds (event decoding, bookkeeping, reclaim interleaved).  Shown next to the
floors measured in C in shared/REFERENCE.md.
"""

from __future__ import annotations

import os
import random
import statistics
import time

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.store.swapfile import SwapStore

# shared/REFERENCE.md, same kind of machine
FLOORS_US = {
    "round trip": "8.4 same CPU / 47 other CPU (C handler, UFFDIO_COPY)",
    "store read": "54-57 (O_DIRECT 4K random read, QD1)",
    "install": "1.5 per page in 16-page copies",
    "swap-in": "73 (C handler: pread 4K O_DIRECT + UFFDIO_COPY, disk-IRQ CPU)",
}


def _p50_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


def measure_store_read(store_path: str, n: int = 2000) -> float:
    with SwapStore.open(store_path) as store:
        buf = AlignedBuffer(PAGE_SIZE)
        slots = random.sample(range(store.slot_count), min(n, store.slot_count))
        for slot in slots:
            buf.view[:8] = slot.to_bytes(8, "little")
            store.write_slots(slot, 1, buf)
        random.shuffle(slots)
        samples = []
        for slot in slots:
            t0 = time.perf_counter_ns()
            store.read_slots(slot, 1, buf)
            samples.append(time.perf_counter_ns() - t0)
    return _p50_us(samples)


def measure_install(n: int = 4096) -> float:
    import mmap

    from uswap.uffd import CopyMode, Feature, RegisterMode, Userfaultfd
    memfd = os.memfd_create("uswap-breakdown", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, n * PAGE_SIZE)
        region = mmap.mmap(memfd, n * PAGE_SIZE, mmap.MAP_SHARED)
        import ctypes
        anchor = ctypes.c_char.from_buffer(region)
        addr = ctypes.addressof(anchor)
        src = AlignedBuffer(PAGE_SIZE)
        samples = []
        with Userfaultfd.open(Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM) as fd:
            fd.register(addr, n * PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
            for i in range(n):
                t0 = time.perf_counter_ns()
                fd.copy(addr + i * PAGE_SIZE, src.address, PAGE_SIZE, CopyMode.WP)
                samples.append(time.perf_counter_ns() - t0)
        del anchor
        region.close()
    finally:
        os.close(memfd)
    return _p50_us(samples)


def run_breakdown(bench, binaries: dict[str, str]) -> list[dict]:
    """Rows of (part, p50 µs, floor); ``bench`` supplies the workdir and the daemon launcher."""
    from uswap.bench.backends import UswapDaemon
    cfg = bench.config
    store = os.path.join(cfg.workdir, "bench.store")
    mib = min(64, cfg.size >> 20)

    def workload_p50(resident: int, *args: str) -> float:
        with UswapDaemon(cfg.workdir, store, budget=resident, io="sync", readahead=1,
                         daemon_cpu=cfg.daemon_cpu, workload_cpu=cfg.workload_cpu) as daemon:
            r = daemon.run([binaries["workload"], *args], timeout=600)
        fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return float(fields["fault_p50_us"])

    round_trip = workload_p50(mib << 21, "seq", "-s", str(mib))               # nothing evicted: zero fills only
    swap_in = workload_p50(max(4 << 20, (mib << 20) // 4), "random", "-s", str(mib), "-n", "20000", "-w", "0",
                           "-F")
    read = measure_store_read(store)
    install = measure_install()
    # The round trip already contains a page install (the zero page), so the
    # rest of a swap-in is what is left after the round trip and the read.
    rows = [("round trip", round_trip), ("store read", read), ("install", install), ("swap-in", swap_in),
            ("daemon, rest of the swap-in", max(0.0, swap_in - round_trip - read))]
    return [{"part": part, "p50_us": round(us, 1), "floor_us": FLOORS_US.get(part, "")} for part, us in rows]
