"""The one training loop: K runs of a method as one vmapped program, evaluation every
``eval_every`` steps, model selection on validation, checkpoints, records.

``run_experiment(bench, specs, seeds, cfg, out)`` trains every (spec, seed) run; runs of one
spec (and, for ``linear``, every priority vector of it) are grouped into vmapped programs of
at most ``cfg.parallel_seeds`` runs. Each run keeps its own folder ``out/runs/<label>/seed<k>``
with ``result.json``, ``history.json``, TensorBoard events and checkpoints.

Determinism and resume: batch ``k`` of a run is ``BatchIterator(train, seed=seed).batch_at(k)``,
its PRNG key ``fold_in(key(seed), k)``; a checkpoint holds the run's state, step, key,
history, counters, plateau state, priorities and its vmapped group, so a resumed run ends
bit-identical to an uninterrupted one. Checkpoints: ``checkpoint_every`` k > 0: every k steps
and at the end; None (the default): every minute of training, at the end and when the run is
stopped (Ctrl-C, SIGTERM); 0: never.

Stops, label checks (:mod:`experiments.stops`) and grouping on resume
(:mod:`experiments.run_groups`): a resumed run trains in the group it was saved with, and
evaluation runs each run on its own, so no number depends on how runs were grouped.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from experiments import records, selection
from experiments.checkpoints import RunCheckpoints, _diff
from experiments.errors import CheckpointError
from experiments.program import Program, stack, unstack
from experiments.runs import RunConfig, RunSpec, run_dir
from experiments.run_groups import _group_size, _plan_groups
from experiments.run_results import _finish as _finish_result, _solver_record, _nonconverged  # noqa: F401
from experiments.schedules import Plateau, Schedule
from experiments.stops import (_COUNTER, RunInterrupted, _StopRequests, _check_label, _counters,  # noqa: F401
                               _stop_message)

__all__ = ["run_experiment", "RunInterrupted", "AUTO_CHECKPOINT_SECONDS", "NONCONVERGED_WARN_FRACTION", "log"]

AUTO_CHECKPOINT_SECONDS = 60.0
NONCONVERGED_WARN_FRACTION = 0.01  # warn once when a run's solver missed its tolerance on more steps


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _new_timing() -> dict:
    return {"step_time_sum": 0.0, "step_time_count": 0, "first_step_s": 0.0, "wall_before_s": 0.0}


@dataclasses.dataclass
class _Run:
    spec: RunSpec
    seed: int
    dir: Path
    fingerprint: dict
    ckpt: Optional[RunCheckpoints] = None
    state: Optional[dict] = None
    history: Optional[dict] = None
    start: int = 0
    skipped: int = 0
    consecutive: int = 0
    timing: dict = dataclasses.field(default_factory=lambda: _new_timing())
    plateau: Optional[Plateau] = None
    priorities: Optional[np.ndarray] = None
    key: Optional[np.ndarray] = None
    status: str = "ok"
    message: str = ""
    resumed_from: Optional[int] = None
    corrupt: list = dataclasses.field(default_factory=list)
    result: Optional[dict] = None
    group: Optional[list] = None  # the runs it was vmapped with (its checkpoint's record), ordered
    nonconverged: int = 0
    warned: bool = False

    @property
    def ident(self) -> str:
        """``<label>/seed<k>``: how a group names its runs."""
        return f"{self.spec.label}/seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.spec.label} seed {self.seed}"


def _metric_names(bench, spec: RunSpec) -> list:
    if spec.single_task is not None:
        return bench.metric_names_of_task(spec.single_task)
    return [s.name for s in bench.metrics]


def _prepare(bench, spec, seed, cfg, out, program, log) -> _Run:
    """Finished (``--resume``): the stored result. Otherwise the initial or restored state."""
    d = run_dir(out, spec, seed)
    fp = records.to_json({"benchmark": bench.name, "run": spec.label, **spec.fingerprint(), "seed": int(seed),
                          **cfg.fingerprint(), **bench.fingerprint})
    run = _Run(spec, int(seed), d, fp)
    prev = records.read_json(d / "result.json")
    if cfg.resume and prev and prev.get("fingerprint") == fp and prev.get("steps_planned") == cfg.steps \
            and prev.get("complete"):
        log(f"{bench.name} {run.name}: finished earlier, skipped (--resume)")
        run.result = prev
        return run
    run.ckpt = RunCheckpoints(d / "ckpt", keep=cfg.keep_checkpoints)
    existing = run.ckpt.steps()
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise CheckpointError(f"{d / 'ckpt'} holds checkpoints of an earlier run (steps {existing}); pass "
                                  "--resume to continue it or --overwrite to discard them")
        shutil.rmtree(d / "ckpt")
    d.mkdir(parents=True, exist_ok=True)
    _fresh(bench, run, cfg, program)
    if cfg.resume and existing:
        _restore(bench, run, cfg, program, log)
    if run.start > cfg.steps:
        raise CheckpointError(f"checkpoint {run.ckpt.directory / str(run.start)} is at step {run.start}, beyond "
                              f"--steps {cfg.steps}; pass --steps >= {run.start} or --overwrite")
    return run


def _fresh(bench, run: _Run, cfg: RunConfig, program: Program) -> None:
    """The run's state before its first step."""
    import jax
    run.state = program.init_state(run.seed)
    run.history = records.new_history(bench.task_names)
    run.plateau = Plateau(_schedule(cfg))
    run.priorities = None if run.spec.priorities is None else np.asarray(run.spec.priorities, np.float32)
    run.key = np.asarray(jax.random.key_data(jax.random.key(run.seed)))
    run.start, run.skipped, run.consecutive = 0, 0, 0
    run.timing = _new_timing()
    run.status, run.message, run.resumed_from, run.group = "ok", "", None, None
    run.nonconverged = 0


def _restore(bench, run: _Run, cfg: RunConfig, program: Program, log, at_most: Optional[int] = None) -> None:
    """The newest usable checkpoint of ``run`` (of a step ``<= at_most`` when given) into ``run``;
    the fresh state when there is none (the run then starts over)."""
    import jax
    template = program.init_state(run.seed)
    treedef = jax.tree_util.tree_structure(template)
    got = run.ckpt.restore_latest(jax.tree_util.tree_leaves(template), log=log, at_most=at_most,
                                  check=lambda step, leaves, meta: _check_label(treedef, step, leaves, meta))
    run.corrupt.extend(c for c in run.ckpt.quarantined if c not in run.corrupt)
    if got is None:
        _fresh(bench, run, cfg, program)
        return
    step0, leaves, meta, _ = got
    fp = run.fingerprint
    if meta.get("fingerprint") != fp:
        raise CheckpointError(
            f"checkpoint {run.ckpt.directory / str(step0)} was written with a different configuration "
            f"({_diff(meta.get('fingerprint'), fp)}); use the same flags or --overwrite")
    run.state = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    run.key = np.asarray(meta["key"], dtype=run.key.dtype)
    run.history, run.timing = meta["history"], meta["timing"]
    run.start, run.skipped, run.consecutive = meta["step"], meta["skipped_total"], meta["consecutive_skipped"]
    run.plateau = Plateau(_schedule(cfg), meta.get("plateau"))
    run.priorities = None if run.spec.priorities is None else np.asarray(run.spec.priorities, np.float32)
    if meta.get("priorities") is not None:
        run.priorities = np.asarray(meta["priorities"], np.float32)
    run.status, run.message = meta.get("status", "ok"), meta.get("message", "")
    run.group = meta.get("group")
    run.nonconverged = _nonconverged(run.history)
    run.resumed_from = run.start
    log(f"{bench.name} {run.name}: resumed from step {run.start} ({run.ckpt.directory / str(run.start)})")


def _schedule(cfg: RunConfig) -> Schedule:
    return Schedule(cfg.schedule, cfg.lr, cfg.steps, warmup=cfg.warmup, factor=cfg.plateau_factor,
                    patience=cfg.plateau_patience)


def _save(run: _Run, step_done: int, state: dict, wall0: float) -> None:
    import jax
    t = dict(run.timing, wall_before_s=run.timing["wall_before_s"] + (time.perf_counter() - wall0))
    run.ckpt.save(step_done, [np.asarray(x) for x in jax.tree_util.tree_leaves(state)], records.to_json({
        "fingerprint": run.fingerprint, "key": run.key.tolist(), "history": run.history,
        "skipped_total": run.skipped, "consecutive_skipped": run.consecutive, "timing": t,
        "plateau": run.plateau.state(), "status": run.status, "message": run.message,
        "priorities": None if run.priorities is None else run.priorities.tolist(),
        "group": run.group, "updates": sum(bool(x) for x in run.history["finite"])}))


def _train_group(bench, program: Program, runs: list, cfg: RunConfig, *, reference, on_eval, probe,
                 probe_every: int, log, stop: Optional[_StopRequests] = None) -> None:
    """Trains ``runs`` (same method, same start step) as one vmapped program.

    A stop requested by a signal (``stop``) or ``cfg.interrupt_at`` is honoured between two
    steps, where the step counter, the state, the history and the evaluations agree: the
    runs are saved there and :class:`RunInterrupted` is raised."""
    import jax
    import jax.numpy as jnp
    from experiments.data import BatchIterator

    stop = stop if stop is not None else _StopRequests()
    K, start = len(runs), runs[0].start
    group = [r.ident for r in runs]
    for r in runs:
        r.group = group
    wall0 = time.perf_counter()
    iters: list = []
    bar = None
    auto = cfg.checkpoint_every is None
    # the newest step saved for every run of the group (a resumed group starts at one)
    last_saved = start if all(r.resumed_from == start for r in runs) and start > 0 else None
    done, forced = start, False

    def save_all(step_done, st):
        nonlocal last_saved
        for r, s in zip(runs, unstack(st, K)):
            _save(r, step_done, s, wall0)
        last_saved = step_done

    try:
        try:
            state = stack([r.state for r in runs])
            keys = jnp.asarray(np.stack([r.key for r in runs]))
            iters = [BatchIterator(bench.train, cfg.batch_size, seed=r.seed, num_workers=bench.num_workers)
                     for r in runs]
            with_p = runs[0].priorities is not None
            probe_fn = program.probe(probe) if probe is not None and probe_every > 0 else None
            if not cfg.quiet:
                from tqdm import tqdm
                seeds = ",".join(str(r.seed) for r in runs)
                labels = sorted({r.spec.label for r in runs})
                bar = tqdm(total=cfg.steps, initial=start, desc=f"{bench.name} {'/'.join(labels)[:40]} s{seeds}",
                           dynamic_ncols=True, leave=True, file=sys.stderr,
                           mininterval=0.2 if sys.stderr.isatty() else 5.0)
            last_save, first = time.perf_counter(), True
            stop.deferring = True
            for step in range(start, cfg.steps):
                # The safe point: everything of the steps before `step` is committed.
                if stop.requested is not None:
                    break
                active = np.asarray([r.status == "ok" for r in runs])
                if not active.any():
                    break
                batch = stack([it.batch_at(step) for it in iters])
                if probe_fn is not None and step % probe_every == 0:
                    pkeys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(keys)  # noqa: B023 (called here)
                    pv = jax.device_get(probe_fn(state["params"], state["method_state"], batch, pkeys))
                    for i, r in enumerate(runs):
                        r.history["probe"].append({"step": step, **records.to_json({k: v[i] for k, v in pv.items()})})
                lr = np.asarray([r.plateau.lr(step) for r in runs], np.float32)
                pr = jnp.asarray(np.stack([r.priorities for r in runs])) if with_p else None
                t0 = time.perf_counter()
                new_state, out, ok = program.train_step(state, batch, keys, jnp.asarray(step, jnp.uint32),
                                                        jnp.asarray(lr), pr, jnp.asarray(active))
                state, done = new_state, step + 1  # the state and its step move together
                (losses, weights, scales, info), ok = jax.device_get((out, ok))
                dt = time.perf_counter() - t0
                stopped = []
                for i, r in enumerate(runs):
                    if not active[i]:
                        continue
                    tm = r.timing
                    if first:
                        tm["first_step_s"] += dt
                    else:
                        tm["step_time_sum"] += dt
                        tm["step_time_count"] += 1
                    h = r.history
                    h["step"].append(done)
                    h["loss"].append(np.asarray(losses[i], np.float64).tolist())
                    h["weight"].append(np.asarray(weights[i], np.float64).tolist())
                    h["scale"].append(np.asarray(scales[i], np.float64).tolist())
                    h["finite"].append(bool(ok[i]))
                    h["lr"].append(float(lr[i]))
                    for k, v in info.items():
                        h["info"].setdefault(k, []).append(np.asarray(v[i], np.float64).tolist())
                    if ok[i]:
                        r.consecutive = 0
                        if "converged" in info and not bool(np.asarray(info["converged"][i])):
                            r.nonconverged += 1
                            _warn_nonconverged(bench, r, cfg, done, log)
                    else:
                        r.skipped += 1
                        r.consecutive += 1
                    if r.consecutive >= cfg.max_skipped:
                        stopped.append(i)
                        r.status = "diverged"
                        r.message = (f"{bench.name} {r.name}: stopped at step {done} after {r.consecutive} consecutive "
                                     "non-finite steps (skipped); lower --lr or check the data")
                        log(r.message)
                first = False
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or done == cfg.steps:
                        l0 = np.asarray(losses[0])
                        bar.set_postfix_str("loss " + " ".join(f"{v:.3g}" for v in l0[:6])
                                            + (" ..." if len(l0) > 6 else ""))
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    _evaluate(bench, program, runs, state, done, reference, on_eval,
                              [i for i, r in enumerate(runs) if r.status == "ok" or i in stopped])
                elif stopped:  # a stopped run is evaluated once, where it stopped
                    _evaluate(bench, program, runs, state, done, reference, on_eval, stopped)
                if cfg.checkpoint_every:
                    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                        save_all(done, state)
                elif auto and (done == cfg.steps or time.perf_counter() - last_save > AUTO_CHECKPOINT_SECONDS):
                    save_all(done, state)
                    last_save = time.perf_counter()
                if cfg.interrupt_at is not None and done == cfg.interrupt_at:
                    stop.requested = "interrupt_at"
        except KeyboardInterrupt:  # a second signal, or one before the loop: stop now, save nothing
            forced = True
        finally:
            stop.deferring = False
            if bar is not None:
                bar.close()
            for it in iters:
                it.close()
        if forced or (stop.requested is not None and done < cfg.steps):
            raise RunInterrupted(_stop_message(runs, cfg, start, done, last_saved, forced,
                                               lambda: save_all(done, state)))
    finally:
        for r in runs:
            r.ckpt.close()
    wall = time.perf_counter() - wall0
    for r, s in zip(runs, unstack(state, K)):
        r.state = s
        r.timing["wall_before_s"] += wall / K
        r.timing["group_size"] = K


def _warn_nonconverged(bench, run: _Run, cfg: RunConfig, done: int, log) -> None:
    """Once per run: its solver missed its tolerance on more than 1 % of the planned steps."""
    if run.warned or run.nonconverged <= NONCONVERGED_WARN_FRACTION * cfg.steps:
        return
    run.warned = True
    log(f"warning: {bench.name} {run.name}: the {run.spec.method} solver stopped at its iteration cap without "
        f"reaching its tolerance on {run.nonconverged} of {done} steps so far (more than "
        f"{100 * NONCONVERGED_WARN_FRACTION:g} % of {cfg.steps}); those steps used approximate weights "
        "(nonconverged_steps in result.json; history.json has each step's certificate)")


def _evaluate(bench, program, runs, state, done, reference, on_eval, which) -> None:
    """Validation and test metrics of every run; recorded for the runs ``which``."""
    K = len(runs)
    vm, vl = program.evaluate(state, bench.val, K)
    tm, tl = program.evaluate(state, bench.test, K)
    for i in which:
        r = runs[i]
        r.history["val"].append({"step": done, "metrics": vm[i], "losses": vl[i], "test_metrics": tm[i],
                                 "test_losses": tl[i], "lr": r.plateau.lr(max(done - 1, 0))})
        names = _metric_names(bench, r.spec)
        ref = reference if reference is not None else r.history["val"][0]["metrics"]
        r.plateau.update(selection.score(vm[i], ref, bench.higher_is_better, names))
        if on_eval is not None:
            new = on_eval(r.spec, r.seed, r.history["val"], None if r.priorities is None else r.priorities.copy())
            if new is not None:
                if r.priorities is None:
                    raise ValueError("on_eval returned priorities for a run trained without priorities")
                r.priorities = np.asarray(new, np.float32)


def run_experiment(bench, specs: Sequence[RunSpec], seeds: Sequence[int], cfg: RunConfig, out, *,
                   reference: Optional[dict] = None, on_eval: Optional[Callable] = None,
                   probe: Optional[Callable] = None, probe_every: int = 0,
                   log: Callable[[str], None] = log) -> list[dict]:
    """Every (spec, seed) run into ``out/runs/...``; returns their results (spec-major order).

    ``reference``: validation metrics model selection measures Δm against (the single-task
    runs' when known; None: each run's first evaluation). ``on_eval(spec, seed, evals,
    priorities) -> new priorities or None`` is called after each evaluation (priority policies).
    ``probe(program) -> fn(params, method_state, batch, key) -> dict`` runs every
    ``probe_every`` steps before the update (the z-vs-θ ablation).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    by_group: dict = {}
    for spec in specs:
        by_group.setdefault((spec.method, spec.priorities is not None), []).append(spec)
    with _StopRequests() as stop:
        for (method, with_p), group_specs in by_group.items():
            program = Program(bench, method, cfg, with_priorities=with_p)
            runs, finished = [], set()
            for spec in group_specs:
                for seed in seeds:
                    run = _prepare(bench, spec, seed, cfg, out, program, log)
                    if run.result is not None:
                        results[(spec.label, seed)] = run.result
                        finished.add(run.ident)
                    else:
                        runs.append(run)
            size = _group_size(cfg, bench, len(runs), method)
            for chunk in _plan_groups(bench, runs, size, cfg, program, log, frozenset(finished), restore=_restore):
                if chunk[0].start < cfg.steps:
                    _train_group(bench, program, chunk, cfg, reference=reference, on_eval=on_eval, probe=probe,
                                 probe_every=probe_every, log=log, stop=stop)
                for r in chunk:
                    results[(r.spec.label, r.seed)] = _finish_result(bench, r, cfg, out, reference, log, _metric_names)
    return [results[(s.label, seed)] for s in specs for seed in seeds]
