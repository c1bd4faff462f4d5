"""The budget allocator: never over budget, monotone in the budget, within the greedy's bound of optimal."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantizers.allocate import Allocation, Option, allocate, lower_hull

# a tensor's options: 1-4 (bytes, kld) pairs; types are just labels here
options = st.lists(st.tuples(st.integers(1, 60), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=4)
instances = st.lists(options, min_size=1, max_size=5).map(
    lambda ts: {f"t{i}": [Option(f"x{j}", b, k) for j, (b, k) in enumerate(t)] for i, t in enumerate(ts)})


def brute_force(cands: dict[str, list[Option]], budget: int) -> float | None:
    """The least total KLD of any choice within ``budget`` (None when nothing fits)."""
    best = None
    for combo in itertools.product(*cands.values()):
        if sum(o.bytes for o in combo) <= budget:
            k = sum(o.kld for o in combo)
            best = k if best is None else min(best, k)
    return best


def max_upgrade_saving(cands: dict[str, list[Option]]) -> float:
    """The most KLD any single hull step saves (the greedy's known gap to the optimum is at most one)."""
    return max([h[i].kld - h[i + 1].kld for h in map(lower_hull, cands.values()) for i in range(len(h) - 1)],
               default=0.0)


def cheapest(cands) -> int:
    return sum(min(o.bytes for o in opts) for opts in cands.values())


def dearest(cands) -> int:
    return sum(max(o.bytes for o in opts) for opts in cands.values())


def budget_in(cands, frac: float) -> int:
    """A budget ``frac`` of the way from the cheapest choice to the dearest (beyond it when > 1)."""
    return int(cheapest(cands) + frac * (dearest(cands) - cheapest(cands)))


fractions = st.floats(-0.1, 1.1, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(instances, fractions)
def test_within_budget_and_within_the_greedy_bound_of_optimal(cands, frac):
    budget = budget_in(cands, frac)
    opt = brute_force(cands, budget)
    if budget < cheapest(cands):
        with pytest.raises(ValueError):
            allocate(cands, budget)
        return
    a = allocate(cands, budget)
    assert a.bytes == sum(o.bytes for o in a.choice.values()) <= budget
    assert a.kld == pytest.approx(sum(o.kld for o in a.choice.values()))
    assert set(a.choice) == set(cands) and all(a.choice[n] in cands[n] for n in cands)
    assert opt is not None
    eps = 1e-9 * (1 + abs(opt))
    assert a.lower_bound <= opt + eps <= a.kld + 2 * eps           # LP bound <= optimum <= greedy
    assert a.kld - a.lower_bound <= max_upgrade_saving(cands) + eps  # ... within one upgrade


@settings(max_examples=400, deadline=None)
@given(instances, fractions, st.integers(0, 100))
def test_more_budget_never_predicts_more_kld(cands, frac, extra):
    budget = budget_in(cands, frac)
    if budget < cheapest(cands):
        return
    small, big = allocate(cands, budget), allocate(cands, budget + extra)
    assert big.kld <= small.kld + 1e-9 * (1 + small.kld)


def test_hull_drops_dominated_and_non_convex_options():
    opts = [Option("a", 10, 5.0), Option("b", 20, 1.0), Option("c", 30, 0.9), Option("d", 25, 2.0),
            Option("e", 40, 0.0), Option("f", 15, 4.0)]
    # d costs more than b and is worse (dominated); f and c lie above the hull's segments
    assert [o.type for o in lower_hull(opts)] == ["a", "b", "e"]


def test_greedy_skips_an_upgrade_that_does_not_fit_and_fills_with_others():
    cands = {"big": [Option("lo", 10, 10.0), Option("hi", 60, 0.0)],     # saves 0.2 / byte
             "small": [Option("lo", 10, 2.0), Option("hi", 20, 1.0)]}   # saves 0.1 / byte
    a = allocate(cands, 45)
    assert a.types == {"big": "lo", "small": "hi"} and a.bytes == 30 and a.kld == 11.0
    # the LP bound: 25 of big's 50-byte upgrade fit -> 12 - 10 * 25 / 50
    assert a.lower_bound == pytest.approx(7.0)
    assert allocate(cands, 70).types == {"big": "hi", "small": "lo"}
    assert allocate(cands, 80) == Allocation(
        {"big": Option("hi", 60, 0.0), "small": Option("hi", 20, 1.0)}, 80, 1.0, 1.0)


def test_ties_are_broken_by_name_so_the_result_is_deterministic():
    cands = {n: [Option("lo", 1, 1.0), Option("hi", 2, 0.0)] for n in ("b", "a", "c")}
    assert allocate(cands, 4).types == {"a": "hi", "b": "lo", "c": "lo"}


def test_the_greedy_is_sometimes_suboptimal_and_the_bound_says_by_how_much():
    """Random instances: the LP bound is below the optimum and the greedy above it, and the instances are
    hard enough that the greedy misses the optimum on some (so the bound is not trivially the result)."""
    import random
    rng = random.Random(0)
    missed = 0
    for _ in range(300):
        cands = {f"t{i}": [Option(j, rng.randint(1, 40), rng.uniform(0, 5)) for j in range(rng.randint(1, 4))]
                 for i in range(rng.randint(2, 5))}
        budget = budget_in(cands, rng.uniform(0, 1))
        a, opt = allocate(cands, budget), brute_force(cands, budget)
        assert a.lower_bound - 1e-9 <= opt <= a.kld + 1e-9
        missed += a.kld > opt + 1e-9
    assert missed > 10
