"""The page table of a run's process (csrc/daemon/uswap_pt.c, uswap.daemon.runengine.PageTable) against a dict:
the fault thread and the daemon trust it for which page has which slot, so every lookup, removal, claim
and walk must agree with the model, across growth and the deletions that shift entries back."""

import errno
import random

import pytest

from uswap.daemon.runengine import (BUSY, CLAIMED, INFLIGHT, SHARED, SWAPPED, PageTable, entry, slot_of,
                                    state_of)

PS = 4096


@pytest.fixture
def table():
    t = PageTable()
    yield t
    t.close()


def random_address(rnd):
    # clustered pages (linear-probing clusters, backward shifts) and far-apart ones (hash spread)
    return rnd.choice([rnd.randrange(1, 3000) * PS, rnd.randrange(1, 1 << 30) * PS])


def test_agrees_with_a_dict_across_growth_and_deletion(table):
    rnd = random.Random(12)
    model: dict[int, int] = {}
    for i in range(100_000):
        a = random_address(rnd) if rnd.random() < 0.5 or not model else rnd.choice(list(model)[:64])
        if rnd.random() < 0.55:
            e = entry(rnd.choice([SWAPPED, CLAIMED, INFLIGHT, SHARED]), rnd.randrange(1 << 20))
            assert table.set(a, e) == model.get(a, 0)
            model[a] = e
        else:
            assert table.set(a, 0) == model.pop(a, 0)
        if i % 10_000 == 0:
            for s in (SWAPPED, CLAIMED, INFLIGHT, SHARED):
                assert table.count(s) == sum(1 for e in model.values() if state_of(e) == s)
    for a, e in model.items():
        assert table.get(a) == e
    assert dict(table.walk()) == model


def test_walk_takes_a_range_and_leaves_the_rest(table):
    rnd = random.Random(5)
    model = {}
    for _ in range(20_000):
        a = random_address(rnd)
        model[a] = entry(rnd.choice([SWAPPED, INFLIGHT, SHARED]), rnd.randrange(1000))
        table.set(a, model[a])
    lo, hi = 500 * PS, 2500 * PS
    taken = dict(table.walk(lo, hi, states=(SWAPPED, INFLIGHT), take=True))
    assert taken == {a: e for a, e in model.items() if lo <= a < hi and state_of(e) in (SWAPPED, INFLIGHT)}
    assert taken, "the range held nothing: the test would prove nothing"
    for a in taken:
        del model[a]
    assert dict(table.walk()) == model
    for a in taken:
        assert table.get(a) == 0


def test_claim_is_for_swapped_pages_only_and_once(table):
    a = 77 * PS
    assert table.claim(a) == -errno.ENOENT
    table.set(a, entry(INFLIGHT, 3))
    assert table.claim(a) == -errno.ENOENT          # an eviction's page is not swapped in
    table.set(a, entry(SWAPPED, 9))
    e = table.claim(a)
    assert e == entry(SWAPPED, 9) | BUSY and slot_of(e) == 9
    assert table.claim(a) == -errno.EBUSY           # held: nobody else installs it
    assert not table.swap(a, entry(SWAPPED, 9), 0)  # compare-and-set sees the holder's bit
    assert table.swap(a, e, 0) and table.get(a) == 0


def test_a_corrupted_model_is_caught(table):
    """Negative control: the comparison above notices one wrong slot."""
    table.set(5 * PS, entry(SWAPPED, 1))
    model = {5 * PS: entry(SWAPPED, 2)}
    assert dict(table.walk()) != model
