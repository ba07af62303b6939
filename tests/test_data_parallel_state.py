"""Data parallelism with encoder state: a Flax Linen BatchNorm + Dropout encoder on 8 simulated
CPU devices, ``mtl_step(..., has_state=True)``, against one device.

* ``jax.jit`` with the batch sharded by ``NamedSharding`` (no ``axis_name``): BatchNorm's
  statistics are over the global batch and the dropout mask is the single-device mask
  (partitionable threefry), so gradients, new batch statistics and losses equal the
  single-device step's (<= 1e-5 relative, float32 reordered sums).
* ``jax.shard_map`` with ``BatchNorm(axis_name="data")`` (synchronized statistics) and
  ``mtl_step(axis_name="data")``: the same result as one device (no dropout: a shard draws its
  own mask, which no single-device run reproduces).
* ``jax.shard_map`` with per-device BatchNorm: the returned statistics are the device average of
  the per-shard statistics (the documented state reduction), checked against the plain encoder
  run shard by shard on one device.
* each compiled once across two calls.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see
tests/test_data_parallel.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Each module runs its 8-device programs in one subprocess (a 30-70 s set-up): CI's slow step.
pytestmark = pytest.mark.slow

NUM_DEVICES = 8
METHODS = ("imtl_h", "equal", "imtl_g_exact")
T, BATCH, DIN, HIDDEN = 3, 64, 6, 16
RTOL = 1e-5


def _worker() -> dict:
    import jax

    if len(jax.devices()) != NUM_DEVICES:
        jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import imtl_jax
    import imtl_jax.linen

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    class Encoder(nn.Module):
        bn_axis: object = None
        rate: float = 0.0

        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.8, axis_name=self.bn_axis)(nn.Dense(HIDDEN)(x))
            return nn.Dropout(self.rate, deterministic=not train or self.rate == 0.0)(jnp.tanh(x))

    def head_loss(h, z, b, t):
        return jnp.mean((z @ h["w"] + h["b"] - b["y"][:, t]) ** 2)

    k = jax.random.split(jax.random.key(0), 5)
    variables = Encoder().init(k[0], jnp.ones((2, DIN)), train=False)
    params = imtl_jax.MTLParams(variables["params"],
                                {"w": jax.random.normal(k[1], (T, HIDDEN)) / 4, "b": jnp.zeros(T)},
                                jnp.array([0.3, -0.2, 0.1]))
    state = {"batch_stats": variables["batch_stats"]}
    batch = {"x": jax.random.normal(k[2], (BATCH, DIN)), "y": jax.random.normal(k[3], (BATCH, T))}
    key = k[4]
    opt = optax.sgd(1.0)

    def make_train(step):
        def train(params, opt_state, mstate, enc_state, batch, key):
            grads, mstate, enc_state, aux = step(params, mstate, batch, encoder_state=enc_state, key=key)
            updates, opt_state = opt.update(grads, opt_state, params)
            return updates, enc_state, aux.losses, aux.weights
        return train

    def rel_error(got, want) -> float:
        """The worst, over the outputs (updates, state, losses, weights), of ||a - b|| / ||b|| on
        the output's concatenated leaves (per leaf, the Dense bias before BatchNorm, whose exact
        gradient is zero, would compare round-off with round-off)."""
        worst = 0.0
        for g, w in zip(got, want, strict=True):
            a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)])
            b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(w)])
            den = np.linalg.norm(b)
            worst = max(worst, float(np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)))
        return worst

    def build(method, bn_axis, rate, axis_name):
        enc = imtl_jax.linen.encoder(Encoder(bn_axis, rate), train=True)
        return imtl_jax.mtl_step(enc, imtl_jax.stacked_task_losses(head_loss), method, has_state=True,
                                 axis_name=axis_name)

    results: dict = {}
    for method in METHODS:
        out: dict = {}
        base = build(method, None, 0.0, None)
        mstate, opt_state = base.init(params), opt.init(params)
        args = (params, opt_state, mstate, state, batch, key)
        sharded = (*jax.device_put((params, opt_state, mstate, state), replicated),
                   jax.device_put(batch, by_example), key)
        in_specs = (P(), P(), P(), P(), P("data"), P())

        def run(mode, fn, reference, args_=sharded):
            traces = []

            def counted(*a):
                traces.append(1)
                return fn(*a)
            try:
                compiled = jax.jit(counted)
                got = compiled(*args_)
                compiled(*args_)
                out[mode] = {"rel_error": rel_error(got, reference), "traces": len(traces), "error": None,  # noqa: B023 (used within this iteration)
                             "devices": len(jax.tree_util.tree_leaves(got[1])[0].sharding.device_set)}
            except Exception as e:  # reported by the test
                out[mode] = {"error": f"{type(e).__name__}: {e}"[:600]}  # noqa: B023 (used within this iteration)

        # jit + NamedSharding, with dropout: the single-device step with the same key.
        dropout = build(method, None, 0.3, None)
        run("jit_named_sharding", make_train(dropout), jax.jit(make_train(dropout))(*args))
        # shard_map, synchronized BatchNorm, no dropout: the single-device step.
        synced = build(method, "data", 0.0, "data")
        run("shard_map_synced", jax.shard_map(make_train(synced), mesh=mesh, in_specs=in_specs,
                                              out_specs=P()), jax.jit(make_train(base))(*args))
        # shard_map, per-device BatchNorm: the state is the device mean of per-shard states.
        per_device = build(method, None, 0.0, "data")
        enc = imtl_jax.linen.encoder(Encoder(), train=True)
        shards = [jax.tree_util.tree_map(lambda x, i=i: x[i * (BATCH // NUM_DEVICES):(i + 1) * (BATCH // NUM_DEVICES)],
                                         batch) for i in range(NUM_DEVICES)]
        per_shard_states = [enc(params.shared, state, s, None)[1] for s in shards]
        mean_state = jax.tree_util.tree_map(lambda *xs: sum(xs) / NUM_DEVICES, *per_shard_states)
        global_state = jax.jit(make_train(base))(*args)[1]
        traces = []

        def counted(*a):
            traces.append(1)  # noqa: B023 (used within this iteration)
            return jax.shard_map(make_train(per_device), mesh=mesh, in_specs=in_specs,  # noqa: B023 (same)
                                 out_specs=P())(*a)
        try:
            fn = jax.jit(counted)
            got = fn(*sharded)
            fn(*sharded)
            out["shard_map_per_device_state"] = {
                "rel_error": rel_error([got[1]], [mean_state]), "error": None, "traces": len(traces),
                "devices": len(jax.tree_util.tree_leaves(got[1])[0].sharding.device_set),
                # the per-device average must be distinguishable from the global-batch statistics
                "distance_to_global": rel_error([mean_state], [global_state])}
        except Exception as e:
            out["shard_map_per_device_state"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        results[method] = out
    return results


def _run_worker() -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                          text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return json.loads(_run_worker())
    import fcntl  # several xdist workers: the first runs the subprocess, the others read its file

    shared = tmp_path_factory.getbasetemp().parent
    out = shared / "data_parallel_state_results.json"
    with open(shared / "data_parallel_state_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.exists():
                out.write_text(_run_worker())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["jit_named_sharding", "shard_map_synced", "shard_map_per_device_state"])
@pytest.mark.parametrize("method", METHODS)
def test_stateful_step_on_8_devices_matches_one_device(results, method, mode):
    r = results[method][mode]
    assert r["error"] is None, f"{method} / {mode}: {r['error']}"
    assert r["devices"] == NUM_DEVICES
    assert r["traces"] == 1
    assert r["rel_error"] <= RTOL, f"{method} / {mode}: relative error {r['rel_error']:.3g}"
    if mode == "shard_map_per_device_state":  # not vacuous: per-device variances differ from global
        assert r["distance_to_global"] > 1e-3


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
