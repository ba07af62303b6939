"""Trace-time argument checks shared by the whole package.

Every check runs on static shape/dtype information only, so it raises at trace time under
``jax.jit`` and costs nothing at run time. Messages name the argument and the shapes seen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_float_array(x: Any, name: str, ndim: int | None = None) -> jax.Array:
    """Returns ``x`` as a floating-point array, or raises naming ``name``.

    Raises:
      TypeError: integer, boolean or complex dtype.
      ValueError: wrong number of dimensions (when ``ndim`` is given).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating-point dtype (float16/bfloat16/float32/"
            f"float64), got dtype {x.dtype} with shape {x.shape}."
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"`{name}` must be a rank-{ndim} array, got shape {x.shape} (rank {x.ndim})."
        )
    return x


def check_num_tasks(num_tasks: int, what: str, shape: tuple[int, ...], expected_name: str,
                    expected: int) -> None:
    """Raises ValueError when the task axis of ``what`` (shape ``shape``) differs."""
    if num_tasks != expected:
        raise ValueError(
            f"`{what}` has {num_tasks} tasks (shape {shape}) but `{expected_name}` has "
            f"{expected}; the leading axis of both must be the task axis T."
        )


def check_task_vector(x: Any, name: str, num_tasks: int, ref_name: str,
                      ref_shape: tuple[int, ...]) -> jax.Array:
    """Checks ``x`` is a float vector of length ``num_tasks`` (the T of ``ref_name``)."""
    x = check_float_array(x, name)
    if x.shape != (num_tasks,):
        raise ValueError(
            f"`{name}` must have shape ({num_tasks},) to match `{ref_name}` with shape "
            f"{ref_shape}, got shape {x.shape}."
        )
    return x


def check_array(x: Any, name: str) -> None:
    """Raises TypeError naming ``name`` when ``x`` is a Python list/tuple instead of an array.

    Used where the step keeps using the caller's object (a parameter in :class:`MTLParams`): a
    list there would be a pytree of Python scalars, not a (T,) array, and fail later with an
    unrelated ``AttributeError``.
    """
    if isinstance(x, (list, tuple)):
        raise TypeError(
            f"`{name}` must be an array (jax.Array or numpy.ndarray), got a Python "
            f"{type(x).__name__} of length {len(x)}; wrap it, e.g. jnp.asarray({name.split('.')[-1]}, "
            "jnp.float32).")


# --- Does a task's loss read its targets in bounds? ----------------------------------------------
#
# JAX clamps an out-of-bounds index (``y[:, t]`` with ``y`` of shape (B, 1) and t = 1 reads
# column 0) instead of raising, so a batch with fewer target columns than tasks would silently
# train task 1 on task 0's targets. The check below traces the loss once more (no compilation,
# no computation on data: abstract shapes only) with the task index bound to a known value,
# folds the integer index arithmetic that depends on it, and compares every resulting slice or
# gather start with the static shape of the array it reads.

_SMALL = 4096  # largest integer intermediate that is evaluated while folding indices


def _subjaxpr(eqn):
    """(jaxpr, consts) of a call-like equation whose inputs map 1:1 onto the sub-jaxpr's."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
            return sub.jaxpr, list(sub.consts)
        if hasattr(sub, "eqns"):
            return sub, []
    return None, []


def _is_var(v) -> bool:
    return not hasattr(v, "val")  # Literals carry .val


def _fold(jaxpr, consts, known, tainted, origin, problems, depth=0):
    """Walks ``jaxpr`` evaluating small integer computations of known inputs and recording
    out-of-bounds slice/gather starts that depend on a tainted value (the task index) or read a
    batch leaf (``origin``) at a known index."""
    import numpy as np

    for var, c in zip(jaxpr.constvars, consts):
        known[var] = c

    def value(v):
        if not _is_var(v):
            return v.val
        return known.get(v, None)

    for eqn in jaxpr.eqns:
        vals = [value(v) for v in eqn.invars]
        is_tainted = any(_is_var(v) and v in tainted for v in eqn.invars)
        name = eqn.primitive.name
        if name == "dynamic_slice":
            operand, starts = eqn.invars[0], vals[1:]
            src = origin.get(operand) if _is_var(operand) else None
            if all(s is not None for s in starts) and (is_tainted or src is not None):
                shape = operand.aval.shape
                for axis, (s, size) in enumerate(zip(starts, eqn.params["slice_sizes"])):
                    s = int(np.asarray(s))
                    if s < 0 or s + size > shape[axis]:
                        problems.append((src, shape, axis, s, size))
        elif name == "gather":
            operand, idx = eqn.invars[0], vals[1]
            src = origin.get(operand) if _is_var(operand) else None
            if idx is not None and (is_tainted or src is not None):
                dnums, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
                idx = np.asarray(idx).reshape(-1, len(dnums.start_index_map)) if np.size(idx) else None
                shape = operand.aval.shape
                for row in (idx if idx is not None else []):
                    for k, axis in enumerate(dnums.start_index_map):
                        s = int(row[k])
                        if s < 0 or s + sizes[axis] > shape[axis]:
                            problems.append((src, shape, axis, s, sizes[axis]))
        sub, sub_consts = _subjaxpr(eqn)
        if sub is not None and depth < 8 and len(sub.invars) == len(eqn.invars):
            inner_known, inner_tainted, inner_origin = {}, set(), {}
            for outer, inner, val in zip(eqn.invars, sub.invars, vals):
                if val is not None:
                    inner_known[inner] = val
                if _is_var(outer) and outer in tainted:
                    inner_tainted.add(inner)
                if _is_var(outer) and outer in origin:
                    inner_origin[inner] = origin[outer]
            _fold(sub, sub_consts, inner_known, inner_tainted, inner_origin, problems, depth + 1)
            for outer, inner in zip(eqn.outvars, sub.outvars):
                if _is_var(inner) and inner in inner_known:
                    known[outer] = inner_known[inner]
                if _is_var(inner) and inner in inner_tainted:
                    tainted.add(outer)
            continue
        if is_tainted:
            tainted.update(eqn.outvars)
        small_ints = all(
            jnp.issubdtype(o.aval.dtype, jnp.integer) or o.aval.dtype == jnp.bool_
            for o in eqn.outvars if hasattr(o.aval, "dtype")) and all(
            int(np.prod(o.aval.shape)) <= _SMALL for o in eqn.outvars if hasattr(o.aval, "shape"))
        if all(v is not None for v in vals) and small_ints and not eqn.effects and sub is None:
            try:
                with jax.ensure_compile_time_eval():
                    out = eqn.primitive.bind(*vals, **eqn.params)
            except Exception:  # noqa: BLE001 - folding is best effort
                continue
            outs = out if eqn.primitive.multiple_results else [out]
            for o, v in zip(eqn.outvars, outs):
                known[o] = np.asarray(v)


def check_task_reads(loss_fn: Any, head_params: Any, z: Any, batch: Any, *, num_tasks: int,
                     task: Any = None, what: str = "stacked_task_losses") -> None:
    """Raises ValueError when the task loss reads an array out of bounds for task ``T-1``.

    ``loss_fn(head_params, z, batch, t)`` (``task=None``: ``t`` is bound to ``num_tasks - 1``,
    the largest task index) or ``loss_fn(head_params, z, batch)`` (``task`` given: the loss of
    that task, whose indices are constants). Only shapes are used; the loss is traced once more.
    A check that cannot be made (an unusual loss) passes silently: the real step still runs.
    """
    import numpy as np

    def abstract(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    batch_paths, batch_def = jax.tree_util.tree_flatten_with_path(batch)
    array_leaf = [hasattr(x, "shape") and hasattr(x, "dtype") for _, x in batch_paths]
    static = [x for (_, x), a in zip(batch_paths, array_leaf) if not a]
    head_leaves, head_def = jax.tree_util.tree_flatten(head_params)

    def probe(head_leaves_, z_, batch_arrays, *t):
        it, st = iter(batch_arrays), iter(static)
        b = jax.tree_util.tree_unflatten(batch_def, [next(it) if a else next(st) for a in array_leaf])
        h = jax.tree_util.tree_unflatten(head_def, head_leaves_)
        return loss_fn(h, z_, b, *t)

    args: tuple = ([abstract(x) for x in head_leaves], abstract(z),
                   [abstract(x) for (_, x), a in zip(batch_paths, array_leaf) if a])
    if task is None:
        args = args + (jax.ShapeDtypeStruct((), jnp.int32),)
    try:
        closed = jax.make_jaxpr(probe)(*args)
    except IndexError as err:  # e.g. y[:, t] with y of shape (B, 0): no targets at all
        t = num_tasks - 1 if task is None else task
        raise ValueError(
            f"{what}: the loss of task {t} indexes past the end of a batch array ({err}). The batch "
            f"must carry targets for all {num_tasks} tasks of `params.log_scales`; check the batch's "
            "task axis or the index in the loss function.") from None
    except Exception:  # noqa: BLE001 - the real call reports real errors
        return
    jaxpr = closed.jaxpr
    n_head = len(head_leaves)
    batch_vars = jaxpr.invars[n_head + 1: n_head + 1 + len(args[2])]
    array_paths = [p for (p, _), a in zip(batch_paths, array_leaf) if a]
    origin = {v: "batch" + jax.tree_util.keystr(p) for v, p in zip(batch_vars, array_paths)}
    known, tainted = {}, set()
    if task is None:
        known[jaxpr.invars[-1]] = np.asarray(num_tasks - 1, np.int32)
        tainted.add(jaxpr.invars[-1])
    problems: list = []
    _fold(jaxpr, list(closed.consts), known, tainted, origin, problems)
    if problems:
        src, shape, axis, start, size = problems[0]
        t = num_tasks - 1 if task is None else task
        where = f"{src} (shape {tuple(shape)})" if src else f"an array of shape {tuple(shape)}"
        raise ValueError(
            f"{what}: the loss of task {t} reads index {start} of axis {axis} of {where}, which has "
            f"{shape[axis]} {'entry' if shape[axis] == 1 else 'entries'} (JAX would clamp the index "
            f"silently and train task {t} on another task's data). The batch must carry targets for "
            f"all {num_tasks} tasks of `params.log_scales`; check the batch's task axis or the index in "
            "the loss function.")


def check_step_task_reads(task_losses: Any, heads: Any, z: Any, batch: Any, num_tasks: int) -> None:
    """:func:`check_task_reads` for the task losses of :func:`imtl_jax.mtl_step`: the stacked
    form (task index ``T-1``) and the tuple form (each function's constant indices into the
    batch). The generic form (one function of all heads) has no task index to check."""
    loss_fn = getattr(task_losses, "loss_fn", None)
    if loss_fn is not None and num_tasks >= 1:
        head_t = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), heads)
        check_task_reads(loss_fn, head_t, z, batch, num_tasks=num_tasks)
    elif isinstance(task_losses, tuple) and isinstance(heads, (tuple, list)):
        for t, (fn, head) in enumerate(zip(task_losses, heads)):
            check_task_reads(fn, head, z, batch, num_tasks=num_tasks, task=t,
                             what=f"task_losses[{t}]")
