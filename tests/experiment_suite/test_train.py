"""The training loop: vmapped seeds against plain one-by-one training, model selection on the
validation split through the real entry point, the constant-weights method, schedules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import suites
from experiments.options import Options
from experiments.runs import RunConfig, RunSpec, expand_methods
from experiments.train import run_experiment

STEPS = 6


@pytest.fixture(scope="module")
def bench():
    with suites.build("qm9", Options(benchmark="qm9", tiny=True)) as b:
        yield b


def _final_params(run_dir):
    """The parameters in the newest checkpoint of a run, as a flat list (checkpoint leaf order)."""
    from experiments.checkpoints import RunCheckpoints
    import orbax.checkpoint as ocp
    ck = RunCheckpoints(run_dir / "ckpt")
    step = ck.steps()[-1]
    r = ck._mngr().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
    ck.close()
    return step, [np.asarray(r.state[k]) for k in sorted(r.state)]


def _plain_flax_run(bench, method, seed, steps, lr, batch_size):
    """The oracle: one run trained with the library step and optax.adam directly, no vmap, no loop code."""
    import jax
    import optax
    import imtl_jax
    from experiments.data import BatchIterator
    pure = bench.pure_model(bench.make_model(seed))
    step = imtl_jax.mtl_step(pure.encoder, pure.task_losses, method)
    opt = optax.adam(lr)
    params = pure.params0
    opt_state, mstate = opt.init(params), step.init(params)
    it = BatchIterator(bench.train, batch_size, seed=seed)
    key = jax.random.key(seed)

    @jax.jit
    def one(params, opt_state, mstate, batch, k):
        grads, mstate, _ = step(params, mstate, batch, key=k)
        upd, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, mstate

    for k in range(steps):
        params, opt_state, mstate = one(params, opt_state, mstate, it.batch_at(k), jax.random.fold_in(key, k))
    return jax.tree_util.tree_leaves({"params": params, "opt_state": opt_state, "method_state": mstate})


# PCGrad draws its projection order from the per-run key: one step checks that every vmapped
# run gets its own key. Over more steps Adam turns round-off in (near-)zero gradient entries
# into O(lr) updates (g / (|g| + eps)), which PCGrad's branches expose: not a vmap effect.
@pytest.mark.parametrize("method,steps", [("imtl_h", STEPS), pytest.param("equal", STEPS, marks=pytest.mark.slow),
                                          pytest.param("pcgrad", 1, marks=pytest.mark.slow)])
def test_vmapped_seeds_equal_one_by_one_plain_runs(bench, tmp_path, method, steps):
    """K = 3 seeds as one vmapped program end where three plain optax runs end (float32 round-off)."""
    cfg = RunConfig(steps=steps, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=steps,
                    parallel_seeds=0, tensorboard=False)
    seeds = [0, 1, 2]
    res = run_experiment(bench, [RunSpec(method)], seeds, cfg, tmp_path, log=lambda m: None)
    assert all(r["group_size"] == 3 for r in res)
    for seed in seeds:
        step, got = _final_params(tmp_path / "runs" / method / f"seed{seed}")
        assert step == steps
        want = _plain_flax_run(bench, method, seed, steps, 1e-2, 4)
        # checkpoint leaves are keyed by their tree_leaves index ("00000", ...): same order
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, np.asarray(w), rtol=2e-5, atol=2e-6)
    # different seeds really trained differently (the vmapped axis is not broadcast)
    a = _final_params(tmp_path / "runs" / method / "seed0")[1]
    b = _final_params(tmp_path / "runs" / method / "seed1")[1]
    assert any(not np.allclose(x, y) for x, y in zip(a, b) if x.size > 1)


@pytest.mark.slow  # two whole training runs; test_vmapped_seeds_equal_one_by_one_plain_runs stays by default
def test_parallel_and_sequential_runs_agree(bench, tmp_path):
    """--parallel-seeds 1 (one by one) and 0 (all at once) give the same per-run results."""
    kw = dict(steps=STEPS, batch_size=4, lr=1e-2, eval_every=2, tensorboard=False, checkpoint_every=0)
    specs = expand_methods(["single_task"], bench.num_tasks)[:3] + [RunSpec("imtl_h", (1.0,) * bench.num_tasks)]
    a = run_experiment(bench, specs, [0, 1], RunConfig(parallel_seeds=1, **kw), tmp_path / "a", log=lambda m: None)
    b = run_experiment(bench, specs, [0, 1], RunConfig(parallel_seeds=0, **kw), tmp_path / "b", log=lambda m: None)
    assert [r["group_size"] for r in a] == [1] * len(a) and max(r["group_size"] for r in b) == 6
    for ra, rb in zip(a, b):
        assert (ra["method"], ra["seed"]) == (rb["method"], rb["seed"])
        for k in ra["test"]:
            assert math.isclose(ra["test"][k], rb["test"][k], rel_tol=1e-4), (ra["method"], k)


def test_single_task_is_linear_with_one_hot_priorities(bench, tmp_path):
    """single_task_t: weights e_t every step; other heads keep their initial parameters."""
    specs = expand_methods(["single_task"], bench.num_tasks)
    assert [s.method for s in specs] == ["linear"] * bench.num_tasks
    assert specs[2].priorities == tuple(1.0 if i == 2 else 0.0 for i in range(bench.num_tasks))
    cfg = RunConfig(steps=3, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=0, tensorboard=False)
    run_experiment(bench, specs[2:3], [0], cfg, tmp_path, log=lambda m: None)
    h = json.loads((tmp_path / "runs" / "single_task_2" / "seed0" / "history.json").read_text())
    for w in h["weight"]:
        assert w == [1.0 if i == 2 else 0.0 for i in range(bench.num_tasks)]


def _dm(metrics, ref, names):
    """Oracle of the selection score: Δm% with every metric lower-is-better (QM9's MAEs)."""
    return 100.0 * float(np.mean([(metrics[n] - ref[n]) / abs(ref[n]) for n in names]))


def test_entry_point_reports_test_metrics_at_best_validation_step(tmp_path):
    """`python -m experiments qm9` on a shrunken config with a large learning rate, so that the
    validation metric is best in the middle of training: the reported test metrics are those
    of the evaluation with the best validation metric, not those of the last step."""
    from experiments.__main__ import main
    out = tmp_path / "sel"
    rc = main(["qm9", "--tiny", "--quiet", "--out", str(out), "--method", "single_task", "imtl_h",
               "--targets", "mu", "homo", "--steps", "16", "--eval-every", "2", "--lr", "0.05",
               "--no-plots", "--no-tensorboard"])
    assert rc == 0
    runs = {}
    for lab in ("single_task_0", "single_task_1", "imtl_h"):
        h = json.loads((out / "runs" / lab / "seed0" / "history.json").read_text())
        r = json.loads((out / "runs" / lab / "seed0" / "result.json").read_text())
        runs[lab] = (h["val"], r)
    # single task t: the argmin of its own validation MAE
    for lab, metric in (("single_task_0", "mu_mae"), ("single_task_1", "homo_mae")):
        evals, r = runs[lab]
        best = int(np.argmin([e["metrics"][metric] for e in evals]))
        assert r["selected"]["step"] == evals[best]["step"]
        assert r["test"] == evals[best]["test_metrics"]
        assert r["test_last"] == evals[-1]["test_metrics"]
    # multi-task: best validation Δm against the single-task runs' validation metrics
    ref = {"mu_mae": runs["single_task_0"][1]["val"]["mu_mae"], "homo_mae": runs["single_task_1"][1]["val"]["homo_mae"]}
    evals, r = runs["imtl_h"]
    best = int(np.argmin([_dm(e["metrics"], ref, ["mu_mae", "homo_mae"]) for e in evals]))
    assert r["selected"]["step"] == evals[best]["step"] and r["test"] == evals[best]["test_metrics"]
    # the constructed case: for at least one run the last step is not the selected one
    assert any(rr["selected"]["step"] != rr["last"]["step"] for _, rr in runs.values())
    assert all(rr["record_version"] == 2 for _, rr in runs.values())
    table = json.loads((out / "results.json").read_text())
    assert table["summary"]["imtl_h"]["test"]["mu_mae"]["mean"] == pytest.approx(r["test"]["mu_mae"])


def test_per_task_best_tracking(bench, tmp_path):
    cfg = RunConfig(steps=8, batch_size=4, lr=0.05, eval_every=2, checkpoint_every=0, tensorboard=False)
    (r,) = run_experiment(bench, [RunSpec("equal")], [0], cfg, tmp_path, log=lambda m: None)
    h = json.loads((tmp_path / "runs" / "equal" / "seed0" / "history.json").read_text())
    evals = h["val"]
    ref = evals[0]["metrics"]
    for task in bench.task_names:
        name = f"{task}_mae"
        vals = [e["metrics"][name] for e in evals]
        best = int(np.argmin(vals))
        pt = r["per_task_best"][task]
        assert pt["best_step"] == evals[best]["step"] and pt["best_val"][name] == vals[best]
        assert pt["final_val"][name] == vals[-1]
        assert pt["gap"] == pytest.approx(100 * (vals[-1] - vals[best]) / abs(ref[name]), rel=1e-9, abs=1e-12)


def test_train_function_for_tuning_studies(tmp_path):
    """studies.compare.train: a benchmark's defaults with overrides, validation metrics back."""
    from experiments.studies.compare import train
    res = train("qm9", ["equal"], [0, 1], tmp_path, tiny=True, lr=0.02, steps=4, eval_every=2,
                targets=["mu", "homo"], tensorboard=False, checkpoint_every=0)
    assert [(r["method"], r["seed"]) for r in res] == [("equal", 0), ("equal", 1)]
    assert all(set(r["val"]) == {"mu_mae", "homo_mae"} for r in res)
    assert all(r["config"]["lr"] == 0.02 and r["config"]["steps"] == 4 for r in res)
    with pytest.raises(TypeError, match="unknown fields"):
        train("qm9", ["equal"], [0], tmp_path, tiny=True, learning_rate=0.1)


def test_default_grouping_follows_the_backend_and_the_model(bench):
    """None: one program for all runs, except convolutional benchmarks and parameter-level methods
    on CPU (one by one)."""
    import dataclasses as dc
    import jax
    from experiments.train import _group_size
    cfg = RunConfig(steps=1, batch_size=4, lr=1e-3, parallel_seeds=None)
    assert _group_size(cfg, bench, 5) == 5  # QM9's MLP
    conv = dc.replace(bench, vmap_on_cpu=False)
    assert _group_size(cfg, conv, 5) == (1 if jax.default_backend() == "cpu" else 5)
    assert _group_size(dc.replace(cfg, parallel_seeds=2), conv, 5) == 2
    assert _group_size(dc.replace(cfg, parallel_seeds=0), conv, 5) == 5
    for method in ("imtl_g_exact", "nash_mtl@params", "moco"):
        assert _group_size(cfg, bench, 5, method) == (1 if jax.default_backend() == "cpu" else 5)
        assert _group_size(dc.replace(cfg, parallel_seeds=0), bench, 5, method) == 5
    assert _group_size(cfg, bench, 5, "imtl_g") == 5
