"""The experiment harness: exact resume, corrupt checkpoints, determinism, divergence stop,
reports and command-line errors. Runs on the tiny generated QM9 fixture (an MLP: fast to
compile), 8 steps of IMTL-H (trained log-scales, Adam state) per run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import cli, harness, report

STEPS = 8


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    parser = cli.make_parser("test", "test")
    s = cli.parse_settings(parser, ["--tiny", "--out", str(tmp_path_factory.mktemp("unused"))])
    b = harness.build_benchmark("qm9", s)
    yield b
    if b.cleanup:
        b.cleanup()


def _cfg(**kw):
    base = harness.RunConfig(steps=STEPS, batch_size=4, lr=1e-2, eval_every=4, checkpoint_every=2)
    return dataclasses.replace(base, **kw)


SPEC = harness.MethodSpec("imtl_h")


def _final_leaves(run_dir: Path):
    """Every leaf of the newest checkpoint of a run (params, optimizer and method state)."""
    import orbax.checkpoint as ocp
    ck = harness.RunCheckpoints(run_dir / "ckpt")
    step = ck.steps()[-1]
    r = ck._mngr().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
    ck.close()
    return step, [np.asarray(r.state[k]) for k in sorted(r.state)], r.meta


def _history(run_dir: Path):
    return json.loads((run_dir / "history.json").read_text())


def _assert_same_run(a: Path, b: Path):
    sa, la, _ = _final_leaves(a)
    sb, lb, _ = _final_leaves(b)
    assert sa == sb == STEPS
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert _history(a) == _history(b)
    ra = json.loads((a / "result.json").read_text())
    rb = json.loads((b / "result.json").read_text())
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"]


@pytest.fixture(scope="module")
def straight(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    res = harness.train_run(bench, SPEC, 0, _cfg(), d, log=lambda m: None)
    assert res["status"] == "ok" and res["steps_done"] == STEPS
    return d


def test_interrupted_and_resumed_run_is_bit_identical(bench, straight, tmp_path):
    d = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        harness.train_run(bench, SPEC, 0, _cfg(interrupt_at=5), d, log=lambda m: None)
    assert harness.RunCheckpoints(d / "ckpt").steps() == [2, 4]
    logs = []
    res = harness.train_run(bench, SPEC, 0, _cfg(resume=True), d, log=logs.append)
    assert res["resumed_from"] == 4 and any("resumed from step 4" in m for m in logs)
    _assert_same_run(straight, d)
    # log-scales moved, so the test covers IMTL-L's trained parameters too
    assert not np.allclose(_history(d)["scale"][-1], 1.0)
    # a finished run is skipped on --resume
    again = harness.train_run(bench, SPEC, 0, _cfg(resume=True), d, log=logs.append)
    assert again == res and "skipped" in logs[-1]


# orbax's async reader may report an "Event loop is closed" during cleanup after a failed read:
# harmless (the failure itself is what these tests provoke).
_ORBAX_CLEANUP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_CLEANUP
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(bench, straight, tmp_path, damage):
    d = tmp_path / "c"
    harness.train_run(bench, SPEC, 0, _cfg(steps=6), d, log=lambda m: None)
    ckdir = d / "ckpt"
    assert harness.RunCheckpoints(ckdir).steps() == [4, 6]
    if damage == "truncate":  # a partial write: every file of the array item cut in half
        for f in (ckdir / "6" / "state").rglob("*"):
            if f.is_file():
                with open(f, "r+b") as fh:
                    fh.truncate(f.stat().st_size // 2)
    else:  # the array data files deleted
        for f in (ckdir / "6" / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.unlink()
    logs = []
    res = harness.train_run(bench, SPEC, 0, _cfg(resume=True), d, log=logs.append)
    warn = [m for m in logs if "is corrupt or partial" in m]
    assert len(warn) == 1 and str(ckdir / "6") in warn[0] and "\n" not in warn[0], logs
    assert res["resumed_from"] == 4 and res["corrupt_checkpoints"] == [str(ckdir / "6")]
    assert (ckdir / "6.corrupt").is_dir()  # kept for inspection, not deleted
    _assert_same_run(straight, d)  # 4 -> 8 from the good checkpoint == the straight run


@_ORBAX_CLEANUP
def test_checkpoint_checksum_catches_silent_damage(tmp_path):
    ck = harness.RunCheckpoints(tmp_path / "ck", keep=3)
    leaves1 = [np.arange(2000, dtype=np.float32), np.array(3, np.int32)]
    leaves2 = [leaves1[0] + 1, np.array(4, np.int32)]
    ck.save(1, leaves1, {"x": 1})
    ck.save(2, leaves2, {"x": 2})
    ck.close()
    for victim in (tmp_path / "ck" / "2" / "state").rglob("*"):
        if victim.is_file() and victim.parent.name == "d":  # one flipped byte per data file
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))
    logs = []
    step, leaves, meta, bad = harness.RunCheckpoints(tmp_path / "ck").restore_latest(leaves1, log=logs.append)
    assert step == 1 and meta["x"] == 1 and all(np.array_equal(a, b) for a, b in zip(leaves, leaves1))
    assert bad == [str(tmp_path / "ck" / "2")] and "is corrupt or partial" in logs[0]
    # every checkpoint damaged: a clear error naming the folder
    shutil.rmtree(tmp_path / "ck" / "1" / "state")
    with pytest.raises(cli.CheckpointError, match="no usable checkpoint in"):
        harness.RunCheckpoints(tmp_path / "ck").restore_latest(leaves1, log=logs.append)


def test_same_seed_twice_is_identical_and_seeds_differ(bench, straight, tmp_path):
    harness.train_run(bench, SPEC, 0, _cfg(checkpoint_every=STEPS), tmp_path / "again", log=lambda m: None)
    _assert_same_run(straight, tmp_path / "again")
    harness.train_run(bench, SPEC, 1, _cfg(checkpoint_every=0), tmp_path / "seed1", log=lambda m: None)
    assert _history(tmp_path / "seed1")["loss"] != _history(straight)["loss"]


def test_existing_checkpoints_need_resume_or_overwrite(bench, straight, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(straight, d)
    with pytest.raises(cli.CheckpointError, match="--resume .* --overwrite"):
        harness.train_run(bench, SPEC, 0, _cfg(), d, log=lambda m: None)
    with pytest.raises(cli.CheckpointError, match="different configuration"):
        harness.train_run(bench, SPEC, 0, _cfg(resume=True, lr=0.5), d, log=lambda m: None)
    res = harness.train_run(bench, SPEC, 0, _cfg(overwrite=True, checkpoint_every=0), d, log=lambda m: None)
    assert res["status"] == "ok" and harness.RunCheckpoints(d / "ckpt").steps() == []


def test_consecutive_nonfinite_steps_stop_the_run(bench, tmp_path):
    logs = []
    res = harness.train_run(bench, harness.MethodSpec("equal"), 0,
                            _cfg(lr=1e30, steps=50, max_skipped=3, checkpoint_every=0, eval_every=0),
                            tmp_path / "nan", log=logs.append)
    assert res["status"] == "diverged" and res["steps_done"] < 50
    assert res["skipped_steps"] >= 3
    msg = [m for m in logs if "consecutive non-finite" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "--lr" in msg[0]
    hist = _history(tmp_path / "nan")
    assert hist["finite"][-3:] == [False] * 3


def test_loss_scale_multiplies_one_task(bench):
    from experiments.data import BatchIterator
    model = bench.make_model(0)
    plain = harness.FunctionalModel(bench, model)
    scaled = harness.FunctionalModel(bench, model, loss_scale_task=2, loss_scale=10.0)
    batch = BatchIterator(bench.train, 4).batch_at(0)
    p = plain.params0
    z = plain.encoder(p.shared, batch)
    a = plain.task_losses(p.heads, z, batch)
    b = scaled.task_losses(p.heads, z, batch)
    expect = a.at[2].multiply(10.0)
    np.testing.assert_allclose(np.asarray(b), np.asarray(expect), rtol=1e-6)
    # and the stacked per-task losses equal the model's own full forward pass
    preds = plain.predict(p, batch)
    np.testing.assert_allclose(np.asarray(plain.eval_losses(preds, batch)), np.asarray(a), rtol=1e-5)


def _fake_result(method, seed, test, task=None):
    return {"method": method if task is None else f"single_task_{task}", "base_method": method,
            "single_task": task, "seed": seed, "status": "ok", "test": test, "val": test,
            "wall_time_s": 1.0, "step_time_ms": 2.0, "skipped_steps": 0, "steps_done": 10,
            "steps_planned": 10, "config": {}}


def test_summary_uses_single_task_baseline_and_both_delta_conventions():
    from experiments import metrics
    b = harness.Benchmark(name="multimnist", metric_benchmark="multimnist", task_names=("l", "r"),
                          train=None, val=None, test=None, make_model=None, input_key="image")
    results = [
        _fake_result("single_task", 0, {"task1_acc": 0.90, "task2_acc": 0.10}, task=0),
        _fake_result("single_task", 0, {"task1_acc": 0.10, "task2_acc": 0.80}, task=1),
        _fake_result("imtl_h", 0, {"task1_acc": 0.99, "task2_acc": 0.80}),
        _fake_result("imtl_h", 1, {"task1_acc": 0.90, "task2_acc": 0.88}),
        _fake_result("equal", 0, {"task1_acc": 0.90, "task2_acc": 0.80}),
    ]
    s = report.summarize(b, results)
    assert s["baseline_label"] == "single-task runs"
    assert s["baseline"] == {"task1_acc": 0.90, "task2_acc": 0.80}
    assert s["order"][0] == "single_task"
    e = s["methods"]["imtl_h"]
    hib = {"task1_acc": True, "task2_acc": True}
    tom = {"task1_acc": "task1", "task2_acc": "task2"}
    dm = [metrics.delta_m(r["test"], s["baseline"], hib) for r in results[2:4]]
    dp = [metrics.delta_p(r["test"], s["baseline"], hib, tom) for r in results[2:4]]
    assert e["delta_m"]["mean"] == pytest.approx(np.mean(dm)) and e["delta_m"]["mean"] < 0
    assert e["delta_p"]["mean"] == pytest.approx(np.mean(dp)) and e["delta_p"]["mean"] > 0
    assert e["test"]["task1_acc"]["mean"] == pytest.approx(0.945)
    assert e["test"]["task1_acc"]["std"] == pytest.approx(0.045)
    table = report.markdown_table(b, s)
    assert "Δm% ↓" in table and "94.50 ± 4.50" in table
    # without single-task runs: equal weighting, labelled as the fallback
    s2 = report.summarize(b, results[2:])
    assert "fallback" in s2["baseline_label"] and s2["methods"]["equal"]["delta_m"]["mean"] == 0.0


# ---------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("script,argv,needle", [
    ("celeba", [], "--data-dir"),
    ("nyuv2", ["--data-dir", "/nonexistent/nyu"], "/nonexistent/nyu"),
    ("multimnist", ["--steps", "x"], "--steps"),
    ("multimnist", ["--steps", "3", "--epochs", "1"], "not allowed"),
    ("multimnist", ["--method", "nope"], "unknown method 'nope'"),
    ("multimnist", ["--lr", "-1"], "--lr"),
    ("qm9", ["--bogus"], "unrecognized arguments"),
    ("qm9", ["--tiny", "--loss-scale-task", "99", "--loss-scale", "10"], "out of range"),
    ("qm9", ["--tiny", "--batch-size", "1000"], "--batch-size"),
    ("robustness", ["--loss-scale", "1", "--tiny"], "k != 1"),
    ("cityscapes", ["--tiny", "--seeds", "a"], "--seeds"),
])
def test_cli_errors_are_one_line_exit_2(script, argv, needle, capsys, tmp_path):
    import importlib
    mod = importlib.import_module(f"experiments.{script}")
    rc = mod.main(argv + ["--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert err.startswith(f"python -m experiments.{script}: error:")


def test_cli_error_exit_status_in_a_subprocess(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-m", "experiments.cityscapes", "--out", str(tmp_path)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--data-dir" in p.stderr and "Traceback" not in p.stderr


def test_shared_single_task_method_matches_the_registry_factory(bench):
    """The harness's state-driven single-task method (one compile for all T runs) gives the same
    gradients as imtl_jax.methods.single_task(t) of the baseline registry."""
    import imtl_jax
    factory = imtl_jax.methods.single_task
    from experiments.data import BatchIterator
    fm = harness.FunctionalModel(bench, bench.make_model(0))
    batch = BatchIterator(bench.train, 4).batch_at(0)
    spec = harness.MethodSpec("single_task", 3)
    mine = imtl_jax.mtl_step(fm.encoder, fm.task_losses, spec.resolve())
    ref = imtl_jax.mtl_step(fm.encoder, fm.task_losses, factory(3))
    state = spec.initial_method_state(mine.init(fm.params0), bench.num_tasks)
    g1, _, a1 = mine(fm.params0, state, batch)
    g2, _, a2 = ref(fm.params0, ref.init(fm.params0), batch)
    np.testing.assert_array_equal(np.asarray(a1.weights), np.asarray(a2.weights))
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_epochs_become_steps(bench, tmp_path):
    parser = cli.make_parser("t", "t")
    s = cli.parse_settings(parser, ["--tiny", "--epochs", "1.5", "--batch-size", "4", "--out", str(tmp_path)])
    cfg = harness.settings_to_run_config(s, bench)
    spe = len(bench.train) // 4
    assert s.steps is None and cfg.steps == int(np.ceil(1.5 * spe))
