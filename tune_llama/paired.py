"""Is one model really better than another on the same problems? The paired difference in accuracy.

Two models scored on the same problems differ only on the problems one solves and the other does not (the
discordant ones); the problems both solve or both miss say nothing about which is better. The test is the
exact McNemar test, and the interval its exact inversion: given the ``m`` discordant problems, the number the
first model alone solves is Binomial(m, p), p's 95% Clopper-Pearson interval maps to the difference in accuracy
as ``m (2p - 1) / n``, and the interval excludes 0 exactly when the test's p-value is below 0.05. (Being
conditional on ``m``, it never reaches beyond the share of discordant problems ``m / n``.)

Why exact McNemar rather than a paired bootstrap: at the sizes this tool is run at (tens of problems, a
handful of discordant ones) the bootstrap's percentile interval is too narrow (4 problems against 0 out of 32
excludes 0 there, while the exact test gives p = 0.125), it needs a random seed to be reproducible, and it
has nothing to resample when the models agree everywhere. The exact interval is conservative and has none of
these problems. Standard library only: the GPU image and the finalists' Ray tasks import it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

ALPHA = 0.05
METHOD = "exact McNemar test; 95% interval from Clopper-Pearson on the discordant problems"


def binomial_tail(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p)."""
    return sum(math.comb(m, i) * p ** i * (1 - p) ** (m - i) for i in range(k, m + 1))


def clopper_pearson(k: int, m: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion after k successes in m trials."""
    def solve(tail_above) -> float:  # bisection: the tails are monotone in p
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (low, mid) if tail_above(mid) else (mid, high)
        return (low + high) / 2
    lower = 0.0 if k == 0 else solve(lambda p: binomial_tail(k, m, p) >= alpha / 2)
    upper = 1.0 if k == m else solve(lambda p: 1 - binomial_tail(k + 1, m, p) <= alpha / 2)
    return lower, upper


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail at p = 1/2, at most 1."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail(max(a_only, b_only), m, 0.5))


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Accuracy of ``a`` minus that of ``b``, scored on the same problems in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same problems: {len(a)} against {len(b)} results")
    n = len(a)
    a_only = sum(bool(x) and not y for x, y in zip(a, b))
    b_only = sum(bool(y) and not x for x, y in zip(a, b))
    m = a_only + b_only
    if m == 0:
        low = high = 0.0
    else:
        p_low, p_high = clopper_pearson(a_only, m)
        low, high = m * (2 * p_low - 1) / n, m * (2 * p_high - 1) / n
    p_value = mcnemar_p(a_only, b_only)
    verdict = "not distinguishable" if p_value >= ALPHA else ("better" if a_only > b_only else "worse")
    return {"n": n, "a_correct": sum(map(bool, a)), "b_correct": sum(map(bool, b)), "a_only": a_only,
            "b_only": b_only, "difference": (a_only - b_only) / n if n else 0.0, "ci95": [low, high],
            "p_value": p_value, "verdict": verdict, "method": METHOD}


def over_seeds(pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]]) -> dict[str, Any]:
    """One paired comparison per seed (``a``'s and ``b``'s runs with the same seed): mean and spread of the
    difference, and how many seeds tell them apart."""
    each = [paired_difference(a, b) for a, b in pairs]
    differences = [c["difference"] for c in each]
    return {"seeds": len(each), "difference_mean": statistics.fmean(differences) if each else 0.0,
            "difference_spread": statistics.pstdev(differences) if len(each) > 1 else 0.0,
            "better_in": sum(c["verdict"] == "better" for c in each),
            "worse_in": sum(c["verdict"] == "worse" for c in each)}


def sentence(comparison: dict[str, Any], a: str = "the winner", b: str = "the runner-up") -> str:
    """One plain line: the difference, its interval, and what it means at this size."""
    c = comparison
    meaning = {"better": f"{a} is better", "worse": f"{a} is worse",
               "not distinguishable": f"{a} and {b} are not distinguishable at this size"}[c["verdict"]]
    return (f"{a} − {b}, strict accuracy: {c['difference']:+.1%} [95% CI {c['ci95'][0]:+.1%}, "
            f"{c['ci95'][1]:+.1%}] on {c['n']} problems ({c['a_only']} solved only by {a}, {c['b_only']} only by "
            f"{b}; exact McNemar p = {c['p_value']:.2g}): {meaning}")
