"""Float64 oracles and helpers written independently of the library."""

from __future__ import annotations

import contextlib

import jax
import numpy as np


@contextlib.contextmanager
def x64():
    """Enables float64 in JAX for the duration of the block."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def paper_alpha(grads: np.ndarray) -> np.ndarray:
    """IMTL-G weights by the paper's Eq. 2 in float64 numpy: alpha_{2:T} = g_1 U^T (D U^T)^-1.

    D has rows g_1 - g_t, U rows u_1 - u_t (t = 2..T); alpha_1 = 1 - sum(alpha_{2:T}).
    """
    g = np.asarray(grads, np.float64)
    if g.shape[0] == 1:
        return np.ones(1)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_mat = g[0] - g[1:]
    u_mat = u[0] - u[1:]
    # Row-vector equation a (D U^T) = g_1 U^T  <=>  (D U^T)^T a^T = U g_1^T.
    rest = np.linalg.solve((d_mat @ u_mat.T).T, u_mat @ g[0])
    return np.concatenate([[1.0 - rest.sum()], rest])


def paper_alpha_error_bound(grads: np.ndarray) -> float:
    """Forward-error bound of :func:`paper_alpha` in float64: cond(D U^T) eps max|alpha|.

    The paper's system is conditioned by the gradient norms (not only the angles), so the
    float64 oracle itself is only this accurate when the norms differ by orders of magnitude.
    """
    g = np.asarray(grads, np.float64)
    if g.shape[0] == 1:
        return 0.0
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    m = (g[0] - g[1:]) @ (u[0] - u[1:]).T
    return float(10 * np.linalg.cond(m) * np.finfo(np.float64).eps * np.abs(paper_alpha(g)).max())


def projections(grads: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """g . u_t for g = alpha @ grads, in float64."""
    g = np.asarray(grads, np.float64)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    return u @ (np.asarray(alpha, np.float64) @ g)


def relative_spread(p: np.ndarray) -> float:
    """(max - min) / max |p|: 0 when all projections are equal."""
    return float((p.max() - p.min()) / np.abs(p).max())


def random_directions(rng: np.random.Generator, num_tasks: int, dim: int,
                      max_cond: float = 10.0) -> np.ndarray:
    """Unit rows with cond(U) <= max_cond (rejection sampling)."""
    while True:
        u = rng.standard_normal((num_tasks, dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        if np.linalg.cond(u) <= max_cond:
            return u
