"""Statistics for result tables: intervals over seeds, paired differences, test-set noise.

Every table of the experiment suite reports ``mean ± half-width`` of a two-sided Student-t
confidence interval over ``n`` seeds (n stated), and, per method, the *paired* per-seed
difference to a reference method (equal weighting): seeds share the data order and
initialization, so the paired interval is the honest one for "is A better than B".

* :func:`mean_ci` -- mean and half-width of the t interval (``nan`` half-width for n = 1).
* :func:`paired_diff_ci` -- the same for ``a_i - b_i`` over seeds present in both.
* :func:`accuracy_standard_error` -- √(p(1−p)/n): how much one test accuracy moves by the
  luck of the test draw (500 examples at 90 %: 1.34 points; 20,000: 0.21).
* :func:`format_ci` -- ``"90.12 ± 0.34"`` for tables.

Only numpy and scipy (for the t quantile) are used; scipy is a declared test and experiments
dependency, and a closed-form table is used when it is missing.

>>> m, h, n = mean_ci([1.0, 2.0, 3.0]); round(m, 6), round(h, 4), n
(2.0, 2.4841, 3)
>>> round(accuracy_standard_error(0.9, 500) * 100, 2)
1.34
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["t_quantile", "mean_ci", "paired_diff_ci", "paired_t_pvalue", "holm", "accuracy_standard_error", "format_ci"]

# Two-sided 95 % Student-t quantiles t_{0.975, df}, used when scipy is not importable.
_T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836,
         6: 2.446911851, 7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852}


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t quantile ``t_{(1+confidence)/2, df}``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy import stats as _st
    except ImportError:  # pragma: no cover - scipy is a declared dependency
        if confidence == 0.95 and df in _T975:
            return _T975[df]
        raise
    return float(_st.t.ppf(0.5 + confidence / 2.0, df))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """``(mean, half_width, n)`` of the Student-t interval over the finite values.

    The half-width is ``t_{(1+c)/2, n-1} · s / √n`` with ``s`` the sample (n − 1) standard
    deviation; for n = 1 it is ``nan`` (one seed gives no interval), for n = 0 everything is
    ``nan`` and n = 0.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, 1
    half = t_quantile(confidence, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, half, n


def paired_diff_ci(
    a: Mapping[int, float] | Sequence[float],
    b: Mapping[int, float] | Sequence[float],
    confidence: float = 0.95,
) -> tuple[float, float, int]:
    """Interval of the paired difference ``a − b`` over the seeds both have.

    ``a`` and ``b`` are either sequences aligned by seed, or ``{seed: value}`` mappings (then
    only common seeds count, so a missing run never pairs two different seeds).
    """
    return mean_ci(_paired_diffs(a, b, "paired_diff_ci"), confidence)


def _paired_diffs(a, b, caller: str) -> list[float]:
    """``a − b`` per seed: over the common seeds of two ``{seed: value}`` mappings (a missing run
    never pairs two different seeds), or position by position for two equal-length sequences."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise TypeError(f"{caller}: give both a and b as {{seed: value}} mappings, or both as sequences")
        return [float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))]
    if len(a) != len(b):
        raise ValueError(f"{caller}: sequences differ in length ({len(a)} vs {len(b)}); pass seed mappings")
    return [float(x) - float(y) for x, y in zip(a, b)]


def accuracy_standard_error(p: float, n: int) -> float:
    """Standard error √(p(1−p)/n) of an accuracy ``p`` (a fraction) measured on ``n`` examples."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {p}")
    if n < 1:
        raise ValueError(f"need at least one test example, got n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def format_ci(mean: float, half: float, digits: int = 2, signed: bool = False) -> str:
    """``"m ± h"`` with ``digits`` decimals (``"m"`` alone when the half-width is nan)."""
    if not math.isfinite(mean):
        return "–"
    sign = "+" if signed else ""
    head = f"{mean:{sign}.{digits}f}"
    return head if not math.isfinite(half) else f"{head} ± {half:.{digits}f}"


def paired_t_pvalue(
    a: Mapping[int, float],
    b: Mapping[int, float],
) -> tuple[float, int]:
    """Two-sided p-value of the paired t-test of ``a − b`` = 0 over the seeds both have, and n.

    NaN when fewer than two seeds pair up. When every difference is the same (no variance) the
    t statistic is infinite: p = 0 for a non-zero difference, 1 for an exact tie.
    """
    diffs = np.asarray(_paired_diffs(a, b, "paired_t_pvalue"), np.float64)
    diffs = diffs[np.isfinite(diffs)]
    n = int(diffs.size)
    if n < 2:
        return math.nan, n
    if float(np.std(diffs)) == 0.0:
        return (0.0 if float(diffs[0]) != 0.0 else 1.0), n
    from scipy import stats as _st
    return float(_st.ttest_1samp(diffs, 0.0).pvalue), n


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the finite p-values).

    Sort the m finite p-values ascending; the i-th (from 1) is adjusted to
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where the adjusted value is ≤ α is
    Holm's procedure at level α. NaN stays NaN and does not count in m.

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03, 0.005])]
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.nonzero(np.isfinite(p))[0]
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        out[i] = running
    return out.tolist()
