"""One budget for every client of the daemon: the memfd regions and the runs (`uswap run`).

The clients are the memfd regions together (they share one CLOCK and one C ``struct uswap_budget``:
uswap.daemon.reclaim) and each run, i.e. process tree (its C ``struct uswap_run_budget``:
uswap.daemon.runs).  Each counts its resident pages its own way (regions: the swap maps' count, exact; a
run: its members' last pagemap counts plus what their fault threads filled since) and the daemon's budget B
(``uswap daemon --resident``) covers them all.  The policy (``share_out``), recomputed by
``DaemonBudget.update`` whenever a client's count or state changes:

- **fair share**: B divided max-min fairly among the clients, none above its own limit (a run's
  ``uswap run --resident``; the regions': B) and none below its floor;
- **line** (above it the client reclaims its own pages, down to a little under it):
  ``min(limit, max(fair share, B - the others' resident))``, at least the floor (MIN_LINE pages, so that a
  client always makes progress).  A client uses what the others leave (work-conserving) but always keeps its
  fair share: when the total is over B, the lines fall below the resident pages only of the clients that
  hold more than their fair share, and the pressure goes to them;
- **hard line** (at it, faults wait for reclaim, as in the kernel's direct reclaim): the client's resident
  pages plus its part of the free room ``H - sum(resident)``, where ``H = B + max(B/32, MIN_SLACK)`` is the
  daemon's hard line; the room goes max-min fairly to the clients that want it, none beyond its line plus
  its own slack (``Demand.slack_of``).

Invariant (what the engines rely on; tests/test_budget.py checks it): whenever lines are written,
``sum(max(resident_c, hard_c)) <= max(H, sum(resident_c))``.  The engines fill pages only below their own
client's hard line, so between two updates the total resident stays under H (no client grows while it is
at or above H) without the engines of different clients ever looking at each other.  Lines are written
lowered first, so the sum holds between two writes too.

What this does not bound (measured in tests/test_run_shared_budget.py): a client reclaim cannot bring down
(``Demand.stuck``: writeback paused by store errors; a run whose last pass evicted nothing) is not throttled,
and its pages above its line are not held against the others; a run's pages filled before their range was
registered count only from its next pagemap count; a run's fault at its hard line waits 5 ms, then Python
serves it (uswap_runeng.c: throttled, not refused).  A run's count also runs ahead of the kernel's by the pages
its fault threads fill during a pagemap count (counted twice until the next count): the policy sees more than
is there, never less.

**The compressed pool** (``uswap daemon --pool``, uswap.daemon.pool) is paid for out of the same budget, but it
is no client: nothing reclaims it by a line (it writes its oldest entries back to the store itself when it
reaches its own size, at most B/2), so its charge P (pages, a counter the pool keeps in C) comes off the top:
the clients share ``B - P`` (fair shares, lines) and ``H - P`` (the room under the hard lines).

Invariant (the pool's): ``sum(resident_c) + P <= H`` as above, with P read at every update.  P does not need
the engines' immediacy because between two updates it grows only when a page is evicted into it (a region's
writeback, a run's eviction), and a page is stored only if it compresses to at most 3/4 of a page: each store
takes less than the page it frees, so the total only falls.  It falls when a fault takes a page out (counted
by that fault's client, under its hard line) or a slot is freed.  The update after every reclaim batch and
run count moves the lines to the new P.  Not bounded, until that update: a batch in flight (its pages are in
the pool before they leave their client: up to 3/4 of a batch more, 48 pages for a region batch of 64, 768 for
a run's of 1,024), what the pool allocates for itself during a store (an index chunk, one page per 512 slots;
zstd's contexts), and a write-back of its oldest entries (its I/O buffer, up to 64 pages, while it lives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

MIN_LINE = 256      # pages a client keeps however full the budget is (a run's and the regions' floor)
MIN_SLACK = 64      # pages of the daemon's hard line above B at least (B/32 from 8 MiB budgets on)
KINDS = ("regions", "runs")


def hard_line(budget: int) -> int:
    """The daemon's hard line H for a budget of ``budget`` pages: the total resident pages never exceed it."""
    return budget + max(budget // 32, MIN_SLACK)


@dataclass(frozen=True)
class Demand:
    """What a client tells the policy: its resident pages now, its own limit and floor, its own slack above
    its line (a function of the line), whether reclaim cannot bring it down now, and its hard line now."""
    resident: int
    limit: int
    floor: int
    slack_of: Callable[[int], int]
    stuck: bool = False
    hard: int = 0


@dataclass(frozen=True)
class Share:
    """A client's part of the budget: its fair share, its line (reclaim target) and hard line (faults wait)."""
    fair: int
    line: int
    hard: int


class BudgetClient(Protocol):
    kind: str   # one of KINDS

    def budget_demand(self) -> Demand: ...

    def set_share(self, share: Share) -> None: ...


def waterfill(total: int, caps: list[int]) -> list[int]:
    """``total`` divided max-min fairly: each gets min(cap, level), the level as high as ``total`` allows
    (whole pages; what does not divide evenly stays undivided)."""
    out = [0] * len(caps)
    left = max(0, total)
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    for n, i in enumerate(order):
        give = min(max(0, caps[i]), left // (len(caps) - n))
        out[i] = give
        left -= give
    return out


def share_out(budget: int, demands: list[Demand], pool_pages: int = 0) -> list[Share]:
    """Every client's share of ``budget`` pages (the module's policy), in the order of ``demands``; the
    compressed pool's ``pool_pages`` come off the top (the module's pool invariant)."""
    if not demands:
        return []
    hard_total = hard_line(budget) - pool_pages
    budget -= pool_pages
    limits = [min(d.limit, budget) for d in demands]
    floors = [min(d.floor, lim) for d, lim in zip(demands, limits)]
    fair = [max(f, e) for f, e in zip(floors, waterfill(budget, limits))]
    total = sum(d.resident for d in demands)
    lines = [max(f, min(lim, max(e, budget - (total - d.resident))))
             for d, lim, f, e in zip(demands, limits, floors, fair)]
    caps = [line + d.slack_of(line) for d, line in zip(demands, lines)]
    # The free room: a stuck client's pages above its line are not held against the others.
    held = sum(min(d.resident, line) if d.stuck else d.resident for d, line in zip(demands, lines))
    wants = [0 if d.stuck else cap - d.resident for d, cap in zip(demands, caps)]
    room = waterfill(hard_total - held, wants)
    return [Share(e, line, cap if d.stuck else min(cap, d.resident + r))
            for d, e, line, cap, r in zip(demands, fair, lines, caps, room)]


class DaemonBudget:
    """The daemon's budget over its clients (``clients``: those active now) and the compressed pool
    (``pool_pages``: its charge now; none: no pool).  ``update`` shares it out and hands every client its
    share, lowered hard lines first; the one writer of every client's lines."""

    def __init__(self, pages: int, clients: Callable[[], Iterable[BudgetClient]],
                 pool_pages: Callable[[], int] = lambda: 0):
        self.pages = pages
        self.hard = hard_line(pages)
        self._clients = clients
        self._pool_pages = pool_pages
        self._last: list[tuple[str, Demand, Share]] = []
        self._last_pool = 0

    def update(self) -> None:
        clients = list(self._clients())
        demands = [c.budget_demand() for c in clients]
        self._last_pool = self._pool_pages()
        shares = share_out(self.pages, demands, self._last_pool)
        order = sorted(range(len(clients)), key=lambda i: shares[i].hard - demands[i].hard)
        for i in order:
            clients[i].set_share(shares[i])
        self._last = [(c.kind, d, s) for c, d, s in zip(clients, demands, shares)]

    def status(self) -> dict:
        """The hard line and the total at the last update, and each kind's part of the budget."""
        kinds = {kind: {"clients": 0, "resident_pages": 0, "fair_pages": 0, "line_pages": 0} for kind in KINDS}
        for kind, demand, share in self._last:
            k = kinds[kind]
            k["clients"] += 1
            k["resident_pages"] += demand.resident
            k["fair_pages"] += share.fair
            k["line_pages"] += share.line
        return {"hard_pages": self.hard, "total_resident_pages": sum(d.resident for _, d, _ in self._last),
                "pool_pages": self._last_pool, "shares": kinds}
