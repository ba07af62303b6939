import jax.numpy as jnp
import numpy as np
import pytest

from experiments import losses


def test_cross_entropy_by_hand():
    logits = jnp.array([[[0.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]])  # (T=2, B=2, C=2)
    labels = jnp.array([[0, 1], [0, 1]])  # (B, T)
    out = losses.cross_entropy_losses(logits, labels)
    t0 = (np.log(2) + np.log(1 + np.exp(-2))) / 2
    t1 = (np.log(2) + np.log(1 + np.exp(-3))) / 2
    np.testing.assert_allclose(out, [t0, t1], rtol=1e-6)
    np.testing.assert_allclose(losses.multimnist_losses(logits, {"labels": labels}), out)


def test_regression_and_binary_by_hand():
    preds = jnp.array([[[1.0], [3.0]], [[0.0], [0.0]]])  # (T=2, B=2, 1)
    y = jnp.array([[0.0, 1.0], [1.0, -1.0]])  # (B, T)
    np.testing.assert_allclose(losses.regression_losses(preds, y, "l1"), [1.5, 1.0])
    np.testing.assert_allclose(losses.regression_losses(preds, y, "mse"), [2.5, 1.0])
    np.testing.assert_allclose(losses.qm9_losses(preds[..., 0], {"y": y}), [2.5, 1.0])
    with pytest.raises(ValueError):
        losses.regression_losses(preds, y, "huber")
    logits = jnp.array([[[0.0], [2.0]]])  # T=1
    t = jnp.array([[1], [0]])
    expect = (np.log(2) + np.log(1 + np.exp(2))) / 2
    np.testing.assert_allclose(losses.binary_ce_losses(logits, t), [expect], rtol=1e-6)
    np.testing.assert_allclose(losses.celeba_losses(logits, {"attributes": t}), [expect], rtol=1e-6)


def test_dense_losses_by_hand():
    # 1 x 1 x 3 image, 2 classes; pixel 2 ignored
    logits = jnp.array([[[[0.0, 0.0], [0.0, 1.0], [5.0, -5.0]]]])
    labels = jnp.array([[[0, 1, -1]]])
    seg = (np.log(2) + np.log(1 + np.exp(-1))) / 2
    np.testing.assert_allclose(losses.segmentation_loss(logits, labels), seg, rtol=1e-6)
    depth_pred = jnp.array([[[[1.0], [2.0], [9.0]]]])
    depth = jnp.array([[[[1.5], [1.0], [0.0]]]])
    np.testing.assert_allclose(losses.depth_loss(depth_pred, depth), 0.75)
    n_pred = jnp.array([[[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]]])
    n_true = jnp.array([[[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]]])
    np.testing.assert_allclose(losses.normal_loss(n_pred, n_true), 0.5)
    batch = {"label": labels, "depth": depth, "normal": n_true}
    preds = {"segmentation": logits, "depth": depth_pred, "normal": n_pred}
    np.testing.assert_allclose(losses.nyuv2_losses(preds, batch), [seg, 0.75, 0.5], rtol=1e-6)
    np.testing.assert_allclose(losses.cityscapes_losses(preds, batch), [seg, 0.75], rtol=1e-6)
    # no valid pixel -> 0, not NaN
    assert float(losses.depth_loss(depth_pred, jnp.zeros_like(depth))) == 0.0
    assert float(losses.segmentation_loss(logits, -jnp.ones_like(labels))) == 0.0
