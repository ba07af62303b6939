"""The training loop's bookkeeping: exact resume, corrupt checkpoints, determinism, divergence
stop, Ctrl-C, reports and command-line errors. Runs on the tiny generated QM9 fixture (an MLP:
fast to compile), 8 steps of IMTL-H (trained log-scales, Adam state) per run."""

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

from experiments import cli, report, suites
from experiments.checkpoints import RunCheckpoints
from experiments.options import Options
from experiments.runs import RunConfig, RunSpec
from experiments.train import RunInterrupted, run_experiment

STEPS = 8
SPEC = RunSpec("imtl_h")
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def bench():
    with suites.build("qm9", Options(benchmark="qm9", tiny=True)) as b:
        yield b


def _cfg(**kw):
    base = RunConfig(steps=STEPS, batch_size=4, lr=1e-2, eval_every=4, checkpoint_every=2, tensorboard=False)
    return dataclasses.replace(base, **kw)


def _run(bench, out, cfg, spec=SPEC, seed=0, log=None):
    return run_experiment(bench, [spec], [seed], cfg, out, log=log or (lambda m: None))[0]


def _rd(out, spec=SPEC, seed=0) -> Path:
    return Path(out) / "runs" / spec.label / f"seed{seed}"


def _final_leaves(run_dir: Path):
    import orbax.checkpoint as ocp
    ck = RunCheckpoints(run_dir / "ckpt")
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
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"] and ra["selected"] == rb["selected"]


@pytest.fixture(scope="module")
def straight(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    res = _run(bench, d, _cfg())
    assert res["status"] == "ok" and res["steps_done"] == STEPS
    return _rd(d)


def test_interrupted_and_resumed_run_is_bit_identical(bench, straight, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(bench, tmp_path, _cfg(interrupt_at=5))
    d = _rd(tmp_path)
    # every 2 steps, and the interrupted step 5 itself (saved on Ctrl-C); keep 2
    assert RunCheckpoints(d / "ckpt").steps() == [4, 5]
    logs = []
    res = _run(bench, tmp_path, _cfg(resume=True), log=logs.append)
    assert res["resumed_from"] == 5 and any("resumed from step 5" in m for m in logs)
    _assert_same_run(straight, d)
    assert not np.allclose(_history(d)["scale"][-1], 1.0)  # IMTL-L's log-scales are covered too
    logs.clear()
    again = _run(bench, tmp_path, _cfg(resume=True), log=logs.append)
    assert again == res and "skipped" in logs[-1]


def test_ctrl_c_message_tells_the_truth(bench, tmp_path):
    """Default checkpoints: Ctrl-C saves and says --resume; --checkpoint-every 0: says nothing can be resumed."""
    with pytest.raises(RunInterrupted, match="--resume") as e:
        _run(bench, tmp_path / "auto", _cfg(checkpoint_every=None, interrupt_at=3))
    assert "\n" not in str(e.value)
    assert RunCheckpoints(_rd(tmp_path / "auto") / "ckpt").steps() == [3]
    res = _run(bench, tmp_path / "auto", _cfg(checkpoint_every=None, resume=True))
    assert res["resumed_from"] == 3 and res["steps_done"] == STEPS
    with pytest.raises(RunInterrupted, match="cannot be resumed"):
        _run(bench, tmp_path / "off", _cfg(checkpoint_every=0, interrupt_at=3))
    assert RunCheckpoints(_rd(tmp_path / "off") / "ckpt").steps() == []


_ORBAX_CLEANUP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_CLEANUP
@pytest.mark.parametrize("damage", ["truncate", pytest.param("delete", marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_to_previous(bench, straight, tmp_path, damage):
    _run(bench, tmp_path, _cfg(steps=6))
    ckdir = _rd(tmp_path) / "ckpt"
    assert RunCheckpoints(ckdir).steps() == [4, 6]
    for f in (ckdir / "6" / "state").rglob("*"):
        if f.is_file() and damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
        elif f.is_file() and f.parent.name == "d":
            f.unlink()
    logs = []
    res = _run(bench, tmp_path, _cfg(resume=True), log=logs.append)
    warn = [m for m in logs if "is corrupt or partial" in m]
    assert len(warn) == 1 and str(ckdir / "6") in warn[0] and "\n" not in warn[0], logs
    assert res["resumed_from"] == 4 and res["corrupt_checkpoints"] == [str(ckdir / "6")]
    assert (ckdir / "6.corrupt").is_dir()
    _assert_same_run(straight, _rd(tmp_path))


def test_same_seed_twice_is_identical_and_seeds_differ(bench, straight, tmp_path):
    _run(bench, tmp_path / "again", _cfg(checkpoint_every=STEPS))
    _assert_same_run(straight, _rd(tmp_path / "again"))
    _run(bench, tmp_path / "s1", _cfg(checkpoint_every=0), seed=1)
    assert _history(_rd(tmp_path / "s1", seed=1))["loss"] != _history(straight)["loss"]


def test_existing_checkpoints_need_resume_or_overwrite(bench, straight, tmp_path):
    shutil.copytree(straight, _rd(tmp_path))
    with pytest.raises(cli.CheckpointError, match="--resume .* --overwrite"):
        _run(bench, tmp_path, _cfg())
    with pytest.raises(cli.CheckpointError, match="different configuration"):
        _run(bench, tmp_path, _cfg(resume=True, lr=0.5))
    res = _run(bench, tmp_path, _cfg(overwrite=True, checkpoint_every=0))
    assert res["status"] == "ok" and RunCheckpoints(_rd(tmp_path) / "ckpt").steps() == []


def test_consecutive_nonfinite_steps_stop_the_run_and_not_its_neighbours(bench, tmp_path):
    """A diverging run stops with one line; a run vmapped beside it (other priorities) trains on."""
    logs = []
    T = bench.num_tasks
    cfg = _cfg(lr=1e30, steps=30, max_skipped=3, checkpoint_every=0, eval_every=0)
    eq = RunSpec("equal")
    res = run_experiment(bench, [eq], [0], cfg, tmp_path, log=logs.append)[0]
    assert res["status"] == "diverged" and res["steps_done"] < 30 and res["skipped_steps"] >= 3
    msg = [m for m in logs if "consecutive non-finite" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "--lr" in msg[0]
    assert _history(_rd(tmp_path, eq))["finite"][-3:] == [False] * 3
    bad = RunSpec("linear", (float("inf"),) * T, "inf")
    good = RunSpec("linear", (1.0,) * T, "ones")
    both = run_experiment(bench, [bad, good], [0], _cfg(lr=1e-2, steps=6, max_skipped=2, checkpoint_every=0,
                                                        eval_every=0), tmp_path / "both", **QUIET)
    # infinite weights make every step of that run non-finite: only that run stops
    assert [r["status"] for r in both] == ["diverged", "ok"] and both[1]["steps_done"] == 6


def test_loss_scale_multiplies_one_task(bench):
    from experiments.data import BatchIterator
    model = bench.make_model(0)
    plain = bench.pure_model(model)
    factors = np.ones(bench.num_tasks, np.float32)
    factors[2] = 10.0
    scaled = bench.pure_model(model, factors)
    batch = BatchIterator(bench.train, 4).batch_at(0)
    p = plain.params0
    z = plain.encoder(p.shared, batch)
    a = plain.task_losses(p.heads, z, batch)
    b = scaled.task_losses(p.heads, z, batch)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a.at[2].multiply(10.0)), rtol=1e-6)
    # and the stacked per-task losses equal the NNX model's own forward pass with the plain loss
    from experiments import losses as L
    preds = model.heads(model.encoder(batch["x"]))
    np.testing.assert_allclose(np.asarray(L.regression_losses(preds, batch["y"])), np.asarray(a), rtol=1e-5)


def _fake_result(method, seed, test, task=None):
    return {"method": method if task is None else f"single_task_{task}", "base_method": method,
            "single_task": task, "seed": seed, "status": "ok", "test": test, "val": test,
            "wall_time_s": 1.0, "step_time_ms": 2.0, "skipped_steps": 0, "steps_done": 10,
            "steps_planned": 10, "config": {}}


def test_summary_uses_single_task_baseline_and_both_delta_conventions():
    from experiments import metrics
    specs = (metrics.MetricSpec("task1_acc", "l", True), metrics.MetricSpec("task2_acc", "r", True))
    b = suites.Benchmark(name="multimnist", task_names=("l", "r"), train=None, val=None, test=None,
                             make_model=None, pure_model=None, metrics=specs, stats=None, finalize=None)
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
    tom = {"task1_acc": "l", "task2_acc": "r"}
    dm = [metrics.delta_m(r["test"], s["baseline"], hib) for r in results[2:4]]
    dp = [metrics.delta_p(r["test"], s["baseline"], hib, tom) for r in results[2:4]]
    assert e["delta_m"]["mean"] == pytest.approx(np.mean(dm)) and e["delta_m"]["mean"] < 0
    assert e["delta_p"]["mean"] == pytest.approx(np.mean(dp)) and e["delta_p"]["mean"] > 0
    assert e["test"]["task1_acc"]["mean"] == pytest.approx(0.945)
    # 95 % Student-t half-width with n - 1 = 1 degree of freedom, from scipy directly
    from scipy import stats as sps
    vals = np.array([0.99, 0.90])
    assert e["test"]["task1_acc"]["ci95"] == pytest.approx(sps.t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2))
    assert e["test"]["task1_acc"]["n"] == 2
    # paired difference to equal weighting: only seed 0 has both
    ew0 = metrics.delta_m(results[4]["test"], s["baseline"], hib)
    assert e["delta_m_minus_ew"] == {"mean": pytest.approx(dm[0] - ew0), "ci95": None, "n": 1}
    table = report.markdown_table(b, s)
    assert "94.50 ± " in table and "Δm − EW" in table
    s2 = report.summarize(b, results[2:])
    assert "fallback" in s2["baseline_label"] and s2["methods"]["equal"]["delta_m"]["mean"] == 0.0


# ---------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("argv,needle", [
    (["celeba"], "--data-dir"),
    (["nyuv2", "--data-dir", "/nonexistent/nyu"], "/nonexistent/nyu"),
    (["multimnist", "--steps", "x"], "--steps"),
    (["multimnist", "--steps", "3", "--epochs", "1"], "not allowed"),
    (["multimnist", "--method", "nope"], "unknown method 'nope'"),
    (["multimnist", "--lr", "-1"], "--lr"),
    (["qm9", "--bogus"], "unrecognized arguments"),
    (["qm9", "--tiny", "--loss-scale-task", "99", "--loss-scale", "10"], "out of range"),
    (["qm9", "--tiny", "--batch-size", "1000"], "--batch-size"),
    (["qm9", "--tiny", "--targets", "mu", "nope"], "--targets"),
    (["robustness", "--loss-scale", "1", "--tiny", "--benchmark", "qm9"], "k != 1"),
    (["priorities", "--tiny", "--benchmark", "qm9", "--targets", "mu"], "two-task"),
    (["cityscapes", "--tiny", "--seeds", "a"], "--seeds"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path):
    from experiments.__main__ import main
    rc = main(argv + ["--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    from experiments.errors import EXIT_DATA, EXIT_USAGE
    assert rc == (EXIT_DATA if argv[:2] == ["nyuv2", "--data-dir"] else EXIT_USAGE)  # a missing folder: data
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert err.startswith(f"python -m experiments {argv[0]}: error:")


def test_cli_error_exit_status_in_a_subprocess(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-m", "experiments", "cityscapes", "--out", str(tmp_path)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--data-dir" in p.stderr and "Traceback" not in p.stderr


def test_epochs_become_steps(bench):
    o = Options(benchmark="qm9", tiny=True, steps=None, epochs=1.5, batch_size=4)
    cfg = RunConfig.from_options(o, bench)
    assert cfg.steps == int(np.ceil(1.5 * (len(bench.train) // 4)))


def test_constant_curves_are_not_plotted(tmp_path):
    from experiments.plots import plot_method
    steps = list(range(1, 11))
    flat = {"step": steps, "weight": [[1.0, 1.0]] * 10, "scale": [[1.0, 1.0]] * 10,
            "loss": [[1.0 / k, 2.0 / k] for k in steps], "val": []}
    moving = dict(flat, weight=[[k / 10, 1 - k / 10] for k in steps])
    assert [p.name for p in plot_method(tmp_path, "equal", [flat], [0], ("a", "b"))] == ["losses_equal.png"]
    assert [p.name for p in plot_method(tmp_path, "imtl_g", [moving], [0], ("a", "b"))] == [
        "weights_imtl_g.png", "losses_imtl_g.png"]
