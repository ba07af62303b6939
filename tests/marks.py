"""Which parametrizations run in the default suite and which in CI's slow step.

A test that loops over the whole method registry runs, by default, on one representative of
each family (a loss method, IMTL at both levels, a stateful loss weighting, a stochastic
method, an iterative solver); the other methods run the same test in the slow step
(``pytest -m "slow or stress"``, CI's second step), so nothing loses coverage and the default
suite answers in minutes.
"""

from __future__ import annotations

import pytest

# equal: loss-level, stateless; imtl_h: IMTL-L + IMTL-G at z; imtl_g_exact: the parameter level;
# famo: a stateful loss weighting; pcgrad: stochastic (key); mgda: an iterative certified solver.
CORE_METHODS = ("equal", "imtl_h", "imtl_g_exact", "famo", "pcgrad", "mgda")


def slow_unless_core(names, *, core=CORE_METHODS):
    """``names`` as parametrize values: the core methods plain, the others marked slow."""
    return [n if n in core else pytest.param(n, marks=pytest.mark.slow) for n in names]


def slow(*values):
    """One parametrize value marked slow (``slow(jnp.bfloat16)``)."""
    return pytest.param(*values, marks=pytest.mark.slow)
