"""Where the time of the exact (parameter-level) IMTL-G step goes, stage by stage.

    python -m benchmarks.exact_profile            # LeNet T=2, CelebA-like MLP T=2 and T=40
    python -m benchmarks.exact_profile --quick    # LeNet T=2 and MLP T=2 only

Each row is one jitted function of (params, batch), timed interleaved with the others of its
model (medians of wall time; the ratio is to the encoder forward + one backward, i.e. EW):

* ``fwd+bwd (EW)``: encoder forward, per-task z-gradients, one encoder VJP with the summed
  cotangent (what equal weighting costs, without heads and optimizer);
* ``jacobian``: the same forward, then the T per-task parameter gradients (vmapped encoder VJP):
  the first half of the physical limit;
* ``jacobian + gram``: plus ``G = sum_leaf J_leaf J_leaf^T``: the physical limit;
* ``jacobian + concat``: plus flattening the leaves into one (T, P) array (the copy the old
  step made);
* ``old: concat + imtl_g_solve``: the generic route, ``imtl_g_solve`` on the (T, P) matrix,
  then ``alpha @ J``;
* ``new: gram + solve + alpha.J``: ``imtl_jax._exact`` (the step's route);
* ``new, extra VJP``: the same weights, the shared gradient by one more encoder VJP with the
  alpha-weighted cotangent instead of contracting alpha with the stored Jacobian.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

import imtl_jax
from imtl_jax import _exact
from benchmarks import _models
from benchmarks.step_cost import time_interleaved


def stages(case: _models.Case) -> dict:
    T = case.num_tasks

    def forward(params, batch):
        z, vjp = jax.vjp(lambda sp: case.encoder(sp, batch), params.shared)
        gz = jax.vmap(lambda h, t: jax.grad(case.head_loss, argnums=1)(h, z, batch, t))(
            params.heads, jnp.arange(T))
        return vjp, gz

    def ew(params, batch):
        vjp, gz = forward(params, batch)
        return vjp(jnp.sum(gz, axis=0))[0]

    def jacobian(params, batch):
        vjp, gz = forward(params, batch)
        return _exact.per_task_parameter_grads(vjp, gz)

    def jac_gram(params, batch):
        return _exact.gramian(jacobian(params, batch), T)

    def jac_concat(params, batch):
        return jnp.concatenate([x.reshape(T, -1) for x in jax.tree_util.tree_leaves(
            jacobian(params, batch))], axis=1)

    def old(params, batch):
        jac = jacobian(params, batch)
        m = jnp.concatenate([x.reshape(T, -1) for x in jax.tree_util.tree_leaves(jac)], axis=1)
        w = imtl_jax.imtl_g_weights(m)
        return jax.tree_util.tree_map(lambda x: jnp.tensordot(w, x, axes=1), jac)

    def weights(vjp, gz):
        jac = _exact.per_task_parameter_grads(vjp, gz)
        gram, f = _exact._safe_gramian(
            jac, lambda: _exact.per_task_parameter_grads(vjp, gz), T, jnp.float32)
        return jac, _exact.imtl_g_from_gramian(gram, f)[0]

    def new(params, batch):
        jac, w = weights(*forward(params, batch))
        return jax.tree_util.tree_map(lambda x: jnp.tensordot(w, x, axes=1), jac)

    def new_vjp(params, batch):
        vjp, gz = forward(params, batch)
        _, w = weights(vjp, gz)
        return vjp(jnp.tensordot(w, gz, axes=1))[0]

    fns = {"ew": ew, "jacobian": jacobian, "jacobian + gram": jac_gram,
           "jacobian + concat": jac_concat, "old: concat + imtl_g_solve": old,
           "new: gram + solve + alpha.J": new, "new, extra VJP": new_vjp}
    args = (case.params, case.make_batch(0))
    out = {}
    for name, fn in fns.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        out[name] = (jitted, args)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args(argv)
    cases = [_models.lenet(2), _models.celeba(2)] + ([] if opts.quick else [_models.celeba(40)])
    print(f"exact-level profile -- jax {jax.__version__}, {jax.default_backend()}, "
          f"{os.cpu_count()} cores; batch 256 float32; median wall ms, ratio to EW within a round")
    for case in cases:
        fns = stages(case)
        probe = {}
        for k, (fn, a) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            probe[k] = time.perf_counter() - t0
        reps = {k: 7 if p < 0.3 else 3 for k, p in probe.items()}
        med, ratio, _ = time_interleaved(fns, reps, min_time=1.0)
        nparams = sum(x.size for x in jax.tree_util.tree_leaves(case.params.shared))
        print(f"\n{case.name}, T = {case.num_tasks}, P = {nparams} shared parameters")
        for k in fns:
            print(f"  {k:<30} {1e3 * med[k]:9.1f} ms  {ratio[k]:6.2f}x")
    print(f"\n1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
