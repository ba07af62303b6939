"""Fault injection through the runner's real entry point (issue 14; CI's slow step).

Every run is a child process: ``python -m experiments multimnist --tiny ...`` or, when a fault
must hit a precise point, a small driver that patches one function and then calls the same
entry point (``experiments.__main__.main``). The oracle is the uninterrupted run: after any
fault and a ``--resume``, the final checkpoint (parameters, optimizer state, method state),
``history.json`` and the test/validation metrics must equal it **bit for bit**; a fault that
cannot be recovered from must end with one stderr line and the exit status of
:mod:`experiments.errors`, leaving earlier checkpoints as they were.

=====================================  ==========================================================
fault                                  expected outcome
=====================================  ==========================================================
SIGKILL between checkpoints            ``--resume`` from step 8 == uninterrupted
SIGKILL inside orbax's save            ``--resume`` (partial save ignored) == uninterrupted
SIGKILL after orbax, before manifest   one warning, fallback to step 4, == uninterrupted
SIGTERM (as Ctrl-C)                    exit 130, one line; ``--resume`` == uninterrupted
newest checkpoint: metadata edited     one warning, fallback to step 4, == uninterrupted
newest checkpoint: one data byte       one warning, fallback to step 4, == uninterrupted
both checkpoints corrupt               exit 4, one error line, both kept as ``*.corrupt``
full disk (file-size limit) on save    exit 5, one line, checkpoints untouched; resume == same
NaN batch, every registered method     step skipped: state after it == state before, bitwise
=====================================  ==========================================================
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments multimnist"
ARGS = ["multimnist", "--tiny", "--method", "imtl_h", "--seeds", "0", "--steps", "12",
        "--checkpoint-every", "4", "--no-plots", "--no-tensorboard", "--quiet"]

DRIVER = textwrap.dedent('''
    """Patches one function to inject a fault, then runs the real entry point."""
    import json, os, signal, sys, threading
    import numpy as np
    plan = json.loads(os.environ["FAULT_PLAN"])
    from experiments.data import BatchIterator
    from experiments import checkpoints

    def die(sig=signal.SIGKILL):
        os.kill(os.getpid(), sig)

    original_batch_at = BatchIterator.batch_at

    def batch_at(self, k):
        if plan.get("kill_at_batch") == k:
            die()
        if plan.get("term_at_batch") == k:
            die(signal.SIGTERM)
        batch = original_batch_at(self, k)
        if k in plan.get("nan_batches", ()):
            batch = {name: (np.full_like(v, np.nan) if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
                     for name, v in batch.items()}
        return batch
    BatchIterator.batch_at = batch_at

    original_manifest = checkpoints._write_manifest

    def write_manifest(step_dir):
        if plan.get("kill_before_manifest") == int(step_dir.name):
            die()
        original_manifest(step_dir)
    checkpoints._write_manifest = write_manifest

    original_save = checkpoints.RunCheckpoints.save

    def save(self, step, leaves, meta):
        if plan.get("kill_during_save") == step:
            threading.Timer(plan.get("delay", 0.02), die).start()
        original_save(self, step, leaves, meta)
    checkpoints.RunCheckpoints.save = save

    from experiments.__main__ import main
    sys.exit(main(sys.argv[1:]))
''')


def run(out, *extra, plan=None, fsize=None, args=ARGS, tmp=None, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if plan is None:
        cmd = [sys.executable, "-m", "experiments"]
    else:
        driver = Path(tmp) / "driver.py"
        driver.write_text(DRIVER)
        env["FAULT_PLAN"] = json.dumps(plan)
        cmd = [sys.executable, str(driver)]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cmd + list(args) + ["--out", str(out)] + list(extra), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if fsize else None)


def run_dir(out, method="imtl_h"):
    return Path(out) / "runs" / method / "seed0"


def newest_state(out, method="imtl_h", step=None):
    """(step, leaves of the checkpoint, its metadata) read with orbax directly."""
    import orbax.checkpoint as ocp
    from experiments.checkpoints import RunCheckpoints
    ck = RunCheckpoints(run_dir(out, method) / "ckpt")
    step = ck.steps()[-1] if step is None else step
    r = ck._mngr().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
    ck.close()
    return step, [np.asarray(r.state[k]) for k in sorted(r.state)], r.meta


def bits(leaves):
    return [(x.dtype.str, x.shape, x.tobytes()) for x in leaves]


def outcome(out):
    d = run_dir(out)
    result = json.loads((d / "result.json").read_text())
    step, leaves, _ = newest_state(out)
    return {"step": step, "state": bits(leaves), "history": json.loads((d / "history.json").read_text()),
            **{k: result[k] for k in ("val", "test", "selected", "last", "skipped_steps", "final_weights",
                                      "steps_done", "status")}}


def ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    ok(run(out))
    return outcome(out)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run SIGKILLed while fetching batch 10 (checkpoints 4 and 8 on disk); tests copy it."""
    tmp = tmp_path_factory.mktemp("killed")
    p = run(tmp / "out", plan={"kill_at_batch": 10}, tmp=tmp)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    return tmp / "out"


def copy_of(killed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    return out


def assert_same_as_baseline(out, baseline, resumed_from):
    got = outcome(out)
    assert got == baseline
    assert json.loads((run_dir(out) / "result.json").read_text())["resumed_from"] == resumed_from


def warnings_of(p):
    return [line for line in p.stderr.splitlines() if line.startswith("warning: checkpoint")]


def test_kill_between_checkpoints_resumes_bitwise(killed, baseline, tmp_path):
    out = copy_of(killed, tmp_path)
    assert sorted(p.name for p in (run_dir(out) / "ckpt").iterdir()) == ["4", "8"]
    assert not (run_dir(out) / "result.json").exists()
    p = run(out, "--resume")
    ok(p)
    assert warnings_of(p) == []
    assert_same_as_baseline(out, baseline, resumed_from=8)


def test_kill_inside_orbax_save_resumes_bitwise(baseline, tmp_path):
    p = run(tmp_path / "out", plan={"kill_during_save": 8, "delay": 0.02}, tmp=tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    left = sorted(q.name for q in (run_dir(tmp_path / "out") / "ckpt").iterdir())
    assert "4" in left  # whatever the kill hit inside the save of 8, 4 is complete
    p = run(tmp_path / "out", "--resume")
    ok(p)
    resumed = json.loads((run_dir(tmp_path / "out") / "result.json").read_text())["resumed_from"]
    assert resumed in (4, 8)  # 8 only if the save had finished before the kill landed
    assert_same_as_baseline(tmp_path / "out", baseline, resumed_from=resumed)


def test_kill_after_orbax_before_manifest_falls_back(baseline, tmp_path):
    p = run(tmp_path / "out", plan={"kill_before_manifest": 8}, tmp=tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = run(tmp_path / "out", "--resume")
    ok(p)
    (w,) = warnings_of(p)
    assert "ckpt/8 is corrupt or partial" in w and "the save did not finish" in w
    assert_same_as_baseline(tmp_path / "out", baseline, resumed_from=4)


def test_sigterm_is_an_interrupt_and_resumes_bitwise(baseline, tmp_path):
    p = run(tmp_path / "out", plan={"term_at_batch": 10}, tmp=tmp_path)
    assert p.returncode == 130, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], p.stderr
    p = run(tmp_path / "out", "--resume")
    ok(p)
    resumed = json.loads((run_dir(tmp_path / "out") / "result.json").read_text())["resumed_from"]
    assert_same_as_baseline(tmp_path / "out", baseline, resumed_from=resumed)


@pytest.mark.parametrize("damage", ["metadata_step", "metadata_skipped", "data_byte"])
def test_damaged_newest_checkpoint_falls_back(killed, baseline, tmp_path, damage):
    out = copy_of(killed, tmp_path)
    ck8 = run_dir(out) / "ckpt" / "8"
    if damage.startswith("metadata"):  # the probe: "step": 20 -> 21 resumed silently
        meta = json.loads((ck8 / "meta" / "metadata").read_text())
        key = "step" if damage == "metadata_step" else "skipped_total"
        meta[key] += 1
        (ck8 / "meta" / "metadata").write_text(json.dumps(meta))
    else:
        victim = max((f for f in (ck8 / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
                     key=lambda f: f.stat().st_size)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    p = run(out, "--resume")
    ok(p)
    (w,) = warnings_of(p)
    assert str(ck8) in w and "falling back to the previous checkpoint" in w
    assert (ck8.parent / "8.corrupt").is_dir()
    assert_same_as_baseline(out, baseline, resumed_from=4)


def test_two_corrupt_checkpoints_end_with_one_error_line(killed, tmp_path):
    from experiments.errors import EXIT_CHECKPOINT
    out = copy_of(killed, tmp_path)
    ckdir = run_dir(out) / "ckpt"
    for s in ("4", "8"):
        (ckdir / s / "meta" / "metadata").write_text("{}")
    p = run(out, "--resume")
    assert p.returncode == EXIT_CHECKPOINT, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(warnings_of(p)) == 2
    assert lines[-1].startswith(f"{PROG}: error: no usable checkpoint in {ckdir}") and "--overwrite" in lines[-1]
    assert len(lines) == 3
    assert sorted(q.name for q in ckdir.iterdir()) == ["4.corrupt", "8.corrupt"]


def test_full_disk_during_save_is_one_line_and_loses_nothing(killed, baseline, tmp_path):
    """RLIMIT_FSIZE on the child (SIGXFSZ ignored): every write beyond 4 KiB fails with EFBIG,
    like a full disk, without a mount. The resumed run trains 8 -> 12 and fails saving 12."""
    from experiments.errors import EXIT_STORAGE
    out = copy_of(killed, tmp_path)
    ckdir = run_dir(out) / "ckpt"
    before = {f: f.read_bytes() for f in ckdir.rglob("*") if f.is_file()}
    p = run(out, "--resume", fsize=4096)
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    lines = [line for line in p.stderr.strip().splitlines() if "resumed from step 8" not in line]
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"{PROG}: error: could not write") and "(EFBIG)" in lines[0]
    assert "--resume" in lines[0]
    assert {f: f.read_bytes() for f in ckdir.rglob("*") if f.is_file()} == before  # untouched
    assert sorted(q.name for q in ckdir.iterdir()) == ["4", "8"]  # no partial 12
    p = run(out, "--resume")  # space freed
    ok(p)
    assert_same_as_baseline(out, baseline, resumed_from=8)


def test_nan_batch_is_skipped_exactly_for_every_method(tmp_path):
    """Batch 5 (the last of 6) is all NaN: every registered method skips that step, and its
    checkpoint after the step equals the one before it, bit for bit (params, optimizer state,
    method state: PCGrad's counter, DWA/FAMO/GradNorm histories), apart from the counters."""
    import imtl_jax
    # Checkpoints at step 5 (before the NaN batch) and 6 (after it) only: the two compared.
    args = ["multimnist", "--tiny", "--method", "all", "--seeds", "0", "--steps", "6",
            "--checkpoint-every", "5", "--eval-every", "6", "--no-plots", "--no-tensorboard", "--quiet"]
    p = run(tmp_path / "out", plan={"nan_batches": [5]}, args=args, tmp=tmp_path)
    ok(p)
    for method in imtl_jax.methods.method_names():
        result = json.loads((run_dir(tmp_path / "out", method) / "result.json").read_text())
        history = json.loads((run_dir(tmp_path / "out", method) / "history.json").read_text())
        assert result["status"] == "ok" and result["skipped_steps"] == 1, method
        assert history["finite"] == [True] * 5 + [False], method
        s5, before, m5 = newest_state(tmp_path / "out", method, step=5)
        s6, after, m6 = newest_state(tmp_path / "out", method, step=6)
        assert bits(after) == bits(before), method
        assert (m5["skipped_total"], m6["skipped_total"]) == (0, 1), method


def test_output_folder_that_cannot_be_created(tmp_path):
    """--out under a regular file: one line naming the path and the fix, exit 5."""
    from experiments.errors import EXIT_STORAGE
    (tmp_path / "file").write_text("not a folder")
    p = run(tmp_path / "file" / "out")
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert str(tmp_path / "file") in lines[0] and "pass another --out" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder(tmp_path):
    from experiments.errors import EXIT_STORAGE
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        p = run(tmp_path / "ro" / "out")
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0] and "Traceback" not in p.stderr
