"""Replicate statistics for `updetr compare` and `updetr demo`: the arithmetic only (no MLflow, no printing).

Each cell of a study runs over several seeds. A cell's value is summarised by its mean, sample standard
deviation (n - 1) and the 95 % confidence interval of the mean from Student's t with n - 1 degrees of freedom.
A cell is compared with the baseline cell by the difference of the means and its 95 % Welch interval (unequal
variances, Welch-Satterthwaite degrees of freedom): `scipy.stats.ttest_ind(a, b, equal_var=False)
.confidence_interval(0.95)`. A difference whose interval excludes 0 is the one a reader may call an effect.
A cell with one run has no spread and no interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

LEVEL = 0.95
METHOD = ("mean ± sd over n seeds; [95 % CI of the mean, Student t, n-1 df]; difference to the baseline: "
          "mean difference [95 % Welch t-interval, unequal variances]")


@dataclass(frozen=True)
class Summary:
    """One cell's values over its seeds."""

    n: int
    mean: float
    sd: Optional[float]                      # None when n < 2
    ci: Optional[tuple[float, float]]        # 95 % CI of the mean; None when n < 2


@dataclass(frozen=True)
class Difference:
    """A cell's mean minus the baseline's mean, with its Welch interval (None when a side has n < 2 or no
    spread at all)."""

    delta: float
    ci: Optional[tuple[float, float]]

    @property
    def excludes_zero(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean, sd and the t interval of the mean of `values` (at least one)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize: no values")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(n, mean, None, None)
    from scipy import stats

    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, (mean - half, mean + half))


def difference(values: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(values) - mean(baseline) and its Welch t-interval."""
    a, b = [float(v) for v in values], [float(v) for v in baseline]
    if not a or not b:
        raise ValueError("difference: a side has no values")
    delta = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(delta, None)
    if all(x == a[0] for x in a) and all(x == b[0] for x in b):
        return Difference(delta, None)      # no spread on either side: the t statistic is undefined
    from scipy import stats

    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return Difference(delta, (float(ci.low), float(ci.high)))
