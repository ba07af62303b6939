"""Non-finite protection for training loops, with optax's ``apply_if_finite`` semantics.

A single NaN or inf in a loss or a gradient (a corrupt example, an overflow in a head, a
log of zero) must not poison the parameters or the optimizer's moments.

* :func:`safe_optimizer` wraps any optax optimizer with the semantics and the state
  (``optax.ApplyIfFiniteState``) of ``optax.apply_if_finite``: an update that contains a NaN
  or inf is skipped (zero update, inner state untouched) and counted. Unlike
  ``optax.apply_if_finite`` it also wraps chains that change the structure of the updates
  (the per-task aggregators :func:`imtl_jax.aggregate` / :func:`imtl_jax.imtl_g`).
* :func:`skipped_steps` reads the counters back out of a (possibly chained, wrapped or
  nested) optimizer state.
* :func:`flag_nonfinite` makes the optimizer also skip steps whose *losses* are non-finite
  although their gradients are finite (the updates alone cannot show it).
* :func:`skip_nonfinite` makes a whole training step atomic: on a non-finite step the
  parameters, the optimizer state *and the method state* (PCGrad's counter, DWA/FAMO/GradNorm
  histories) are returned exactly as they were, so a skipped batch is as if never seen.
* :func:`safe_step` wraps :func:`imtl_jax.mtl_step` so that, with :func:`safe_optimizer`, a
  non-finite step keeps the method state and is skipped by the optimizer (optax's semantics).

IMTL-G itself is loud on bad input: a NaN or inf in any task gradient makes every weight
NaN (see :func:`imtl_jax.imtl_g_solve`), so the whole shared update is non-finite and is
skipped, rather than silently dropping one task.

Example:
  >>> import jax, jax.numpy as jnp, optax, imtl_jax
  >>> tx = imtl_jax.safe_optimizer(optax.sgd(0.1), max_consecutive_errors=3)
  >>> params = {"w": jnp.ones(2)}
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
  >>> updates["w"]  # skipped: a zero update, the inner state is unchanged
  Array([0., 0.], dtype=float32)
  >>> {k: v.item() for k, v in imtl_jax.skipped_steps(state).items()}
  {'notfinite_count': 1, 'last_finite': False, 'total_notfinite': 1}
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any

_STATE_NAME = "ApplyIfFiniteState"
_FIELDS = ("notfinite_count", "last_finite", "total_notfinite")


def safe_optimizer(tx: optax.GradientTransformation, max_consecutive_errors: int = 10
                   ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that updates containing a NaN or inf are skipped.

    The semantics and the state are those of ``optax.apply_if_finite(tx,
    max_consecutive_errors)``: when any leaf of the incoming updates is non-finite, the
    returned update is all zeros and ``tx``'s state is returned unchanged (bit for bit), so
    ``optax.apply_updates`` leaves the parameters as they were. The counters
    ``notfinite_count`` (current streak), ``last_finite`` and ``total_notfinite`` (never
    reset) live in the ``optax.ApplyIfFiniteState``; read them with :func:`skipped_steps`.

    One difference: ``optax.apply_if_finite`` (optax 0.2.8) returns zeros shaped like its
    *input* when it skips, so it fails at trace time ("cond branches must have equal output
    types") around a transformation that changes the structure of the updates, such as an
    :func:`imtl_jax.aggregate` / :func:`imtl_jax.imtl_g` aggregator that maps per-task
    updates (T, ...) to one update. This wrapper returns zeros shaped like ``tx``'s *output*
    (found with ``jax.eval_shape``, no extra computation), so it can wrap the whole chain.
    For structure-preserving ``tx`` the two are identical (tested bit for bit).

    After more than ``max_consecutive_errors`` non-finite updates *in a row* the wrapper
    gives up and applies the update (optax's semantics): a NaN that persists is a bug, not
    noise, and the run then fails visibly instead of silently freezing. ``total_notfinite``
    counts every non-finite update, including such a given-up one.

    Put the wrapper outermost, around the whole chain (aggregator included), so that a bad
    step leaves every inner state, the aggregator's last weights included, untouched. Extra
    arguments of ``update`` (``losses=``, ``key=``, ``priorities=``) are passed to ``tx``.

    To also skip steps whose losses are non-finite while their gradients are finite (which
    the updates alone cannot show), pass the gradients through :func:`flag_nonfinite` with
    the training step's ``aux.all_finite`` first.

    Args:
      tx: any optax transformation, e.g. ``optax.adam(1e-3)`` or
        ``optax.chain(imtl_jax.imtl_g(T), optax.adam(1e-3))``.
      max_consecutive_errors: how many consecutive non-finite updates are skipped before
        one is applied anyway (a non-negative int, static).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      ``optax.ApplyIfFiniteState``.

    Raises:
      TypeError: ``tx`` is not an optax transformation, or ``max_consecutive_errors`` is
        not an int.
      ValueError: ``max_consecutive_errors`` is negative.

    Example:
      >>> import jax, jax.numpy as jnp, optax, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss))
      >>> params = imtl_jax.MTLParams(shared=jnp.ones((3, 4)) / 4, heads=jnp.ones((2, 4)),
      ...                             log_scales=jnp.zeros(2))
      >>> opt = imtl_jax.safe_optimizer(optax.adam(1e-2))
      >>> opt_state, state = opt.init(params), step.init(params)
      >>> @jax.jit
      ... def train(params, opt_state, state, batch):
      ...     grads, state, aux = step(params, state, batch)
      ...     updates, opt_state = opt.update(grads, opt_state, params)
      ...     return optax.apply_updates(params, updates), opt_state, state, aux
      >>> bad = {"x": jnp.ones((8, 3)), "y": jnp.full((8, 2), jnp.nan)}
      >>> new_params, opt_state, state, aux = train(params, opt_state, state, bad)
      >>> bool(aux.all_finite), int(imtl_jax.skipped_steps(opt_state)["total_notfinite"])
      (False, 1)
      >>> bool(jnp.all(new_params.shared == params.shared))
      True
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError("`tx` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
                        f"got {type(tx).__name__}.")
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int):
        raise TypeError("`max_consecutive_errors` must be an int, got "
                        f"{max_consecutive_errors!r} ({type(max_consecutive_errors).__name__}).")
    if max_consecutive_errors < 0:
        raise ValueError(f"`max_consecutive_errors` must be >= 0, got {max_consecutive_errors}.")
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        inner_state = state.inner_state
        isfinite = jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(updates)]))
        notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32),
                                    optax.safe_int32_increment(state.notfinite_count))

        def do_update(_):
            return inner.update(updates, inner_state, params, **extra_args)

        def reject_update(_):
            shapes = jax.eval_shape(lambda: do_update(None)[0])
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return zeros, inner_state

        new_updates, new_inner_state = lax.cond(
            jnp.logical_or(isfinite, notfinite_count > max_consecutive_errors),
            do_update, reject_update, operand=None)
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=isfinite,
            total_notfinite=jnp.where(isfinite, state.total_notfinite,
                                      optax.safe_int32_increment(state.total_notfinite)),
            inner_state=new_inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skipped_steps(opt_state: PyTree) -> dict[str, jax.Array]:
    """The non-finite counters of the ``apply_if_finite`` state inside ``opt_state``.

    ``opt_state`` may be the state of :func:`safe_optimizer` itself or any pytree that holds
    exactly one ``optax.ApplyIfFiniteState`` (a chain, a ``multi_transform``, a train-state
    dataclass, a dict of states, ...). It is found with ``optax.tree_utils.tree_get``.
    Works on concrete states and inside ``jax.jit`` (the values are then tracers).

    Returns:
      ``{"notfinite_count": int32 (), "last_finite": bool (), "total_notfinite": int32 ()}``:
      the current streak of consecutive non-finite updates, whether the last update was
      finite, and the total number of non-finite updates since ``init``. The latter equals
      the number of skipped steps as long as no streak exceeded ``max_consecutive_errors``.

    Example:
      >>> import jax.numpy as jnp, optax, imtl_jax
      >>> tx = imtl_jax.safe_optimizer(optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
      >>> int(imtl_jax.skipped_steps(state)["total_notfinite"])
      1

    Raises:
      ValueError: ``opt_state`` holds no ``ApplyIfFiniteState`` (the optimizer was not
        wrapped by :func:`safe_optimizer` / ``optax.apply_if_finite``), or several of them
        (the message lists their paths; pass the sub-state you mean).
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, _STATE_NAME)
    if not found:
        raise ValueError(
            "`opt_state` contains no optax.ApplyIfFiniteState; wrap the optimizer with "
            "imtl_jax.safe_optimizer(tx) (or optax.apply_if_finite) before calling init. "
            f"Got a state of type {type(opt_state).__name__}.")
    if len(found) > 1:
        paths = [jax.tree_util.keystr(path) for path, _ in found]
        raise ValueError(
            f"`opt_state` contains {len(found)} optax.ApplyIfFiniteState entries, at {paths}; "
            "pass the sub-state whose counters you want.")
    state = found[0][1]
    return {name: getattr(state, name) for name in _FIELDS}


def flag_nonfinite(updates: PyTree, all_finite: jax.Array) -> PyTree:
    """Returns ``updates``, or all-NaN updates of the same structure when ``all_finite`` is False.

    ``optax.apply_if_finite`` (and so :func:`safe_optimizer`) decides from the updates
    alone. A step can have a non-finite loss with finite gradients (e.g. a NaN added as a
    constant, or an ``inf`` loss whose gradient is masked by ``jnp.where``); passing the
    gradients through this function with the training step's ``aux.all_finite`` makes the
    optimizer skip (and count) exactly the steps that the step itself reports as non-finite.
    Jittable; costs one select per leaf.

    Args:
      updates: a pytree of floating-point arrays (e.g. the gradients from
        :func:`imtl_jax.mtl_step`).
      all_finite: a scalar bool (e.g. ``aux.all_finite``).

    Example:
      >>> import jax.numpy as jnp, imtl_jax
      >>> imtl_jax.flag_nonfinite({"w": jnp.ones(2)}, jnp.array(False))["w"]
      Array([nan, nan], dtype=float32)

    Raises:
      ValueError: ``all_finite`` is not a scalar.
      TypeError: ``all_finite`` is not boolean, or a leaf of ``updates`` is not floating
        point (NaN cannot be represented).
    """
    all_finite = jnp.asarray(all_finite)
    if all_finite.shape != ():
        raise ValueError(f"`all_finite` must be a scalar bool, got shape {all_finite.shape}.")
    if all_finite.dtype != jnp.bool_:
        raise TypeError(f"`all_finite` must be a bool, got dtype {all_finite.dtype}.")

    def flag(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(f"every leaf of `updates` must be floating point, got a leaf of "
                            f"dtype {x.dtype} with shape {x.shape}.")
        return jnp.where(all_finite, x, jnp.asarray(jnp.nan, x.dtype))

    return jax.tree_util.tree_map(flag, updates)


# --- The whole step: parameters, optimizer state and method state ------------------------------

def _leaf_finite(x) -> jax.Array:
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.ones((), jnp.bool_)


def _tree_finite(tree: PyTree) -> jax.Array:
    ok = jnp.ones((), jnp.bool_)
    for leaf in jax.tree_util.tree_leaves(tree):
        ok = ok & _leaf_finite(leaf)
    return ok


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` if ``ok`` else ``old``, bit for bit (a select, no arithmetic; PRNG keys too)."""
    if isinstance(new, jax.Array) and jnp.issubdtype(new.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(
            lax.select(ok, jax.random.key_data(new), jax.random.key_data(old)),
            impl=jax.random.key_impl(new))
    new, old = jnp.asarray(new), jnp.asarray(old)
    return lax.select(jnp.broadcast_to(ok, new.shape), new, old)


def _check_same_carry(new: PyTree, old: PyTree) -> None:
    new_def: Any = jax.tree_util.tree_structure(new)
    old_def: Any = jax.tree_util.tree_structure(old)
    if new_def != old_def:
        raise ValueError("skip_nonfinite: `train_fn` must return a carry with the structure of "
                         f"its input carry; got {new_def} for an input {old_def}.")
    paths = jax.tree_util.tree_flatten_with_path(old)[0]
    for (path, o), n in zip(paths, jax.tree_util.tree_leaves(new)):
        if jnp.shape(n) != jnp.shape(o) or jnp.result_type(n) != jnp.result_type(o):
            raise ValueError(
                f"skip_nonfinite: carry leaf {jax.tree_util.keystr(path) or '(root)'} changes from "
                f"{jnp.result_type(o)}{list(jnp.shape(o))} to {jnp.result_type(n)}{list(jnp.shape(n))}; "
                "`train_fn` must keep every leaf's shape and dtype (as a jitted loop carry does).")


def skip_nonfinite(train_fn: Callable[..., tuple[PyTree, Any]], *, check_carry: bool = True
                   ) -> Callable[..., tuple[PyTree, Any, jax.Array]]:
    """Makes a whole training step atomic: a non-finite step leaves *everything* as it was.

    ``train_fn(carry, *args, **kwargs) -> (new_carry, aux)`` is one training step whose
    ``carry`` is everything that persists between steps: parameters, optimizer state and the
    method state (PCGrad's step counter, DWA's loss history, FAMO's logits and their Adam
    moments, GradNorm's weights, ...). The wrapped function returns
    ``(carry_out, aux, finite)`` with

    .. math::

       \\text{finite} = \\texttt{aux.all\\_finite} \\wedge \\bigwedge_{\\ell \\in
       \\text{new\\_carry}} \\text{isfinite}(\\ell),
       \\qquad \\text{carry\\_out} = \\begin{cases} \\text{new\\_carry} & \\text{finite} \\\\
       \\text{carry} & \\text{otherwise} \\end{cases}

    leaf by leaf with a select, so a skipped step returns the input carry **bit for bit** and
    ``good, BAD, good`` gives exactly the carry of ``good, good``: a skipped batch is as if it
    was never seen. This covers what :func:`safe_optimizer` cannot: the method state
    returned by :func:`imtl_jax.mtl_step` (which would otherwise advance on a NaN step, e.g.
    PCGrad's counter, or DWA/FAMO/GradNorm when the losses are finite but a gradient is not),
    a ``-0.0`` parameter (``-0.0 + 0.0`` is ``+0.0`` under a zero update) and anything else
    the caller carries. Unlike :func:`safe_optimizer` it never gives up: count the skips
    yourself from ``finite`` and stop a run that skips too often.

    ``aux.all_finite`` is used when ``aux`` has it (a :class:`imtl_jax.StepAux`, or any
    object/dict with an ``all_finite`` entry); otherwise only the new carry is checked. With
    ``check_carry=True`` (default) every floating-point leaf of the new carry must be finite
    as well (an overflow in the optimizer's update shows there), integer and key leaves are
    not checked. Jittable; the cost is one ``isfinite`` reduction and one select per leaf.

    Args:
      train_fn: ``train_fn(carry, *args, **kwargs) -> (new_carry, aux)``; ``new_carry`` must
        have the structure, shapes and dtypes of ``carry``.
      check_carry: also require every floating-point leaf of ``new_carry`` to be finite.

    Returns:
      ``wrapped(carry, *args, **kwargs) -> (carry_out, aux, finite)``, ``finite`` a scalar bool.

    Raises:
      ValueError: (at trace time) ``new_carry`` differs from ``carry`` in structure, shape or
        dtype, or ``aux.all_finite`` is not a scalar bool.
      TypeError: ``train_fn`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp, optax, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), "pcgrad")
      >>> opt = optax.adam(1e-2)
      >>> params = imtl_jax.MTLParams(shared=jnp.ones((3, 4)) / 4, heads=jnp.ones((2, 4)),
      ...                             log_scales=jnp.zeros(2))
      >>> carry = (params, opt.init(params), step.init(params))
      >>> @jax.jit
      ... @imtl_jax.skip_nonfinite
      ... def train(carry, batch):
      ...     params, opt_state, method_state = carry
      ...     grads, method_state, aux = step(params, method_state, batch)
      ...     updates, opt_state = opt.update(grads, opt_state, params)
      ...     return (optax.apply_updates(params, updates), opt_state, method_state), aux
      >>> bad = {"x": jnp.ones((8, 3)), "y": jnp.full((8, 2), jnp.nan)}
      >>> new_carry, aux, finite = train(carry, bad)
      >>> bool(finite), int(new_carry[2].count)  # PCGrad's step counter did not advance
      (False, 0)
      >>> all(bool(jnp.all(a == b)) for a, b in zip(jax.tree_util.tree_leaves(new_carry),
      ...                                            jax.tree_util.tree_leaves(carry)))
      True
    """
    if not callable(train_fn):
        raise TypeError(f"`train_fn` must be callable (carry, ...) -> (new_carry, aux), got {train_fn!r}.")

    @functools.wraps(train_fn)
    def wrapped(carry, *args, **kwargs):
        out = train_fn(carry, *args, **kwargs)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("skip_nonfinite: `train_fn` must return a pair (new_carry, aux), got "
                             f"{type(out).__name__}"
                             + (f" of length {len(out)}" if isinstance(out, tuple) else "") + ".")
        new_carry, aux = out
        _check_same_carry(new_carry, carry)
        flag = aux.get("all_finite") if isinstance(aux, dict) else getattr(aux, "all_finite", None)
        finite = jnp.ones((), jnp.bool_)
        if flag is not None:
            flag = jnp.asarray(flag)
            if flag.shape != () or flag.dtype != jnp.bool_:
                raise ValueError("skip_nonfinite: `aux.all_finite` must be a scalar bool, got "
                                 f"{flag.dtype}{list(flag.shape)}.")
            finite = finite & flag
        if check_carry:
            finite = finite & _tree_finite(new_carry)
        carry_out = jax.tree_util.tree_map(lambda n, o: _select(finite, n, o), new_carry, carry)
        return carry_out, aux, finite

    return wrapped


class SafeStep:
    """A training step whose non-finite steps keep the method state and flag the gradients.

    Create with :func:`safe_step`; same interface as :class:`imtl_jax.MTLStep`.
    """

    def __init__(self, step):
        if not (callable(step) and hasattr(step, "init")):
            raise TypeError("`step` must be a training step with .init(params) and "
                            "__call__(params, state, batch, ...), e.g. imtl_jax.mtl_step(...); "
                            f"got {step!r}.")
        self.step = step

    def init(self, params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        """The wrapped step's initial method state (the arguments of its ``init``, e.g. an
        example batch for ``"excess_mtl"``)."""
        return self.step.init(params, *args, **kwargs)

    def __call__(self, params: PyTree, state: PyTree, batch: Any, **kwargs):
        grads, new_state, aux = self.step(params, state, batch, **kwargs)
        ok = aux.all_finite
        new_state = jax.tree_util.tree_map(lambda n, o: _select(ok, n, o), new_state, state)
        return flag_nonfinite(grads, ok), new_state, aux

    def __getattr__(self, name):  # method, encoder, task_losses, ... of the wrapped step
        if name == "step":
            raise AttributeError(name)
        return getattr(self.step, name)

    def __repr__(self) -> str:
        return f"safe_step({self.step!r})"


def safe_step(step) -> SafeStep:
    """Wraps an :func:`imtl_jax.mtl_step` step for use with :func:`safe_optimizer`.

    ``safe_step(step)(params, state, batch, **kw)`` returns ``(grads, new_state, aux)`` like
    ``step``, except that when ``aux.all_finite`` is False (a NaN/inf loss, weight or gradient)

    * ``new_state`` is the input method ``state``, bit for bit (PCGrad's counter, DWA's loss
      history, FAMO's logits, GradNorm's weights do not advance), and
    * every gradient is NaN (:func:`flag_nonfinite`), so that :func:`safe_optimizer` skips the
      update and counts it, even when the gradients alone were finite (a NaN loss constant).

    Together, ``safe_step`` + ``safe_optimizer`` leave the method state and the optimizer
    state as they were and the parameters unchanged (``p + 0``: a ``-0.0`` parameter becomes
    ``+0.0``). Within optax's semantics, after ``max_consecutive_errors`` skips in a row the
    optimizer applies the (NaN) update. For the exact guarantee on the whole carry use
    :func:`skip_nonfinite`, which is what the experiment runner does.

    Example:
      >>> import jax, jax.numpy as jnp, optax, imtl_jax
      >>> def encoder(w, batch): return jnp.tanh(batch["x"] @ w)
      >>> def head_loss(v_t, z, batch, t): return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)
      >>> step = imtl_jax.safe_step(imtl_jax.mtl_step(
      ...     encoder, imtl_jax.stacked_task_losses(head_loss), "dwa"))
      >>> opt = imtl_jax.safe_optimizer(optax.adam(1e-2))
      >>> params = imtl_jax.MTLParams(shared=jnp.ones((3, 4)) / 4, heads=jnp.ones((2, 4)),
      ...                             log_scales=jnp.zeros(2))
      >>> opt_state, state = opt.init(params), step.init(params)
      >>> bad = {"x": jnp.ones((8, 3)), "y": jnp.full((8, 2), jnp.nan)}
      >>> grads, new_state, aux = step(params, state, bad)
      >>> int(new_state.count), bool(aux.all_finite)  # DWA's history did not advance
      (0, False)
      >>> _, opt_state = opt.update(grads, opt_state, params)
      >>> int(imtl_jax.skipped_steps(opt_state)["total_notfinite"])
      1

    Raises:
      TypeError: ``step`` has no ``init`` or is not callable.
    """
    return SafeStep(step)
