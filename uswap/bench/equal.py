"""Equal total memory: each backend's limit lowered by what it uses outside that limit.

The condition of issue 21's comparison: every backend runs with the same total memory T (the bench's
--resident), counted as its limit (uswap's --resident budget, which holds its compressed pool; the memcg's
memory.limit_in_bytes for kernel swap) plus what it uses outside that limit at its peak (uswap: the daemon's RSS
that is not the pool's charged memory; zram: mm_stat mem_used_max; zswap: its pool; native swap: nothing, its swap
cache is charged to the memcg).

What a backend uses outside depends on its limit: a lower limit swaps more, and zram and zswap then keep more
compressed pages.  So the limit is found by runs (`calibrate`): the first at T; after each, the next limit is T
minus what that run used outside; it stops when limit + outside <= T + tolerance.  uswap's daemon RSS hardly
depends on the budget (one lowering suffices); zram's pool at pages that compress well is small (the same).

It cannot always be arranged, and then nothing is faked: zram keeps every page it swaps in memory, so pages that
compress to half need about (working set - limit) / 2 outside whatever the limit, and random pages need all of it;
when the next limit would fall under a floor (T / 4) the row's timed runs use T and its note says why.  Every timed
run reports its own total (limit + outside, measured in that run), so a row that is not equal shows by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from uswap.core import PAGE_SIZE

ATTEMPTS = 3          # calibration runs per row at most


def tolerance(total: int) -> int:
    """How far over T a row's limit + outside may be and still count as equal: run-to-run noise in RSS and pool
    peaks (1 MiB or 5 %, the larger)."""
    return max(1 << 20, total // 20)


def floor(total: int) -> int:
    """The lowest limit calibration tries: below a quarter of T the row would measure a starved configuration,
    not the backend."""
    return total // 4


@dataclass
class Limit:
    limit: int                    # bytes: the budget or memcg limit of the row's timed runs
    note: str | None              # why the row is not at equal memory (None: it is, as far as calibration saw)
    tried: list[list] = field(default_factory=list)   # [limit bytes, outside MiB or None] per calibration run


def calibrate(total: int, measure: Callable[[int], tuple[float | None, str | None]]) -> Limit:
    """The limit at which limit + outside <= total (+ tolerance).  ``measure(limit)`` runs the row once at that
    limit and returns (MiB used outside the limit at its peak, or None when not measured; why the run failed, or
    None)."""
    limit = total
    tried: list[list] = []
    for _ in range(ATTEMPTS):
        outside, failed = measure(limit)
        tried.append([limit, outside])
        if failed:
            if limit == total:
                return Limit(total, f"its calibration run failed at {_mib(total)}: {failed}", tried)
            # Equal memory was being arranged and the backend cannot run in it: the timed runs show that failure
            return Limit(limit, f"failed at the lowered limit {_mib(limit)} ({failed})", tried)
        if outside is None:
            return Limit(total, "what it uses outside its limit is not measured: not lowered", tried)
        used = int(outside * (1 << 20))
        if limit + used <= total + tolerance(total):
            return Limit(limit, None, tried)
        lower = (total - used) // PAGE_SIZE * PAGE_SIZE
        if lower < floor(total):
            return Limit(total, f"not arrangeable: it used {outside:.1f} MiB outside a {_mib(limit)} limit; "
                                f"equal memory would need a limit of {_mib(lower)}, under the floor "
                                f"{_mib(floor(total))}: run at {_mib(total)}", tried)
        limit = lower
    return Limit(limit, f"not within {_mib(tolerance(total))} of {_mib(total)} after {ATTEMPTS} calibration runs "
                        f"(last: {tried[-1][1]:.1f} MiB outside {_mib(tried[-1][0])})", tried)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
