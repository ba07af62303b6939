"""A shared vocabulary of named properties of weightings, checked with chex.

Each method's test file declares the properties its method has::

    TestMgdaProperties = property_tests("mgda", MGDA, ("sums_to_one", "scale_invariant", ...))

which builds a ``chex.TestCase`` running every declared property with and without ``jax.jit``
(``chex.variants``) on the named input families of ``tests/inputs.py``. The properties:

* ``sums_to_one`` — ``sum(w) = 1`` (to ``10 T eps sum|w|``);
* ``scale_invariant`` — ``w(s G) = w(G)`` for ``s`` in 1e-20, 1e20 (Theorem 2 of the
  IMTL paper for IMTL-G; every baseline here is invariant to a uniform rescale too);
* ``permutation_equivariant`` — permuting the tasks permutes the weights;
* ``finite_on_degenerate`` — finite weights for a zero row, duplicate rows, opposite rows,
  T > D and all-zero gradients;
* ``nonconflicting`` — ``g_t . (w @ G) >= 0`` for every task (to the round-off of the products);
* ``compiles_once`` — two calls with new values trace once (``chex.assert_max_traces``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

import inputs

PROPERTIES = ("sums_to_one", "scale_invariant", "permutation_equivariant", "finite_on_degenerate",
              "nonconflicting", "compiles_once")

_EPS32 = float(np.finfo(np.float32).eps)


def _weights(weighting, g):
    return weighting.weigh(g, jnp.zeros(g.shape[:1], g.dtype), weighting.init(g.shape[0], g.dtype),
                           None, None).weights


def _draws():
    """Well-conditioned inputs from the named families (float32, norms over 1e+-1)."""
    out = []
    # Two draws: the without-jit variant compiles every while_loop per call (keep CI time low).
    for i, (family, t, d) in enumerate([("mixed", 4, 16), ("opposed_pairs", 3, 8)]):
        out.append(inputs.draw(family, 100 + i, t, d, 1).astype(np.float32))
    return out


def _degenerate():
    g = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0], [-1.0, 0.5, 2.0]], np.float32)
    return {"zero_row": g * np.array([[1.0], [0.0], [1.0]], np.float32),
            "duplicates": np.stack([g[0], g[0], g[1]]),
            "opposite": np.stack([g[0], -g[0], g[2]]),
            "more_tasks_than_dims": np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.3], [0.2, -1.0]],
                                             np.float32),
            "all_zero": np.zeros((3, 4), np.float32)}


def check_sums_to_one(fn):
    for g in _draws():
        w = np.asarray(fn(jnp.asarray(g)), np.float64)
        chex.assert_shape(w, (g.shape[0],))
        np.testing.assert_allclose(w.sum(), 1.0, atol=10 * len(w) * _EPS32 * max(np.abs(w).sum(), 1))


def _tol(g, rtol, cond2):
    """``rtol``, plus ``cond2 eps cond(G)^2`` for methods that work on the Gramian's spectrum
    (its float32 eigenvectors are only that accurate)."""
    return rtol + cond2 * _EPS32 * np.linalg.cond(g.astype(np.float64)) ** 2


def check_scale_invariant(fn, rtol, cond2=0.0):
    for g in _draws():
        rtol_g = _tol(g, rtol, cond2)
        w = np.asarray(fn(jnp.asarray(g)))
        for s in (1e-20, 1e20):
            ws = np.asarray(fn(jnp.asarray(g * np.float32(s))))
            np.testing.assert_allclose(ws, w, rtol=rtol_g, atol=rtol_g * np.abs(w).max())


def check_permutation_equivariant(fn, rtol, cond2=0.0):
    for i, g in enumerate(_draws()):
        rtol_g = _tol(g, rtol, cond2)
        perm = np.random.default_rng(i).permutation(g.shape[0])
        w = np.asarray(fn(jnp.asarray(g)))
        wp = np.asarray(fn(jnp.asarray(g[perm])))
        np.testing.assert_allclose(wp, w[perm], rtol=rtol_g, atol=rtol_g * np.abs(w).max())


def check_finite_on_degenerate(fn):
    for _name, g in _degenerate().items():
        w = fn(jnp.asarray(g))
        chex.assert_tree_all_finite(w)
        chex.assert_type(w, jnp.float32)


def check_nonconflicting(fn):
    for g in _draws():
        w = np.asarray(fn(jnp.asarray(g)), np.float64)
        g64 = g.astype(np.float64)
        proj = g64 @ (w @ g64)
        # Round-off of the products: a few eps times |g_t| |w| |G|.
        bound = 10 * _EPS32 * np.linalg.norm(g64, axis=1) * (np.abs(w) @ np.linalg.norm(g64, axis=1))
        assert np.all(proj >= -bound), (proj, bound)


def check_compiles_once(weighting):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(g):
        return _weights(weighting, g)

    chex.clear_trace_counter()
    g = _draws()[0]
    f(jnp.asarray(g))
    f(jnp.asarray(2.0 * g + 1.0))


def property_tests(name: str, weighting, properties, *, rtol: float = 1e-4, cond2: float = 0.0):
    """A ``chex.TestCase`` checking the named ``properties`` of ``weighting`` with and without jit
    (tolerance ``rtol + cond2 eps cond(G)^2`` for the invariances)."""
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"unknown properties {sorted(unknown)}; known: {PROPERTIES}")

    def _fn(self):
        return self.variant(lambda g: _weights(weighting, g))

    def _make(prop):
        if prop == "compiles_once":
            def test(self):
                check_compiles_once(weighting)
            return test

        def test(self):
            fn = self._fn()
            if prop == "sums_to_one":
                check_sums_to_one(fn)
            elif prop == "scale_invariant":
                check_scale_invariant(fn, rtol, cond2)
            elif prop == "permutation_equivariant":
                check_permutation_equivariant(fn, rtol, cond2)
            elif prop == "finite_on_degenerate":
                check_finite_on_degenerate(fn)
            elif prop == "nonconflicting":
                check_nonconflicting(fn)
        test.__name__ = test.__qualname__ = f"test_{prop}"
        return chex.variants(with_jit=True, without_jit=True)(test)

    attrs = {"_fn": _fn, **{f"test_{prop}": _make(prop) for prop in properties}}
    # Built with type() so that chex's metaclass expands the variants at class creation.
    name = f"Test{name.title().replace('_', '')}Properties"
    return type(name, (chex.TestCase,), attrs)
