"""The issue-15 studies through the real entry point at --tiny (slow: CI's second step).

Each test checks the property its study is about, not only that it ran:

* grouping: the groups trained are exactly ``propose_groups`` of the recorded affinity (which is
  the mean of the recorded probe cosine matrices: symmetric, unit diagonal, in [-1, 1]), the
  random grouping has the same sizes, every task is covered once, and every row has its Δm.
* overfitting: the policy run's final priorities are the plateau policy replayed over its own
  stored evaluations, some task was reduced at patience 1, and the reduced priorities reached
  training (the policy run's IMTL weights differ from plain IMTL-H's after the first drop,
  while both start from the same initialization and batches).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import imtl_jax

pytestmark = pytest.mark.slow


def _main(argv):
    from experiments.__main__ import main
    assert main(argv) == 0


def test_grouping_study_tiny(tmp_path):
    out = tmp_path / "grouping"
    _main(["grouping", "--tiny", "--quiet", "--no-tensorboard", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    a = np.asarray(res["affinity"])
    T = len(res["tasks"])
    assert a.shape == (T, T) and res["probes"] > 0
    np.testing.assert_allclose(a, a.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(a), 1.0, atol=1e-6)
    assert np.all(np.abs(a) <= 1 + 1e-6)
    # the affinity is the mean of the probes the equal-weighting runs recorded
    probes = []
    for seed in res["seeds"]:
        h = json.loads((out / "all" / "runs" / "equal" / f"seed{seed}" / "history.json").read_text())
        probes += [np.asarray(p["cosines"]) for p in h["probe"]]
    np.testing.assert_allclose(a, np.mean(probes, axis=0), atol=1e-9)
    prop = [tuple(g) for g in res["groupings"]["proposed_k2"]]
    assert tuple(prop) == imtl_jax.propose_groups(a, 2)
    rand = [tuple(g) for g in res["groupings"]["random_k2"]]
    assert sorted(len(g) for g in rand) == sorted(len(g) for g in prop)
    for groups in (prop, rand):
        assert sorted(i for g in groups for i in g) == list(range(T))
    configs = {(r["config"], r["method"]) for r in res["rows"]}
    for m in ("equal", "imtl_h"):
        assert {("all tasks", m), ("proposed k=2", m), ("random k=2", m)} <= configs
    for r in res["rows"]:
        assert r["n"] == len(res["seeds"]) and np.isfinite(r["delta_m"])
    assert "| proposed k=2 | imtl_h | 2 |" in (out / "results.md").read_text()


def test_overfitting_study_tiny(tmp_path):
    from experiments.studies.overfitting import policy_label, policy_priorities
    out = tmp_path / "overfitting"
    _main(["overfitting", "--tiny", "--quiet", "--no-tensorboard", "--patience", "1",
           "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["patience"] == [1]
    policy = policy_label(1)
    reduced_any = False
    for seed in res["seeds"]:
        d = out / "runs" / policy / f"seed{seed}"
        result = json.loads((d / "result.json").read_text())
        hist = json.loads((d / "history.json").read_text())
        names = [f"{t}_mae" for t in res["tasks"]]
        state, trail = policy_priorities(hist["val"], names, [False] * len(names), 1, res["reduced"])
        np.testing.assert_allclose(result["final_priorities"], trail[-1], rtol=1e-6)
        drops = [i for i, p in enumerate(trail) if min(p) < 1]
        if drops:
            reduced_any = True
            # training with the reduced priorities differs from plain IMTL-H after the first drop
            plain = json.loads((out / "runs" / "imtl_h" / f"seed{seed}" / "history.json").read_text())
            first = hist["val"][drops[0]]["step"]
            w_pol = np.asarray(hist["weight"][first:])
            w_plain = np.asarray(plain["weight"][first:])
            assert np.max(np.abs(w_pol - w_plain)) > 1e-4
            np.testing.assert_allclose(hist["weight"][:first], plain["weight"][:first], rtol=1e-4, atol=1e-6)
    assert reduced_any
    frac = res["summary"][policy]["reduced_fraction"]
    assert len(frac) == len(res["tasks"]) and max(frac) > 0
    for lab in ("equal", "imtl_h", policy):
        assert set(res["summary"][lab]["gaps"]) == set(res["tasks"])
