"""The host-wide fair share of cbox.py's loop and the bounds on guest answers (issue 23).

Unit tests drive cbox.FairShare on a fake clock (a discrete-event simulation: no
sleeps, no timing); the tests further down run attacking VMs under the stand-in and
check correctness (the healthy VM's exec works, memory comes back), never speed.
"""
import heapq
import itertools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cbox  # noqa: E402


class Simulation:
    """A fake clock and timer queue for FairShare, and VMs asking it for work."""

    def __init__(self, rate):
        self.now = 0.0
        self.timers = []            # heap: (time, seq, fn)
        self.seq = itertools.count()
        self.share = cbox.FairShare(rate, clock=lambda: self.now, call_later=self.call_later)
        self.granted = {}           # key -> units granted

    def call_later(self, delay, fn):
        assert delay > 0
        heapq.heappush(self.timers, (self.now + delay, next(self.seq), fn))
        return fn

    def ask(self, key, cost, then=None):
        """One request of `key`; then() when it is granted."""
        def granted():
            self.granted[key] = self.granted.get(key, 0) + cost
            if then:
                self.call_later(1e-9, then)       # the waiter's task runs a moment later
            return True
        if self.share.spend(key, cost, granted):
            granted()

    def greedy(self, key, cost):
        """A VM that asks again as soon as it got its units."""
        self.ask(key, cost, lambda: self.greedy(key, cost))

    def steady(self, key, cost, per_s):
        """A VM asking `per_s` times a second, whatever it got."""
        self.ask(key, cost)
        self.call_later(1.0 / per_s, lambda: self.steady(key, cost, per_s))

    def run(self, seconds):
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            self.now, _, fn = heapq.heappop(self.timers)
            fn()
        self.now = end
        return self.granted


RATE = 1_000_000.0


def test_a_lone_vm_gets_the_whole_budget():
    sim = Simulation(RATE)
    sim.greedy("a", 20_000)
    got = sim.run(10.0)
    assert 0.97 * RATE * 10 <= got["a"] <= 1.03 * RATE * 10


def test_greedy_vms_get_equal_shares_whatever_their_request_sizes():
    sim = Simulation(RATE)
    sim.greedy("a", 20_000)
    sim.greedy("b", 20_000)
    sim.greedy("c", 3_000)                  # small requests, many more of them
    got = sim.run(10.0)
    for key in "abc":
        assert abs(got[key] - RATE * 10 / 3) < 0.05 * RATE * 10 / 3, got
    assert sum(got.values()) <= 1.03 * RATE * 10


def test_a_modest_vm_gets_all_it_asks_and_the_rest_goes_to_the_greedy_one():
    sim = Simulation(RATE)
    sim.greedy("bulk", 50_000)
    sim.steady("modest", 1_000, 100)        # 10 % of the budget, well under its half
    got = sim.run(10.0)
    assert got["modest"] >= 0.99 * 100 * 1_000 * 10
    assert got["bulk"] >= 0.85 * RATE * 10
    assert sum(got.values()) <= 1.03 * RATE * 10


def test_a_modest_vm_waits_little_behind_many_greedy_ones():
    sim = Simulation(RATE)
    for i in range(39):
        sim.greedy(f"g{i}", 40_000)
    sim.run(1.0)
    waits = []
    for _ in range(20):
        asked = sim.now
        sim.ask("modest", 500, then=lambda: waits.append(sim.now - asked))
        sim.run(0.5)
    assert len(waits) == 20
    # its turn comes at the next wakeup: within the largest single overdraft's payback
    assert max(waits) <= 2 * 40_000 / RATE + 1e-3


def test_an_idle_vm_banks_nothing():
    sim = Simulation(RATE)
    sim.greedy("a", 10_000)
    sim.run(5.0)
    sim.greedy("b", 10_000)             # b was idle for 5 s: it gets half from now on, not all
    before = dict(sim.granted)
    got = sim.run(4.0)
    a, b = got["a"] - before["a"], got["b"]
    assert abs(a - b) < 0.05 * (a + b), (a, b)


def test_a_waiter_that_left_is_not_charged():
    sim = Simulation(RATE)
    sim.greedy("a", 10_000)
    sim.run(0.1)                                                  # a waits now
    assert not sim.share.spend("gone", 10 ** 9, lambda: False)    # a huge request whose task was cancelled
    got = sim.run(2.0)
    assert got["a"] >= 0.97 * RATE * 2.1


def test_no_budget_when_the_rate_is_zero():
    share = cbox.FairShare(0, clock=lambda: 0.0, call_later=None)
    assert all(share.spend("a", 10 ** 12, None) for _ in range(10))
