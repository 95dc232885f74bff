"""Layer 2: the daemon's policies on their own, with fakes injected (no kernel needed).

The paging path itself is tested for real in test_region_daemon.py; these pin down
the decisions: slot clustering, the swap map's transitions, the CLOCK over spans,
backoff, per-uid limits.
"""

from types import SimpleNamespace

import pytest

from uswap.daemon.reclaim import Reclaimer, WritebackBatch, spans
from uswap.daemon.slots import NoSlots, SlotAllocator
from uswap.daemon.swapmap import (ABSENT, BUSY, CLEAN, DIRTY, SWAPPED, WRITEBACK, Budget, SwapMap,
                                  slot_of)


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


def test_a_fragmented_store_costs_a_bounded_look():
    slots = SlotAllocator(40000)
    assert slots.allocate(40000) == (0, 40000)
    for slot in range(0, 40000, 2):                 # every other slot free: runs of 1
        slots.free(slot)
    for slot in range(30001, 30064, 2):             # 30000..30064 free: far past the look's bound
        slots.free(slot)
    for slot in range(5001, 5032, 2):               # 5000..5032 free: a 33-run within it
        slots.free(slot)
    assert slots.allocate(32) == (5000, 32)         # a whole cluster within the look is found
    assert slots.allocate(64) == (5032, 1)          # the 65-run is past the look: the longest seen


def test_a_batch_gets_clustered_slots_and_none_for_zero_pages():
    from uswap._core import ffi
    slots = SlotAllocator(10)
    zero = ffi.new("uint8_t[]", [0, 0, 1, 0, 0, 0])
    out = ffi.new("int64_t[]", 6)
    slots.assign(zero, out, 6)
    assert list(out) == [0, 1, -1, 2, 3, 4] and slots.in_use == 5
    with pytest.raises(NoSlots):
        slots.assign(ffi.new("uint8_t[]", 6), out, 6)      # 6 needed, 5 free: nothing taken
    assert slots.in_use == 5 and list(out) == [-1] * 6
    slots.free_list(ffi.new("int64_t[]", [0, -1, 4]), 3)
    assert slots.in_use == 3
    with pytest.raises(AssertionError, match="freed twice"):
        slots.free_list(ffi.new("int64_t[]", [0]), 1)


def test_runs():
    assert spans([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 2), (10, 1)]
    assert spans([]) == []


def test_swapmap_transitions_keep_the_resident_counts():
    budget = Budget(100, soft=50)
    m, other = SwapMap(8, budget), SwapMap(4, budget)
    assert m.state(0) == ABSENT and m.resident == 0
    entry = m.claim(0)
    assert entry == ABSENT and m.claim(0) is None            # one holder at a time
    m.publish(0, DIRTY, referenced=1)
    assert m.entry(0) & BUSY == 0 and m.resident == 1 and budget.resident == 1
    m.claim(0)
    m.publish(0, SWAPPED, 41)
    assert slot_of(m.entry(0)) == 41 and m.resident == 0
    for page in (1, 2):
        m.claim(page)
        m.publish(page, CLEAN, 7 + page)
    other.claim(3)
    other.publish(3, WRITEBACK)
    assert budget.resident == 3 and m.count(CLEAN) == 2
    m.close()                                                  # a region's pages leave the budget with it
    assert budget.resident == 1
    other.claim(3)
    other.unclaim(3)                                           # a claim given back changes nothing
    assert other.state(3) == WRITEBACK and budget.resident == 1
    other.close()


def test_swapmap_referenced_bits_and_victim_claims():
    m = SwapMap(8, Budget(100, soft=50))
    for page, state in enumerate([DIRTY, CLEAN, SWAPPED, DIRTY, WRITEBACK, CLEAN, ABSENT, DIRTY]):
        m.claim(page)
        m.publish(page, state, 10 + page if state in (SWAPPED, CLEAN) else -1, referenced=int(page == 3))
    assert m.test_clear_referenced(0, 4) and not m.test_clear_referenced(0, 8)   # read and cleared
    assert m.claim(5) is not None                                                # held by someone
    taken, held, end = m.claim_spans(0, 8, most=3)
    assert taken == [(0, 1, DIRTY), (1, 1, CLEAN), (3, 1, DIRTY)] and end == 4   # spans of one state
    assert held == []                                     # 0..3: nothing resident held by another
    taken, held, end = m.claim_spans(0, 8, most=8)
    assert taken == [(7, 1, DIRTY)] and end == 8          # neither SWAPPED, WRITEBACK, ABSENT nor held
    assert held == [(0, 2), (3, 1), (5, 1)]               # resident but held: ours from above, and 5
    m.close()
    m = SwapMap(100, Budget(1000, soft=500))
    for page in range(100):
        m.claim(page)
        m.publish(page, DIRTY if page % 2 else CLEAN, page if page % 2 == 0 else -1)
    taken, held, end = m.claim_spans(0, 100, most=100)     # alternating states: one span a page
    assert len(taken) == 64 and end == 64                 # the span list filled: the rest not looked at
    m.close()


def pages(victims) -> list[int]:
    return [p for _, first, count, _ in victims for p in range(first, first + count)]


def clock(budget_pages=4, batch=2):
    return Reclaimer(SimpleNamespace(), budget_pages=budget_pages, batch=batch, clock=lambda: 0.0)


def fake_region(r, states):
    """What the CLOCK looks at: a real swap map, and whether the region is gone."""
    m = SwapMap(len(states), r.budget)
    for page, state in enumerate(states):
        m.claim(page)
        m.publish(page, state, 1 if state in (SWAPPED, CLEAN) else -1)
    return SimpleNamespace(map=m, closed=False, held=set())


def test_clock_takes_runs_whole_and_gives_referenced_runs_a_second_chance():
    r = clock(batch=4)
    region = fake_region(r, [DIRTY] * 8)
    for first in (0, 2, 4, 6):
        r.add_span(region, first, 2)
    region.map.set_referenced(3)                   # span (2, 2) was touched
    assert pages(r.pick_victims()) == [0, 1, 4, 5]
    assert list(r.spans)[0][1:] == (6, 2)           # untouched rest in order, the referenced span at the tail
    assert list(r.spans)[-1][1:] == (2, 2) and not region.map.test_clear_referenced(2, 2)   # bit cleared
    assert pages(r.pick_victims()) == [6, 7, 2, 3]   # the second pass takes it


def test_clock_keeps_held_pages_and_drops_closed_regions():
    r = clock(batch=8)
    region, gone = fake_region(r, [DIRTY, CLEAN, DIRTY, SWAPPED]), fake_region(r, [CLEAN])
    gone.closed = True
    region.map.claim(1)                            # the engine is installing it right now
    r.add_span(region, 0, 4)
    r.add_span(gone, 0, 1)
    assert pages(r.pick_victims()) == [0, 2]
    assert [span[1:] for span in r.spans] == [(1, 1)]   # invariant: a resident page stays on the CLOCK


def test_a_full_batch_leaves_the_rest_of_its_run_next_in_line():
    r = clock(batch=3)
    region = fake_region(r, [DIRTY] * 6)
    r.add_span(region, 0, 6)
    assert pages(r.pick_victims()) == [0, 1, 2]
    assert list(r.spans)[0][1:] == (3, 3)


def test_backoff_pauses_reclaim_with_an_injected_clock():
    now = [100.0]
    r = Reclaimer(SimpleNamespace(stats=SimpleNamespace(write_errors=0), log_limited=lambda *a: None,
                                  slots=SlotAllocator(4)),
                  budget_pages=4, clock=lambda: now[0])
    r._write_failed(WritebackBatch(1), OSError(5, "Input/output error"))
    assert r.paused and r.pause_reason.startswith("writeback failed: errno 5")
    now[0] += 0.06
    assert not r.paused
    r._write_failed(WritebackBatch(1), OSError(5, "Input/output error"))
    now[0] += 0.06
    assert r.paused                                # the second pause is twice as long


def test_user_limits_bound_each_uid_but_not_the_daemons_own():
    import errno

    from uswap.daemon.limits import UserLedger, UserLimits
    from uswap.protocol import ProtocolError
    ledger = UserLedger(UserLimits(max_pages=100, max_regions=2, max_connections=2, exempt_uid=0))
    ledger.add_region(1000, 60)
    with pytest.raises(ProtocolError, match=r"--user-max-size") as e:
        ledger.add_region(1000, 41)                      # 60 + 41 > 100
    assert e.value.errno == errno.EDQUOT
    ledger.add_region(1000, 40)                          # exactly the limit
    with pytest.raises(ProtocolError, match=r"--user-max-regions"):
        ledger.add_region(1000, 0)
    ledger.add_region(2000, 100)                         # another uid has its own allowance
    for _ in range(5):
        ledger.add_region(0, 1000)                       # the daemon's uid is not limited
    ledger.open_connection(1000)
    ledger.open_connection(1000)
    with pytest.raises(ProtocolError, match=r"--user-max-connections"):
        ledger.open_connection(1000)
    ledger.close_connection(1000)
    ledger.open_connection(1000)                         # a closed connection gives its place back
    ledger.remove_region(1000, 60)
    ledger.add_region(1000, 60)
    for uid, pages in ((1000, 60), (1000, 40), (2000, 100)):
        ledger.remove_region(uid, pages)
    ledger.close_connection(1000)
    ledger.close_connection(1000)
    assert set(ledger.usage) == {0}                      # idle uids are forgotten


def test_backoff_doubles_to_its_maximum_and_resets():
    from uswap.backoff import Backoff
    b = Backoff(0.01, 0.05)
    assert [b.next() for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    b.reset()
    assert b.next() == 0.01
