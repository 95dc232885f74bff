"""`uswap bench --breakdown`: one swap-in fault split into its parts.

Each part is measured on its own, on this machine, now:
  round trip   a first-touch fault served by the daemon with a zero page
               (fault → daemon wakes → UFFDIO_ZEROPAGE → client resumes;
               so it includes one page install)
  store read   one 4 KiB slot read: O_DIRECT pread + open (AES-256-GCM, the
               default), from Python; and the same with --encrypt off (crc32c)
  seal / open  the slot codecs alone on a 4 KiB page in memory, as the store
               calls them (one page per call), against crc32c; the floor column
               has the same per page in 32-page calls (the C cost alone)
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
from uswap.store.sealing import slot_codec
from uswap.store.swapfile import SwapStore

# shared/REFERENCE.md, same kind of machine
FLOORS_US = {
    "round trip": "8.4 same CPU / 47 other CPU (C handler, UFFDIO_COPY)",
    "store read": "54-57 (O_DIRECT 4K random read, QD1)",
    "store read, --encrypt off": "54-57 (O_DIRECT 4K random read, QD1)",
    "install": "1.5 per page in 16-page copies",
    "swap-in": "73 (C handler: pread 4K O_DIRECT + UFFDIO_COPY, disk-IRQ CPU)",
}


def _p50_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


def measure_store_read(store_path: str, n: int = 2000, *, encrypt: bool = True) -> float:
    with SwapStore.open(store_path, encrypt=encrypt) as store:
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


def measure_codec(encrypt: bool, pages: int, n: int) -> tuple[float, float]:
    """p50 µs per 4 KiB page of the slot codec before a write (encode: seal, or crc32c)
    and after a read (decode: open, or crc32c and compare), ``pages`` per call."""
    codec = slot_codec("bench", pages, PAGE_SIZE, encrypt=encrypt)
    buf = AlignedBuffer(pages * PAGE_SIZE)
    buf.view[:] = os.urandom(pages * PAGE_SIZE)
    encode, decode = [], []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            codec.encode(0, pages, buf.ptr)
            t1 = time.perf_counter_ns()
            codec.written(0, pages)
            t2 = time.perf_counter_ns()
            codec.decode(0, pages, buf.ptr)
            t3 = time.perf_counter_ns()
            encode.append(t1 - t0)
            decode.append(t3 - t2)
    finally:
        codec.close()
    return _p50_us(encode) / pages, _p50_us(decode) / pages


def codec_rows(n: int = 20000) -> list[tuple[str, float, str]]:
    """(part, p50 µs per page one page a call, floor: the same in 32-page calls)."""
    rows = []
    for encrypt, write_name, read_name in ((True, "seal 4K (aes-256-gcm)", "open 4K (aes-256-gcm)"),
                                           (False, "crc32c 4K on write", "crc32c 4K check on read")):
        single = measure_codec(encrypt, 1, n)
        batch = measure_codec(encrypt, 32, n // 32)
        rows += [(write_name, single[0], f"{batch[0]:.2f} per page in 32-page calls"),
                 (read_name, single[1], f"{batch[1]:.2f} per page in 32-page calls")]
    return rows


def measure_swapin_floor(store_path: str, n: int = 4000) -> tuple[float, float]:
    """(p50, p99) µs of a random swap-in served by a bare C handler on this store
    (csrc/daemon/uswap_probe.c: poll, read the event, 4 KiB O_DIRECT pread, UFFDIO_COPY;
    handler and toucher unpinned): the floor uswap's random-fault p50 is held to."""
    from uswap._core import ffi, lib
    from uswap.core import check
    samples = ffi.new("uint64_t[]", n)
    with SwapStore.open(store_path, encrypt=False) as store:
        check(lib.uswap_probe_swapin_floor(store.local_fd, store.slot_count, PAGE_SIZE, n, samples))
    ordered = sorted(samples[i] for i in range(n))
    return ordered[n // 2] / 1e3, ordered[n * 99 // 100] / 1e3


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
    read = measure_store_read(store)                   # sealed, as the daemon above (the default)
    read_crc = measure_store_read(store, encrypt=False)
    install = measure_install()
    floor, _ = measure_swapin_floor(store)
    # The round trip already contains a page install (the zero page), so the
    # rest of a swap-in is what is left after the round trip and the read.
    rows = [("round trip", round_trip), ("store read", read), ("install", install), ("swap-in", swap_in),
            ("daemon, rest of the swap-in", max(0.0, swap_in - round_trip - read)),
            ("store read, --encrypt off", read_crc), ("C floor: random swap-in (this run)", floor)]
    out = [{"part": part, "p50_us": round(us, 1), "floor_us": FLOORS_US.get(part, "")} for part, us in rows]
    out += [{"part": part, "p50_us": round(us, 2), "floor_us": floor} for part, us, floor in codec_rows()]
    return out
