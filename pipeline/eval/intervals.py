"""Confidence intervals for results over seeds: the mean of n values and the half-width of its 95 % interval
by Student's t with n - 1 degrees of freedom, the t quantile computed here (no scipy).

    Stat.of([0.60, 0.61, 0.59])        # mean 0.60, half-width t_{0.975, 2} * sd / sqrt(3)
    student_t_quantile(0.975, 2)       # 4.303
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95  # of every interval in the ablation's table and chart


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (12.706 for p=0.975 and
    df=1, 1.960 as df grows), to about 1e-12 relative: bisection on the upper tail.

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` not a finite number > 0.
    """
    if not (0.0 < p < 1.0 and 0.0 < df < math.inf):
        raise ValueError(f"a t quantile needs 0 < p < 1 and finite df > 0, got p={p}, df={df}")
    if p < 0.5:  # the distribution is symmetric about 0
        return -student_t_quantile(1.0 - p, df)
    if p == 0.5:  # the median, where the bisection's relative stop cannot be met
        return 0.0
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):  # each step halves the bracket [high / 2, high]: 1e-12 relative within about 40
        if high - low <= 1e-12 * high:
            break
        middle = (low + high) / 2.0
        low, high = (middle, high) if _t_upper_tail(middle, df) > tail else (low, middle)
    return (low + high) / 2.0


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0: half the regularized incomplete beta I_x(df/2, 1/2) at x = df / (df + t^2),
    computed directly rather than as 1 - CDF, which would cancel far in the tail."""
    return 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0, by its continued fraction (Numerical Recipes' betai)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    # The fraction converges quickly only below about Beta(a, b)'s mean; above, I_x(a, b) = 1 - I_1-x(b, a).
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_fraction(x, a, b) / a


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method (to 1e-15 relative)."""
    tiny = 1e-300  # stands in for a zero denominator, as Lentz's method prescribes

    def step(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / step(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 10_000):  # about sqrt(max(a, b)) terms are needed
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 / step(1.0 + numerator * d)
            c = step(1.0 + numerator / c)
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


@dataclass(frozen=True)
class Stat:
    """The mean of n values and the half-width of its 95 % confidence interval by Student's t with n - 1
    degrees of freedom, ``t_{0.975, n-1} * sd / sqrt(n)``; None for one value, which has no interval."""

    mean: float
    half_width: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistic of ``values`` with NaN left out; None when none is left."""
        values = [v for v in values if v is not None and not math.isnan(v)]
        if len(values) < 2:
            return cls(values[0], None, 1) if values else None
        n = len(values)
        t = student_t_quantile(0.5 + CONFIDENCE / 2.0, n - 1)
        return cls(statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(n), n)

    @property
    def interval(self) -> tuple[float, float] | None:
        """``(mean - half_width, mean + half_width)``; None without a half-width."""
        if self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width
