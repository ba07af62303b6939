"""Flax NNX models for the experiments, each split into a shared encoder and task heads.

Every model has ``model.encoder`` (``encoder(x) -> z``), ``model.heads`` (``heads(z) ->
predictions``) and ``model(x) == model.heads(model.encoder(x))``, so a training step can
differentiate the losses with respect to the shared representation ``z``.

Homogeneous heads are *stacked*: :class:`StackedLinear` / :class:`StackedMLP` hold one
set of parameters with a leading task axis T (``kernel`` (T, F, out), ``bias`` (T, out)),
map ``z`` (B, F) -- or one representation per task, (T, B, F) -- to (T, B, out), and
``apply_task(z, t)`` applies task ``t``'s head alone. Task ``t``'s output depends only on
head ``t``'s slice of the parameters.

Models:
  * :class:`LeNetMTL` -- Sener & Koltun's MultiMNIST LeNet (conv-pool-conv-pool-fc, z (B, 50)),
    two stacked 50-50-10 classification heads.
  * :class:`MLPMTL` -- MLP trunk for QM9 with 11 stacked scalar regression heads.
  * :class:`ResNet18MTL` -- ResNet-18 (small-input variant: 3x3 stem, no max-pool) with 40
    stacked binary heads for CelebA.
  * :class:`DenseMTL` -- a small U-Net-style conv encoder-decoder (z a (B, H, W, C) feature
    map) with per-task dense heads (segmentation logits, depth, unit normals).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "StackedLinear",
    "StackedMLP",
    "LeNetEncoder",
    "LeNetMTL",
    "MLPEncoder",
    "MLPMTL",
    "ResNet18Encoder",
    "ResNet18MTL",
    "DenseEncoder",
    "DenseHeads",
    "DenseMTL",
    "DENSE_OUT_CHANNELS",
]

_stacked_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                  batch_axis=(0,))


class StackedLinear(nnx.Module):
    """T linear heads in one parameter set: ``kernel`` (T, F, out), ``bias`` (T, out).

    ``__call__(z)`` with z (B, F) -> (T, B, out) (every head on the same z) or z (T, B, F)
    -> (T, B, out) (head t on z[t]); ``apply_task(z, t)`` -> (B, out).
    """

    def __init__(self, num_tasks: int, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.num_tasks = num_tasks
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = nnx.Param(_stacked_init(rngs.params(), (num_tasks, in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_tasks, out_features), jnp.float32))

    def __call__(self, z: jax.Array) -> jax.Array:
        """All heads: (B, F) or (T, B, F) -> (T, B, out)."""
        k, b = self.kernel[...], self.bias[...]
        if z.ndim == 2:
            return jnp.einsum("bf,tfo->tbo", z, k) + b[:, None, :]
        if z.ndim == 3 and z.shape[0] == self.num_tasks:
            return jnp.einsum("tbf,tfo->tbo", z, k) + b[:, None, :]
        raise ValueError(f"expected z of shape (B, {self.in_features}) or ({self.num_tasks}, B, {self.in_features}); "
                         f"got {z.shape}")

    def apply_task(self, z: jax.Array, t) -> jax.Array:
        """Head ``t`` alone (``t`` may be traced): (B, F) -> (B, out)."""
        return z @ self.kernel[...][t] + self.bias[...][t]


class StackedMLP(nnx.Module):
    """T MLP heads ``F -> hidden... -> out`` (ReLU between layers), stacked over tasks.

    ``__call__(z)`` (B, F) or (T, B, F) -> (T, B, out); ``apply_task(z, t)`` (B, F) -> (B, out).
    """

    def __init__(self, num_tasks: int, in_features: int, hidden: Sequence[int], out_features: int, *, rngs: nnx.Rngs):
        dims = [in_features, *hidden, out_features]
        self.num_tasks = num_tasks
        self.layers = nnx.List([StackedLinear(num_tasks, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, z: jax.Array) -> jax.Array:
        """All heads: (B, F) or (T, B, F) -> (T, B, out)."""
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h

    def apply_task(self, z: jax.Array, t) -> jax.Array:
        """Head ``t`` alone: (B, F) -> (B, out)."""
        h = z
        for i, layer in enumerate(self.layers):
            h = layer.apply_task(h, t)
            if i < len(self.layers) - 1:
                h = jax.nn.relu(h)
        return h


class _TwoPart(nnx.Module):
    """Base: ``__call__(x) = heads(encoder(x))``."""

    def __call__(self, x: jax.Array):
        """Full forward pass: ``heads(encoder(x))``."""
        return self.heads(self.encoder(x))


# ---------------------------------------------------------------------- LeNet


def _lenet_flat(input_size: int) -> int:
    s = ((input_size - 8) // 2 - 4) // 2
    if s < 1:
        raise ValueError(f"input_size {input_size} too small for the LeNet trunk")
    return 20 * s * s


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, VALID, on (B, H, W, C) as a reshape and a max.

    The same function as ``nnx.max_pool(x, (2, 2), (2, 2))`` (odd trailing rows/columns are
    dropped, as VALID does), but its gradient is a plain select instead of XLA's
    ``select-and-scatter``, which is slow on CPU: the LeNet gradient at batch 256 took 52 ms
    instead of 95 ms on the 2-core CPU (measured 2026-11-30, interleaved, load 1-2).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNetEncoder(nnx.Module):
    """conv(10, 9x9) - maxpool - relu - conv(20, 5x5) - maxpool - relu - fc(50) - relu; (B, S, S, C) -> (B, 50)."""

    def __init__(self, in_channels: int = 1, input_size: int = 28, features: int = 50, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 10, (9, 9), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(10, 20, (5, 5), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(_lenet_flat(input_size), features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, S, S, C) images -> (B, 50) features."""
        h = jax.nn.relu(max_pool_2x2(self.conv1(x)))
        h = jax.nn.relu(max_pool_2x2(self.conv2(h)))
        return jax.nn.relu(self.fc(h.reshape(h.shape[0], -1)))


class LeNetMTL(_TwoPart):
    """MultiMNIST LeNet: :class:`LeNetEncoder` + stacked 50-50-``num_classes`` heads; ``model(x)`` -> (T, B, C)
    logits."""

    def __init__(
        self,
        num_tasks: int = 2,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        input_size: int = 28,
        features: int = 50,
        head_hidden: Sequence[int] = (50,),
        rngs: nnx.Rngs,
    ):
        self.encoder = LeNetEncoder(in_channels, input_size, features, rngs=rngs)
        self.heads = StackedMLP(num_tasks, features, head_hidden, num_classes, rngs=rngs)


# ------------------------------------------------------------------------ MLP


class MLPEncoder(nnx.Module):
    """MLP trunk ``in -> hidden[0] -> ... -> hidden[-1]`` with ReLU after every layer; (B, in) -> (B, hidden[-1])."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256, 256), *, rngs: nnx.Rngs):
        dims = [in_features, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, in) -> (B, hidden[-1])."""
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


class MLPMTL(_TwoPart):
    """QM9 model: :class:`MLPEncoder` + ``num_tasks`` stacked regression heads; ``model(x)`` -> (T, B, 1)."""

    def __init__(
        self,
        in_features: int,
        num_tasks: int = 11,
        *,
        hidden: Sequence[int] = (256, 256, 256),
        head_hidden: Sequence[int] = (),
        out_features: int = 1,
        rngs: nnx.Rngs,
    ):
        self.encoder = MLPEncoder(in_features, hidden, rngs=rngs)
        self.heads = StackedMLP(num_tasks, hidden[-1], head_hidden, out_features, rngs=rngs)


# -------------------------------------------------------------------- ResNet


def _norm(kind: str, channels: int, rngs: nnx.Rngs) -> nnx.Module | None:
    if kind == "batch":
        return nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
    if kind == "group":
        return nnx.GroupNorm(channels, num_groups=min(32, channels), rngs=rngs)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; expected 'batch', 'group' or 'none'")


def _apply(norm, x):
    return x if norm is None else norm(x)


class _BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, *, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1))
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=pad, use_bias=norm == "none", rngs=rngs)
        self.norm1 = _norm(norm, cout, rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=pad, use_bias=norm == "none", rngs=rngs)
        self.norm2 = _norm(norm, cout, rngs)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, padding="VALID", use_bias=norm == "none", rngs=rngs)
            self.proj_norm = _norm(norm, cout, rngs)
        else:
            self.proj = None
            self.proj_norm = None

    def __call__(self, x):
        h = jax.nn.relu(_apply(self.norm1, self.conv1(x)))
        h = _apply(self.norm2, self.conv2(h))
        sc = x if self.proj is None else _apply(self.proj_norm, self.proj(x))
        return jax.nn.relu(h + sc)


class ResNet18Encoder(nnx.Module):
    """ResNet-18, small-input variant (3x3 stride-1 stem, no max-pool), global average pool; (B, H, W, C) ->
    (B, 8*width).

    ``norm``: ``batch`` (default; use ``model.train()`` / ``model.eval()``), ``group`` or ``none``.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, norm: str = "batch", *, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1))
        self.stem = nnx.Conv(in_channels, width, (3, 3), padding=pad, use_bias=norm == "none", rngs=rngs)
        self.stem_norm = _norm(norm, width, rngs)
        blocks = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(cin, cout, stride, norm, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.out_features = cin

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, 8 * width)."""
        h = jax.nn.relu(_apply(self.stem_norm, self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return h.mean(axis=(1, 2))


class ResNet18MTL(_TwoPart):
    """CelebA model: :class:`ResNet18Encoder` + ``num_tasks`` stacked binary heads; ``model(x)`` -> (T, B, 1) logits."""

    def __init__(
        self,
        num_tasks: int = 40,
        *,
        in_channels: int = 3,
        width: int = 64,
        norm: str = "batch",
        head_hidden: Sequence[int] = (),
        rngs: nnx.Rngs,
    ):
        self.encoder = ResNet18Encoder(in_channels, width, norm, rngs=rngs)
        self.heads = StackedMLP(num_tasks, self.encoder.out_features, head_hidden, 1, rngs=rngs)


# --------------------------------------------------------------------- dense

DENSE_OUT_CHANNELS = {"segmentation": None, "depth": 1, "normal": 3}


class _ConvBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, norm: str, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), padding="SAME", use_bias=norm == "none", rngs=rngs)
        self.norm1 = _norm(norm, cout, rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=norm == "none", rngs=rngs)
        self.norm2 = _norm(norm, cout, rngs)

    def __call__(self, x):
        x = jax.nn.relu(_apply(self.norm1, self.conv1(x)))
        return jax.nn.relu(_apply(self.norm2, self.conv2(x)))


def _upsample_to(x: jax.Array, like: jax.Array) -> jax.Array:
    return jax.image.resize(x, (x.shape[0], like.shape[1], like.shape[2], x.shape[3]), "bilinear")


class DenseEncoder(nnx.Module):
    """U-Net-style shared trunk: ``levels`` 2x down-samplings (max-pool) and back (bilinear + skip);
    (B, H, W, C) -> (B, H, W, width)."""

    def __init__(self, in_channels: int = 3, width: int = 32, levels: int = 3, norm: str = "batch", *, rngs: nnx.Rngs):
        chans = [width * 2**i for i in range(levels + 1)]
        self.down = nnx.List([_ConvBlock(in_channels if i == 0 else chans[i - 1], chans[i], norm, rngs=rngs)
                              for i in range(levels + 1)])
        self.up = nnx.List([_ConvBlock(chans[i + 1] + chans[i], chans[i], norm, rngs=rngs)
                            for i in reversed(range(levels))])
        self.out_features = width

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, width) feature map."""
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i > 0:
                skips.append(h)
                h = nnx.max_pool(h, (2, 2), (2, 2), padding="SAME")
            h = block(h)
        for block in self.up:
            s = skips.pop()
            h = block(jnp.concatenate([_upsample_to(h, s), s], axis=-1))
        return h


class _DenseHead(nnx.Module):
    def __init__(self, cin: int, cout: int, unit_norm: bool, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cin, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(cin, cout, (1, 1), rngs=rngs)
        self.unit_norm = unit_norm

    def __call__(self, z):
        y = self.conv2(jax.nn.relu(self.conv1(z)))
        if self.unit_norm:
            y = y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-12)
        return y


class DenseHeads(nnx.Module):
    """Per-task dense heads (conv3x3-relu-conv1x1); ``normal`` outputs are unit vectors.

    ``__call__(z)`` -> dict task -> (B, H, W, C_t); ``apply_task(z, t)`` (t an int or name) -> (B, H, W, C_t).
    """

    def __init__(self, in_features: int, out_channels: Mapping[str, int], *, rngs: nnx.Rngs):
        self.task_names = tuple(out_channels)
        self.heads = nnx.Dict({t: _DenseHead(in_features, c, t == "normal", rngs=rngs)
                               for t, c in out_channels.items()})

    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        """All heads: dict task -> prediction."""
        return {t: self.heads[t](z) for t in self.task_names}

    def apply_task(self, z: jax.Array, t: int | str) -> jax.Array:
        """One head (Python int index or task name)."""
        name = self.task_names[t] if isinstance(t, int) else t
        return self.heads[name](z)


class DenseMTL(_TwoPart):
    """NYUv2 / Cityscapes model: :class:`DenseEncoder` + :class:`DenseHeads`.

    ``tasks`` from ``segmentation`` (``num_classes`` logits), ``depth`` (1), ``normal`` (3, unit);
    NYUv2: 13 classes, all three; Cityscapes: 7 classes, ``("segmentation", "depth")``.
    """

    def __init__(
        self,
        num_classes: int = 13,
        tasks: Sequence[str] = ("segmentation", "depth", "normal"),
        *,
        in_channels: int = 3,
        width: int = 32,
        levels: int = 3,
        norm: str = "batch",
        rngs: nnx.Rngs,
    ):
        out = {}
        for t in tasks:
            if t not in DENSE_OUT_CHANNELS:
                raise ValueError(f"unknown dense task {t!r}; expected one of {list(DENSE_OUT_CHANNELS)}")
            out[t] = num_classes if t == "segmentation" else DENSE_OUT_CHANNELS[t]
        self.encoder = DenseEncoder(in_channels, width, levels, norm, rngs=rngs)
        self.heads = DenseHeads(width, out, rngs=rngs)
        self.task_names = tuple(tasks)
