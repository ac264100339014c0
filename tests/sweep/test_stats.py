"""The replicate statistics of `updetr compare` against scipy and hand arithmetic on fixed numbers."""
import math

import pytest
from scipy import stats as sps

from updetr.stats import difference, summarize

A = [0.212, 0.187, 0.241, 0.199]          # e.g. AP50 of one cell over 4 seeds
B = [0.101, 0.143, 0.122]                 # the baseline over 3 seeds


def test_summary_is_mean_sample_sd_and_the_t_interval_of_the_mean():
    st = summarize(A)
    assert st.n == 4 and st.mean == pytest.approx(0.20975)
    assert st.sd == pytest.approx(0.0232002155, rel=1e-8)                     # n - 1 in the denominator
    # t(0.975, 3) = 3.182446: mean ± t * sd / sqrt(n)
    half = 3.182446305 * st.sd / 2
    assert st.ci == pytest.approx((0.20975 - half, 0.20975 + half), rel=1e-7)
    lo, hi = sps.t.interval(0.95, 3, loc=st.mean, scale=sps.sem(A))
    assert st.ci == pytest.approx((lo, hi), rel=1e-9)


def test_difference_is_welchs_interval():
    d = difference(A, B)
    assert d.delta == pytest.approx(0.20975 - 0.122)
    ref = sps.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)
    assert d.ci == pytest.approx((ref.low, ref.high), rel=1e-9)
    # by hand: Welch-Satterthwaite df and the unpooled standard error
    va, vb = sps.tvar(A) / 4, sps.tvar(B) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.ci == pytest.approx((d.delta - half, d.delta + half), rel=1e-9)
    assert d.excludes_zero


def test_an_overlapping_difference_does_not_exclude_zero():
    d = difference([0.10, 0.30, 0.20], [0.15, 0.25, 0.05])
    assert d.ci[0] < 0 < d.ci[1] and not d.excludes_zero
    assert difference([0.10, 0.11], [0.30, 0.31]).ci[1] < 0                       # a negative effect excludes 0 too
    assert difference([0.10, 0.11], [0.30, 0.31]).excludes_zero


def test_one_run_has_no_spread_and_no_interval():
    st = summarize([0.3])
    assert (st.n, st.mean, st.sd, st.ci) == (1, 0.3, None, None)
    d = difference([0.3], B)
    assert d.delta == pytest.approx(0.3 - 0.122) and d.ci is None and not d.excludes_zero
    assert difference([0.2, 0.2], [0.1, 0.1]).ci is None                     # no spread at all: undefined
    with pytest.raises(ValueError):
        summarize([])
