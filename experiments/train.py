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

Stops (issue 26): during training SIGINT and SIGTERM only *request* a stop; the loop honours it
between two steps, where the state, the step counter, the history and the evaluations are
consistent, saves there and raises :class:`RunInterrupted`. A second signal stops at once
without saving (the newest checkpoint on disk stays the valid one). On load, the optimizer's
step count and every method-state counter must equal the number of updates the checkpoint's
label and history imply; a checkpoint that disagrees is refused in one line (and the previous
one used). Grouping: each checkpoint records the runs it was vmapped with; a resume trains them
as that same group again (rolling a run that was saved one checkpoint ahead back to the
group's common step), and evaluation runs each run on its own, so no number depends on how
runs were grouped.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from experiments import records, selection
from experiments.checkpoints import LabelMismatch, RunCheckpoints, _diff
from experiments.errors import CheckpointError
from experiments.program import Program, stack, unstack
from experiments.runs import RunConfig, RunSpec, run_dir
from experiments.schedules import Plateau, Schedule

__all__ = ["run_experiment", "RunInterrupted", "AUTO_CHECKPOINT_SECONDS", "NONCONVERGED_WARN_FRACTION", "log"]

AUTO_CHECKPOINT_SECONDS = 60.0
NONCONVERGED_WARN_FRACTION = 0.01  # warn once when a run's solver missed its tolerance on more steps


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``str()`` says what was saved and how to continue."""


class _StopRequests:
    """SIGINT/SIGTERM handling of :func:`run_experiment` (main thread only).

    While ``deferring`` (inside the training loop) the first signal only sets ``requested``;
    the loop checks it between steps. A second signal, or any signal outside the loop,
    raises KeyboardInterrupt at once (nothing half-updated is saved then). A signal that was
    ignored (SIG_IGN, e.g. SIGINT of a background job) stays ignored."""

    def __init__(self):
        self.requested: Optional[str] = None
        self.deferring = False
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if not self.deferring or self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


_COUNTER = "count"


def _counters(state) -> list:
    """(path, value) of the step counters in a run's state: optax's ``count`` in the optimizer
    state (Adam) and a method state's own ``count`` (DWA, FAMO, GradNorm, PCGrad, RLW, ...),
    each advanced once per applied update. A method's inner optimizer (FAMO's logits' Adam,
    one step behind by design) is not one of them."""
    import jax
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names and names[-1] == _COUNTER and "opt_state" not in names[1:-1] and np.ndim(leaf) == 0:
            out.append((jax.tree_util.keystr(path), int(np.asarray(leaf))))
    return out


def _check_label(treedef, step: int, leaves: list, meta: dict) -> None:
    """Raises :class:`LabelMismatch` when the checkpoint filed as ``step`` holds a state whose
    counters disagree with it: the updates applied (finite steps of the history, which for a
    run still training covers every step up to ``step``) must equal each counter."""
    import jax
    h = meta.get("history") or {}
    finite = h.get("finite") or []
    status = meta.get("status", "ok")
    if status == "ok" and (len(h.get("step") or []) != step or (step and h["step"][-1] != step)):
        raise LabelMismatch(f"labelled step {step}, its history holds {len(h.get('step') or [])} steps")
    updates = sum(bool(x) for x in finite)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    wrong = [f"{name} = {value}" for name, value in _counters(state) if value != updates]
    if wrong:
        skipped = len(finite) - updates
        raise LabelMismatch(
            f"labelled step {step}, i.e. {updates} updates applied" + (f" ({skipped} steps skipped)" if skipped else "")
            + f", but the state holds {', '.join(wrong)}: its contents belong to another step")


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


def _solver_record(history: dict) -> tuple[int, int]:
    """(applied steps whose solver reported ``converged``, those of them it reported False);
    (0, 0) for a method without an iterative solver. ``converged`` covers the newest steps
    (a run resumed from a checkpoint of a version without it covers fewer)."""
    conv = (history.get("info") or {}).get("converged") or []
    finite = history["finite"][len(history["finite"]) - len(conv):] if conv else []
    return sum(1 for f in finite if f), sum(1 for c, f in zip(conv, finite) if f and not c)


def _nonconverged(history: dict) -> int:
    """Applied (finite) steps whose solver reported ``converged`` False."""
    return _solver_record(history)[1]


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
                    pkeys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), step))(keys)
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


def _stop_message(runs, cfg, start, done, last_saved, forced, save) -> str:
    """Saves (a requested stop with checkpoints on) and says what was kept, in one line."""
    where = runs[0].dir.parent.parent
    if forced:
        if last_saved is not None and cfg.checkpoint_every != 0:
            return (f"stopped at once by a second interrupt, without saving; the checkpoints at step {last_saved} "
                    f"under {where} are intact — rerun the same command with --resume to continue")
        return ("stopped at once (a second interrupt) before anything of these runs was saved; nothing to resume "
                "for them (finished runs are kept; --resume skips them)")
    if cfg.checkpoint_every == 0:
        return (f"interrupted at step {done}; checkpoints are off (--checkpoint-every 0), so these runs "
                "cannot be resumed (finished runs are kept; --resume skips them)")
    if done > start:
        if last_saved != done:
            save()
        return (f"interrupted at step {done}; checkpoint written under {where} — rerun the same command with "
                "--resume to continue")
    if start > 0:
        return (f"interrupted before step {start + 1}; the checkpoints at step {start} under {where} are "
                "intact — rerun the same command with --resume to continue")
    return ("interrupted before the first training step; nothing to resume for these runs (finished "
            "runs are kept; --resume skips them)")


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


def _finish(bench, run: _Run, cfg: RunConfig, out: Path, reference, log) -> dict:
    h = run.history
    evals = h["val"]
    names = _metric_names(bench, run.spec)
    i = selection.select(evals, bench.higher_is_better, names, reference)
    sel, last = evals[i], evals[-1]
    tm = run.timing
    n_t = tm["step_time_count"]
    steps_done = h["step"][-1] if h["step"] else run.start
    solver_steps, run.nonconverged = _solver_record(h)
    result = {
        "record_version": records.RECORD_VERSION,
        "benchmark": bench.name, "method": run.spec.label, "base_method": run.spec.method,
        "priorities": list(run.spec.priorities) if run.spec.priorities else None,
        "final_priorities": None if run.priorities is None else run.priorities.tolist(),
        "single_task": run.spec.single_task, "seed": run.seed, "tasks": list(bench.task_names),
        "run_dir": str(run.dir.relative_to(out)),
        "status": run.status, "message": run.message, "complete": run.status == "ok",
        "steps_planned": cfg.steps, "steps_done": steps_done if run.status != "ok" else cfg.steps,
        "skipped_steps": run.skipped, "nonconverged_steps": run.nonconverged, "solver_steps": solver_steps,
        "resumed_from": run.resumed_from, "corrupt_checkpoints": run.corrupt,
        "selection": {"criterion": "best validation Δm% over " + ("the task's metrics" if run.spec.single_task
                      is not None else "every task's metrics"),
                      "reference": "single-task validation metrics" if reference is not None else "first evaluation",
                      "metrics": names},
        "selected": {"step": sel["step"], "val": sel["metrics"], "test": sel["test_metrics"]},
        "last": {"step": last["step"], "val": last["metrics"], "test": last["test_metrics"]},
        "val": sel["metrics"], "test": sel["test_metrics"], "val_losses": sel["losses"],
        "test_losses": sel["test_losses"], "val_last": last["metrics"], "test_last": last["test_metrics"],
        "per_task_best": selection.per_task_best(evals, bench.higher_is_better, bench.metric_tasks, reference),
        "final_weights": h["weight"][-1] if h["weight"] else None,
        "final_scales": h["scale"][-1] if h["scale"] else None,
        "wall_time_s": tm["wall_before_s"], "group_size": tm.get("group_size", 1),
        "step_time_ms": 1e3 * tm["step_time_sum"] / n_t if n_t else None, "first_step_s": tm["first_step_s"],
        "config": cfg.describe(), "fingerprint": run.fingerprint, "machine": records.machine(),
    }
    if h.get("probe"):
        result["probe_summary"] = _probe_summary(h["probe"])
    result = records.to_json(result)
    records.write_run(run.dir, result, h, tensorboard=cfg.tensorboard)
    first_metric = names[0]
    log(f"{bench.name} {run.name}: {run.status}, {result['steps_done']} steps, {result['wall_time_s']:.1f} s; "
        f"selected step {sel['step']} of {last['step']} on validation; test {first_metric} "
        f"{sel['test_metrics'].get(first_metric)!s:.8} (last step {last['test_metrics'].get(first_metric)!s:.8})"
        + (f"; solver short of its tolerance on {run.nonconverged} of {solver_steps} steps" if solver_steps else ""))
    return result


def _probe_summary(probes: list) -> dict:
    out = {}
    for k in [k for k in probes[0] if k != "step"]:
        vals = [p[k] for p in probes if isinstance(p.get(k), (int, float))]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                      "last": float(vals[-1]), "n": len(vals)}
    return out


def _group_size(cfg: RunConfig, bench, n: int) -> int:
    k = cfg.parallel_seeds
    if k is None:
        import jax
        k = 1 if jax.default_backend() == "cpu" and not getattr(bench, "vmap_on_cpu", True) else 0
    return k if k > 0 else max(n, 1)


def _plan_groups(bench, runs: list, size: int, cfg: RunConfig, program: Program, log,
                 finished: frozenset = frozenset()) -> list:
    """The vmapped groups to train, in order.

    A run resumed from a checkpoint rejoins the group it was trained in (its checkpoint names
    the runs, in order), whatever ``--parallel-seeds`` says now: the same compiled program
    then continues the same runs. A run whose newest checkpoint is ahead of its group's (a
    kill between the per-run saves) is rolled back to the group's common step, and its newer
    checkpoints are removed (they are recomputed bit for bit). Runs without a recorded group
    (fresh runs, checkpoints of older versions) are grouped by start step, ``size`` at a time.
    """
    by_ident = {r.ident: r for r in runs}
    groups: list = []
    taken: set = set()
    for r in runs:
        if r.group is None or r.ident in taken:
            continue
        group = list(r.group)  # r's own record may be reset by a roll-back below
        done_elsewhere = [n for n in group if n not in by_ident and n in finished]
        missing = [n for n in group if n not in by_ident and n not in finished]
        if missing:
            raise CheckpointError(
                f"{bench.name} {r.name} was trained in one vmapped group with {', '.join(missing)} (checkpoint "
                f"{r.ckpt.directory / str(r.start)}); resume them together (the same --methods and --seeds) so the "
                "group keeps its compiled shape, or pass --overwrite to start over")
        members = [by_ident[n] for n in group if n in by_ident]
        other = [m for m in members if m.group is not None and m.group != group]
        if other:
            raise CheckpointError(
                f"{bench.name}: the checkpoints of {r.name} and {other[0].name} record different vmapped groups "
                f"({', '.join(group)} vs {', '.join(other[0].group)}); pass --overwrite to start over")
        while len({m.start for m in members}) > 1:
            common = min(m.start for m in members)
            for m in members:
                if m.start > common:
                    ahead = m.start
                    _restore(bench, m, cfg, program, log, at_most=common)
                    gone = m.ckpt.discard_after(m.start)
                    log(f"{bench.name} {m.name}: rolled back from step {ahead} to step {m.start} to resume with its "
                        f"vmapped group ({', '.join(group)}); removed its checkpoints {gone}")
        if done_elsewhere and min(m.start for m in members) < cfg.steps:
            # only when a member's final checkpoint was lost after that member finished
            log(f"warning: {bench.name} {r.name}: its vmapped group's {', '.join(done_elsewhere)} finished "
                f"earlier; it resumes in a smaller group (training may then differ from an uninterrupted run "
                f"at float32 round-off; evaluation does not)")
        if len(members) > size:
            log(f"{bench.name}: {', '.join(group)} resume as the one vmapped group they were trained in "
                f"(--parallel-seeds now asks for groups of {size}), so that no number depends on the grouping")
        groups.append(members)
        taken.update(m.ident for m in members)
    by_start: dict = {}
    for r in runs:
        if r.ident not in taken:
            by_start.setdefault(r.start, []).append(r)
    for start_runs in by_start.values():
        for i in range(0, len(start_runs), size):
            groups.append(start_runs[i:i + size])
    return groups


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
            size = _group_size(cfg, bench, len(runs))
            for chunk in _plan_groups(bench, runs, size, cfg, program, log, frozenset(finished)):
                if chunk[0].start < cfg.steps:
                    _train_group(bench, program, chunk, cfg, reference=reference, on_eval=on_eval, probe=probe,
                                 probe_every=probe_every, log=log, stop=stop)
                for r in chunk:
                    results[(r.spec.label, r.seed)] = _finish(bench, r, cfg, out, reference, log)
    return [results[(s.label, seed)] for s in specs for seed in seeds]
