"""Named input families shared by the method tests, the stress step and ``benchmarks.accuracy``.

Every family is a function ``family(rng, num_tasks, dim, norm_decades) -> (T, D) float64``:
unit directions with a given conflict structure, times row norms ``10^U(-k, k)`` with
``k = norm_decades`` (so ``k = 2`` spreads the norms over 1e-2..1e2, ``k = 4`` over 1e-4..1e4).

* ``opposed_pairs`` — rows in pairs whose cosine is exactly -0.8 (``u, -0.8 u + 0.6 w``), the
  pairs otherwise random: the conflicts that broke fixed-budget MGDA/UPGrad (issue 16);
* ``mixed`` — half the rows from opposed pairs, the rest Gaussian, plus a shared component for
  some rows (pairwise cosines of both signs);
* ``simplex`` — directions close to the vertices of a centred simplex: every pairwise cosine
  near -1/(T-1), the most uniform conflict possible (the origin is almost in the hull);
* ``aligned`` — a shared direction plus noise (nothing conflicts; MGDA's min-norm point is
  interior, UPGrad is the mean).

``HARD`` lists the (family, T, D, decades) cases of the default suite (small sizes);
``HARD_STRESS`` the large ones (``@pytest.mark.stress``).
"""

from __future__ import annotations

import numpy as np


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _norms(rng, num_tasks, decades):
    return 10.0 ** rng.uniform(-decades, decades, num_tasks)


def _pair_rows(rng, num_pairs, dim):
    rows = []
    for _ in range(num_pairs):
        v = _unit(rng.standard_normal(dim))
        w = rng.standard_normal(dim)
        w = _unit(w - (w @ v) * v)
        rows += [v, -0.8 * v + 0.6 * w]
    return np.array(rows).reshape(-1, dim)


def opposed_pairs(rng, num_tasks, dim, decades):
    rows = _pair_rows(rng, (num_tasks + 1) // 2, dim)[:num_tasks]
    return rows * _norms(rng, num_tasks, decades)[:, None]


def mixed(rng, num_tasks, dim, decades):
    half = num_tasks // 2
    rows = np.concatenate([_pair_rows(rng, (half + 1) // 2, dim)[:half],
                           _unit(rng.standard_normal((num_tasks - half, dim)))])
    shared = _unit(rng.standard_normal(dim))
    some = rng.random(num_tasks) < 0.3
    rows[some] = _unit(rows[some] + shared)
    return rows[rng.permutation(num_tasks)] * _norms(rng, num_tasks, decades)[:, None]


def simplex(rng, num_tasks, dim, decades):
    vertices = np.eye(num_tasks) - 1.0 / num_tasks              # centred simplex in R^T
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_tasks)))  # orthonormal columns
    rows = _unit(vertices @ basis.T + 0.05 * rng.standard_normal((num_tasks, dim)) / np.sqrt(dim))
    return rows * _norms(rng, num_tasks, decades)[:, None]


def aligned(rng, num_tasks, dim, decades):
    shared = _unit(rng.standard_normal(dim))
    rows = _unit(shared + 0.5 * rng.standard_normal((num_tasks, dim)) / np.sqrt(dim))
    return rows * _norms(rng, num_tasks, decades)[:, None]


FAMILIES = {"opposed_pairs": opposed_pairs, "mixed": mixed, "simplex": simplex, "aligned": aligned}

# (family, T, D, decades): default suite, small sizes (T in {5, 10}, D from T to 64).
HARD = [("opposed_pairs", 5, 5, 2), ("mixed", 5, 16, 4), ("simplex", 5, 64, 2),
        ("opposed_pairs", 10, 10, 2), ("mixed", 10, 32, 2), ("simplex", 10, 16, 4),
        ("aligned", 10, 64, 2)]
# Stress step: T in {5, 10, 20}, D up to 512, both norm spreads, every family.
HARD_STRESS = [(f, t, d, k) for f in FAMILIES for t in (5, 10, 20) for d in (t, 64, 512)
               for k in (2, 4)]


def draw(name: str, seed: int, num_tasks: int, dim: int, decades: float) -> np.ndarray:
    """One (T, D) float64 draw of family ``name`` (deterministic in ``seed``)."""
    return FAMILIES[name](np.random.default_rng(seed), num_tasks, dim, decades)
