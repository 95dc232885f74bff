"""Layer 2: the daemon's policies on their own, with fakes injected (no kernel needed).

The paging path itself is tested for real in test_t4_daemon.py; these pin down
the decisions: slot clustering, CLOCK second chance, readahead windows.
"""

from types import SimpleNamespace

import pytest

from uswap.daemon.reclaim import Reclaimer, by_region, runs
from uswap.daemon.region import CLEAN, DIRTY, SWAPPED, WRITEBACK, Region
from uswap.daemon.slots import NoSlots, SlotAllocator


def test_slots_come_in_clusters_next_fit():
    slots = SlotAllocator(100)
    assert slots.allocate(32) == (0, 32)
    assert slots.allocate(32) == (32, 32)
    slots.free(10, 5)
    assert slots.allocate(8) == (64, 8)          # next-fit: after the last cluster, not into the hole
    assert slots.in_use == 32 + 32 - 5 + 8


def test_slots_settle_for_shorter_runs_when_fragmented():
    slots = SlotAllocator(8)
    for first in range(0, 8, 2):
        slots.allocate(1)
        slots.allocate(1)
    for slot in (1, 3, 5, 7):
        slots.free(slot)
    assert slots.allocate(4)[1] == 1              # no run of 4, 2: takes 1
    for _ in range(3):
        slots.allocate(1)
    with pytest.raises(NoSlots):
        slots.allocate(1)
    with pytest.raises(AssertionError, match="freed twice"):
        SlotAllocator(4).free(0)


def test_runs_and_grouping():
    assert runs([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 2), (10, 1)]
    assert runs([]) == []
    a, b = object(), object()
    assert by_region([(a, 5), (b, 1), (a, 2)]) == [(a, [2, 5]), (b, [1])]


class FakeRegion:
    """What the CLOCK looks at: page states and whether the region is gone."""

    def __init__(self, states):
        self.state = bytearray(states)
        self.closed = False


fake_region = FakeRegion


def test_clock_gives_referenced_pages_a_second_chance():
    r = Reclaimer(SimpleNamespace(), budget_pages=4, batch=2, clock=lambda: 0.0)
    region = fake_region([DIRTY] * 4)
    for page, referenced in ((0, True), (1, False), (2, True), (3, False)):
        r.add(region, page, referenced=referenced)
    assert r.pick_victims() == [(region, 1), (region, 3)]
    assert list(r.lru.items()) == [((region, 0), False), ((region, 2), False)]  # bits cleared, kept
    assert r.pick_victims() == [(region, 0), (region, 2)]                       # second pass takes them


def test_clock_skips_pages_under_writeback_and_closed_regions():
    r = Reclaimer(SimpleNamespace(), budget_pages=4, batch=8, clock=lambda: 0.0)
    busy, gone = fake_region([WRITEBACK, CLEAN]), fake_region([CLEAN])
    gone.closed = True
    r.add(busy, 0, referenced=False)
    r.add(busy, 1, referenced=False)
    r.add(gone, 0, referenced=False)
    assert r.pick_victims() == [(busy, 1)]
    assert (gone, 0) not in r.lru and (busy, 0) in r.lru


def test_backoff_pauses_reclaim_with_an_injected_clock():
    now = [100.0]
    r = Reclaimer(SimpleNamespace(stats=SimpleNamespace(write_errors=0), log_limited=lambda *a: None),
                  budget_pages=4, clock=lambda: now[0])
    r._write_failed([], OSError(5, "Input/output error"))
    assert r.paused and r.pause_reason.startswith("writeback failed: errno 5")
    now[0] += 0.06
    assert not r.paused
    r._write_failed([], OSError(5, "Input/output error"))
    now[0] += 0.06
    assert r.paused                                # the second pause is twice as long


def region_with(states, swap_map, readahead=8):
    daemon = SimpleNamespace(readahead=readahead, reclaimer=SimpleNamespace(resident=0))
    region = Region(1, None, -1, 0x10000, len(states) * 4096, pid=1, uid=0, daemon=daemon)
    region.state[:] = bytes(states)
    for page, slot in enumerate(swap_map):
        region.swap_map[page] = slot
    return region


def test_readahead_grows_on_sequential_faults_and_follows_slots():
    pages = 32
    region = region_with([SWAPPED] * pages, list(range(100, 100 + pages)))
    assert region.readahead_window(0) == (0, 1)     # the first fault: window 1
    assert region.readahead_window(1) == (1, 2)     # near the last one: doubles
    assert region.readahead_window(3) == (2, 4)     # mostly ahead, a quarter behind
    assert region.readahead_window(7) == (5, 8)     # up to --readahead
    assert region.readahead_window(15) == (13, 8)


def test_readahead_shrinks_on_random_faults_and_stops_at_slot_breaks():
    region = region_with([SWAPPED] * 16, [50, 51, 52, 9, 10, 11, 12, 13] + [200 + i for i in range(8)])
    region._ra_size = 8
    region._last_fault = 0
    assert region.readahead_window(1) == (0, 3)     # slots 50..52, then a break at page 3
    assert region.readahead_window(14) == (13, 3)   # far away: the window halves to 4 (2 ahead fit)
    assert region.readahead_window(5)[1] == 2       # and again
    assert region.readahead_window(11) == (11, 1)
