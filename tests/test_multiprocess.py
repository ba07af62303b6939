"""Multi-process data parallelism: 2 processes x 4 CPU devices on 127.0.0.1 with
``jax.distributed``, against 1 process x 8 CPU devices (slow: CI's second step).

Each process runs the multi-host recipe of ``docs/distributed.md`` (the Python block after the
``<!-- multiprocess-recipe -->`` marker, executed as written) with ``JAX_COORDINATOR``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, then one training step of ``imtl_h``,
``imtl_g_exact`` (both routes: the flattened matrix and the Gramian) and ``equal``, both under
``jax.jit`` with a sharded batch and under ``shard_map`` with ``axis_name``. The reference runs
the same recipe in one process with 8 devices. All traffic stays on loopback: coordinator and its
bind address 127.0.0.1, cluster auto-detection off, gloo bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("imtl_h", "imtl_g_exact", "imtl_g_exact:gramian", "equal")
NUM_TASKS, BATCH, IN_FEATURES, HIDDEN, FEATURES, OUT = 3, 64, 12, 32, 16, 4
TOTAL_DEVICES = 8
RTOL = 1e-6
MARKER = "<!-- multiprocess-recipe -->"


def recipe() -> str:
    """The Python block that follows the marker in docs/distributed.md."""
    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    after = text[text.index(MARKER):]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "no python block after the multiprocess-recipe marker"
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# The worker: one process of the run (device count from XLA_FLAGS), prints one JSON line.


def _worker() -> dict:
    namespace: dict = {}
    exec(compile(recipe(), "docs/distributed.md:multiprocess-recipe", "exec"), namespace)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import imtl_jax
    from imtl_jax import _exact

    mesh, replicate, global_batch = namespace["mesh"], namespace["replicate"], namespace["global_batch"]
    assert jax.device_count() == TOTAL_DEVICES, jax.devices()
    rng = np.random.default_rng(0)  # the same values in every process
    shared = {"w1": rng.standard_normal((IN_FEATURES, HIDDEN), np.float32) / 4,
              "w2": rng.standard_normal((HIDDEN, FEATURES), np.float32) / 6}
    heads = {"w": rng.standard_normal((NUM_TASKS, FEATURES, OUT), np.float32) / 4,
             "b": np.zeros((NUM_TASKS, OUT), np.float32)}
    params = imtl_jax.MTLParams(shared, heads, np.array([0.3, -0.2, 0.1], np.float32))
    full = {"x": rng.standard_normal((BATCH, IN_FEATURES), np.float32),
            "y": rng.standard_normal((BATCH, NUM_TASKS, OUT), np.float32)}
    # This process's examples: the rows of its devices' shards of the global batch.
    rows = BATCH // jax.process_count()
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in full.items()}
    batch = global_batch(local)

    def encoder(p, b):
        return jnp.tanh(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"])

    def head_loss(h, z, b, t):
        return jnp.mean((z @ h["w"] + h["b"] - b["y"][:, t]) ** 2)

    losses = imtl_jax.stacked_task_losses(head_loss)
    opt = optax.sgd(1.0)  # update = -grads

    def make_train(step):
        def train(params, opt_state, mstate, batch):
            grads, mstate, aux = step(params, mstate, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return updates, aux.weights
        return train

    default_min_size = _exact._GRAMIAN_MIN_SIZE
    out = {"processes": jax.process_count(), "local_devices": jax.local_device_count()}
    for name in METHODS:
        method, _, route = name.partition(":")
        _exact._GRAMIAN_MIN_SIZE = 0 if route == "gramian" else default_min_size
        step = imtl_jax.mtl_step(encoder, losses, method)
        step_dp = imtl_jax.mtl_step(encoder, losses, method, axis_name="data")
        args = (*replicate((params, opt.init(params), step.init(params))), batch)
        runs = {"jit": jax.jit(make_train(step)),
                "shard_map": jax.jit(jax.shard_map(make_train(step_dp), mesh=mesh,
                                                   in_specs=(P(), P(), P(), P("data")), out_specs=P()))}
        for mode, fn in runs.items():
            got = fn(*args)
            leaves = jax.tree_util.tree_leaves(got)
            assert all(x.sharding.is_fully_replicated for x in leaves)
            out[f"{name}/{mode}"] = [np.asarray(x.addressable_data(0), np.float64).ravel().tolist()
                                     for x in leaves]
    return out


# ------------------------------------------------------------------------------------------------
# The test (main process).


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, devices: int, port: int, out_dir: Path) -> list:
    """Starts the processes; each writes to its own files (a pipe left unread while waiting for
    another process would fill up and block the writer before jax's shutdown barrier)."""
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS=(env.get("XLA_FLAGS", "") +
                              f" --xla_force_host_platform_device_count={devices}").strip())
        out = out_dir / f"{num_processes}x{devices}_{pid}.out"
        err = out_dir / f"{num_processes}x{devices}_{pid}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env, cwd=ROOT,
                                    stdout=fo, stderr=fe)
        procs.append((proc, out, err))
    return procs


def _collect(procs) -> list[dict]:
    results = []
    try:
        for proc, out, err in procs:
            proc.wait(timeout=900)
            assert proc.returncode == 0, f"worker failed:\n{err.read_text()[-4000:]}"
            results.append(json.loads(out.read_text().strip().splitlines()[-1]))
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def _rel_error(got, want) -> float:
    import numpy as np

    worst = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        den = np.linalg.norm(b)
        worst = max(worst, float(np.linalg.norm(a - b) / den if den > 0 else np.linalg.norm(a)))
    return worst


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    reference = _collect(_launch(1, TOTAL_DEVICES, _free_port(), tmp_path))[0]
    workers = _collect(_launch(2, TOTAL_DEVICES // 2, _free_port(), tmp_path))
    assert reference["processes"] == 1 and reference["local_devices"] == TOTAL_DEVICES
    assert [w["processes"] for w in workers] == [2, 2]
    assert [w["local_devices"] for w in workers] == [TOTAL_DEVICES // 2] * 2
    worst = 0.0
    for method in METHODS:
        for mode in ("jit", "shard_map"):
            key = f"{method}/{mode}"
            assert any(any(v != 0 for v in leaf) for leaf in reference[key]), key
            for w in workers:
                err = _rel_error(w[key], reference[key])
                assert err <= RTOL, f"{key}: 2 x 4 devices differ from 1 x 8 by {err:.3g} (relative)"
                worst = max(worst, err)
    print(f"largest relative difference, 2 x 4 devices vs 1 x 8: {worst:.2e}")  # shown with -s


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
