"""experiments.stats against closed forms and scipy's own t-test machinery."""

import math

import numpy as np
import pytest
from scipy import stats as st

from experiments import stats


def test_mean_ci_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        x = rng.normal(3.0, 2.0, n)
        m, h, k = stats.mean_ci(x)
        lo, hi = st.t.interval(0.95, n - 1, loc=x.mean(), scale=st.sem(x))
        assert k == n
        assert m == pytest.approx(x.mean(), rel=1e-12)
        assert h == pytest.approx((hi - lo) / 2, rel=1e-10)


def test_mean_ci_known_value_and_edges():
    # n=3, values 1,2,3: s = 1, t_{0.975,2} = 4.302652730, half = 4.3026527/sqrt(3)
    m, h, n = stats.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302652730 / math.sqrt(3), rel=1e-9)
    m, h, n = stats.mean_ci([5.0])
    assert m == 5.0 and math.isnan(h) and n == 1
    m, h, n = stats.mean_ci([])
    assert math.isnan(m) and n == 0
    assert stats.mean_ci([1.0, float("nan"), 3.0])[2] == 2  # non-finite values are not seeds


def test_paired_diff_uses_common_seeds_only():
    a = {0: 1.0, 1: 2.0, 2: 4.0}
    b = {0: 0.5, 2: 3.0, 5: 100.0}
    m, h, n = stats.paired_diff_ci(a, b)
    assert n == 2 and m == pytest.approx(0.75)
    # equals a one-sample t interval on the differences
    d = np.array([0.5, 1.0])
    lo, hi = st.t.interval(0.95, 1, loc=d.mean(), scale=st.sem(d))
    assert h == pytest.approx((hi - lo) / 2, rel=1e-10)
    with pytest.raises(ValueError, match="length"):
        stats.paired_diff_ci([1.0], [1.0, 2.0])
    with pytest.raises(TypeError, match="both"):
        stats.paired_diff_ci(a, [1.0])


def test_paired_interval_narrower_than_unpaired_when_seeds_correlate():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 1.0, 5)
    a = 10 + seed_effect + rng.normal(0, 0.05, 5)
    b = 9.9 + seed_effect + rng.normal(0, 0.05, 5)
    _, h_pair, _ = stats.paired_diff_ci(list(a), list(b))
    _, h_a, _ = stats.mean_ci(a)
    assert h_pair < h_a / 5


def test_accuracy_standard_error_closed_form():
    assert stats.accuracy_standard_error(0.9, 500) == pytest.approx(math.sqrt(0.09 / 500))
    assert stats.accuracy_standard_error(0.9, 20_000) * 100 == pytest.approx(0.2121, abs=1e-4)
    with pytest.raises(ValueError, match="fraction"):
        stats.accuracy_standard_error(90.0, 500)
    with pytest.raises(ValueError, match="n=0"):
        stats.accuracy_standard_error(0.5, 0)


def test_format_ci():
    assert stats.format_ci(1.234, 0.056) == "1.23 ± 0.06"
    assert stats.format_ci(1.234, float("nan")) == "1.23"
    assert stats.format_ci(1.0, 0.5, signed=True) == "+1.00 ± 0.50"
    assert stats.format_ci(float("nan"), 0.1) == "–"
