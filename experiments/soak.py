"""Kill/resume soak of ``python -m experiments`` (issue 26).

    python -m experiments.soak [--kills 15] [--seed 0] [--out DIR] [--tiny] [--jobs famo imtl_h mgda]

Short QM9 jobs, each run twice: once uninterrupted, once stopped again and again by a fault
drawn at random and resumed with ``--resume`` after each, until ``--kills`` faults (split over
the jobs) have landed; then the stopped run is finished and every run's ``result.json`` (less
wall times, the machine and the resume bookkeeping), ``history.json`` and checkpoints (state
leaves bit for bit, metadata less wall times) are compared with the uninterrupted run's.

Jobs (``--jobs``): ``famo`` (a stateful method: its own step counter and an inner Adam) and
``imtl_h`` (trained loss scales), seeds 0 1 2 as one vmapped group; ``mgda`` (an iterative
solver), seeds 0 1 one at a time (``--parallel-seeds 1``). Data: QM9 with ``--max-train``
molecules (qm9pack; ``--tiny``: the generated fixture, no download).

Faults, each at a random step (or time) and seed of the job:

=========================  ==================================================================
``sigkill_time``           SIGKILL after a random delay: anywhere (start-up, compile, a step, a
                           save, a result write)
``sigterm_time``           SIGTERM after a random delay
``kill_between_seed_saves`` SIGKILL as seed k starts its save of step S (the seeds before it in
                           its group have saved S, those after it have not)
``kill_inside_save``       SIGKILL a few milliseconds into seed k's save of step S (inside orbax)
``kill_before_manifest``   SIGKILL after orbax wrote seed k's step S, before its manifest
``term_in_save``           SIGTERM as seed k starts its save of step S (the stop must wait for
                           the save and the group's other saves)
``term_after_update``      SIGTERM right after the train step of step S returned: where the old
                           loop had replaced the state but not yet advanced the step counter
``kill_at_batch``          SIGKILL while fetching the batch of step S
=========================  ==================================================================

A landed fault ends the child with SIGKILL, SIGTERM (before the handlers are installed) or exit
status 130 (a graceful stop); anything else (a traceback, exit 4 for an unusable checkpoint) is
a failure. Exit status of the soak: 0 when every job matches its uninterrupted run, 1 otherwise.
The guarantee and its conditions: docs/experiments.md, "Stops and resumes".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sigkill_time", "sigterm_time", "kill_between_seed_saves", "kill_inside_save", "kill_before_manifest",
         "term_in_save", "term_after_update", "kill_at_batch")
SAVE_KINDS = ("kill_between_seed_saves", "kill_inside_save", "kill_before_manifest", "term_in_save")
JOBS = {
    "famo": (["--methods", "famo", "--seeds", "0", "1", "2", "--parallel-seeds", "0"], "famo", [0, 1, 2]),
    "imtl_h": (["--methods", "imtl_h", "--seeds", "0", "1", "2", "--parallel-seeds", "0"], "imtl_h", [0, 1, 2]),
    "mgda": (["--methods", "mgda", "--seeds", "0", "1", "--parallel-seeds", "1"], "mgda", [0, 1]),
}
# result.json fields that legitimately differ between an interrupted and an uninterrupted run
VOLATILE = ("wall_time_s", "step_time_ms", "first_step_s", "machine", "resumed_from", "corrupt_checkpoints")

DRIVER = r'''
"""Installs one fault (SOAK_PLAN), then runs the real entry point."""
import json, os, signal, sys, threading
from pathlib import Path
plan = json.loads(os.environ.get("SOAK_PLAN") or "{}")
kind, step, seed = plan.get("kind"), plan.get("step"), plan.get("seed")


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


def seed_of(ckpt_dir):  # .../runs/<label>/seed<k>/ckpt
    return int(Path(ckpt_dir).parent.name[len("seed"):])


from experiments import checkpoints
if kind in ("kill_between_seed_saves", "kill_inside_save", "term_in_save"):
    original_save = checkpoints.RunCheckpoints.save

    def save(self, s, leaves, meta):
        if s == step and seed_of(self.directory) == seed:
            if kind == "kill_between_seed_saves":
                die()
            elif kind == "kill_inside_save":
                threading.Timer(plan.get("delay", 0.01), die).start()
            else:
                die(signal.SIGTERM)
        return original_save(self, s, leaves, meta)
    checkpoints.RunCheckpoints.save = save
if kind == "kill_before_manifest":
    original_manifest = checkpoints._write_manifest

    def write_manifest(step_dir):
        if int(step_dir.name) == step and seed_of(step_dir.parent) == seed:
            die()
        original_manifest(step_dir)
    checkpoints._write_manifest = write_manifest
if kind == "term_after_update":
    import jax
    from experiments import program
    armed = []
    real_get, real_init = jax.device_get, program.Program.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        inner = self.train_step

        def train_step(*args):
            out = inner(*args)
            if int(args[3]) == step:
                armed.append(1)
            return out
        self.train_step = train_step
    program.Program.__init__ = init

    def device_get(x):
        if armed:
            armed.clear()
            die(signal.SIGTERM)
        return real_get(x)
    jax.device_get = device_get
if kind == "kill_at_batch":
    from experiments.data import BatchIterator
    original_batch = BatchIterator.batch_at

    def batch_at(self, k):
        if k == step:
            die()
        return original_batch(self, k)
    BatchIterator.batch_at = batch_at

from experiments.__main__ import main
sys.exit(main(sys.argv[1:]))
'''


def job_args(name: str, *, tiny: bool, steps: int, checkpoint_every: int, eval_every: int,
             max_train: int) -> list:
    """The ``python -m experiments`` arguments of one job (without ``--out``/``--resume``)."""
    args = ["qm9", *JOBS[name][0], "--steps", str(steps), "--checkpoint-every", str(checkpoint_every),
            "--eval-every", str(eval_every), "--schedule", "plateau", "--plateau-patience", "1",
            "--no-plots", "--no-tensorboard", "--quiet"]
    if tiny:
        return args + ["--tiny", "--batch-size", "4"]
    return args + ["--max-train", str(max_train), "--max-eval", "500", "--hidden", "32", "32", "--batch-size", "64"]


def _child(args: list, out: Path, plan: Optional[dict], *, resume: bool, delay: Optional[float] = None,
           timeout: float = 900.0) -> tuple[int, str]:
    """Runs one child; ``plan``: a fault for the driver; ``delay``: the signal of a time fault.
    Returns (return code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "experiments"]
    if plan is not None and plan["kind"] not in ("sigkill_time", "sigterm_time"):
        driver = out.parent / "soak_driver.py"
        driver.write_text(DRIVER)
        env["SOAK_PLAN"] = json.dumps(plan)
        cmd = [sys.executable, str(driver)]
    cmd += args + ["--out", str(out)] + (["--resume"] if resume else [])
    err_path = out.parent / f".{out.name}.stderr"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            if delay is not None:
                try:
                    p.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL if plan and plan["kind"] == "sigkill_time" else signal.SIGTERM)
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return p.returncode, err_path.read_text()


def _run_dirs(out: Path, label: str, seeds) -> list:
    return [out / "runs" / label / f"seed{s}" for s in seeds]


def _complete(run_dir: Path, steps: int) -> bool:
    try:
        r = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(r.get("complete")) and r.get("steps_planned") == steps


def _newest(run_dir: Path) -> int:
    ck = run_dir / "ckpt"
    return max((int(p.name) for p in ck.iterdir() if p.name.isdigit()), default=0) if ck.is_dir() else 0


def _plan(kind: str, rng: random.Random, *, pending: list, progress: int, steps: int, checkpoint_every: int,
          grouped: bool, left: int) -> Optional[dict]:
    """A fault of ``kind`` that can still land (None: it cannot, from ``progress`` on), drawn from
    the next ``1 / left`` of the remaining steps so that ``left`` faults fit in the job."""
    seeds = [int(d.name[len("seed"):]) for d in pending]
    saves = [s for s in range(checkpoint_every, steps + 1, checkpoint_every) if s > progress] or \
        ([steps] if steps > progress else [])
    if kind in SAVE_KINDS:
        if not saves:
            return None
        pick = seeds[1:] if kind == "kill_between_seed_saves" and grouped and len(seeds) > 1 else seeds
        saves = saves[:max(1, len(saves) // max(1, left))]
        plan = {"kind": kind, "step": rng.choice(saves), "seed": rng.choice(pick)}
        if kind == "kill_inside_save":
            plan["delay"] = rng.choice([0.001, 0.005, 0.02, 0.05])
        return plan
    if kind in ("term_after_update", "kill_at_batch"):
        if progress >= steps:
            return None
        return {"kind": kind, "step": rng.randrange(progress, progress + max(1, (steps - progress) // max(1, left)))}
    return {"kind": kind}


def _leaves_and_meta(run_dir: Path, step: int):
    import orbax.checkpoint as ocp
    from experiments.checkpoints import RunCheckpoints
    ck = RunCheckpoints(run_dir / "ckpt")
    try:
        r = ck._mngr().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    finally:
        ck.close()
    leaves = [np.asarray(r.state[k]) for k in sorted(r.state)]
    meta = {k: v for k, v in r.meta.items() if k not in ("timing", "digest")}
    return [(x.dtype.str, x.shape, x.tobytes()) for x in leaves], meta


def compare(baseline: Path, soaked: Path, label: str, seeds) -> list:
    """What differs between two finished jobs (empty: identical bit for bit)."""
    diffs = []
    for b, s in zip(_run_dirs(baseline, label, seeds), _run_dirs(soaked, label, seeds)):
        name = f"{label}/seed{b.name[len('seed'):]}"
        try:
            rb, rs = (json.loads((d / "result.json").read_text()) for d in (b, s))
        except (OSError, ValueError) as e:
            diffs.append(f"{name}: result.json unreadable ({e})")
            continue
        keys = sorted(k for k in set(rb) | set(rs) if k not in VOLATILE and rb.get(k) != rs.get(k))
        if keys:
            diffs.append(f"{name}: result.json differs in {keys}")
        if (b / "history.json").read_text() != (s / "history.json").read_text():
            diffs.append(f"{name}: history.json differs")
        # A graceful stop saves at the step it stops at, so the stopped run may keep a checkpoint
        # the uninterrupted run never wrote: the newest must be the same, every common one equal.
        steps_b = sorted(int(p.name) for p in (b / "ckpt").iterdir() if p.name.isdigit())
        steps_s = sorted(int(p.name) for p in (s / "ckpt").iterdir() if p.name.isdigit())
        if not steps_s or steps_s[-1] != steps_b[-1]:
            diffs.append(f"{name}: checkpoints {steps_s} vs {steps_b} uninterrupted")
        for step in sorted(set(steps_b) & set(steps_s)):
            lb, mb = _leaves_and_meta(b, step)
            ls, ms = _leaves_and_meta(s, step)
            if lb != ls:
                diffs.append(f"{name}: checkpoint {step}: state leaves differ")
            if mb != ms:
                diffs.append(f"{name}: checkpoint {step}: metadata differs in "
                             f"{sorted(k for k in set(mb) | set(ms) if mb.get(k) != ms.get(k))}")
    return diffs


def soak_job(name: str, out: Path, kills: int, rng: random.Random, *, tiny: bool = False, steps: int = 60,
             checkpoint_every: int = 5, eval_every: int = 15, max_train: int = 2000,
             log: Callable[[str], None] = print) -> dict:
    """One job: uninterrupted, then stopped ``kills`` times and resumed; returns a report."""
    args = job_args(name, tiny=tiny, steps=steps, checkpoint_every=checkpoint_every, eval_every=eval_every,
                    max_train=max_train)
    _, label, seeds = JOBS[name]
    base, soaked = out / name / "uninterrupted", out / name / "stopped"
    t0 = time.perf_counter()
    rc, err = _child(args, base, None, resume=False)
    if rc != 0:
        raise RuntimeError(f"{name}: the uninterrupted run failed ({rc}): {err[-2000:]}")
    wall = time.perf_counter() - t0
    # the faults of a vmapped group's per-seed saves first (so a short soak has them), then the
    # other kinds in a random order, repeated
    first = ["kill_between_seed_saves", "kill_inside_save"] if name != "mgda" else []
    kinds = itertools.cycle(first + rng.sample([k for k in KINDS if k not in first], len(KINDS) - len(first)))
    landed: list = []
    failures: list = []
    attempts = 0
    while len(landed) < kills and attempts < 4 * kills + len(KINDS):
        pending = [d for d in _run_dirs(soaked, label, seeds) if not _complete(d, steps)]
        if not pending:
            break
        progress = min(_newest(d) for d in pending)
        kind = next(kinds)
        left = kills - len(landed)
        plan = _plan(kind, rng, pending=pending, progress=progress, steps=steps,
                     checkpoint_every=checkpoint_every, grouped=name != "mgda", left=left)
        if plan is None:
            continue
        attempts += 1
        delay = None
        if kind in ("sigkill_time", "sigterm_time"):
            # start-up (imports, data, compilation) is most of a short job: draw over it and over
            # this fault's share of the training left
            delay = rng.uniform(0.2, max(1.0, wall * (1.0 - progress / steps) * 2.0 / left))
            plan["delay_s"] = round(delay, 3)
        rc, err = _child(args, soaked, plan, resume=True, delay=delay)
        if rc in (-signal.SIGKILL, -signal.SIGTERM, 130):
            plan.update(rc=rc, after=progress)
            landed.append(plan)
            log(f"  {name}: {kind} {json.dumps({k: v for k, v in plan.items() if k != 'kind'})}")
        elif rc != 0:
            failures.append(f"{name}: {kind} {plan}: exit {rc}: {err.strip()[-1500:]}")
            break
    rc, err = _child(args, soaked, None, resume=True)
    if rc != 0:
        failures.append(f"{name}: the final resume failed ({rc}): {err.strip()[-1500:]}")
    diffs = [] if failures else compare(base, soaked, label, seeds)
    corrupt = sorted(str(p.relative_to(soaked)) for p in soaked.rglob("*.corrupt*") if p.is_dir())
    return {"job": name, "kills": len(landed), "resumes": len(landed) + 1, "landed": landed,
            "failures": failures, "differences": diffs, "quarantined": corrupt, "uninterrupted_s": round(wall, 1)}


def soak(out: os.PathLike, kills: int = 15, seed: int = 0, jobs=("famo", "imtl_h", "mgda"), *,
         log: Callable[[str], None] = print, **kw) -> list:
    """Every job of ``jobs`` with ``kills`` faults split over them; returns their reports."""
    out = Path(out)
    rng = random.Random(seed)
    reports: list = []
    for i, name in enumerate(jobs):
        # this job's share of the faults not landed yet (a job that finished early passes its
        # remainder on)
        k = -(-(kills - sum(r["kills"] for r in reports)) // (len(jobs) - i))
        log(f"{name}: {k} faults")
        reports.append(soak_job(name, out, k, rng, log=log, **kw))
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=15, help="faults to land, split over the jobs (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws (default 0)")
    p.add_argument("--out", default="runs/soak", help="working folder (default runs/soak; emptied first)")
    p.add_argument("--jobs", nargs="+", default=["famo", "imtl_h", "mgda"], choices=list(JOBS))
    p.add_argument("--tiny", action="store_true", help="the generated QM9 fixture instead of qm9pack's data")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--max-train", type=int, default=2000)
    a = p.parse_args(argv)
    import shutil
    shutil.rmtree(a.out, ignore_errors=True)
    reports = soak(a.out, a.kills, a.seed, tuple(a.jobs), tiny=a.tiny, steps=a.steps,
                   checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, max_train=a.max_train)
    bad = False
    for r in reports:
        kinds = sorted({f["kind"] for f in r["landed"]})
        ok = not r["failures"] and not r["differences"]
        bad |= not ok
        print(f"{r['job']}: {r['kills']} faults landed, {r['resumes']} resumes, "
              f"{'bit-identical' if ok else 'DIFFERENT'} to the uninterrupted run; kinds {', '.join(kinds)}; "
              f"quarantined {len(r['quarantined'])}")
        for line in r["failures"] + r["differences"]:
            print("  " + line)
    total = sum(r["kills"] for r in reports)
    print(f"total: {total} faults, {sum(r['resumes'] for r in reports)} resumes; "
          + ("all bit-identical" if not bad else "FAILED"))
    (Path(a.out) / "soak_report.json").write_text(json.dumps(reports, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
