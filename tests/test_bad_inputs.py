"""Bad inputs raise at trace time, naming the argument and the shapes seen (issue 7).

Every call below gets only ``jax.ShapeDtypeStruct`` placeholders (through ``jax.eval_shape``, or
``jax.jit(f).lower`` for a few), so no concrete value exists: the errors come from static
shape/dtype checks during tracing, i.e. before anything is compiled or run.

Every check listed here is made by the library (the missing ones found while writing this file
were added: T >= 1, scalar per-task losses, dtype of `losses=` and of stacked `updates`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import imtl_jax

S = jax.ShapeDtypeStruct
F32, I32, C64 = jnp.float32, jnp.int32, jnp.complex64
B, DIN, F = 8, 3, 4


def at_trace_time(fn, *args, **kwargs):
    """Traces ``fn`` on abstract arguments only (ShapeDtypeStruct leaves)."""
    return jax.eval_shape(lambda *a: fn(*a, **kwargs), *args)


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: S(jnp.shape(x), jnp.result_type(x)), tree)


# --- imtl_g_weights / imtl_g_solve ---------------------------------------------------------

GRADS_CASES = [
    (S((3,), F32), ValueError, r"`grads` must be a rank-2 array, got shape \(3,\)"),
    (S((2, 3, 4), F32), ValueError, r"`grads` must be a rank-2 array, got shape \(2, 3, 4\)"),
    (S((0, 3), F32), ValueError, r"`grads` must be \(T, D\) with T >= 1 and D >= 1, got shape \(0, 3\)"),
    (S((3, 0), F32), ValueError, r"`grads`.*T >= 1 and D >= 1, got shape \(3, 0\)"),
    (S((2, 3), I32), TypeError, r"`grads` must have a real floating-point dtype.*int32.*\(2, 3\)"),
    (S((2, 3), C64), TypeError, r"`grads`.*floating-point.*complex64.*\(2, 3\)"),
    (S((2, 3), jnp.bool_), TypeError, r"`grads`.*floating-point.*bool.*\(2, 3\)"),
]


@pytest.mark.parametrize("fn", [imtl_jax.imtl_g_weights, imtl_jax.imtl_g_solve])
@pytest.mark.parametrize("grads,exc,match", GRADS_CASES)
def test_imtl_g_bad_grads(fn, grads, exc, match):
    with pytest.raises(exc, match=match):
        at_trace_time(fn, grads)


@pytest.mark.parametrize("priorities,exc,match", [
    (S((3,), F32), ValueError,
     r"`priorities` must have shape \(2,\) to match `grads` with shape \(2, 5\), got shape \(3,\)"),
    (S((2, 1), F32), ValueError, r"`priorities`.*\(2,\).*\(2, 5\).*got shape \(2, 1\)"),
    (S((), F32), ValueError, r"`priorities`.*\(2,\).*\(2, 5\).*got shape \(\)"),
    (S((2,), I32), TypeError, r"`priorities`.*floating-point.*int32.*\(2,\)"),
])
def test_imtl_g_bad_priorities(priorities, exc, match):
    with pytest.raises(exc, match=match):
        at_trace_time(lambda g, p: imtl_jax.imtl_g_weights(g, priorities=p), S((2, 5), F32), priorities)


def test_imtl_g_errors_also_from_jit_lower():
    with pytest.raises(ValueError, match=r"`grads`.*rank-2.*\(4,\)"):
        jax.jit(imtl_jax.imtl_g_weights).lower(S((4,), F32))
    with pytest.raises(TypeError, match=r"`grads`.*int32"):
        jax.jit(imtl_jax.imtl_g_solve).lower(S((2, 2), I32))


# --- scale_losses --------------------------------------------------------------------------

@pytest.mark.parametrize("losses,log_scales,exc,match", [
    (S((2, 1), F32), S((2,), F32), ValueError, r"`losses` must be a rank-1 array, got shape \(2, 1\)"),
    (S((), F32), S((), F32), ValueError, r"`losses` must be a rank-1 array, got shape \(\)"),
    (S((2,), F32), S((2, 1), F32), ValueError, r"`log_scales` must be a rank-1 array, got shape \(2, 1\)"),
    (S((2,), F32), S((3,), F32), ValueError,
     r"`losses` has shape \(2,\) but `log_scales` has shape \(3,\)"),
    (S((2,), I32), S((2,), F32), TypeError, r"`losses`.*floating-point.*int32.*\(2,\)"),
    (S((2,), F32), S((2,), I32), TypeError, r"`log_scales`.*floating-point.*int32.*\(2,\)"),
    (S((2,), C64), S((2,), F32), TypeError, r"`losses`.*floating-point.*complex64"),
])
def test_scale_losses_bad_inputs(losses, log_scales, exc, match):
    with pytest.raises(exc, match=match):
        at_trace_time(imtl_jax.scale_losses, losses, log_scales)
    with pytest.raises(exc, match=match):
        jax.jit(imtl_jax.scale_losses).lower(losses, log_scales)


def test_scale_losses_empty_task_axis():
    with pytest.raises(ValueError, match=r"`losses`.*\(0,\)"):
        at_trace_time(imtl_jax.scale_losses, S((0,), F32), S((0,), F32))


# --- mtl_step ------------------------------------------------------------------------------

def encoder(w, batch):
    return jnp.tanh(batch["x"] @ w)


def head_loss(v_t, z, batch, t):
    return jnp.mean((z @ v_t - batch["y"][:, t]) ** 2)


def all_losses(v, z, batch):  # the generic form: (T,) from all heads
    return jnp.mean((z @ v.T - batch["y"]) ** 2, axis=0)


def loss0(v, z, batch):
    return jnp.mean((z @ v - batch["y"][:, 0]) ** 2)


def loss1(v, z, batch):
    return jnp.mean((z @ v - batch["y"][:, 1]) ** 2)


def params(shared=S((DIN, F), F32), heads=S((2, F), F32), log_scales=S((2,), F32)):  # noqa: B008 (immutable specs)
    return imtl_jax.MTLParams(shared=shared, heads=heads, log_scales=log_scales)


BATCH = {"x": S((B, DIN), F32), "y": S((B, 2), F32)}
STEP_METHODS = ["imtl_h", "imtl_g", "equal", "imtl_g_exact"]


def run_step(step, p, batch=BATCH, **kwargs):
    return at_trace_time(lambda p_, b_: step(p_, (), b_, **kwargs), p, batch)


def test_valid_abstract_inputs_trace():
    """The placeholders themselves are fine: every error below is about the bad argument."""
    for method in STEP_METHODS:
        for losses, heads in [(imtl_jax.stacked_task_losses(head_loss), S((2, F), F32)),
                              ((loss0, loss1), (S((F,), F32), S((F,), F32))),
                              (all_losses, S((2, F), F32))]:
            grads, _, aux = run_step(imtl_jax.mtl_step(encoder, losses, method), params(heads=heads))
            assert grads.log_scales.shape == (2,) and aux.weights.shape == (2,)


@pytest.mark.parametrize("method", STEP_METHODS)
@pytest.mark.parametrize("log_scales,exc,match", [
    (S((2, 1), F32), ValueError, r"`params.log_scales` must be a rank-1 array, got shape \(2, 1\)"),
    (S((), F32), ValueError, r"`params.log_scales` must be a rank-1 array, got shape \(\)"),
    (S((2,), I32), TypeError, r"`params.log_scales`.*floating-point.*int32.*\(2,\)"),
    (S((2,), C64), TypeError, r"`params.log_scales`.*floating-point.*complex64"),
])
def test_step_bad_log_scales(method, log_scales, exc, match):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(exc, match=match):
        run_step(step, params(log_scales=log_scales))


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_stacked_heads_vs_log_scales(method):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(ValueError, match=r"`params.heads` is stacked over 2 tasks but "
                                         r"`params.log_scales` has shape \(3,\)"):
        run_step(step, params(log_scales=S((3,), F32)))
    with pytest.raises(ValueError, match=r"`params.heads` is stacked over 3 tasks but "
                                         r"`params.log_scales` has shape \(2,\)"):
        run_step(step, params(heads=S((3, F), F32)))
    with pytest.raises(ValueError, match=r"same leading task axis T.*\['2', '3'\]"):
        run_step(step, params(heads={"w": S((2, F), F32), "b": S((3,), F32)}))
    with pytest.raises(ValueError, match=r"same leading task axis T.*\['2', 'None'\]"):
        run_step(step, params(heads={"w": S((2, F), F32), "b": S((), F32)}))
    with pytest.raises(ValueError, match=r"`params.heads` is stacked over 2 tasks.*\(3,\)"):
        jax.jit(lambda p, b: step(p, (), b)).lower(params(log_scales=S((3,), F32)), BATCH)


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_tuple_heads(method):
    step = imtl_jax.mtl_step(encoder, (loss0, loss1), method)
    two = (S((F,), F32), S((F,), F32))
    with pytest.raises(ValueError, match=r"`task_losses` has 2 functions but `params.heads` has 3 "
                                         r"entries"):
        run_step(step, params(heads=two + (S((F,), F32),)))
    with pytest.raises(ValueError, match=r"`task_losses` has 2 functions but `params.heads` has "
                                         r"(\w+ entries|a single array of shape \(2, 4\))"):
        run_step(step, params(heads=S((2, F), F32)))  # stacked array instead of a tuple
    with pytest.raises(ValueError, match=r"`task_losses` has 2 functions but `params.log_scales` "
                                         r"has shape \(3,\)"):
        run_step(step, params(heads=two, log_scales=S((3,), F32)))


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_generic_task_losses_output(method):
    step = imtl_jax.mtl_step(encoder, all_losses, method)
    with pytest.raises(ValueError, match=r"shape \(2,\) but `params.log_scales` has shape \(3,\)"):
        run_step(step, params(log_scales=S((3,), F32)))
    rank2 = imtl_jax.mtl_step(encoder, lambda v, z, b: all_losses(v, z, b)[:, None], method)
    with pytest.raises(ValueError, match=r"task.losses.*must be a rank-1 array, got shape \(2, 1\)"):
        run_step(rank2, params())
    ints = imtl_jax.mtl_step(encoder, lambda v, z, b: jnp.ones(2, I32), method)
    with pytest.raises(TypeError, match=r"task.losses.*floating-point.*int32.*\(2,\)"):
        run_step(ints, params())
    cplx = imtl_jax.mtl_step(encoder, lambda v, z, b: all_losses(v, z, b).astype(C64), method)
    with pytest.raises(TypeError, match=r"task.losses.*floating-point.*complex64"):
        run_step(cplx, params())


@pytest.mark.parametrize("method", STEP_METHODS)
def test_step_encoder_output_and_batch(method):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    empty = {"x": S((0, DIN), F32), "y": S((0, 2), F32)}
    with pytest.raises(ValueError, match=r"non-empty leading batch axis, got shape \(0, 4\)"):
        run_step(step, params(), empty)
    scalar = imtl_jax.mtl_step(lambda w, b: jnp.sum(w), imtl_jax.stacked_task_losses(head_loss),
                               method)
    with pytest.raises(ValueError, match=r"`encoder` output.*batch axis, got shape \(\)"):
        run_step(scalar, params())
    ints = imtl_jax.mtl_step(lambda w, b: jnp.ones((B, F), I32),
                             imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(TypeError, match=r"`encoder\(\.\.\.\) output`.*floating-point.*int32.*\(8, 4\)"):
        run_step(ints, params())
    with pytest.raises(TypeError, match=r"`params` must be an imtl_jax.MTLParams.*got tuple"):
        run_step(step, tuple(params()))


@pytest.mark.parametrize("method", ["imtl_h", "imtl_g", "imtl_g_exact"])
def test_step_bad_priorities(method):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(ValueError, match=r"`priorities` must have shape \(2,\).*got shape \(3,\)"):
        at_trace_time(lambda p, b, pr: step(p, (), b, priorities=pr), params(), BATCH, S((3,), F32))
    with pytest.raises(TypeError, match=r"`priorities`.*int32"):
        at_trace_time(lambda p, b, pr: step(p, (), b, priorities=pr), params(), BATCH, S((2,), I32))


@pytest.mark.parametrize("method", ["imtl_h", "imtl_g", "equal"])
def test_step_zero_tasks(method):
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(ValueError, match=r"`params.log_scales`.*\(0,\)"):
        run_step(step, params(heads=S((0, F), F32), log_scales=S((0,), F32)))


@pytest.mark.parametrize("method", ["imtl_h", "imtl_g", "equal"])
@pytest.mark.parametrize("form", ["stacked", "tuple"])
def test_step_per_task_loss_not_scalar(method, form):
    if form == "stacked":
        losses = imtl_jax.stacked_task_losses(lambda v, z, b, t: (z @ v - b["y"][:, t]) ** 2)
        heads = S((2, F), F32)
    else:
        losses = (lambda v, z, b: (z @ v - b["y"][:, 0]) ** 2, loss1)
        heads = (S((F,), F32), S((F,), F32))
    step = imtl_jax.mtl_step(encoder, losses, method)
    with pytest.raises(ValueError, match=r"task loss.*scalar|task loss.*rank-0.*\(8,\)"):
        run_step(step, params(heads=heads))


# --- list/tuple arrays, and targets for every task (issue 14) ----------------------------------

@pytest.mark.parametrize("method", ["imtl_h", "equal", "dwa"])
@pytest.mark.parametrize("container", [list, tuple])
def test_step_log_scales_as_python_sequence(method, container):
    """A list used to pass validation and fail later with AttributeError: 'list' ... 'shape'."""
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    p = imtl_jax.MTLParams(shared=jnp.zeros((DIN, F)), heads=jnp.zeros((2, F)),
                           log_scales=container([0.0, 0.0]))
    match = rf"`params.log_scales` must be an array.*Python {container.__name__} of length 2.*jnp.asarray"
    with pytest.raises(TypeError, match=match):
        step.init(p)
    with pytest.raises(TypeError, match=match):
        step(p, (), {"x": jnp.zeros((B, DIN)), "y": jnp.zeros((B, 2))})


THREE = dict(heads=S((3, F), F32), log_scales=S((3,), F32))


def run_full(step, p, batch=BATCH):
    """Like run_step, with the method's own initial state (DWA has one)."""
    return at_trace_time(lambda p_, b_: step(p_, step.init(p_), b_), p, batch)
FEW_TARGETS = r"the loss of task 2 reads index 2 of axis 1 of batch\['y'\] \(shape \(8, 2\)\), which has 2 entries"


@pytest.mark.parametrize("method", ["imtl_h", "imtl_g", "equal", "dwa", "imtl_g_exact"])
def test_step_batch_without_targets_for_every_task(method):
    """3 tasks, 2 target columns: JAX clamps y[:, 2] to y[:, 1] silently, so task 2 would train
    on task 1's targets. The step refuses at trace time (jit lowering included)."""
    step = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(head_loss), method)
    with pytest.raises(ValueError, match=FEW_TARGETS + r".*targets for all 3 tasks"):
        run_full(step, params(**THREE))
    with pytest.raises(ValueError, match=FEW_TARGETS):
        jax.jit(lambda p, b: step(p, step.init(p), b)).lower(params(**THREE), BATCH)
    # take() (a gather that would fill with NaN) and index arithmetic are folded too
    taken = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(
        lambda v, z, b, t: jnp.mean((z @ v - jnp.take(b["y"], 2 * t, axis=1)) ** 2)), method)
    with pytest.raises(ValueError, match=r"task 2 reads index 4 of axis 1 of batch\['y'\]"):
        run_full(taken, params(**THREE), {"x": S((B, DIN), F32), "y": S((B, 4), F32)})
    run_full(taken, params(**THREE), {"x": S((B, DIN), F32), "y": S((B, 5), F32)})
    # enough targets (or more), and losses that use t without indexing, trace fine
    run_full(step, params(**THREE), {"x": S((B, DIN), F32), "y": S((B, 3), F32)})
    run_full(step, params(), {"x": S((B, DIN), F32), "y": S((B, 5), F32), "n": S((), I32)})
    one_hot = imtl_jax.mtl_step(encoder, imtl_jax.stacked_task_losses(
        lambda v, z, b, t: jnp.mean((z @ v - b["y"] @ jax.nn.one_hot(t, 2)) ** 2)), method)
    run_full(one_hot, params())


@pytest.mark.parametrize("method", ["imtl_h", "equal"])
def test_step_tuple_losses_reading_a_missing_column(method):
    step = imtl_jax.mtl_step(encoder, (loss0, loss1), method)
    two = (S((F,), F32), S((F,), F32))
    with pytest.raises(ValueError, match=r"task_losses\[1\]: the loss of task 1 reads index 1 of axis 1 "
                                         r"of batch\['y'\] \(shape \(8, 1\)\), which has 1 entry"):
        run_full(step, params(heads=two), {"x": S((B, DIN), F32), "y": S((B, 1), F32)})


# --- optax aggregators: aggregate / imtl_g -------------------------------------------------

AGG_PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(())}
GOOD_UPDATES = {"w": S((2, 3), F32), "b": S((2,), F32)}


def aggregators():
    return [("imtl_g", imtl_jax.imtl_g(2)), ("aggregate_imtl_h", imtl_jax.aggregate("imtl_h", 2)),
            ("aggregate_equal", imtl_jax.aggregate("equal", 2))]


def run_update(tx, updates, **kwargs):
    state = abstract(tx.init(AGG_PARAMS))
    kwargs.setdefault("losses", S((2,), F32))
    kwargs.setdefault("log_scales", S((2,), F32))  # imtl_h's loss scaling needs its log-scales
    names = sorted(kwargs)
    return jax.eval_shape(lambda u, s, *extra: tx.update(u, s, None, **dict(zip(names, extra))),
                          updates, state, *(kwargs[n] for n in names))


@pytest.mark.parametrize("name,tx", aggregators())
def test_aggregator_valid_abstract_inputs(name, tx):
    out, _ = run_update(tx, GOOD_UPDATES)
    assert out["w"].shape == (3,) and out["b"].shape == ()


@pytest.mark.parametrize("name,tx", aggregators())
@pytest.mark.parametrize("updates,shape", [
    ({"w": S((2, 3), F32), "b": S((), F32)}, r"\(\)"),          # a leaf without the task axis
    ({"w": S((3, 3), F32), "b": S((2,), F32)}, r"\(3, 3\)"),    # wrong T on the leading axis
    ({"w": S((3,), F32), "b": S((), F32)}, r"\(\)"),            # unstacked updates
])
def test_aggregator_leaf_without_task_axis(name, tx, updates, shape):
    with pytest.raises(ValueError, match=r"every leaf of `updates` must have the task axis T=2 "
                                         r"first.*found a leaf of shape " + shape):
        run_update(tx, updates)


@pytest.mark.parametrize("name,tx", aggregators())
@pytest.mark.parametrize("losses,got", [(S((3,), F32), r"\(3,\)"), (S((2, 1), F32), r"\(2, 1\)"),
                                        (S((), F32), r"\(\)")])
def test_aggregator_wrong_losses_shape(name, tx, losses, got):
    with pytest.raises(ValueError, match=r"`losses` must have shape \(2,\), got " + got):
        run_update(tx, GOOD_UPDATES, losses=losses)


def test_aggregator_other_errors():
    tx = imtl_jax.imtl_g(2)
    with pytest.raises(ValueError, match=r"`priorities` must have shape \(2,\).*got shape \(3,\)"):
        run_update(tx, GOOD_UPDATES, priorities=S((3,), F32))
    with pytest.raises(TypeError, match=r"int32"):
        run_update(tx, {"w": S((2, 3), I32), "b": S((2,), I32)})
    with pytest.raises(ValueError, match=r"`updates` has no array leaves"):
        run_update(tx, {})
    with pytest.raises(ValueError, match=r"weighting 'equal' weighs losses: pass `losses=` "
                                         r"\(shape \(2,\)\)"):
        jax.eval_shape(lambda u, s: imtl_jax.aggregate("equal", 2).update(u, s, None),
                       GOOD_UPDATES, abstract(imtl_jax.aggregate("equal", 2).init(AGG_PARAMS)))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"`num_tasks` must be a positive int, got " + repr(bad)):
            imtl_jax.imtl_g(bad)
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        imtl_jax.aggregate("no_such_method", 2)
    # Through a chain under jit: still a trace-time error.
    chained = optax.chain(imtl_jax.imtl_g(2), optax.adam(1e-3))
    state = chained.init(AGG_PARAMS)
    with pytest.raises(ValueError, match=r"task axis T=2.*\(3, 3\)"):
        jax.jit(chained.update).lower({"w": S((3, 3), F32), "b": S((2,), F32)}, abstract(state))


@pytest.mark.filterwarnings("ignore:Casting from complex:DeprecationWarning")
@pytest.mark.parametrize("name,tx", aggregators())
@pytest.mark.parametrize("dtype", [I32, C64])
def test_aggregator_losses_dtype(name, tx, dtype):
    with pytest.raises(TypeError, match=r"`losses`.*" + jnp.dtype(dtype).name):
        run_update(tx, GOOD_UPDATES, losses=S((2,), dtype))


@pytest.mark.filterwarnings("ignore:Casting from complex:DeprecationWarning")
@pytest.mark.parametrize("name,tx", aggregators())
@pytest.mark.parametrize("dtype", [I32, C64])
def test_aggregator_updates_dtype(name, tx, dtype):
    with pytest.raises(TypeError, match=r"`updates`.*" + jnp.dtype(dtype).name + r".*shape \((2, 3|2,)\)"):
        run_update(tx, {"w": S((2, 3), dtype), "b": S((2,), dtype)})
