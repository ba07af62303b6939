"""One compiled program per (benchmark, method): the vmapped train step and evaluation.

K runs of one method (seeds, priority vectors) train as **one** jitted step: ``jax.vmap``
over the stacked parameters, optimizer and method states, batches (each run its own data
order), PRNG keys, learning rates and priorities. On one device this turns K small programs
into one larger one (see ``benchmarks/vmapped_seeds.py``); per-run results equal the runs done
one by one up to float32 round-off (``tests/experiment_suite/test_train.py``).

The step: ``imtl_jax.mtl_step`` -> Adam (``optax.scale_by_adam``, optional decoupled weight
decay) -> ``-lr ·`` (the rate is an argument: schedules never recompile) -> keep the old
parameters, optimizer and method state when the step is not finite (``aux.all_finite`` False
or non-finite new parameters) or the run is no longer active (stopped after divergence).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["Program", "stack", "unstack"]


def stack(trees: Sequence[Any]):
    """K pytrees -> one pytree with a leading axis K (numpy)."""
    import jax
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, k: int) -> list:
    """The inverse of :func:`stack`."""
    import jax
    return [jax.tree_util.tree_map(lambda x, i=i: np.asarray(x[i]), tree) for i in range(k)]


class Program:
    """The jitted, vmapped functions of one method on one benchmark.

    Attributes: ``pure`` (:class:`experiments.pure_model.PureModel` of the architecture),
    ``step`` (the :class:`imtl_jax.MTLStep`), ``optimizer``, ``train_step``, ``eval_step``.
    """

    def __init__(self, bench, method_name: str, cfg, *, with_priorities: bool):
        import jax
        import jax.numpy as jnp
        import optax
        import imtl_jax
        from experiments.runs import resolve_method

        self.bench = bench
        factors = None
        if cfg.loss_scale_task is not None and cfg.loss_scale != 1.0:
            factors = np.ones(bench.num_tasks, np.float32)
            factors[cfg.loss_scale_task] = cfg.loss_scale
        self.loss_factors = factors
        self.pure = bench.pure_model(bench.make_model(0), factors)
        self.has_state = self.pure.has_state
        self.step = imtl_jax.mtl_step(self.pure.encoder, self.pure.task_losses, resolve_method(method_name),
                                      has_state=self.has_state)
        parts = [optax.scale_by_adam()]
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        self.optimizer = optax.chain(*parts) if len(parts) > 1 else parts[0]
        step, opt = self.step, self.optimizer

        def all_finite(tree):
            ok = jnp.asarray(True)
            for x in jax.tree_util.tree_leaves(tree):
                if jnp.issubdtype(x.dtype, jnp.inexact):
                    ok = ok & jnp.all(jnp.isfinite(x))
            return ok

        self.traces = 0  # times the train step was traced (compiled): one per program and run count

        def train_step(state, batch, key_data, step_index, lr, priorities, active):
            self.traces += 1
            params, opt_state, mstate = state["params"], state["opt_state"], state["method_state"]
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step_index)
            new = {}
            if self.has_state:
                grads, new_mstate, new["encoder_state"], aux = step(
                    params, mstate, batch, key=key, priorities=priorities, encoder_state=state["encoder_state"])
            else:
                grads, new_mstate, aux = step(params, mstate, batch, key=key, priorities=priorities)
            updates, new_opt = opt.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(lambda u: -lr.astype(u.dtype) * u, updates)
            new_params = optax.apply_updates(params, updates)
            ok = aux.all_finite & all_finite(new_params) & all_finite(new.get("encoder_state", ()))
            new.update(params=new_params, opt_state=new_opt, method_state=new_mstate)
            out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok & active, a, b), new, state)
            return out, (aux.losses, aux.weights, aux.scales, aux.info), ok

        p_axis = 0 if with_priorities else None
        self.train_step = jax.jit(jax.vmap(train_step, in_axes=(0, 0, 0, None, 0, p_axis, 0)))
        pure = self.pure

        def eval_step(params, encoder_state, batch):
            preds = pure.predict(params, batch, encoder_state)
            return bench.stats(preds, batch), pure.eval_losses(preds, batch)

        self.eval_step = jax.jit(jax.vmap(eval_step, in_axes=(0, 0, None)))
        # Evaluation runs one run at a time through this un-vmapped program: its compiled shape,
        # hence every metric bit, does not depend on how many runs train as one group.
        self.eval_one = jax.jit(eval_step)

    def init_state(self, seed: int) -> dict:
        """The initial state of the run with ``seed`` (the model initialized from ``seed``)."""
        import jax
        pure = self.bench.pure_model(self.bench.make_model(seed), self.loss_factors)
        params = pure.params0
        state = {"params": params, "opt_state": self.optimizer.init(params),
                 "method_state": self.step.init(params, **self._state_args(pure))}
        if self.has_state:
            state["encoder_state"] = pure.encoder_state0
        return jax.tree_util.tree_map(np.asarray, state)

    def _state_args(self, pure) -> dict:
        """The example batch a method with per-coordinate state (``excess_mtl``) needs for F,
        the shared feature's size per example (its state is (T, F)); nothing for the others,
        and nothing at the parameter level (F is the shared parameters' count there)."""
        method = self.step.method
        if not method.weighting.needs_dim or method.level == "parameters":
            return {}
        from experiments.data import BatchIterator
        train = self.bench.train
        batch = BatchIterator(train, min(2, len(train)), shuffle=False, drop_last=False).batch_at(0)
        args: dict = {"batch": batch}
        if self.has_state:
            args["encoder_state"] = pure.encoder_state0
        return args

    def evaluate(self, state_stacked, dataset, num_members: int) -> tuple[list, list]:
        """Per run: (metrics, mean per-task losses) on ``dataset`` (evaluation mode).

        Each run is evaluated on its own by :attr:`eval_one` (not vmapped over the group), so
        its numbers are the same bits whether it trains alone or with others: a resume that
        regroups runs cannot change an evaluation, a plateau decision or the selected step."""
        import jax
        from experiments import metrics as M
        from experiments.data import BatchIterator
        bench = self.bench
        it = BatchIterator(dataset, min(bench.eval_batch_size, len(dataset)), shuffle=False, drop_last=False,
                           num_workers=bench.num_workers)
        members = [jax.tree_util.tree_map(lambda x, i=i: x[i], (state_stacked["params"],
                                                                state_stacked.get("encoder_state")))
                   for i in range(num_members)]
        totals: list = [None] * num_members
        loss_sum, n = np.zeros((num_members, bench.num_tasks)), 0
        try:
            for batch in it.epoch(0):
                batch = jax.device_put(batch)
                b = len(next(iter(batch.values())))
                for i, (params, encoder_state) in enumerate(members):
                    stats, losses = self.eval_one(params, encoder_state, batch)
                    totals[i] = M.accumulate(totals[i], stats)
                    loss_sum[i] += np.asarray(jax.device_get(losses), np.float64) * b
                n += b
        finally:
            it.close()
        metrics = [bench.finalize(t) for t in totals]
        return metrics, (loss_sum / max(n, 1)).tolist()

    def probe(self, make: Optional[Callable]):
        """``make(program) -> fn(params, method_state, batch, key)`` vmapped over runs (or None)."""
        if make is None:
            return None
        import jax
        return jax.jit(jax.vmap(make(self), in_axes=(0, 0, 0, 0)))
