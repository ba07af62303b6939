r"""Task affinity from training: running statistics of pairwise gradient cosines, and groupings.

Every gradient-based step already forms the (T, F) matrix ``G`` of per-task gradients at the
shared representation (rows ``g_t = dL_t/dz``, batch-summed). Its cosine matrix

.. math:: K_{ij} = \frac{g_i \cdot g_j}{\lVert g_i\rVert\,\lVert g_j\rVert}

is the signal task-affinity methods pay extra for. This module keeps, over training,

* the running mean and (sample) variance of every ``K_ij`` (Welford's update, per pair),
* the fraction of steps on which the pair conflicts (``K_ij < 0``),
* optionally a first-order *look-ahead* affinity in the style of Fifty et al. ("Efficiently
  Identifying Task Groupings", NeurIPS 2021), who measure how a step on task i's loss changes
  task j's loss, ``Z_{i->j} = 1 - L_j(theta - eta g_i) / L_j(theta)``. To first order in
  ``eta`` this is

  .. math:: Z_{i\to j} \approx \eta\,\frac{g_i \cdot g_j}{L_j},

  computed here from the same matrix (at the representation: the step is taken on z, i.e. the
  encoder Jacobian is left out, the same approximation as IMTL-G on ``grad_z``). ``Z`` is
  directed (``Z_{i->j} != Z_{j->i}``); its diagonal is task j's relative first-order progress
  from its own step.

and turns an affinity matrix into a proposed grouping of the tasks (:func:`propose_groups`).

Two ways to use it:

* :func:`affinity_tracker` returns an optax-style ``(init, update)`` pair over an
  :class:`AffinityState`; call ``update(grads, state)`` with any (T, F) matrix you have.
* :func:`with_affinity` wraps a registered method so that :func:`imtl_jax.mtl_step` updates the
  statistics inside its own jitted step, from the matrix it computes anyway: the method state
  becomes a :class:`TrackedState` ``(inner, affinity)`` and ``aux.info["cosines"]`` holds the
  step's (T, T) cosine matrix. Wrapping a loss-only method (equal weighting, DWA, ...) makes the
  step compute the per-task gradients it otherwise skips (the representation-level path; see
  ``benchmarks/affinity_cost.py`` for the measured cost).

Undefined values are skipped, not guessed: a step whose matrix (or, for the look-ahead, losses)
is not finite is ignored entirely, and a pair involving an all-zero gradient row is not counted
for that step (its cosine is undefined). Counts are therefore per pair.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from imtl_jax._method import Method, Weighting, WeightingOutput
from imtl_jax._validation import check_float_array, check_task_vector
from imtl_jax.methods import get_method

PyTree = Any


# ----------------------------------------------------------------------------------- matrices

def cosine_matrix(grads: jax.Array) -> jax.Array:
    """The (T, T) matrix of pairwise cosines between the rows of ``grads`` (T, F).

    Rows are scaled by their largest absolute entry before the norms are taken, so the result is
    exact to round-off for rows at any scale (1e-30 or 1e30). Entries involving an all-zero row
    are 0 (also on the diagonal); all other diagonal entries are 1; values are clipped to
    [-1, 1]. Non-finite rows give NaN.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> imtl_jax.cosine_matrix(jnp.array([[1., 0.], [1., 1.], [0., -2.]])).round(3)
      Array([[ 1.   ,  0.707,  0.   ],
             [ 0.707,  1.   , -0.707],
             [ 0.   , -0.707,  1.   ]], dtype=float32)
    """
    grads = check_float_array(grads, "grads", ndim=2)
    units, nonzero = _unit_rows(grads)
    cos = jnp.clip(jnp.matmul(units, units.T, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)
    both = nonzero[:, None] & nonzero[None, :]
    eye = jnp.eye(grads.shape[0], dtype=bool)
    diag = jnp.where(jnp.isnan(cos), cos, jnp.ones_like(cos))
    return jnp.where(both, jnp.where(eye, diag, cos), jnp.zeros_like(cos))


def _unit_rows(grads):
    peak = jnp.max(jnp.abs(grads), axis=1, keepdims=True)
    nonzero = ~(peak[:, 0] == 0)  # NaN rows count as nonzero, so their NaN shows
    scaled = grads / jnp.where(peak > 0, peak, 1.0)
    norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=1, keepdims=True))
    return scaled / jnp.where(norm > 0, norm, 1.0), nonzero


def lookahead_affinity(grads: jax.Array, losses: jax.Array, lr: float) -> jax.Array:
    r"""First-order look-ahead affinity ``Z[i, j] = lr * (g_i . g_j) / L_j`` (Fifty et al. 2021).

    ``Z[i, j]`` is, to first order in ``lr``, the relative decrease of task j's loss caused by a
    gradient step of size ``lr`` on task i's loss alone: ``1 - L_j(z - lr g_i) / L_j(z)``.
    Positive means task i's update helps task j. The matrix is directed (not symmetric).

    Args:
      grads: (T, F) per-task gradients of the losses ``losses``.
      losses: (T,) the losses (positive; a non-positive loss gives a non-finite column).
      lr: the step size of the look-ahead (a Python float > 0).

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> imtl_jax.lookahead_affinity(jnp.array([[1., 0.], [1., 1.]]), jnp.array([2., 4.]), 0.1)
      Array([[0.05 , 0.025],
             [0.05 , 0.05 ]], dtype=float32)
    """
    grads = check_float_array(grads, "grads", ndim=2)
    losses = check_task_vector(losses, "losses", grads.shape[0], "grads", grads.shape)
    lr = _check_lr(lr)
    dots = jnp.matmul(grads, grads.T, precision=jax.lax.Precision.HIGHEST)
    safe = jnp.where(losses > 0, losses, jnp.nan)
    return lr * dots / safe[None, :]


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"`lookahead_lr` must be a finite Python float > 0 (the look-ahead step "
                         f"size, e.g. your learning rate), got {lr!r}.")
    return float(lr)


# ----------------------------------------------------------------------------------- tracker

class AffinityState(NamedTuple):
    """Running statistics of the pairwise gradient cosines (all (T, T)).

    Attributes:
      steps: int32, the number of steps on which the pair's cosine was defined.
      mean: running mean of the cosine ``K_ij`` over those steps.
      m2: running sum of squared deviations from the mean (Welford); the sample variance is
        ``m2 / (steps - 1)``.
      conflicts: int32, the number of those steps with ``K_ij < 0``.
      last: the last defined cosine matrix (zeros before any step).
      lookahead_count: int32 scalar, the steps that updated ``lookahead``.
      lookahead: running mean of :func:`lookahead_affinity` (zeros unless the tracker was built
        with ``lookahead_lr``).
    """

    steps: jax.Array
    mean: jax.Array
    m2: jax.Array
    conflicts: jax.Array
    last: jax.Array
    lookahead_count: jax.Array
    lookahead: jax.Array


class AffinityTracker(NamedTuple):
    """An optax-style pair of pure functions (see :func:`affinity_tracker`).

    Attributes:
      init: ``init(num_tasks, dtype=float32) -> AffinityState``.
      update: ``update(grads, state, losses=None) -> AffinityState``; ``grads`` is (T, F);
        ``losses`` (T,) is required when the tracker has a look-ahead step size.
      lookahead_lr: the look-ahead step size, or None.
    """

    init: Callable[..., AffinityState]
    update: Callable[..., AffinityState]
    lookahead_lr: Optional[float]


def _init(num_tasks: int, dtype: Any = jnp.float32) -> AffinityState:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a Python int >= 1, got {num_tasks!r}.")
    dtype = jnp.promote_types(dtype, jnp.float32)
    n = int(num_tasks)
    zi = jnp.zeros((n, n), jnp.int32)
    zf = jnp.zeros((n, n), dtype)
    return AffinityState(steps=zi, mean=zf, m2=zf, conflicts=zi, last=zf,
                         lookahead_count=jnp.zeros((), jnp.int32), lookahead=zf)


def _check_state(state, num_tasks):
    if not isinstance(state, AffinityState):
        raise TypeError(f"`state` must be an AffinityState (from tracker.init), got {type(state).__name__}.")
    if state.mean.shape != (num_tasks, num_tasks):
        raise ValueError(f"`state` was created for {state.mean.shape[0]} tasks but `grads` has "
                         f"{num_tasks} rows; create it with tracker.init({num_tasks}).")


def _update_cosines(state: AffinityState, cos: jax.Array, defined: jax.Array) -> AffinityState:
    cos = cos.astype(state.mean.dtype)
    m = defined.astype(jnp.int32)
    count = state.steps + m
    delta = cos - state.mean
    mean = state.mean + jnp.where(defined, delta / jnp.maximum(count, 1).astype(cos.dtype), 0.0)
    m2 = state.m2 + jnp.where(defined, delta * (cos - mean), 0.0)
    conflicts = state.conflicts + (defined & (cos < 0)).astype(jnp.int32)
    last = jnp.where(defined, cos, state.last)
    return state._replace(steps=count, mean=mean, m2=m2, conflicts=conflicts, last=last)


def _update_lookahead(state: AffinityState, z: jax.Array) -> AffinityState:
    z = z.astype(state.lookahead.dtype)
    ok = jnp.all(jnp.isfinite(z))
    n = state.lookahead_count + ok.astype(jnp.int32)
    mean = jnp.where(ok, state.lookahead + (z - state.lookahead) / jnp.maximum(n, 1).astype(z.dtype),
                     state.lookahead)
    return state._replace(lookahead_count=n, lookahead=mean)


def _tracked_update(lookahead_lr, grads, state, losses=None):
    grads = check_float_array(grads, "grads", ndim=2)
    num_tasks = grads.shape[0]
    _check_state(state, num_tasks)
    cos = cosine_matrix(grads)
    state = _update_cosines(state, cos, _defined(grads))
    if lookahead_lr is not None:
        if losses is None:
            raise ValueError("this tracker has `lookahead_lr`, so update(...) needs the (T,) "
                             "`losses` whose gradients are `grads`; pass losses=...")
        losses = check_task_vector(losses, "losses", num_tasks, "grads", grads.shape)
        z = lookahead_affinity(grads, losses, lookahead_lr)
        state = _update_lookahead(state, jnp.where(jnp.all(jnp.isfinite(grads)), z, jnp.nan))
    return state


def _defined(grads):
    finite = jnp.all(jnp.isfinite(grads))
    nonzero = jnp.any(grads != 0, axis=1)
    return finite & nonzero[:, None] & nonzero[None, :]


def affinity_tracker(*, lookahead_lr: Optional[float] = None) -> AffinityTracker:
    """An accumulator of task-affinity statistics: pure, jittable, optax-style.

    ``state = tracker.init(T)``; then every step ``state = tracker.update(G, state)`` with the
    (T, F) matrix ``G`` of per-task gradients (rows may be at any scale). A step with a
    non-finite entry is skipped; a pair involving an all-zero row is not counted that step.
    Read the results with :func:`affinity_stats`. For the look-ahead affinity pass
    ``lookahead_lr`` here and ``losses=`` (the (T,) losses whose gradients are ``G``) to update.

    Example:
      >>> import jax, jax.numpy as jnp, imtl_jax
      >>> tracker = imtl_jax.affinity_tracker()
      >>> state = tracker.init(2)
      >>> update = jax.jit(tracker.update)
      >>> for g in ([[1., 0.], [1., 1.]], [[1., 0.], [-1., 1.]], [[0., 1.], [1., 0.]]):
      ...     state = update(jnp.array(g), state)
      >>> stats = imtl_jax.affinity_stats(state)
      >>> stats.mean.round(3)
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
      >>> stats.std[0, 1].round(3)
      Array(0.707, dtype=float32)
    """
    if lookahead_lr is not None:
        lookahead_lr = _check_lr(lookahead_lr)

    def update(grads: jax.Array, state: AffinityState, losses: Optional[jax.Array] = None) -> AffinityState:
        return _tracked_update(lookahead_lr, grads, state, losses)

    return AffinityTracker(init=_init, update=update, lookahead_lr=lookahead_lr)


class AffinityStats(NamedTuple):
    """What :func:`affinity_stats` returns (NumPy-free: all jax arrays, (T, T) unless noted).

    Attributes:
      mean: mean cosine per pair (NaN for a pair never defined).
      std: sample standard deviation (``ddof=1``; NaN with fewer than 2 steps).
      stderr: ``std / sqrt(steps)``.
      conflict_fraction: fraction of the pair's steps with a negative cosine (NaN if none).
      steps: steps per pair.
      lookahead: mean look-ahead affinity (NaN when it was never updated).
    """

    mean: jax.Array
    std: jax.Array
    stderr: jax.Array
    conflict_fraction: jax.Array
    steps: jax.Array
    lookahead: jax.Array


def affinity_stats(state: AffinityState) -> AffinityStats:
    """Reads means, standard deviations and conflict fractions out of an :class:`AffinityState`.

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> tracker = imtl_jax.affinity_tracker()
      >>> state = tracker.update(jnp.array([[1., 0.], [-1., 0.]]), tracker.init(2))
      >>> imtl_jax.affinity_stats(state).conflict_fraction
      Array([[0., 1.],
             [1., 0.]], dtype=float32)
    """
    if not isinstance(state, AffinityState):
        raise TypeError(f"`state` must be an AffinityState, got {type(state).__name__}.")
    dtype = state.mean.dtype
    n = state.steps.astype(dtype)
    nan = jnp.array(jnp.nan, dtype)
    mean = jnp.where(state.steps > 0, state.mean, nan)
    var = jnp.where(state.steps > 1, state.m2 / jnp.maximum(n - 1, 1), nan)
    std = jnp.sqrt(jnp.maximum(var, 0))
    stderr = std / jnp.sqrt(jnp.maximum(n, 1))
    frac = jnp.where(state.steps > 0, state.conflicts.astype(dtype) / jnp.maximum(n, 1), nan)
    look = jnp.where(state.lookahead_count > 0, state.lookahead, nan)
    return AffinityStats(mean=mean, std=std, stderr=stderr, conflict_fraction=frac,
                         steps=state.steps, lookahead=look)


# ----------------------------------------------------------------------------------- the step

class TrackedState(NamedTuple):
    """The method state of a :func:`with_affinity` method: the wrapped method's state and the
    :class:`AffinityState`."""

    inner: PyTree
    affinity: AffinityState


def with_affinity(method: Union[str, Method], *, lookahead_lr: Optional[float] = None) -> Method:
    """Wraps ``method`` so that the training step also accumulates task-affinity statistics.

    The returned :class:`imtl_jax.Method` has the same scaling, weights and level as ``method``;
    its weighting passes the step's (T, F) per-task gradient matrix (at the representation for
    representation-level methods; flattened shared parameters for ``*_exact``/parameter-level
    ones) to an :func:`affinity_tracker`. The method state becomes a :class:`TrackedState`
    ``(inner, affinity)``; ``aux.info`` gains ``"cosines"``, the step's (T, T) cosine matrix.

    Loss-only methods (``needs_grads=False``: equal weighting, DWA, ...) skip the per-task
    gradients; wrapped, they compute them (the weights are unchanged: the shared gradient is
    the same ``sum_t w_t grad L~_t``). The cosines are those of the gradients the method weights,
    i.e. of the *scaled* losses for IMTL-H (cosines are invariant to the per-task scales).

    Args:
      method: a registered name or a :class:`imtl_jax.Method`.
      lookahead_lr: also track :func:`lookahead_affinity` with this step size. Needs the raw
        losses, so only methods without a trainable loss scaling accept it.

    Example:
      >>> import jax, jax.numpy as jnp, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss),
      ...                          imtl_jax.with_affinity("imtl_h"))
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> params = imtl_jax.MTLParams(shared=jax.random.normal(k1, (3, 4)),
      ...                             heads=jax.random.normal(k2, (2, 4)), log_scales=jnp.zeros(2))
      >>> batch = {"x": jax.random.normal(k3, (8, 3)), "y": jnp.ones((8, 2))}
      >>> grads, state, aux = jax.jit(step)(params, step.init(params), batch)
      >>> aux.info["cosines"].shape, int(state.affinity.steps[0, 1])
      ((2, 2), 1)
    """
    inner = get_method(method)
    tracker = affinity_tracker(lookahead_lr=lookahead_lr)
    if tracker.lookahead_lr is not None and inner.scaling.trainable:
        raise ValueError(f"`lookahead_lr` needs the raw task losses, but method {inner.name!r} "
                         f"scales them ({inner.scaling.name}); track the look-ahead with a method "
                         "without loss scaling (e.g. 'imtl_g', 'equal') or call "
                         "affinity_tracker(lookahead_lr=...).update(G, state, losses) yourself.")
    w = inner.weighting

    def init(num_tasks: int, dtype: Any = jnp.float32, dim: Any = None) -> TrackedState:
        return TrackedState(inner=w.init_state(num_tasks, dtype, dim=dim),
                            affinity=tracker.init(num_tasks, dtype))

    def weigh(grads, losses, state, key, priorities) -> WeightingOutput:
        if not isinstance(state, TrackedState):
            raise TypeError(f"the state of {inner.name}+affinity must be a TrackedState (from "
                            f"step.init), got {type(state).__name__}.")
        if grads is None:
            raise ValueError(f"{inner.name}+affinity needs the (T, F) gradient matrix, got None.")
        out = w.weigh(grads if w.needs_grads else None, losses, state.inner, key, priorities)
        aff = tracker.update(grads, state.affinity, losses if tracker.lookahead_lr is not None else None)
        info = dict(out.info)
        info["cosines"] = cosine_matrix(grads).astype(out.weights.dtype)
        return out._replace(state=TrackedState(out.state, aff), info=info)

    weighting = Weighting(name=f"{w.name}+affinity", init=init, weigh=weigh, needs_grads=True,
                          weights_heads=w.weights_heads, needs_dim=w.needs_dim,
                          per_coordinate=w.per_coordinate, returns_direction=w.returns_direction)
    return Method(name=f"{inner.name}+affinity", scaling=inner.scaling, weighting=weighting,
                  level=inner.level)


# ----------------------------------------------------------------------------------- grouping

EXHAUSTIVE_MAX_TASKS = 12


def grouping_score(affinity: Any, groups: Sequence[Sequence[int]]) -> float:
    r"""The objective :func:`propose_groups` maximizes: mean over tasks of the task's mean
    affinity *onto it* from the other members of its group.

    .. math:: S = \frac1T \sum_t \frac{1}{|g(t)| - 1} \sum_{u \in g(t),\,u \ne t} A_{u t},

    with a task alone in its group contributing 0 (no partner: neither helped nor hurt). For a
    directed affinity (look-ahead, ``A[u, t]`` = effect of u's step on t) this is Fifty et
    al.'s "total inter-task affinity onto each task"; it equals the same score on
    ``(A + A.T) / 2``. The diagonal is never used.

    Example:
      >>> import numpy as np, imtl_jax
      >>> a = np.array([[1., .9, 0.], [.9, 1., 0.], [0., 0., 1.]])
      >>> round(imtl_jax.grouping_score(a, [(0, 1), (2,)]), 3)
      0.6
    """
    a = _check_affinity(affinity)
    labels = _labels_of(groups, a.shape[0])
    return float(_scores(a, labels[None])[0])


def propose_groups(affinity: Any, k: int, *, exhaustive_max_tasks: int = EXHAUSTIVE_MAX_TASKS
                   ) -> tuple[tuple[int, ...], ...]:
    """Splits T tasks into ``k`` non-empty groups with high within-group affinity.

    Algorithm (deterministic):

    * ``T <= exhaustive_max_tasks`` (default 12): exhaustive search over every partition of the
      tasks into exactly ``k`` non-empty groups (Stirling number S(T, k) of them; S(11, 4) =
      145,750), maximizing :func:`grouping_score`. Partitions are enumerated as restricted-growth
      strings in lexicographic order (task 0 in group 0, each next task in an existing group or
      the next new one) and the first one whose score exceeds every earlier one by more than
      ``1e-12 * (1 + |best|)`` wins, so ties go to the lexicographically smallest labelling.
    * larger T: average-linkage agglomeration on the symmetrized affinity ``(A + A.T)/2``:
      start from singletons and repeatedly merge the two groups with the highest mean
      between-group affinity (ties: the pair with the smallest (first member, first member)),
      until ``k`` groups remain. A heuristic; it does not guarantee the best score.

    Args:
      affinity: (T, T) finite matrix; higher means "better together" (e.g. the mean cosines of
        :func:`affinity_stats`, or the look-ahead affinity, ``A[u, t]`` = effect of u on t).
      k: the number of groups, 1 <= k <= T.
      exhaustive_max_tasks: the largest T searched exhaustively.

    Returns:
      ``k`` tuples of task indices, each sorted, ordered by their smallest member.

    Example:
      >>> import numpy as np, imtl_jax
      >>> a = np.full((5, 5), -0.2); a[:3, :3] = 0.8; a[3:, 3:] = 0.7
      >>> imtl_jax.propose_groups(a, 2)
      ((0, 1, 2), (3, 4))
    """
    a = _check_affinity(affinity)
    t = a.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= t:
        raise ValueError(f"`k` must be an int with 1 <= k <= T = {t} (the number of groups), got {k!r}.")
    if isinstance(exhaustive_max_tasks, bool) or not isinstance(exhaustive_max_tasks, (int, np.integer)):
        raise ValueError(f"`exhaustive_max_tasks` must be an int, got {exhaustive_max_tasks!r}.")
    k = int(k)
    if t <= exhaustive_max_tasks:
        labels = _exhaustive(a, k)
    else:
        labels = _agglomerative(a, k)
    return _groups_of(labels, k)


def _check_affinity(affinity) -> np.ndarray:
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"`affinity` must be a square (T, T) matrix with T >= 1, got shape {a.shape}.")
    off = a[~np.eye(a.shape[0], dtype=bool)]
    if not np.all(np.isfinite(off)):
        raise ValueError("`affinity` has non-finite off-diagonal entries (e.g. a task pair that was "
                         "never measured); fill or drop those tasks first.")
    return np.where(np.eye(a.shape[0], dtype=bool), 0.0, a)


def _labels_of(groups, t) -> np.ndarray:
    labels = np.full(t, -1)
    for g, members in enumerate(groups):
        for m in members:
            if not isinstance(m, (int, np.integer)) or not 0 <= m < t or labels[m] != -1:
                raise ValueError(f"`groups` must partition range({t}) (each task exactly once), got {groups!r}.")
            labels[m] = g
    if np.any(labels < 0):
        raise ValueError(f"`groups` must partition range({t}); missing {np.flatnonzero(labels < 0).tolist()}.")
    return labels


def _groups_of(labels, k) -> tuple[tuple[int, ...], ...]:
    groups = [tuple(int(i) for i in np.flatnonzero(labels == g)) for g in range(k)]
    return tuple(sorted((g for g in groups if g), key=lambda g: g[0]))


def _scores(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """grouping_score for a batch of labellings (P, T), vectorized."""
    same = labels[:, :, None] == labels[:, None, :]  # (P, T, T), same[p, u, t]
    same &= ~np.eye(labels.shape[1], dtype=bool)
    onto = np.einsum("put,ut->pt", same, a)  # sum of A[u, t] over groupmates u
    mates = same.sum(axis=1)
    per_task = np.where(mates > 0, onto / np.maximum(mates, 1), 0.0)
    return per_task.mean(axis=1)


def _rgs(t: int, k: int):
    """Restricted-growth strings of length t with exactly k blocks, in lexicographic order."""
    out = [0] * t

    def rec(i, used):
        if t - i < k - used:
            return
        if i == t:
            if used == k:
                yield tuple(out)
            return
        for v in range(min(used + 1, k)):
            out[i] = v
            yield from rec(i + 1, max(used, v + 1))

    out[0] = 0
    if t == 0:
        return
    yield from rec(1, 1)


def _exhaustive(a, k, chunk: int = 20000) -> np.ndarray:
    t = a.shape[0]
    best_score, best = -np.inf, None
    gen = _rgs(t, k)
    while True:
        block = list(itertools.islice(gen, chunk))
        if not block:
            break
        labels = np.asarray(block)
        scores = _scores(a, labels)
        for i in range(len(scores)):  # first strict improvement wins (lexicographic tie-break)
            if scores[i] > best_score + 1e-12 * (1 + abs(best_score)) or best is None:
                best_score, best = scores[i], labels[i]
    assert best is not None  # k <= t, so at least one partition exists
    return best


def _agglomerative(a, k) -> np.ndarray:
    s = (a + a.T) / 2
    groups = [[i] for i in range(a.shape[0])]
    while len(groups) > k:
        best, pair = -np.inf, None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                link = s[np.ix_(groups[i], groups[j])].mean()
                if link > best + 1e-12 * (1 + abs(best)) or pair is None:
                    best, pair = link, (i, j)
        assert pair is not None
        i, j = pair
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
        groups.sort(key=lambda g: g[0])
    labels = np.empty(a.shape[0], dtype=int)
    for g, members in enumerate(groups):
        labels[members] = g
    return labels


def random_groups(num_tasks: int, sizes: Sequence[int], seed: int) -> tuple[tuple[int, ...], ...]:
    """A uniformly random grouping of ``num_tasks`` tasks into groups of the given ``sizes``
    (the control of a grouping study: same group sizes, random membership).

    Example:
      >>> import imtl_jax
      >>> sorted(len(g) for g in imtl_jax.random_groups(5, (3, 2), seed=0))
      [2, 3]
    """
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != num_tasks:
        raise ValueError(f"`sizes` must be positive and sum to num_tasks = {num_tasks}, got {sizes}.")
    perm = np.random.default_rng(seed).permutation(num_tasks)
    out, start = [], 0
    for s in sizes:
        out.append(tuple(sorted(int(i) for i in perm[start:start + s])))
        start += s
    return tuple(sorted(out, key=lambda g: g[0]))
