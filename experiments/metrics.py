"""Per-task evaluation metrics and the Δm% / Δp summaries.

Metrics are accumulated across batches as *sufficient statistics*: a ``*_stats``
function (pure ``jax.numpy``, jit-able) maps one batch of predictions to a dict of
arrays, :func:`accumulate` adds such dicts (in float64 / int64 numpy), and a
``*_from_stats`` function turns the totals into metric values. Which metrics a benchmark
reports, and how, is declared in its own file (``experiments/suites/``). Split-level metrics are
therefore exact over the whole split (segmentation from one confusion matrix over all
pixels; depth errors averaged over all valid pixels; normal-angle percentages exact,
the median from a 0.01-degree histogram).

Δm% (metric-mean; MTAN / Nash-MTL / CAGrad; negative = better than the baseline)::

    Δm = 100/K Σ_k (-1)^{δ_k} (M_k - B_k) / B_k,   δ_k = 1 where higher is better.

Δp (task-mean; LibMTL; positive = better)::

    Δp = 100/T Σ_t 1/N_t Σ_{k in t} (-1)^{s_k} (M_k - B_k) / B_k,   s_k = 1 where lower is better.

They disagree when tasks have different numbers of metrics; report both and say which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MetricSpec",
    "NORMAL_THRESHOLDS",
    "NORMAL_HIST_BIN_DEG",
    "accumulate",
    "classification_stats",
    "binary_stats",
    "accuracy_from_stats",
    "regression_stats",
    "mae_from_stats",
    "confusion_matrix",
    "segmentation_stats",
    "segmentation_from_confusion",
    "depth_stats",
    "depth_from_stats",
    "normal_angles",
    "normal_stats",
    "normal_from_stats",
    "higher_is_better_map",
    "task_of_metric_map",
    "delta_m",
    "delta_p",
]

NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
NORMAL_HIST_BIN_DEG = 0.01
_NORMAL_BINS = int(round(180.0 / NORMAL_HIST_BIN_DEG))


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A reported metric: its ``name``, the ``task`` it belongs to, and whether higher is better."""

    name: str
    task: str
    higher_is_better: bool


# ------------------------------------------------------------------ accumulation


def accumulate(total: Mapping[str, Any] | None, stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``total + stats`` key-wise (``total`` None starts a sum); arrays become float64 / int64 numpy."""

    def widen(x):
        a = np.asarray(jax.device_get(x))
        if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
            return a.astype(np.int64)
        return a.astype(np.float64)

    stats = {k: widen(v) for k, v in stats.items()}
    if total is None:
        return stats
    if set(total) != set(stats):
        raise ValueError(f"cannot add stats with keys {sorted(total)} and {sorted(stats)}")
    return {k: total[k] + stats[k] for k in stats}


def _squeeze_last(p):
    return p[..., 0] if p.ndim == 3 and p.shape[-1] == 1 else p


# ---------------------------------------------------------------- classification


def classification_stats(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Correct counts per task: logits (T, B, C), labels (B, T) -> {correct (T,), count ()}."""
    pred = jnp.argmax(logits, axis=-1)
    return {"correct": jnp.sum(pred == labels.T, axis=1), "count": jnp.asarray(labels.shape[0])}


def binary_stats(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Binary accuracy counts per task: logits (T, B, 1) or (T, B) (> 0 means 1), targets (B, T) -> {correct, count}."""
    pred = (_squeeze_last(logits) > 0).astype(jnp.int32)
    return {"correct": jnp.sum(pred == targets.T.astype(jnp.int32), axis=1), "count": jnp.asarray(targets.shape[0])}


def accuracy_from_stats(stats: Mapping[str, Any]) -> np.ndarray:
    """Accuracy per task (fraction in [0, 1]) from accumulated {correct, count}."""
    return np.asarray(stats["correct"], np.float64) / np.maximum(np.asarray(stats["count"]), 1)


# -------------------------------------------------------------------- regression


def regression_stats(preds: jax.Array, targets: jax.Array, target_std: jax.Array | None = None) -> dict[str, jax.Array]:
    """Absolute-error sums per task: preds (T, B, 1) or (T, B), targets (B, T) -> {abs_err (T,), count ()}.

    With standardized predictions/targets pass ``target_std`` (T,) to get errors in original units.
    """
    err = jnp.abs(_squeeze_last(preds) - targets.T)
    if target_std is not None:
        err = err * jnp.asarray(target_std, err.dtype)[:, None]
    return {"abs_err": jnp.sum(err, axis=1), "count": jnp.asarray(targets.shape[0])}


def mae_from_stats(stats: Mapping[str, Any]) -> np.ndarray:
    """Mean absolute error per task from accumulated {abs_err, count}."""
    return np.asarray(stats["abs_err"], np.float64) / np.maximum(np.asarray(stats["count"]), 1)


# ------------------------------------------------------------------ segmentation


def confusion_matrix(pred: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """(C, C) int32 counts, rows = true class, columns = predicted; labels outside [0, C) (e.g. -1) are ignored."""
    labels = labels.reshape(-1).astype(jnp.int32)
    pred = pred.reshape(-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    idx = jnp.where(valid, labels * num_classes + jnp.clip(pred, 0, num_classes - 1), 0)
    counts = jnp.bincount(idx, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_stats(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """{confusion (C, C)} of argmax(logits (B, H, W, C)) against labels (B, H, W) (-1 ignored)."""
    return {"confusion": confusion_matrix(jnp.argmax(logits, axis=-1), labels, logits.shape[-1])}


def segmentation_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """mIoU (mean IoU over classes with a non-empty union) and pixel accuracy from a confusion matrix."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    miou = float(np.mean(tp[present] / union[present])) if present.any() else float("nan")
    total = cm.sum()
    acc = float(tp.sum() / total) if total > 0 else float("nan")
    return {"miou": miou, "pixel_acc": acc}


# ------------------------------------------------------------------------- depth


def depth_stats(pred: jax.Array, depth: jax.Array) -> dict[str, jax.Array]:
    """Sums over valid pixels (depth != 0): {abs_err, rel_err, count}; pred, depth (B, H, W, 1)."""
    valid = depth != 0
    err = jnp.abs(pred - depth)
    safe = jnp.where(valid, depth, 1.0)
    return {
        "abs_err": jnp.sum(jnp.where(valid, err, 0.0)),
        "rel_err": jnp.sum(jnp.where(valid, err / jnp.abs(safe), 0.0)),
        "count": jnp.sum(valid.astype(jnp.int32)),
    }


def depth_from_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """Mean absolute and mean relative depth error over all valid pixels."""
    n = max(int(stats["count"]), 1)
    return {"abs_err": float(stats["abs_err"]) / n, "rel_err": float(stats["rel_err"]) / n}


# ----------------------------------------------------------------------- normals


def normal_angles(pred: jax.Array, normal: jax.Array) -> jax.Array:
    """Angle in degrees between pred and true normals (..., 3), via atan2(|p x n|, p . n) (scale-invariant)."""
    cross = jnp.cross(pred, normal)
    return jnp.degrees(jnp.arctan2(jnp.linalg.norm(cross, axis=-1), jnp.sum(pred * normal, axis=-1)))


def normal_stats(pred: jax.Array, normal: jax.Array) -> dict[str, jax.Array]:
    """Angle statistics over valid pixels (normal not all zero): {angle_sum, count, within (3,), hist (18000,)}.

    ``within`` counts angles < 11.25, 22.5, 30 degrees; ``hist`` has 0.01-degree bins (for the median).
    """
    valid = jnp.any(normal != 0, axis=-1).reshape(-1)
    ang = normal_angles(pred, normal).reshape(-1)
    w = valid.astype(jnp.int32)
    bins = jnp.clip(jnp.floor(ang / NORMAL_HIST_BIN_DEG).astype(jnp.int32), 0, _NORMAL_BINS - 1)
    thr = jnp.asarray(NORMAL_THRESHOLDS, ang.dtype)
    return {
        "angle_sum": jnp.sum(jnp.where(valid, ang, 0.0)),
        "count": jnp.sum(w),
        "within": jnp.sum((ang[None, :] < thr[:, None]) & valid[None, :], axis=1),
        "hist": jnp.bincount(bins, weights=w, length=_NORMAL_BINS).astype(jnp.int32),
    }


def _hist_median(hist: np.ndarray, width: float) -> float:
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.sum()
    if n == 0:
        return float("nan")
    cum = np.cumsum(hist)
    half = n / 2.0
    b = int(np.searchsorted(cum, half))  # first bin with cum >= half
    before = cum[b - 1] if b > 0 else 0.0
    frac = (half - before) / hist[b] if hist[b] > 0 else 0.5
    return float((b + frac) * width)


def normal_from_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """Mean and median angle error (degrees) and percent of valid pixels within 11.25/22.5/30 degrees."""
    n = max(int(stats["count"]), 1)
    within = np.asarray(stats["within"], np.float64) / n * 100.0
    out = {"mean": float(stats["angle_sum"]) / n, "median": _hist_median(stats["hist"], NORMAL_HIST_BIN_DEG)}
    for t, v in zip(NORMAL_THRESHOLDS, within):
        out[f"within_{t:g}"] = float(v)
    return out


# ------------------------------------------------------------------ Δm and Δp


def higher_is_better_map(specs: Sequence[MetricSpec]) -> dict[str, bool]:
    """{metric name: higher_is_better} of ``specs``."""
    return {s.name: s.higher_is_better for s in specs}


def task_of_metric_map(specs: Sequence[MetricSpec]) -> dict[str, str]:
    """{metric name: task} of ``specs``."""
    return {s.name: s.task for s in specs}


def _rel(metrics: Mapping[str, float], baseline: Mapping[str, float],
         higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """Signed relative improvement (M - B)/B (positive = better) for every metric of ``higher_is_better``."""
    out = {}
    for name, hib in higher_is_better.items():
        if name not in metrics or name not in baseline:
            raise KeyError(f"metric {name!r} missing from {'metrics' if name not in metrics else 'baseline'}")
        b = float(baseline[name])
        if b == 0:
            raise ValueError(f"baseline of {name!r} is 0: relative change undefined")
        r = (float(metrics[name]) - b) / b
        out[name] = r if hib else -r
    return out


def delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Δm% (metric-mean, MTAN / Nash-MTL): 100/K Σ_k (-1)^{δ_k}(M_k - B_k)/B_k; **negative = better**.

    Averages over the K metrics named in ``higher_is_better``.
    """
    rel = _rel(metrics, baseline, higher_is_better)
    if not rel:
        raise ValueError("no metrics given")
    return -100.0 * float(np.mean(list(rel.values())))


def delta_p(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    task_of_metric: Mapping[str, str],
) -> float:
    """Δp (task-mean, LibMTL): mean over tasks of the mean signed relative change of its metrics, in %;
    **positive = better**."""
    rel = _rel(metrics, baseline, higher_is_better)
    if not rel:
        raise ValueError("no metrics given")
    per_task: dict[str, list[float]] = {}
    for name, r in rel.items():
        if name not in task_of_metric:
            raise KeyError(f"metric {name!r} has no task in task_of_metric")
        per_task.setdefault(task_of_metric[name], []).append(r)
    return 100.0 * float(np.mean([np.mean(v) for v in per_task.values()]))


