"""Choosing one type per tensor under a byte budget: a multiple-choice knapsack, solved greedily.

Each tensor offers a few options (a GGUF type, the bytes it takes, the KL divergence it is predicted to
add); exactly one is chosen per tensor, the total bytes must fit the budget and the total predicted KLD
should be as small as possible. Predicted KLDs of different tensors add up (second order: the
cross terms of independent rounding errors average out), so this is the multiple-choice knapsack problem.

The classic greedy (Sinha & Zoltners): every tensor starts at its cheapest option; the options on each
tensor's lower convex hull in (bytes, KLD) form a chain of upgrades with decreasing KLD saved per byte;
upgrades are taken in order of KLD saved per extra byte, across all tensors. When an upgrade does not
fit, its tensor stays where it is and the search goes on with the others' (smaller) upgrades.

Guarantees (tested on brute-forced instances): never over budget; a larger budget never gives a higher
predicted KLD; and the result is within one upgrade of optimal. The upgrades taken before the first one
that does not fit, plus that one's fraction that would fit, is the optimum of the LP relaxation, a lower
bound on every allocation's KLD (:attr:`Allocation.lower_bound`); the greedy is at most the KLD saved by
that one upgrade above it.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: its type, its size in bytes and the KLD it is predicted to add."""
    type: Hashable
    bytes: int
    kld: float


@dataclass(frozen=True)
class Allocation:
    """The chosen option per tensor, their total bytes and predicted KLD, and a lower bound on the
    predicted KLD of any allocation within the same budget (the LP relaxation's optimum)."""
    choice: dict[str, Option]
    bytes: int
    kld: float
    lower_bound: float

    @property
    def types(self) -> dict[str, Hashable]:
        return {name: o.type for name, o in self.choice.items()}


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options a greedy can reach, cheapest first: those on the lower convex hull in (bytes, KLD)
    with strictly decreasing KLD and strictly decreasing KLD saved per extra byte.

    Options that cost more for no less KLD are dominated; an option above the segment between two
    others is never worth taking whole (the LP would mix its neighbours), and dropping collinear middle
    points keeps the chain strictly convex, which the greedy's order relies on.
    """
    if not options:
        raise ValueError("a tensor needs at least one option")
    pts = sorted(options, key=lambda o: (o.bytes, o.kld))
    hull: list[Option] = []
    for p in pts:
        if hull and p.kld >= hull[-1].kld:
            continue  # dominated: not cheaper and not better
        # pop the last point while it lies on or above the segment from the one before it to p
        while len(hull) >= 2 and ((hull[-1].kld - hull[-2].kld) * (p.bytes - hull[-1].bytes)
                                  >= (p.kld - hull[-1].kld) * (hull[-1].bytes - hull[-2].bytes)):
            hull.pop()
        hull.append(p)
    return hull


def allocate(candidates: Mapping[str, Sequence[Option]], budget: int) -> Allocation:
    """One option per tensor with total bytes <= ``budget`` and (near-)least total predicted KLD.

    Deterministic: ties in KLD saved per byte go to the tensor whose name sorts first. Raises
    ``ValueError`` when even the cheapest option of every tensor does not fit.
    """
    hulls = {name: lower_hull(opts) for name, opts in sorted(candidates.items())}
    level = {name: 0 for name in hulls}
    used = sum(h[0].bytes for h in hulls.values())
    if used > budget:
        raise ValueError(f"the cheapest options take {used} bytes, over the budget of {budget}")
    kld = sum(h[0].kld for h in hulls.values())

    def upgrade(name: str) -> tuple[float, str, int, int, float] | None:
        h, k = hulls[name], level[name]
        if k + 1 >= len(h):
            return None
        cost, saved = h[k + 1].bytes - h[k].bytes, h[k].kld - h[k + 1].kld
        return (-saved / cost, name, k, cost, saved)

    heap = [u for u in map(upgrade, hulls) if u is not None]
    heapq.heapify(heap)
    lower_bound: float | None = None  # set at the first upgrade that does not fit
    prefix_kld = kld                  # KLD after the upgrades taken before that one
    while heap:
        _, name, k, cost, saved = heapq.heappop(heap)
        if used + cost > budget:
            if lower_bound is None:
                lower_bound = prefix_kld - saved * (budget - used) / cost
            continue  # this tensor stays at level k; smaller upgrades of others may still fit
        used, kld, level[name] = used + cost, kld - saved, k + 1
        if lower_bound is None:
            prefix_kld = kld
        nxt = upgrade(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    choice = {name: hulls[name][level[name]] for name in hulls}
    kld = sum(o.kld for o in choice.values())  # summed afresh: no rounding drift from the updates
    return Allocation(choice, used, kld, kld if lower_bound is None else min(lower_bound, kld))
