"""Data parallelism: the training step with the batch sharded over 8 (simulated) CPU devices.

The update must equal the single-device update (to float32 round-off of the reordered batch sums,
<= 1e-6 relative) for every method, in the two ways to run it:

* ``jax.jit`` with the batch placed by ``NamedSharding(Mesh(devices, ("data",)), P("data"))``
  and the step built without ``axis_name`` (XLA's SPMD partitioner inserts the all-reduces);
* ``jax.shard_map`` over the same mesh with ``mtl_step(..., axis_name="data")`` (explicit
  ``pmean``), with shard_map's default ``check_vma=True`` (and ``check_vma=False`` for IMTL-H).

The compiled shard_map step must hold exactly the all-reduces we claim: one for the (T, F)
feature-gradient matrix packed with the (T,) raw and scaled losses, i.e. a (T, F + 2) array,
and one (tuple) all-reduce of the gradients; equal weighting needs only the latter. At the
parameter level (``imtl_g_exact``) the first carries the per-task parameter gradients: the
flattened (T, P) matrix for small models, the tuple of (T, ...) leaves on the Gramian route
(``imtl_g_exact:gramian``, forced here by lowering its size threshold), whose over/underflow
branch (a ``lax.cond``, not taken here) holds one more.

XLA's device count is fixed when JAX initializes, so the check runs in a subprocess (this file
with ``--worker``) started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; the rest
of the test suite keeps its single device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

# Each module runs its 8-device programs in one subprocess (a 30-70 s set-up): CI's slow step.
pytestmark = pytest.mark.slow

METHODS = ("imtl_h", "imtl_g", "imtl_g_exact", "imtl_g_exact:gramian", "equal")
NUM_DEVICES = 8
NUM_TASKS, BATCH, IN_FEATURES, HIDDEN, FEATURES, OUT = 3, 64, 12, 32, 16, 4
RTOL = 1e-6
# check_vma=False takes the same code path for every method; one method keeps the test short.
NO_CHECK_VMA_METHODS = ("imtl_h",)


# ------------------------------------------------------------------------------------------------
# The worker: runs with 8 CPU devices, prints one JSON line.


def _worker() -> dict:
    import jax

    if len(jax.devices()) != NUM_DEVICES:
        jax.config.update("jax_num_cpu_devices", NUM_DEVICES)  # if XLA_FLAGS was not honoured
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import imtl_jax

    devices = jax.devices()
    assert len(devices) == NUM_DEVICES, devices
    mesh = Mesh(np.array(devices), ("data",))
    replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    k = jax.random.split(jax.random.key(0), 5)
    shared = {"w1": jax.random.normal(k[0], (IN_FEATURES, HIDDEN)) / 4,
              "w2": jax.random.normal(k[1], (HIDDEN, FEATURES)) / 6}
    heads = {"w": jax.random.normal(k[2], (NUM_TASKS, FEATURES, OUT)) / 4,
             "b": jnp.zeros((NUM_TASKS, OUT))}
    params = imtl_jax.MTLParams(shared, heads, jnp.array([0.3, -0.2, 0.1]))
    batch = {"x": jax.random.normal(k[3], (BATCH, IN_FEATURES)),
             "y": jax.random.normal(k[4], (BATCH, NUM_TASKS, OUT))}

    def encoder(p, b):
        return jnp.tanh(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"])

    def head_loss(h, z, b, t):
        return jnp.mean((z @ h["w"] + h["b"] - b["y"][:, t]) ** 2)

    losses = imtl_jax.stacked_task_losses(head_loss)
    opt = optax.sgd(1.0)  # update = -grads: compares the gradients themselves

    def make_train(step):
        def train(params, opt_state, mstate, batch):
            grads, mstate, aux = step(params, mstate, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return updates, aux.losses, aux.weights
        return train

    def rel_error(got, want) -> float:
        worst = 0.0
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            den = np.linalg.norm(b)
            err = np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)
            worst = max(worst, float(err))
        return worst

    def all_reduces(hlo: str) -> dict:
        """The result shapes of the all-reduce ops in an optimized HLO module: those that always
        run ("main") and those inside the branches of a conditional ("in_branches")."""
        computations, current = {}, None
        for line in hlo.splitlines():
            head = re.match(r"\s*(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
            if head:
                current = head.group(1)
                computations[current] = []
            elif current is not None:
                computations[current].append(line)
        branches = set()
        for lines in computations.values():
            for line in lines:
                m = re.search(r"branch_computations=\{([^}]*)\}", line)
                if m:
                    branches.update(x.strip().lstrip("%") for x in m.group(1).split(","))
                m = re.search(r"true_computation=%(\S+?),\s*false_computation=%(\S+?)[,\s]", line)
                if m:
                    branches.update(m.groups())
        out = {"main": [], "in_branches": []}
        for comp, lines in computations.items():
            for line in lines:
                m = re.search(r"=\s*(.+?)\s+all-reduce(?:-start)?\(", line)
                if m:
                    out["in_branches" if comp in branches else "main"].append(
                        re.sub(r"\{[0-9,]*\}", "", m.group(1)))
        return out

    from imtl_jax import _exact

    results = {}
    default_min_size = _exact._GRAMIAN_MIN_SIZE
    for name in METHODS:
        # "imtl_g_exact:gramian": the exact level's gramian route, taken above a size (large
        # models); forced here for this small model by lowering the threshold while tracing.
        method, _, route = name.partition(":")
        _exact._GRAMIAN_MIN_SIZE = 0 if route == "gramian" else default_min_size
        step = imtl_jax.mtl_step(encoder, losses, method)
        mstate, opt_state = step.init(params), opt.init(params)
        reference = jax.jit(make_train(step))(params, opt_state, mstate, batch)
        ref_norm = float(np.linalg.norm(np.asarray(reference[0].shared["w1"])))
        args = (*jax.device_put((params, opt_state, mstate), replicated),
                jax.device_put(batch, by_example))
        step_dp = imtl_jax.mtl_step(encoder, losses, method, axis_name="data")
        runs = {
            "jit_named_sharding": jax.jit(make_train(step)),
            "shard_map": jax.jit(jax.shard_map(
                make_train(step_dp), mesh=mesh, in_specs=(P(), P(), P(), P("data")),
                out_specs=P())),
        }
        if method in NO_CHECK_VMA_METHODS:
            runs["shard_map_no_check_vma"] = jax.jit(jax.shard_map(
                make_train(step_dp), mesh=mesh, in_specs=(P(), P(), P(), P("data")),
                out_specs=P(), check_vma=False))
        results[name] = {"reference_norm": ref_norm}
        for mode, fn in runs.items():
            try:
                compiled = fn.lower(*args).compile()
                got = compiled(*args)
                results[name][mode] = {
                    "rel_error": rel_error(got, reference), "error": None,
                    "all_reduces": all_reduces(compiled.as_text()),
                    "output_devices": len(got[0].shared["w1"].sharding.device_set)}
            except Exception as e:  # reported by the test, not raised here
                results[name][mode] = {"rel_error": None, "error": f"{type(e).__name__}: {e}"[:600],
                                         "all_reduces": None, "output_devices": None}
    return results


# ------------------------------------------------------------------------------------------------
# The tests (main process, single device).


def _run_worker() -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return json.loads(_run_worker())
    # Under pytest-xdist several workers may need these results: the first one runs the
    # subprocess, the others wait for its file (a directory shared by the workers of one run).
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent
    out = shared / "data_parallel_results.json"
    with open(shared / "data_parallel_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.exists():
                out.write_text(_run_worker())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return json.loads(out.read_text())


def _check(results, method, mode):
    r = results[method][mode]
    assert r["error"] is None, f"{method} / {mode}: {r['error']}"
    assert results[method]["reference_norm"] > 0
    assert r["output_devices"] == NUM_DEVICES  # really ran on the 8-device mesh
    assert r["rel_error"] <= RTOL, (
        f"{method} / {mode}: update differs from the single-device update by "
        f"{r['rel_error']:.3g} (relative)")


@pytest.mark.parametrize("method", METHODS)
def test_jit_named_sharding_matches_single_device(results, method):
    _check(results, method, "jit_named_sharding")


@pytest.mark.parametrize("method", METHODS)
def test_shard_map_matches_single_device(results, method):
    # shard_map's default check_vma=True: differentiating w.r.t. replicated parameters inserts
    # an implicit psum; mtl_step(axis_name=...) must not reduce the gradients twice.
    _check(results, method, "shard_map")


@pytest.mark.parametrize("method", NO_CHECK_VMA_METHODS)
def test_shard_map_no_check_vma_matches_single_device(results, method):
    _check(results, method, "shard_map_no_check_vma")


@pytest.mark.parametrize("method, mode", [(m, "shard_map") for m in METHODS] + [
    (m, "shard_map_no_check_vma") for m in NO_CHECK_VMA_METHODS])
def test_shard_map_all_reduce_count(results, method, mode):
    """Two all-reduces for the gradient methods, one for equal weighting.

    Representation level: one of the packed (T, F + 2) matrix and losses, one of the gradients.
    Exact level: one of the per-task parameter gradients (the flattened (T, P) matrix for small
    models; a tuple of the (T, ...) leaves on the gramian route), one of the gradients; the
    gramian route's over/underflow branch (lax.cond, not run here) holds one more.
    """
    r = results[method][mode]
    assert r["error"] is None, f"{method} / {mode}: {r['error']}"
    shapes, in_branches = r["all_reduces"]["main"], r["all_reduces"]["in_branches"]
    if method == "equal":  # losses only, reduced together with the gradients
        assert len(shapes) == 1 and not in_branches, r["all_reduces"]
        return
    assert len(shapes) == 2, shapes
    if method == "imtl_g_exact:gramian":
        leaves = sorted(["f32[%d,%d,%d]" % (NUM_TASKS, IN_FEATURES, HIDDEN),
                         "f32[%d,%d,%d]" % (NUM_TASKS, HIDDEN, FEATURES)])
        jacobian = [s for s in shapes if s.startswith("(") and
                    sorted(x.strip() for x in s.strip("()").split(", ")) in (
                        leaves, sorted(["f32[%d,%d,%d]" % (NUM_TASKS, HIDDEN, IN_FEATURES),
                                        "f32[%d,%d,%d]" % (NUM_TASKS, FEATURES, HIDDEN)]))]
        assert len(jacobian) == 1, shapes
        assert len(in_branches) == 1, in_branches
        return
    assert not in_branches, in_branches
    if method == "imtl_g_exact":  # parameter level: the (T, #shared parameters) matrix
        packed = f"f32[{NUM_TASKS},{IN_FEATURES * HIDDEN + HIDDEN * FEATURES}]"
    else:
        packed = f"f32[{NUM_TASKS},{FEATURES + 2}]"
    assert shapes.count(packed) == 1, (packed, shapes)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
