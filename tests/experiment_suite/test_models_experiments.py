import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import losses
from experiments.models import (
    DenseMTL,
    LeNetMTL,
    MLPMTL,
    ResNet18MTL,
    StackedLinear,
    StackedMLP,
)


def test_stacked_linear_matches_per_task_linear():
    T, F, D_OUT, B = 4, 6, 3, 5
    head = StackedLinear(T, F, D_OUT, rngs=nnx.Rngs(0))
    assert head.kernel[...].shape == (T, F, D_OUT) and head.bias[...].shape == (T, D_OUT)
    head.bias[...] = jax.random.normal(jax.random.key(1), (T, D_OUT))
    z = jax.random.normal(jax.random.key(2), (B, F))
    out = head(z)
    assert out.shape == (T, B, D_OUT)
    for t in range(T):
        lin = nnx.Linear(F, D_OUT, rngs=nnx.Rngs(0))
        lin.kernel[...] = head.kernel[...][t]
        lin.bias[...] = head.bias[...][t]
        np.testing.assert_allclose(out[t], lin(z), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[t], head.apply_task(z, t), rtol=1e-5, atol=1e-6)
    # per-task representations (T, B, F)
    zs = jax.random.normal(jax.random.key(3), (T, B, F))
    out2 = head(zs)
    for t in range(T):
        np.testing.assert_allclose(out2[t], head.apply_task(zs[t], t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        head(jnp.zeros((T + 1, B, F)))


def test_stacked_mlp_equals_vmapped_single_heads():
    T, F, B = 3, 7, 4
    heads = StackedMLP(T, F, (5, 6), 2, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (B, F))
    out = heads(z)
    assert out.shape == (T, B, 2)
    vm = jax.vmap(lambda t: heads.apply_task(z, t))(jnp.arange(T))  # traced task index
    np.testing.assert_allclose(out, vm, rtol=1e-5, atol=1e-6)
    for t in range(T):
        np.testing.assert_allclose(out[t], heads.apply_task(z, t), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lenet():
    return LeNetMTL(rngs=nnx.Rngs(0))


@pytest.mark.slow  # heavy: CI's slow step
def test_task_loss_touches_only_its_head(lenet):
    model = lenet
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    batch = {"labels": jnp.array([[1, 2], [3, 4], [5, 6]])}

    def loss0(m):
        return losses.multimnist_losses(m(x), batch)[0]

    g = nnx.grad(loss0)(model)
    for i in range(len(model.heads.layers)):
        k = g["heads"]["layers"][i]["kernel"][...]
        b = g["heads"]["layers"][i]["bias"][...]
        assert jnp.abs(k[1]).max() == 0 and jnp.abs(b[1]).max() == 0
        assert jnp.abs(k[0]).max() > 0
    assert jnp.abs(g["encoder"]["conv1"]["kernel"][...]).max() > 0


def test_lenet_shapes_and_encoder_split(lenet):
    model = lenet
    x = jnp.ones((4, 28, 28, 1))
    z = model.encoder(x)
    assert z.shape == (4, 50)
    out = model(x)
    assert out.shape == (2, 4, 10)
    np.testing.assert_allclose(out, model.heads(z))


def test_mlp_qm9_shapes_and_jit():
    model = MLPMTL(34, hidden=(32, 16), rngs=nnx.Rngs(0))
    x = jnp.ones((5, 34))
    assert model.encoder(x).shape == (5, 16)
    out = nnx.jit(lambda m, x: m(x))(model, x)
    assert out.shape == (11, 5, 1)
    batch = {"y": jnp.zeros((5, 11))}
    assert losses.qm9_losses(out, batch).shape == (11,)


def _abstract_forward(make, x_shape):
    model = nnx.eval_shape(make)
    return model, nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(x_shape, jnp.float32))


def _n_params(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_resnet18_abstract_shapes_and_size():
    model, out = _abstract_forward(lambda: ResNet18MTL(rngs=nnx.Rngs(0)), (2, 64, 64, 3))
    assert out.shape == (40, 2, 1)
    assert len(model.encoder.blocks) == 8  # 4 stages x 2 basic blocks
    assert _n_params(model.encoder) == 11_168_832  # the CIFAR-style ResNet-18 trunk
    assert model.heads.layers[0].kernel.shape == (40, 512, 1)
    z = nnx.eval_shape(lambda m, x: m.encoder(x), model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert z.shape == (2, 512)


def test_dense_abstract_shapes():
    _, out = _abstract_forward(lambda: DenseMTL(rngs=nnx.Rngs(0)), (2, 288, 384, 3))
    assert out["segmentation"].shape == (2, 288, 384, 13)
    assert out["depth"].shape == (2, 288, 384, 1) and out["normal"].shape == (2, 288, 384, 3)
    model, out = _abstract_forward(lambda: DenseMTL(7, ("segmentation", "depth"), rngs=nnx.Rngs(0)), (2, 128, 256, 3))
    assert set(out) == {"segmentation", "depth"} and out["segmentation"].shape == (2, 128, 256, 7)
    z = nnx.eval_shape(lambda m, x: m.encoder(x), model, jax.ShapeDtypeStruct((2, 128, 256, 3), jnp.float32))
    assert z.shape == (2, 128, 256, 32)
    with pytest.raises(ValueError):
        DenseMTL(3, ("segmentation", "edges"), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_resnet18_shapes_train_eval():
    model = ResNet18MTL(width=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    z = model.encoder(x)
    assert z.shape == (2, 32)
    assert model(x).shape == (40, 2, 1)
    model.eval()
    y1 = model(x)
    y2 = model(x)
    np.testing.assert_allclose(y1, y2)
    model.train()
    y3 = model(x)
    assert not np.allclose(y1, y3)  # batch statistics in training mode


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["group", "none"])
def test_resnet18_norm_variants(norm):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    m = ResNet18MTL(width=4, norm=norm, num_tasks=3, rngs=nnx.Rngs(0))
    assert m(x).shape == (3, 2, 1)
    with pytest.raises(ValueError):
        ResNet18MTL(width=4, norm="layer", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_lenet_36_input():
    assert LeNetMTL(input_size=36, rngs=nnx.Rngs(0))(jnp.ones((2, 36, 36, 1))).shape == (2, 2, 10)


@pytest.mark.slow
def test_dense_model_shapes():
    model = DenseMTL(13, width=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 24, 32, 3))
    z = model.encoder(x)
    assert z.shape == (2, 24, 32, 4)
    out = model(x)
    assert out["segmentation"].shape == (2, 24, 32, 13)
    assert out["depth"].shape == (2, 24, 32, 1)
    assert out["normal"].shape == (2, 24, 32, 3)
    norms = np.asarray(jnp.linalg.norm(out["normal"], axis=-1))
    assert norms.max() <= 1.0 + 1e-5
    np.testing.assert_allclose(norms[norms > 1e-3], 1.0, atol=1e-4)  # exactly-zero raw outputs stay 0
    np.testing.assert_allclose(model.heads.apply_task(z, 1), out["depth"])
    np.testing.assert_allclose(model.heads.apply_task(z, "normal"), out["normal"])
    out = model(jax.random.normal(jax.random.key(0), (1, 10, 18, 3)))  # not divisible by 8
    assert out["segmentation"].shape == (1, 10, 18, 13) and out["normal"].shape == (1, 10, 18, 3)


@pytest.mark.slow
def test_dense_cityscapes_config():
    cs = DenseMTL(7, ("segmentation", "depth"), width=4, levels=2, rngs=nnx.Rngs(0))
    out = cs(jax.random.normal(jax.random.key(0), (1, 12, 20, 3)))
    assert out["segmentation"].shape == (1, 12, 20, 7) and set(out) == {"segmentation", "depth"}


def test_max_pool_2x2_equals_nnx_max_pool_and_its_gradient():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.models import max_pool_2x2

    for shape in [(2, 20, 20, 3), (1, 7, 9, 2)]:
        x = jax.random.normal(jax.random.key(0), shape)
        np.testing.assert_array_equal(max_pool_2x2(x), nnx.max_pool(x, (2, 2), (2, 2)))
        ct = jax.random.normal(jax.random.key(1), max_pool_2x2(x).shape)
        g1 = jax.grad(lambda v, ct=ct: jnp.sum(max_pool_2x2(v) * ct))(x)
        g2 = jax.grad(lambda v, ct=ct: jnp.sum(nnx.max_pool(v, (2, 2), (2, 2)) * ct))(x)
        np.testing.assert_array_equal(g1, g2)
