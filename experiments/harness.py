"""The one train/evaluate loop behind every experiment script.

Pipeline of one run (one method, one seed)::

    benchmark (data + NNX model)  --nnx.split-->  pure parameter dicts + graph definitions
    encoder(shared, batch) -> z           (nnx.merge(encoder_def, shared)(batch[input]))
    task losses:
      stacked heads (MultiMNIST, QM9, CelebA): imtl_jax.stacked_task_losses(loss_fn) with
        loss_fn(head_params_t, z, batch, t) = loss of head t (the heads' leaves carry a leading
        task axis; task t's slice is merged back as a one-task stack and applied with
        ``apply_task(z, 0)``, so the model's own code computes the prediction);
      heterogeneous dense heads (NYUv2, Cityscapes): a tuple of T functions, one per head.
    params = imtl_jax.MTLParams(shared, heads, log_scales)
    step = imtl_jax.mtl_step(encoder, losses, method)
    one jax.jit-ted train step: step -> optax.adam -> keep the old params, optimizer state and
      method state when ``aux.all_finite`` is False (or the new params are not finite): the step
      is *skipped* and counted; ``--max-skipped`` consecutive skips stop the run with one line.

Normalization layers: the functional path supports parameter-only models. BatchNorm's running
statistics would be mutable state outside ``MTLParams`` (and would have to be threaded through
the encoder VJP), so the ResNet and U-Net models are built with ``norm="group"`` (GroupNorm,
no batch statistics, identical in training and evaluation). A model holding any non-parameter
variable is refused with a clear error.

Determinism and resume: batch ``k`` is ``BatchIterator.batch_at(k)`` (a pure function of the
seed and k) and the step's PRNG key is ``fold_in(key(seed), k)``; a checkpoint holds params,
optimizer state, method state, the step, the key and the logged history, so a run that is
interrupted and resumed ends bit-identical to one that is not (tests/experiments).

Checkpoints (orbax ``CheckpointManager``, one per run under ``<out>/runs/<method>/seed<k>/ckpt``):
the state leaves are saved with ``StandardSave`` and a JSON item holds the step, key, history
and a SHA-256 of every leaf. Restoring verifies the structure and the checksum; a corrupt or
partial checkpoint is reported (one line naming it), renamed to ``<step>.corrupt`` (kept for
inspection, never deleted) and the previous good one is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from experiments.checkpoints import RunCheckpoints, _diff, _leaves_checksum, _quiet_absl  # noqa: F401
from experiments.cli import CheckpointError, CLIError, HarnessError, Settings

__all__ = [
    "Benchmark",
    "Subset",
    "FunctionalModel",
    "RunConfig",
    "RunCheckpoints",
    "MethodSpec",
    "expand_methods",
    "train_run",
    "evaluate",
    "run_experiment",
    "build_benchmark",
    "BENCHMARK_BUILDERS",
    "run_dir_for",
    "settings_to_run_config",
]


# ------------------------------------------------------------------------------ data helpers


class Subset:
    """The examples ``indices`` of ``dataset`` (keeps a fast ``get_batch`` if it has one)."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def get_batch(self, idx):
        idx = self.indices[np.asarray(idx)]
        get = getattr(self.dataset, "get_batch", None)
        if get is not None:
            return get(idx)
        from experiments.data.batching import stack_examples
        return stack_examples([self.dataset[int(i)] for i in idx])


def _head(dataset, n: Optional[int]):
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, np.arange(n))


@dataclasses.dataclass
class Benchmark:
    """A data set, its model and how to score it.

    Attributes:
      name: short name used in file names and tables (``multimnist``, ``qm9``, ...).
      metric_benchmark: key of :data:`experiments.metrics.BENCHMARK_METRICS`.
      task_names: the T task names, in head order.
      train, val, test: datasets (``len`` + ``__getitem__``, optionally ``get_batch``).
      make_model: ``seed -> nnx.Module`` with ``.encoder`` and ``.heads``.
      input_key: the batch key fed to the encoder.
      kind: ``"stacked"`` (heads stacked on a task axis, ``apply_task``) or ``"dense"``
        (``DenseHeads``: one module per task in ``heads.heads[name]``).
      stacked_loss: stacked kind only: ``(preds (T, B, o), targets (B, T)) -> (T,)``.
      target_key: stacked kind only: the batch key of the (B, T) targets.
      metric_kwargs: extra keyword arguments of :func:`experiments.metrics.metric_stats`.
      eval_batch_size: batch size for evaluation.
      num_workers: loader threads (datasets that read files per example).
      notes: lines describing the data and model, written to results.md.
      cleanup: called once when all runs are done (removes generated fixtures).
    """

    name: str
    metric_benchmark: str
    task_names: tuple
    train: Any
    val: Any
    test: Any
    make_model: Callable[[int], Any]
    input_key: str
    kind: str = "stacked"
    stacked_loss: Optional[Callable] = None
    target_key: Optional[str] = None
    metric_kwargs: dict = dataclasses.field(default_factory=dict)
    eval_batch_size: int = 256
    num_workers: int = 0
    notes: list = dataclasses.field(default_factory=list)
    cleanup: Optional[Callable[[], None]] = None
    fingerprint: dict = dataclasses.field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def metric_specs(self):
        from experiments import metrics
        return metrics.BENCHMARK_METRICS[self.metric_benchmark]

    def task_of_metric_index(self) -> dict:
        """{metric name: index of the task it belongs to} (tasks in spec order = head order)."""
        specs = self.metric_specs()
        order = []
        for s in specs:
            if s.task not in order:
                order.append(s.task)
        if len(order) != self.num_tasks:
            raise ValueError(f"{self.name}: metrics name {len(order)} tasks, model has {self.num_tasks}")
        return {s.name: order.index(s.task) for s in specs}


# ------------------------------------------------------------------------ functional model


class FunctionalModel:
    """A model with ``.encoder`` and ``.heads`` as pure functions of parameter pytrees.

    Attributes:
      params0: the initial :class:`imtl_jax.MTLParams` (pure dicts of arrays; log-scales zero).
      encoder: ``(shared, batch) -> z``.
      task_losses: what :func:`imtl_jax.mtl_step` takes (stacked or a tuple of T functions);
        task ``loss_scale_task``'s loss is multiplied by ``loss_scale`` (robustness runs).
      predict: ``(params, batch) -> predictions`` (stacked (T, B, o) or a dict per task).
      eval_losses: ``(preds, batch) -> (T,)`` raw (unscaled) losses.
    """

    def __init__(self, bench: Benchmark, model, *, loss_scale_task: Optional[int] = None,
                 loss_scale: float = 1.0):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        import imtl_jax
        from experiments import losses as L

        def split_params(module, what):
            _, _, rest = nnx.split(module, nnx.Param, ...)
            if jax.tree_util.tree_leaves(rest):
                raise HarnessError(
                    f"{what} holds non-parameter state (e.g. BatchNorm statistics); the functional "
                    "training path needs parameter-only modules: build it with norm='group'")
            graphdef, state = nnx.split(module)
            return graphdef, nnx.to_pure_dict(state)

        T = bench.num_tasks
        enc_def, shared0 = split_params(model.encoder, f"{bench.name} encoder")
        input_key = bench.input_key

        def encoder(shared, batch):
            return nnx.merge(enc_def, shared)(batch[input_key])

        factors = np.ones(T, np.float32)
        if loss_scale_task is not None:
            factors[loss_scale_task] = loss_scale
        self.loss_factors = factors
        scaled = loss_scale_task is not None and loss_scale != 1.0

        if bench.kind == "stacked":
            heads_def, heads0 = split_params(model.heads, f"{bench.name} heads")
            stacked_loss, target_key = bench.stacked_loss, bench.target_key

            def head_loss(head_t, z, batch, t):
                head = nnx.merge(heads_def, jax.tree_util.tree_map(lambda x: x[None], head_t))
                pred = head.apply_task(z, 0)  # (B, out)
                target = jnp.take(batch[target_key], t, axis=1)[:, None]
                loss = stacked_loss(pred[None], target)[0]
                if scaled:
                    loss = loss * jnp.asarray(factors)[t]
                return loss

            task_losses = imtl_jax.stacked_task_losses(head_loss)

            def predict(params, batch):
                z = encoder(params.shared, batch)
                return nnx.merge(heads_def, params.heads)(z)

            def eval_losses(preds, batch):
                return stacked_loss(preds, batch[target_key])
        elif bench.kind == "dense":
            defs, heads = [], []
            for name in bench.task_names:
                d, p = split_params(model.heads.heads[name], f"{bench.name} head {name!r}")
                defs.append(d)
                heads.append(p)
            heads0 = tuple(heads)
            names = tuple(bench.task_names)

            def make_loss(t):
                def loss_t(head_t, z, batch):
                    pred = nnx.merge(defs[t], head_t)(z)
                    loss = L.dense_losses({names[t]: pred}, batch, (names[t],))[0]
                    return loss * float(factors[t]) if scaled else loss
                return loss_t

            task_losses = tuple(make_loss(t) for t in range(T))

            def predict(params, batch):
                z = encoder(params.shared, batch)
                return {n: nnx.merge(d, h)(z) for n, d, h in zip(names, defs, params.heads)}

            def eval_losses(preds, batch):
                return L.dense_losses(preds, batch, names)
        else:
            raise ValueError(f"unknown benchmark kind {bench.kind!r}")

        self.params0 = imtl_jax.MTLParams(shared0, heads0, jnp.zeros((T,), jnp.float32))
        self.encoder = encoder
        self.task_losses = task_losses
        self.predict = predict
        self.eval_losses = eval_losses


# ------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--method``: a registered name, or ``single_task`` for task ``task``."""

    name: str
    task: Optional[int] = None

    @property
    def label(self) -> str:
        return self.name if self.task is None else f"single_task_{self.task}"

    @property
    def compile_key(self) -> str:
        """Runs with the same key share one compiled train step (all single-task runs do)."""
        return self.name

    def resolve(self):
        import imtl_jax
        if self.task is None:
            return imtl_jax.methods.get_method(self.name)
        return single_task_method()

    def initial_method_state(self, state, num_tasks: int):
        """The method state a run starts from (single-task: the one-hot task vector)."""
        if self.task is None:
            return state
        import jax.numpy as jnp
        return jnp.zeros((num_tasks,), jnp.float32).at[self.task].set(1.0)


_SINGLE_TASK = None


def single_task_method():
    """Single-task training as one method for every task: the weights are the method *state*
    (the one-hot vector e_t, set by the harness), so the T single-task runs of a benchmark share
    one compiled train step instead of compiling T times. Otherwise identical to
    ``imtl_jax.methods.single_task(t)`` of the baseline registry: identity loss scaling,
    weights ``e_t`` on the whole loss (heads of other tasks get a zero gradient), no per-task
    gradients (the cost of equal weighting)."""
    global _SINGLE_TASK
    if _SINGLE_TASK is None:
        import jax.numpy as jnp
        from imtl_jax import Method, Weighting, WeightingOutput
        from imtl_jax.methods.equal import IDENTITY

        def init(num_tasks, dtype=None):
            return jnp.zeros((num_tasks,), dtype or jnp.float32)

        def weigh(grads, losses, state, key, priorities):
            del grads, key, priorities
            return WeightingOutput(state.astype(losses.dtype), state, {})

        _SINGLE_TASK = Method("single_task", IDENTITY,
                              Weighting("single_task", init, weigh, needs_grads=False, weights_heads=True))
    return _SINGLE_TASK


def expand_methods(names: Sequence[str], num_tasks: int) -> list[MethodSpec]:
    """``--method`` values -> run specs (``all`` = every registered method; ``single_task`` =
    one run per task). Raises :class:`CLIError` for unknown names."""
    import imtl_jax
    registered = list(imtl_jax.methods.method_names())
    out: list[MethodSpec] = []
    for n in names:
        if n == "all":
            out.extend(MethodSpec(m) for m in registered)
        elif n == "single_task":
            out.extend(MethodSpec("single_task", t) for t in range(num_tasks))
        elif n in registered:
            out.append(MethodSpec(n))
        else:
            raise CLIError(f"--method: unknown method {n!r}; choose from {', '.join(registered)}, "
                           "all, single_task")
    seen, uniq = set(), []
    for m in out:
        if m.label not in seen:
            seen.add(m.label)
            uniq.append(m)
    return uniq


# ------------------------------------------------------------------------------ configuration


@dataclasses.dataclass
class RunConfig:
    """Hyper-parameters and options of one run (see ``experiments/cli.py`` for the flags).

    ``interrupt_at`` (tests only): raise KeyboardInterrupt once this many steps are done, as if
    the process were killed there (after any checkpoint due at that step).
    ``probe``: ``(functional_model) -> jitted fn(params, method_state, batch, key) -> dict`` run
    every ``probe_every`` steps on the current params and batch (before the update); the values
    go to the history (used by the z-vs-theta ablation).
    """

    steps: int
    batch_size: int
    lr: float
    eval_every: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    max_skipped: int = 20
    loss_scale_task: Optional[int] = None
    loss_scale: float = 1.0
    quiet: bool = True
    keep_checkpoints: int = 2
    interrupt_at: Optional[int] = None
    probe: Optional[Callable] = None
    probe_every: int = 0

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (not ``steps``: runs may be extended)."""
        return {"batch_size": self.batch_size, "lr": self.lr, "loss_scale_task": self.loss_scale_task,
                "loss_scale": self.loss_scale, "optimizer": "adam"}


def run_dir_for(out: os.PathLike, spec: MethodSpec, seed: int) -> Path:
    return Path(out) / "runs" / spec.label / f"seed{seed}"


# ------------------------------------------------------------------------------ evaluation


def make_eval_fn(fm: FunctionalModel, bench: Benchmark):
    import jax
    import jax.numpy as jnp
    from experiments import metrics as M
    kwargs = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in bench.metric_kwargs.items()}

    @jax.jit
    def eval_batch(params, batch):
        preds = fm.predict(params, batch)
        stats = M.metric_stats(bench.metric_benchmark, preds, batch, **kwargs)
        return stats, fm.eval_losses(preds, batch)

    return eval_batch


def evaluate(eval_fn, params, dataset, bench: Benchmark) -> tuple[dict, list]:
    """Metrics (``experiments.metrics.finalize_metrics``) and mean per-task losses on ``dataset``."""
    import jax
    from experiments import metrics as M
    from experiments.data import BatchIterator
    it = BatchIterator(dataset, min(bench.eval_batch_size, len(dataset)), shuffle=False,
                       drop_last=False, num_workers=bench.num_workers)
    total, loss_sum, n = None, np.zeros(bench.num_tasks), 0
    try:
        for batch in it.epoch(0):
            stats, losses = eval_fn(params, batch)
            total = M.accumulate(total, stats)
            b = len(next(iter(batch.values())))
            loss_sum += np.asarray(jax.device_get(losses), np.float64) * b
            n += b
    finally:
        it.close()
    return M.finalize_metrics(bench.metric_benchmark, total), (loss_sum / max(n, 1)).tolist()


# ------------------------------------------------------------------------------- training


def _jsonable(x):
    """numpy/jax values -> JSON-safe Python (non-finite floats -> None)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating,)):
        return _jsonable(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _empty_history(task_names) -> dict:
    return {"task_names": list(task_names), "step": [], "loss": [], "weight": [], "scale": [],
            "finite": [], "info": {}, "val": [], "probe": []}


def _build_train_step(step_fn, opt):
    import jax
    import jax.numpy as jnp
    import optax

    def all_finite(tree):
        ok = jnp.asarray(True)
        for x in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(x.dtype, jnp.inexact):
                ok = ok & jnp.all(jnp.isfinite(x))
        return ok

    def train_step(state, batch, key, step):
        params, opt_state, mstate = state["params"], state["opt_state"], state["method_state"]
        k = jax.random.fold_in(key, step)
        grads, new_mstate, aux = step_fn(params, mstate, batch, key=k)
        updates, new_opt = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = aux.all_finite & all_finite(new_params)
        new = {"params": new_params, "opt_state": new_opt, "method_state": new_mstate}
        out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
        return out, aux, ok

    return jax.jit(train_step)


_COMPILED: dict = {}


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def train_run(bench: Benchmark, spec: MethodSpec, seed: int, cfg: RunConfig,
              run_dir: os.PathLike, log: Callable[[str], None] = _log) -> dict:
    """Trains one (method, seed) run and returns its result record (also written to
    ``run_dir/result.json``; the per-step history to ``run_dir/history.json``)."""
    import jax
    import jax.numpy as jnp
    import optax
    import imtl_jax
    from experiments.data import BatchIterator

    run_dir = Path(run_dir)
    wall0 = time.perf_counter()
    method = spec.resolve()
    fingerprint = {"benchmark": bench.name, "method": spec.label, "seed": int(seed),
                   **cfg.fingerprint(), **bench.fingerprint}
    result_path = run_dir / "result.json"
    if cfg.resume and result_path.is_file():
        try:
            prev = json.loads(result_path.read_text())
        except ValueError:
            prev = None
        if prev and prev.get("fingerprint") == _jsonable(fingerprint) and prev.get("steps_planned") == cfg.steps \
                and prev.get("complete"):
            log(f"{bench.name} {spec.label} seed {seed}: finished earlier, skipped (--resume)")
            return prev

    ckpt = RunCheckpoints(run_dir / "ckpt", keep=cfg.keep_checkpoints)
    existing = ckpt.steps()
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise CheckpointError(
                f"{run_dir / 'ckpt'} holds checkpoints of an earlier run (steps {existing}); pass "
                "--resume to continue it or --overwrite to discard them")
        shutil.rmtree(run_dir / "ckpt")
    run_dir.mkdir(parents=True, exist_ok=True)

    model = bench.make_model(seed)
    fm = FunctionalModel(bench, model, loss_scale_task=cfg.loss_scale_task, loss_scale=cfg.loss_scale)
    # The jitted functions depend on the architecture only (graph definitions), not on the seed:
    # reuse them across the seeds of a method (one compilation per method, not per run).
    ckey = (id(bench), spec.compile_key, cfg.lr, cfg.loss_scale_task, cfg.loss_scale)
    cached = _COMPILED.get(ckey)
    if cached is None or cached[0] is not bench:
        step_fn = imtl_jax.mtl_step(fm.encoder, fm.task_losses, method)
        opt = optax.adam(cfg.lr)
        cached = (bench, fm, step_fn, opt, _build_train_step(step_fn, opt))
        if len(_COMPILED) > 16:
            _COMPILED.clear()
        _COMPILED[ckey] = cached
    _, fm_fns, step_fn, opt, train_step = cached
    ekey = ("eval", id(bench))  # evaluation does not depend on the method: one compile per benchmark
    if ekey not in _COMPILED or _COMPILED[ekey][0] is not bench:
        _COMPILED[ekey] = (bench, make_eval_fn(fm, bench))
    eval_fn = _COMPILED[ekey][1]
    params = fm.params0
    state = {"params": params, "opt_state": opt.init(params),
             "method_state": spec.initial_method_state(step_fn.init(params), bench.num_tasks)}
    state = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), state)
    treedef = jax.tree_util.tree_structure(state)
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))

    history = _empty_history(bench.task_names)
    start, skipped_total, consecutive = 0, 0, 0
    timing = {"step_time_sum": 0.0, "step_time_count": 0, "first_step_s": 0.0, "wall_before_s": 0.0}
    resumed_from, corrupt = None, []
    if cfg.resume and ckpt.steps():
        template = jax.tree_util.tree_leaves(state)
        got = ckpt.restore_latest([np.asarray(x) for x in template], log=log)
        if got is not None:
            step0, leaves, meta, corrupt = got
            if meta.get("fingerprint") != _jsonable(fingerprint):
                raise CheckpointError(
                    f"checkpoint {ckpt.directory / str(step0)} was written with a different "
                    f"configuration ({_diff(meta.get('fingerprint'), _jsonable(fingerprint))}); use "
                    "the same flags or --overwrite")
            state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
            key_data = np.asarray(meta["key"], dtype=key_data.dtype)
            history = meta["history"]
            start, skipped_total, consecutive = meta["step"], meta["skipped_total"], meta["consecutive_skipped"]
            timing = meta["timing"]
            resumed_from = start
            log(f"{bench.name} {spec.label} seed {seed}: resumed from step {start} ({ckpt.directory / str(start)})")
    key = jax.random.wrap_key_data(jnp.asarray(key_data))

    if start > cfg.steps:
        raise CheckpointError(f"checkpoint {ckpt.directory / str(start)} is at step {start}, beyond "
                              f"--steps {cfg.steps}; pass --steps >= {start} or --overwrite")
    probe_fn = None
    if cfg.probe is not None and cfg.probe_every > 0:
        pkey = ("probe", id(bench), id(cfg.probe))
        if pkey not in _COMPILED or _COMPILED[pkey][0] is not bench:
            _COMPILED[pkey] = (bench, cfg.probe(fm_fns))
        probe_fn = _COMPILED[pkey][1]
    it = BatchIterator(bench.train, cfg.batch_size, seed=seed, num_workers=bench.num_workers)

    def save(step_done):
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]
        t = dict(timing, wall_before_s=timing["wall_before_s"] + (time.perf_counter() - wall0))
        ckpt.save(step_done, leaves, {"fingerprint": _jsonable(fingerprint), "key": key_data.tolist(),
                                      "history": history, "skipped_total": skipped_total,
                                      "consecutive_skipped": consecutive, "timing": t})

    status, message = "ok", ""
    bar = None
    if not cfg.quiet:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{bench.name} {spec.label} s{seed}",
                   dynamic_ncols=True, leave=False, file=sys.stderr,
                   mininterval=0.2 if sys.stderr.isatty() else 5.0)
    first = True
    step = start
    try:
        for step in range(start, cfg.steps):
            batch = it.batch_at(step)
            if probe_fn is not None and step % cfg.probe_every == 0:
                pv = jax.device_get(probe_fn(state["params"], state["method_state"], batch,
                                             jax.random.fold_in(key, step)))
                history["probe"].append({"step": step, **_jsonable(pv)})
            t0 = time.perf_counter()
            state, aux, ok = train_step(state, batch, key, jnp.asarray(step, jnp.uint32))
            losses, weights, scales, ok, info = jax.device_get(
                (aux.losses, aux.weights, aux.scales, ok, aux.info))
            dt = time.perf_counter() - t0
            if first:
                timing["first_step_s"] += dt
                first = False
            else:
                timing["step_time_sum"] += dt
                timing["step_time_count"] += 1
            history["step"].append(step + 1)
            history["loss"].append(np.asarray(losses, np.float64).tolist())
            history["weight"].append(np.asarray(weights, np.float64).tolist())
            history["scale"].append(np.asarray(scales, np.float64).tolist())
            history["finite"].append(bool(ok))
            for k, v in info.items():
                history["info"].setdefault(k, []).append(np.asarray(v, np.float64).tolist())
            if bool(ok):
                consecutive = 0
            else:
                skipped_total += 1
                consecutive += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step + 1 == cfg.steps:
                    bar.set_postfix_str("loss " + " ".join(f"{v:.3g}" for v in np.asarray(losses)[:6])
                                        + (" ..." if len(losses) > 6 else "")
                                        + (f" skipped {skipped_total}" if skipped_total else ""))
            if consecutive >= cfg.max_skipped:
                status = "diverged"
                message = (f"{bench.name} {spec.label} seed {seed}: stopped at step {step + 1} after "
                           f"{consecutive} consecutive non-finite steps (skipped); lower --lr or check "
                           "the data")
                log(message)
                step += 1
                break
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                vm, vl = evaluate(eval_fn, state["params"], bench.val, bench)
                history["val"].append({"step": done, "losses": vl, "metrics": vm})
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save(done)
            if cfg.interrupt_at is not None and done == cfg.interrupt_at:
                raise KeyboardInterrupt
        else:
            step = cfg.steps
    finally:
        if bar is not None:
            bar.close()
        it.close()
        ckpt.close()

    steps_done = step if status != "ok" else cfg.steps
    val_metrics, val_losses = evaluate(eval_fn, state["params"], bench.val, bench)
    test_metrics, test_losses = evaluate(eval_fn, state["params"], bench.test, bench)
    history["val"].append({"step": steps_done, "losses": val_losses, "metrics": val_metrics})
    wall = timing["wall_before_s"] + (time.perf_counter() - wall0)
    n_t = timing["step_time_count"]
    result = {
        "benchmark": bench.name, "method": spec.label, "base_method": spec.name,
        "single_task": spec.task, "seed": int(seed), "tasks": list(bench.task_names),
        "status": status, "message": message, "complete": status == "ok",
        "steps_planned": cfg.steps, "steps_done": steps_done,
        "skipped_steps": skipped_total, "resumed_from": resumed_from, "corrupt_checkpoints": corrupt,
        "val": val_metrics, "test": test_metrics, "val_losses": val_losses, "test_losses": test_losses,
        "final_weights": history["weight"][-1] if history["weight"] else None,
        "final_scales": history["scale"][-1] if history["scale"] else None,
        "wall_time_s": wall, "step_time_ms": 1e3 * timing["step_time_sum"] / n_t if n_t else None,
        "first_step_s": timing["first_step_s"],
        "config": {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "optimizer": "adam", "loss_scale_task": cfg.loss_scale_task,
                   "loss_scale": cfg.loss_scale},
        "fingerprint": fingerprint,
    }
    if history["probe"]:
        result["probe_summary"] = _probe_summary(history["probe"])
    result = _jsonable(result)
    (run_dir / "history.json").write_text(json.dumps(_jsonable(history)))
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _probe_summary(probes: list) -> dict:
    out = {}
    keys = [k for k in probes[0] if k != "step"]
    for k in keys:
        vals = [p[k] for p in probes if isinstance(p.get(k), (int, float)) and p.get(k) is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                      "last": float(vals[-1]), "n": len(vals)}
    return out


# ---------------------------------------------------------------------------- benchmarks


def _tmpdir(prefix: str):
    d = tempfile.mkdtemp(prefix=f"imtl-{prefix}-")
    return Path(d), (lambda: shutil.rmtree(d, ignore_errors=True))


def _multimnist(s: Settings) -> Benchmark:
    from flax import nnx
    from experiments import losses as L
    from experiments.data.multimnist import load_multi
    from experiments.models import LeNetMTL
    name = s.extra.get("dataset") or "multimnist"
    if s.tiny:
        data = load_multi(name, seed=0, n_train=64, n_val=32, n_test=32, use_cache=False)
    else:
        data = load_multi(name, seed=0)
    train = _head(data.split("train"), s.max_train)
    return Benchmark(
        name=name if name != "multimnist" else "multimnist", metric_benchmark="multimnist",
        task_names=tuple(data.task_names), train=train, val=data.split("val"), test=data.split("test"),
        make_model=lambda seed: LeNetMTL(rngs=nnx.Rngs(seed)), input_key="image", kind="stacked",
        stacked_loss=L.cross_entropy_losses, target_key="labels", eval_batch_size=500,
        notes=[f"{name}: {len(train)} train / {len(data.val_labels)} val / {len(data.test_labels)} test "
               "pairs (28x28, built from a fixed seed); LeNet encoder (z: 50) + two 50-50-10 heads; "
               "metric: accuracy per task"],
        fingerprint={"data": name, "n_train": len(train), "tiny": s.tiny})


QM9_DEFAULT_MAX_TRAIN = 20_000  # CPU default; --max-train 110000 for the full split


def _qm9(s: Settings) -> Benchmark:
    from flax import nnx
    from experiments import losses as L
    from experiments.data import qm9 as Q
    from experiments.models import MLPMTL
    cleanup = None
    if s.tiny:
        root, cleanup = _tmpdir("qm9")
        Q.write_fixture(root / "csv", n=60, seed=0)
        # val and test of one size: one compiled evaluation serves both
        data = Q.load_qm9(data_dir=root / "csv", n_train=30, n_val=12, max_test=12,
                          cache_dir=root / "cache", seed=0)
        hidden = (16, 16)
    else:
        max_train = s.max_train if s.max_train is not None else QM9_DEFAULT_MAX_TRAIN
        data = Q.load_qm9(data_dir=s.data_dir, seed=0, max_train=max_train,
                          max_val=s.extra.get("max_eval"), max_test=s.extra.get("max_eval"))
        hidden = (256, 256, 256)
    nf = data.num_features
    return Benchmark(
        name="qm9", metric_benchmark="qm9", task_names=tuple(data.target_names),
        train=data.split("train"), val=data.split("val"), test=data.split("test"),
        make_model=lambda seed: MLPMTL(nf, len(data.target_names), hidden=hidden, rngs=nnx.Rngs(seed)),
        input_key="x", kind="stacked", stacked_loss=L.regression_losses, target_key="y",
        metric_kwargs={"target_std": np.asarray(data.target_std, np.float32)}, eval_batch_size=2048,
        notes=[f"QM9 ({'generated fixture' if s.tiny else 'qm9pack'}): {len(data.y_train)} train / "
               f"{len(data.y_val)} val / {len(data.y_test)} test molecules; {nf} Coulomb-eigenvalue "
               f"features; MLP {hidden} + 11 linear heads; MSE on standardized targets; metric: MAE "
               "in original units (lower is better)"],
        cleanup=cleanup, fingerprint={"data": "qm9", "n_train": len(data.y_train), "tiny": s.tiny})


def _need_data_dir(name: str, layout: str, s: Settings) -> Path:
    if s.data_dir is None:
        raise CLIError(f"{name} needs the real data set: pass --data-dir ROOT with {layout} "
                       "(or --tiny to run on generated fixtures)")
    root = Path(s.data_dir)
    if not root.is_dir():
        from experiments.data import DataUnavailableError
        raise DataUnavailableError(f"--data-dir {root} does not exist; pass the {name} root holding {layout}")
    return root


def _image_size(s: Settings, default):
    v = s.extra.get("image_size")
    return tuple(v) if v else default


def _celeba(s: Settings) -> Benchmark:
    from flax import nnx
    from experiments import losses as L
    from experiments.data import celeba as C
    from experiments.models import ResNet18MTL
    cleanup = None
    if s.tiny:
        root, cleanup = _tmpdir("celeba")
        C.write_fixture(root, n=12, seed=0, image_hw=(44, 36))
        size, width = (16, 16), 4
    else:
        root = _need_data_dir("celeba", C.LAYOUT, s)
        size, width = _image_size(s, (64, 64)), 32
    max_eval = s.extra.get("max_eval")
    train = C.CelebADataset(root, "train", size, max_examples=s.max_train)
    val = C.CelebADataset(root, "val", size, max_examples=max_eval)
    test = C.CelebADataset(root, "test", size, max_examples=max_eval)
    return Benchmark(
        name="celeba", metric_benchmark="celeba", task_names=tuple(train.attribute_names),
        train=train, val=val, test=test,
        make_model=lambda seed: ResNet18MTL(40, width=width, norm="group", rngs=nnx.Rngs(seed)),
        input_key="image", kind="stacked", stacked_loss=L.binary_ce_losses, target_key="attributes",
        eval_batch_size=256, num_workers=4,
        notes=[f"CelebA ({'generated fixture' if s.tiny else root}): {len(train)} train / {len(val)} val / "
               f"{len(test)} test images at {size[0]}x{size[1]}; ResNet-18 (width {width}, GroupNorm) + "
               "40 linear heads; metric: accuracy per attribute"],
        cleanup=cleanup, fingerprint={"data": "celeba", "n_train": len(train), "size": list(size), "tiny": s.tiny})


def _dense(kind: str, s: Settings) -> Benchmark:
    from flax import nnx
    from experiments.models import DenseMTL
    if kind == "nyuv2":
        from experiments.data import nyuv2 as D
        Dataset, tasks, default_size = D.NYUv2Dataset, ("segmentation", "depth", "normal"), (144, 192)
    else:
        from experiments.data import cityscapes as D
        Dataset, tasks, default_size = D.CityscapesDataset, ("segmentation", "depth"), (64, 128)
    cleanup = None
    if s.tiny:
        root, cleanup = _tmpdir(kind)
        D.write_fixture(root, n=8, shape=(16, 24), seed=0)
        resize, width, levels = None, 4, 1
    else:
        root = _need_data_dir(kind, Dataset.layout, s)
        resize, width, levels = _image_size(s, default_size), 16, 3
    full = Dataset(root, "train", resize=resize)
    test = Dataset(root, "val", resize=resize)
    # a validation split held out of train (MTAN reports on the official val split as "test")
    n_hold = len(full) // 2 if s.tiny else max(1, len(full) // 20)
    train = _head(Subset(full, np.arange(len(full) - n_hold)), s.max_train)
    val = Subset(full, np.arange(len(full) - n_hold, len(full)))
    num_classes = D.NUM_CLASSES
    return Benchmark(
        name=kind, metric_benchmark=kind, task_names=tasks, train=train, val=val, test=test,
        make_model=lambda seed: DenseMTL(num_classes, tasks, width=width, levels=levels, norm="group",
                                         rngs=nnx.Rngs(seed)),
        input_key="image", kind="dense", eval_batch_size=4 if s.tiny else 8, num_workers=2,
        notes=[f"{kind} ({'generated fixture' if s.tiny else root}): {len(train)} train / {len(val)} val "
               f"(held out of train) / {len(test)} test (the official val split, as in MTAN); "
               f"resize {resize or 'none'}; U-Net encoder (width {width}, {levels} levels, GroupNorm) + "
               "per-task conv heads"],
        cleanup=cleanup, fingerprint={"data": kind, "n_train": len(train), "resize": list(resize or []),
                                      "tiny": s.tiny})


BENCHMARK_BUILDERS: dict[str, Callable[[Settings], Benchmark]] = {
    "multimnist": _multimnist,
    "qm9": _qm9,
    "celeba": _celeba,
    "nyuv2": lambda s: _dense("nyuv2", s),
    "cityscapes": lambda s: _dense("cityscapes", s),
}


def build_benchmark(name: str, s: Settings) -> Benchmark:
    if name not in BENCHMARK_BUILDERS:
        raise CLIError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARK_BUILDERS)}")
    return BENCHMARK_BUILDERS[name](s)


# ---------------------------------------------------------------------------- experiments


def _task_index(value, task_names) -> int:
    if value is None:
        return None
    if isinstance(value, int):
        idx = value
    elif str(value).lstrip("-").isdigit():
        idx = int(value)
    elif value in task_names:
        return list(task_names).index(value)
    else:
        raise CLIError(f"--loss-scale-task: unknown task {value!r}; give an index 0..{len(task_names) - 1} "
                       f"or one of {', '.join(task_names)}")
    if not 0 <= idx < len(task_names):
        raise CLIError(f"--loss-scale-task: index {idx} out of range; this benchmark has "
                       f"{len(task_names)} tasks (0..{len(task_names) - 1})")
    return idx


def settings_to_run_config(s: Settings, bench: Benchmark, **overrides) -> RunConfig:
    """Resolves ``--steps``/``--epochs`` and the task of ``--loss-scale-task`` for ``bench``."""
    if s.batch_size > len(bench.train):
        raise CLIError(f"--batch-size {s.batch_size} exceeds the {len(bench.train)} training examples; "
                       "lower --batch-size")
    steps = s.steps
    if steps is None:
        spe = len(bench.train) // s.batch_size
        steps = max(1, int(math.ceil(s.epochs * spe)))
    task = _task_index(s.loss_scale_task, bench.task_names)
    cfg = RunConfig(steps=steps, batch_size=s.batch_size, lr=s.lr, eval_every=s.eval_every,
                    checkpoint_every=s.checkpoint_every, resume=s.resume, overwrite=s.overwrite,
                    max_skipped=s.max_skipped, loss_scale_task=task,
                    loss_scale=s.loss_scale if task is not None else 1.0, quiet=s.quiet)
    return dataclasses.replace(cfg, **overrides)


def run_experiment(bench: Benchmark, specs: Sequence[MethodSpec], seeds: Sequence[int], cfg: RunConfig,
                   out: os.PathLike, log: Callable[[str], None] = _log) -> list[dict]:
    """Every (method, seed) run of ``specs`` x ``seeds`` into ``out/runs/...``; returns the results."""
    results = []
    for spec in specs:
        for seed in seeds:
            results.append(train_run(bench, spec, seed, cfg, run_dir_for(out, spec, seed), log=log))
    return results


def load_histories(out: os.PathLike, results: Sequence[dict]) -> dict:
    """{(method, seed): history} read back from the run folders."""
    hist = {}
    for r in results:
        p = run_dir_for(out, MethodSpec(r["base_method"], r.get("single_task")), r["seed"]) / "history.json"
        if p.is_file():
            hist[(r["method"], r["seed"])] = json.loads(p.read_text())
    return hist


def main_for(benchmark: str, argv, *, description: str, defaults: dict, tiny_defaults: Optional[dict] = None,
             add_flags: Optional[Callable] = None, extra_keys: Sequence[str] = ()) -> int:
    """The whole of a benchmark script: parse flags, train every run, write and print reports."""
    from experiments import cli

    prog = f"python -m experiments.{benchmark}"

    def body():
        parser = cli.make_parser(prog, description)
        if add_flags is not None:
            add_flags(parser)
        s = cli.parse_settings(parser, argv, dict(defaults, out=f"runs/{benchmark}"), tiny_defaults,
                               extra_keys=extra_keys)
        run_benchmark_settings(benchmark, s, argv=argv)

    return cli.run_main(prog, body)


def run_benchmark_settings(benchmark: str, s: Settings, print_table: bool = True, argv=None) -> dict:
    """Builds ``benchmark``, trains every (method, seed) run of ``s`` and writes the reports."""
    from experiments import report
    expand_methods(s.methods, 1)  # unknown names fail before any data is loaded
    bench = build_benchmark(benchmark, s)
    try:
        specs = expand_methods(s.methods, bench.num_tasks)
        cfg = settings_to_run_config(s, bench)
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        results = run_experiment(bench, specs, s.seeds, cfg, out)
        summary = report.write_reports(out, bench, results, load_histories(out, results),
                                       command=command_line(s.prog, argv), total_wall_s=time.perf_counter() - t0)
    finally:
        if bench.cleanup is not None:
            bench.cleanup()
    if print_table:
        print(summary["markdown"])
    return summary


def command_line(prog: str, argv) -> str:
    """The command as typed (``argv`` None: this process's own arguments)."""
    import shlex
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join([prog] + [shlex.quote(a) for a in args])
