import jax.numpy as jnp
import numpy as np
import pytest

from experiments import metrics as M


def test_confusion_matrix_by_hand():
    # true:  0 0 1 1 2 2 2 -1
    # pred:  0 1 1 1 2 0 1  2
    labels = jnp.array([0, 0, 1, 1, 2, 2, 2, -1])
    pred = jnp.array([0, 1, 1, 1, 2, 0, 1, 2])
    cm = np.asarray(M.confusion_matrix(pred, labels, 3))
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 1, 1]]
    # IoU_0 = 1/(2+2-1) = 1/3; IoU_1 = 2/(2+4-2) = 1/2; IoU_2 = 1/(3+1-1) = 1/3
    out = M.segmentation_from_confusion(cm)
    assert out["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert out["pixel_acc"] == pytest.approx(4 / 7)


def test_segmentation_accumulates_and_skips_absent_classes():
    logits = jnp.eye(4)[jnp.array([[[0, 1], [1, 3]]])]  # predictions 0,1,1,3 ; 4 classes
    labels = jnp.array([[[0, 1], [-1, 3]]])
    s = M.segmentation_stats(logits, labels)
    tot = M.accumulate(M.accumulate(None, s), s)
    assert tot["seg_confusion" if "seg_confusion" in tot else "confusion"].dtype == np.int64
    cm = tot["confusion"]
    assert cm.sum() == 6 and np.trace(cm) == 6
    out = M.segmentation_from_confusion(cm)
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0  # class 2 absent: excluded


def test_classification_and_regression_stats():
    logits = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    labels = jnp.array([[0, 1], [1, 1], [1, 0]])
    s = M.classification_stats(logits, labels)
    np.testing.assert_allclose(M.accuracy_from_stats(M.accumulate(None, s)), [2 / 3, 2 / 3])
    b = M.binary_stats(jnp.array([[[1.0], [-1.0]], [[-2.0], [3.0]]]), jnp.array([[1, 1], [1, 1]]))
    np.testing.assert_allclose(M.accuracy_from_stats(b), [0.5, 0.5])
    preds = jnp.array([[[1.0], [2.0]], [[0.0], [0.0]]])  # standardized
    y = jnp.array([[0.0, 1.0], [0.0, -1.0]])
    std = jnp.array([2.0, 10.0])
    s1 = M.regression_stats(preds, y, std)
    s2 = M.regression_stats(preds, y, std)
    np.testing.assert_allclose(M.mae_from_stats(M.accumulate(M.accumulate(None, s1), s2)), [3.0, 10.0])


def test_depth_stats_by_hand():
    pred = jnp.array([[[[1.0], [3.0], [7.0]]]])
    gt = jnp.array([[[[2.0], [2.0], [0.0]]]])
    s = M.accumulate(None, M.depth_stats(pred, gt))
    out = M.depth_from_stats(s)
    assert out["abs_err"] == pytest.approx(1.0)
    assert out["rel_err"] == pytest.approx(0.5)


def test_normal_stats_by_hand():
    degs = np.array([0.0, 10.0, 20.0, 25.0, 45.0, 90.0, 180.0])
    rad = np.radians(degs)
    pred = np.stack([np.cos(rad), np.sin(rad), np.zeros_like(rad)], -1) * 3.0  # scale does not matter
    true = np.tile([1.0, 0.0, 0.0], (len(degs), 1))
    true = np.concatenate([true, np.zeros((2, 3))])  # two invalid pixels
    pred = np.concatenate([pred, np.ones((2, 3))])
    ang = np.asarray(M.normal_angles(jnp.asarray(pred[:7], jnp.float32), jnp.asarray(true[:7], jnp.float32)))
    np.testing.assert_allclose(ang, degs, atol=1e-3)
    s = M.normal_stats(jnp.asarray(pred[None, None], jnp.float32), jnp.asarray(true[None, None], jnp.float32))
    s = M.accumulate(None, s)
    assert s["count"] == 7
    out = M.normal_from_stats(s)
    assert out["mean"] == pytest.approx(degs.mean(), abs=1e-3)
    assert out["median"] == pytest.approx(25.0, abs=M.NORMAL_HIST_BIN_DEG)
    assert out["within_11.25"] == pytest.approx(100 * 2 / 7)
    assert out["within_22.5"] == pytest.approx(100 * 3 / 7)
    assert out["within_30"] == pytest.approx(100 * 4 / 7)


def test_normal_median_many_values():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1, 50, 40, 3))
    w = v + 0.4 * rng.normal(size=v.shape)
    s = M.accumulate(None, M.normal_stats(jnp.asarray(w, jnp.float32), jnp.asarray(v, jnp.float32)))
    ang = np.degrees(np.arccos(np.clip(np.sum(v * w, -1) / np.linalg.norm(v, axis=-1) / np.linalg.norm(w, axis=-1),
                                       -1, 1)))
    out = M.normal_from_stats(s)
    assert out["median"] == pytest.approx(np.median(ang), abs=0.02)
    assert out["mean"] == pytest.approx(ang.mean(), abs=1e-3)


def test_delta_m_and_delta_p_disagree():
    # Task A: one metric (acc, higher better) improves by 4%.
    # Task B: three error metrics (lower better) each worsen by 2%.
    specs = [
        M.MetricSpec("a_acc", "A", True),
        M.MetricSpec("b_e1", "B", False),
        M.MetricSpec("b_e2", "B", False),
        M.MetricSpec("b_e3", "B", False),
    ]
    base = {"a_acc": 0.5, "b_e1": 1.0, "b_e2": 2.0, "b_e3": 4.0}
    mtl = {"a_acc": 0.52, "b_e1": 1.02, "b_e2": 2.04, "b_e3": 4.08}
    hib = M.higher_is_better_map(specs)
    tom = M.task_of_metric_map(specs)
    # Δm = -(1/4)(+4 - 2 - 2 - 2) = +0.5  (worse than baseline)
    assert M.delta_m(mtl, base, hib) == pytest.approx(0.5)
    # Δp = (1/2)(+4 + (-2)) = +1.0  (better than baseline)
    assert M.delta_p(mtl, base, hib, tom) == pytest.approx(1.0)
    assert M.delta_m(base, base, hib) == 0.0 and M.delta_p(base, base, hib, tom) == 0.0
    with pytest.raises(KeyError):
        M.delta_m({"a_acc": 1.0}, base, hib)
    with pytest.raises(ValueError):
        M.delta_m(mtl, {**base, "a_acc": 0.0}, hib)


@pytest.mark.slow  # builds three benchmarks and compiles their models
@pytest.mark.parametrize("name", ["qm9", "nyuv2", "cityscapes"])
def test_benchmark_metrics_accumulate_exactly_over_batches(name):
    """A benchmark's stats/finalize (declared in its own file) give the same metrics from two
    half batches as from the whole batch, and name exactly its metric specs."""
    from experiments import suites
    from experiments.data import BatchIterator
    from experiments.options import Options
    with suites.build(name, Options(benchmark=name, tiny=True)) as b:
        pure = b.pure_model(b.make_model(0))
        ds = b.val
        whole = BatchIterator(ds, len(ds), shuffle=False, drop_last=False).batch_at(0)
        half = len(ds) // 2
        parts = [{k: v[:half] for k, v in whole.items()}, {k: v[half:] for k, v in whole.items()}]
        one = b.finalize(M.accumulate(None, b.stats(pure.predict(pure.params0, whole, pure.encoder_state0), whole)))
        tot = None
        for p in parts:
            tot = M.accumulate(tot, b.stats(pure.predict(pure.params0, p, pure.encoder_state0), p))
        two = b.finalize(tot)
    assert list(one) == [s.name for s in b.metrics]
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


def test_qm9_mae_in_original_units():
    """MAE of standardized predictions is reported times the target's standard deviation."""
    s = M.regression_stats(jnp.zeros((3, 4, 1)), jnp.ones((4, 3)), jnp.asarray([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(M.mae_from_stats(M.accumulate(None, s)), [1.0, 2.0, 3.0])
