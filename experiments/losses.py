"""Per-task loss functions: pure functions ``(predictions, batch) -> (T,)`` losses.

Stacked-head predictions have a leading task axis: (T, B, C) logits or (T, B, 1)
regression outputs; batch targets are (B, T). Task ``t``'s loss depends only on
``predictions[t]``. Dense predictions are dicts task -> (B, H, W, C).

Conventions: every loss is a mean over the batch (over valid pixels for dense tasks);
a dense task with no valid pixel in the batch has loss 0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "cross_entropy_losses",
    "regression_losses",
    "binary_ce_losses",
    "segmentation_loss",
    "depth_loss",
    "normal_loss",
    "dense_losses",
    "multimnist_losses",
    "qm9_losses",
    "celeba_losses",
    "nyuv2_losses",
    "cityscapes_losses",
]


def _squeeze_last(p: jax.Array) -> jax.Array:
    return p[..., 0] if p.ndim == 3 and p.shape[-1] == 1 else p


def cross_entropy_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy per task: logits (T, B, C), integer labels (B, T) -> (T,)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.T.astype(jnp.int32))
    return ce.mean(axis=1)


def regression_losses(preds: jax.Array, targets: jax.Array, kind: str = "mse") -> jax.Array:
    """Regression loss per task: preds (T, B, 1) or (T, B), targets (B, T) -> (T,); ``kind`` 'mse' or 'l1'."""
    err = _squeeze_last(preds) - targets.T
    if kind == "mse":
        return jnp.mean(err**2, axis=1)
    if kind == "l1":
        return jnp.mean(jnp.abs(err), axis=1)
    raise ValueError(f"unknown regression loss {kind!r}; expected 'mse' or 'l1'")


def binary_ce_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sigmoid binary cross-entropy per task: logits (T, B, 1) or (T, B), targets (B, T) in {0, 1} -> (T,)."""
    return optax.sigmoid_binary_cross_entropy(_squeeze_last(logits), targets.T.astype(logits.dtype)).mean(axis=1)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def segmentation_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Pixel cross-entropy: logits (B, H, W, C), labels (B, H, W) with -1 = ignore -> scalar (mean over valid
    pixels)."""
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0).astype(jnp.int32))
    return _masked_mean(ce, valid)


def depth_loss(pred: jax.Array, depth: jax.Array) -> jax.Array:
    """L1 over valid pixels: pred, depth (B, H, W, 1), depth 0 = invalid -> scalar."""
    valid = depth != 0
    return _masked_mean(jnp.abs(pred - depth), valid)


def normal_loss(pred: jax.Array, normal: jax.Array) -> jax.Array:
    """1 - cosine over valid pixels: pred (B, H, W, 3) (unit vectors), normal (B, H, W, 3), all-zero = invalid
    -> scalar."""
    valid = jnp.any(normal != 0, axis=-1)
    return _masked_mean(1.0 - jnp.sum(pred * normal, axis=-1), valid)


_DENSE = {
    "segmentation": lambda p, b: segmentation_loss(p, b["label"]),
    "depth": lambda p, b: depth_loss(p, b["depth"]),
    "normal": lambda p, b: normal_loss(p, b["normal"]),
}


def dense_losses(preds: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], tasks: Sequence[str]) -> jax.Array:
    """Dense-task losses in ``tasks`` order: preds dict task -> (B, H, W, C); batch keys label/depth/normal -> (T,)."""
    return jnp.stack([_DENSE[t](preds[t], batch) for t in tasks])


def multimnist_losses(preds: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """MultiMNIST: cross-entropy of (T, B, 10) logits against ``batch["labels"]`` (B, T) -> (T,)."""
    return cross_entropy_losses(preds, batch["labels"])


def qm9_losses(preds: jax.Array, batch: Mapping[str, jax.Array], kind: str = "mse") -> jax.Array:
    """QM9: MSE (or L1) of (T, B, 1) predictions against standardized ``batch["y"]`` (B, T) -> (T,)."""
    return regression_losses(preds, batch["y"], kind)


def celeba_losses(preds: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """CelebA: binary cross-entropy of (T, B, 1) logits against ``batch["attributes"]`` (B, T) -> (T,)."""
    return binary_ce_losses(preds, batch["attributes"])


def nyuv2_losses(preds: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> jax.Array:
    """NYUv2: (segmentation CE, depth L1, normal 1-cos) -> (3,)."""
    return dense_losses(preds, batch, ("segmentation", "depth", "normal"))


def cityscapes_losses(preds: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> jax.Array:
    """Cityscapes: (segmentation CE, disparity L1) -> (2,)."""
    return dense_losses(preds, batch, ("segmentation", "depth"))
