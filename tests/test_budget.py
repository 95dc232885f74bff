"""The daemon's budget shared by memfd regions and runs (uswap.daemon.budget): the policy, with fake clients."""

from __future__ import annotations

import random

from uswap.daemon.budget import MIN_LINE, DaemonBudget, Demand, Share, hard_line, share_out, waterfill

B = 16384                      # a 64 MiB budget
H = hard_line(B)


def regions(resident, **kw) -> Demand:
    return Demand(resident, B, MIN_LINE, lambda line: max(128, line // 8), **kw)


def run(resident, limit=B, **kw) -> Demand:
    return Demand(resident, limit, MIN_LINE, lambda line: line // 32 + 256, **kw)


def test_hard_line_is_the_budget_and_a_32nd():
    assert H == B + B // 32 == 16896
    assert hard_line(1024) == 1024 + 64          # small budgets: MIN_SLACK pages


def test_waterfill_is_max_min_fair_and_never_above_a_cap():
    assert waterfill(100, [10, 100, 100]) == [10, 45, 45]
    assert waterfill(100, [10, 20]) == [10, 20]
    assert waterfill(100, [-5, 200]) == [0, 100]
    assert waterfill(-3, [10]) == [0]


def test_a_client_alone_gets_its_limit_and_the_daemons_hard_line_at_most():
    [s] = share_out(B, [regions(0)])
    assert s == Share(B, B, H)                   # the regions' own slack (B/8) is cut to the daemon's B/32
    [s] = share_out(B, [run(0, limit=2048)])
    assert (s.fair, s.line, s.hard) == (2048, 2048, 2048 + 64 + 256)   # under B: the run's own slack


def test_each_uses_what_the_others_leave_and_keeps_its_fair_share():
    reg, r = share_out(B, [regions(1000), run(3000)])
    assert (reg.fair, r.fair) == (B // 2, B // 2)
    assert reg.line == B - 3000 and r.line == B - 1000          # work-conserving: room is used
    reg, r = share_out(B, [regions(4000), run(14000)])           # over B: the run holds more than its share
    assert r.line == B - 4000 < 14000                            # the run reclaims
    assert reg.line == B // 2 > 4000                             # the regions, under their share, do not
    assert reg.hard == 4000 + (H - 18000 if H > 18000 else 0)    # and may not grow past the total either


def test_pressure_goes_to_the_client_over_its_fair_share_whichever_kind():
    for mine, other in ((regions, run), (run, regions)):
        hog, small = share_out(B, [mine(12000), other(6000)])
        assert hog.line < 12000 and small.line >= 6000, (mine.__name__, hog, small)
        assert hog.line == B - 6000 and small.line == B // 2


def test_a_runs_own_limit_bounds_its_line_and_its_fair_share():
    reg, r = share_out(B, [regions(0), run(0, limit=2048)])
    assert r.fair == 2048 and reg.fair == B - 2048
    assert r.line == 2048 and reg.line == B


def test_floors_hold_however_full():
    shares = share_out(B, [regions(B)] + [run(0) for _ in range(3)])
    assert all(s.line >= MIN_LINE for s in shares)


def test_a_stuck_clients_excess_is_not_held_against_the_others():
    reg, r = share_out(B, [regions(2000), run(B, stuck=True)])
    assert r.line == B - 2000 and r.hard == r.line + r.line // 32 + 256   # not throttled by room
    assert reg.hard == 2000 + H - B                                       # the regions may grow
    resident = 2000
    for _ in range(100):                                                  # to their fair share, by updates
        reg, r = share_out(B, [regions(resident), run(B, stuck=True)])
        resident = max(resident, min(reg.hard, reg.line))
    assert resident == reg.line == B // 2
    reg, r = share_out(B, [regions(2000), run(B)])                        # not stuck: the regions wait for it
    assert reg.hard == 2000 and r.line == B - 2000


def test_invariant_no_client_grows_past_the_daemons_hard_line():
    """sum(max(resident, hard)) <= max(H, sum(resident)) for any demands; and over the budget some client is
    over its line (reclaim has something to do), always one over its fair share."""
    rnd = random.Random(7)
    for _ in range(3000):
        n = rnd.randint(1, 6)
        demands = [(regions if i == 0 and rnd.random() < 0.7 else run)(
            rnd.randint(0, 2 * B // n + 500), **({} if i == 0 else {"limit": rnd.randint(1, B)}))
            for i in range(n)]
        shares = share_out(B, demands)
        total = sum(d.resident for d in demands)
        assert sum(max(d.resident, s.hard) for d, s in zip(demands, shares)) <= max(H, total), (demands, shares)
        for d, s in zip(demands, shares):
            assert MIN_LINE <= s.line or s.line == d.limit
            assert s.line <= max(min(d.limit, B), MIN_LINE)
            assert s.hard <= s.line + d.slack_of(s.line)
        if total > B + len(demands) * MIN_LINE:
            over = [(d, s) for d, s in zip(demands, shares) if d.resident > s.line]
            assert over and all(d.resident > s.fair for d, s in over), (demands, shares)


def test_shares_converge_to_fair_shares_with_the_total_under_the_hard_line():
    """A simulation: two clients that always want more, each reclaiming to 7/8 of its line when over it and
    filling up to its hard line between updates.  The total never passes H; they end at their fair shares."""
    resident = [0, 0]
    for step in range(400):
        demands = [regions(resident[0]), run(resident[1])]
        shares = share_out(B, demands)
        grow = 0 if step % 2 else 1                       # they take turns, each as far as it may
        for i in (grow, 1 - grow):
            if resident[i] > shares[i].line:
                resident[i] = shares[i].line * 7 // 8
            else:
                resident[i] = max(resident[i], shares[i].hard)
            assert sum(resident) <= H
            shares = share_out(B, [regions(resident[0]), run(resident[1])])
    assert abs(resident[0] - B // 2) <= B // 8 and abs(resident[1] - B // 2) <= B // 8, resident


class FakeClient:
    """A client of the daemon's budget that records what it was told."""

    def __init__(self, kind, demand, log):
        self.kind, self.demand, self.log = kind, demand, log
        self.share = None

    def budget_demand(self):
        return self.demand

    def set_share(self, share):
        self.share = share
        self.log.append((self.kind, share.hard))


def test_update_hands_every_client_its_share_lowered_hard_lines_first_and_sums_kinds():
    log = []
    reg = FakeClient("regions", regions(4000, hard=H), log)
    runs = [FakeClient("runs", run(9000, hard=9000), log), FakeClient("runs", run(100, hard=0), log)]
    budget = DaemonBudget(B, lambda: [reg, *runs])
    budget.update()
    assert [kind for kind, _ in log] == ["regions", "runs", "runs"]   # the regions' hard line fell the most
    assert reg.share.hard < H and all(c.share is not None for c in runs)
    st = budget.status()
    assert st["total_resident_pages"] == 13100 and st["hard_pages"] == H
    assert st["shares"]["runs"]["clients"] == 2 and st["shares"]["runs"]["resident_pages"] == 9100
    assert st["shares"]["regions"]["line_pages"] == reg.share.line
    assert st["shares"]["regions"]["fair_pages"] + st["shares"]["runs"]["fair_pages"] == B


# -- the compressed pool (uswap.daemon.pool): paid for out of the budget, off the top ---------------------------

def test_the_pools_pages_come_off_the_top():
    pool = 3000
    [s] = share_out(B, [regions(0)], pool)
    assert s == Share(B - pool, B - pool, H - pool)
    reg, r = share_out(B, [regions(4000), run(9000)], pool)
    assert reg.fair + r.fair == B - pool
    assert reg.line == reg.fair == (B - pool) // 2      # its fair share of what the pool leaves
    assert r.line == B - pool - 4000                    # over its fair share: what the pool and the regions leave
    assert max(4000, reg.hard) + max(9000, r.hard) + pool <= H


def test_invariant_with_the_pool_nothing_grows_past_the_daemons_hard_line():
    """sum(max(resident, hard)) + pool <= max(H, sum(resident) + pool), the pool holding up to half the budget."""
    rnd = random.Random(11)
    for _ in range(3000):
        n = rnd.randint(1, 6)
        pool = rnd.randint(0, B // 2)
        demands = [(regions if i == 0 and rnd.random() < 0.7 else run)(
            rnd.randint(0, 2 * B // n + 500), **({} if i == 0 else {"limit": rnd.randint(1, B)}))
            for i in range(n)]
        shares = share_out(B, demands, pool)
        total = sum(d.resident for d in demands)
        assert sum(max(d.resident, s.hard) for d, s in zip(demands, shares)) + pool <= max(H, total + pool), \
            (pool, demands, shares)
        assert sum(s.fair for s in shares) <= max(B - pool, n * MIN_LINE)


def test_update_reads_the_pools_charge_every_time_and_shows_it():
    charge = [0]
    reg = FakeClient("regions", regions(8000, hard=H), [])
    budget = DaemonBudget(B, lambda: [reg], pool_pages=lambda: charge[0])
    budget.update()
    assert (reg.share.line, reg.share.hard) == (B, H) and budget.status()["pool_pages"] == 0
    charge[0] = 2048                          # pages evicted into the pool: the regions' line falls by as much
    budget.update()
    assert (reg.share.line, reg.share.hard) == (B - 2048, H - 2048)
    assert budget.status()["pool_pages"] == 2048
