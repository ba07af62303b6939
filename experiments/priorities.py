"""Priority sweep for IMTL (GitHub issue 8): does ``priorities=(1, r)`` trace a trade-off front?

For each ratio ``r`` this trains

* **IMTL-H** with ``priorities = (1, r)`` (projections of the shared-feature aggregate on the
  unit task gradients in ratio ``1 : r``; ``r = 1`` is plain IMTL-H), and
* **linear** loss weighting ``L_1 + r L_2`` (a two-line custom :class:`imtl_jax.Method`: a
  loss-only :class:`imtl_jax.Weighting` whose weights *are* the priorities vector, so the same
  compiled step serves every ratio; ``r = 1`` is equal weighting),

from the same initialization, batches and seed, and plots task-1 metric vs task-2 metric.

Data sets: ``multimnist`` (LeNet, tasks left/right digit, metric: test accuracy) and ``qm9``
(an MLP trunk with two scalar heads on a training subset, tasks ``mu`` and ``homo`` by
default, metric: test MAE in original units).

Everything is functional: the Flax NNX models of :mod:`experiments.models` only provide the
initial parameters (``nnx.split`` -> pure dicts); the encoder and the heads are plain
functions of those dicts, and the training step is one plain ``jax.jit`` over pure pytrees
with the priorities as a traced argument (one compilation per method, not per ratio).

Usage::

    python -m experiments.priorities                       # MultiMNIST, default sweep
    python -m experiments.priorities --dataset qm9 --steps 400
    python -m experiments.priorities --tiny --out /tmp/p    # seconds (synthetic-size run)

Outputs in ``--out`` (default ``runs/priorities/<dataset>``): ``front.png``, ``results.json``,
``results.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import imtl_jax
from imtl_jax import Method, Weighting, WeightingOutput

DEFAULT_RATIOS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0)

# ------------------------------------------------------------------------------- methods


def _linear_weigh(grads, losses, state, key, priorities):
    """Constant loss weights: the priorities vector itself (ones when None)."""
    del grads, key
    w = jnp.ones_like(losses) if priorities is None else jnp.asarray(priorities, losses.dtype)
    return WeightingOutput(w, state, {})


LINEAR = Method(
    "linear",
    imtl_jax.methods.get_method("equal").scaling,  # identity scaling
    Weighting(name="linear", init=lambda num_tasks, dtype=None: (), weigh=_linear_weigh,
              needs_grads=False, weights_heads=True),
)
"""Linear scalarization ``sum_t p_t L_t`` with ``p`` passed as ``priorities`` (traced)."""

# ------------------------------------------------------------------ functional models


def _conv(x, kernel, bias):
    y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def _max_pool2(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def lenet_encoder(p: dict, x: jax.Array) -> jax.Array:
    """Functional :class:`experiments.models.LeNetEncoder`: (B, 28, 28, 1) -> (B, 50)."""
    h = jax.nn.relu(_max_pool2(_conv(x, p["conv1"]["kernel"], p["conv1"]["bias"])))
    h = jax.nn.relu(_max_pool2(_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"])))
    h = h.reshape(h.shape[0], -1)
    return jax.nn.relu(h @ p["fc"]["kernel"] + p["fc"]["bias"])


def mlp_encoder(p: dict, x: jax.Array) -> jax.Array:
    """Functional :class:`experiments.models.MLPEncoder`: ReLU after every layer."""
    for i in range(len(p["layers"])):
        x = jax.nn.relu(x @ p["layers"][i]["kernel"] + p["layers"][i]["bias"])
    return x


def head_apply(head_t: Sequence[tuple[jax.Array, jax.Array]], z: jax.Array) -> jax.Array:
    """One task's head (a tuple of (kernel, bias) layers, ReLU between): (B, F) -> (B, out)."""
    h = z
    for i, (k, b) in enumerate(head_t):
        h = h @ k + b
        if i < len(head_t) - 1:
            h = jax.nn.relu(h)
    return h


def _pure(module) -> Any:
    _, state = nnx.split(module)
    return nnx.to_pure_dict(state)


def _stacked_heads(heads) -> tuple:
    return tuple((jnp.asarray(l.kernel[...]), jnp.asarray(l.bias[...])) for l in heads.layers)


# ------------------------------------------------------------------------------ problems


class Problem:
    """A two-task problem: initial params, encoder, per-task loss, eval metric."""

    name: str
    task_names: tuple[str, str]
    metric_name: str
    metric_unit: str
    higher_is_better: bool
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    input_key: str
    encoder: Callable
    init_params: imtl_jax.MTLParams

    def head_loss(self, head_t, z, batch, t):
        raise NotImplementedError

    def metric(self, params: imtl_jax.MTLParams) -> np.ndarray:
        raise NotImplementedError


@functools.cache
def _make_predict(encoder):
    @jax.jit
    def pred(params, xb):
        z = encoder(params.shared, xb)
        return jnp.stack([head_apply(jax.tree.map(lambda a, t=t: a[t], params.heads), z) for t in range(2)])
    return pred


def _batched_predict(params, encoder, x, chunk=1000):
    """(2, N, out) predictions of both heads, in chunks, one compiled function per encoder."""
    outs = [_make_predict(encoder)(params, jnp.asarray(x[i:i + chunk])) for i in range(0, len(x), chunk)]
    return np.concatenate([np.asarray(o) for o in outs], axis=1)


class MultiMNISTProblem(Problem):
    name = "multimnist"
    task_names = ("left_digit", "right_digit")
    metric_name = "accuracy"
    metric_unit = "%"
    higher_is_better = True
    input_key = "image"

    def __init__(self, *, seed: int, tiny: bool):
        from experiments.data.multimnist import load_multi
        from experiments.models import LeNetMTL

        sizes = dict(n_train=256, n_val=0, n_test=256) if tiny else {}
        data = load_multi("multimnist", seed=0, **sizes)
        self.train = {"image": data.train_images, "labels": data.train_labels}
        self.test = {"image": data.test_images, "labels": data.test_labels}
        def init():
            model = LeNetMTL(num_tasks=2, rngs=nnx.Rngs(seed))
            return imtl_jax.MTLParams(_pure(model.encoder), _stacked_heads(model.heads), jnp.zeros(2))

        self.init_params = jax.jit(init)()  # traced init: eager NNX init dispatches op by op
        self.encoder = lambda p, batch: lenet_encoder(p, batch["image"])

    def head_loss(self, head_t, z, batch, t):
        logits = head_apply(head_t, z)
        labels = jnp.take(batch["labels"], t, axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def metric(self, params):
        logits = _batched_predict(params, lenet_encoder, self.test["image"])
        acc = (logits.argmax(-1) == self.test["labels"].T).mean(axis=1)
        return 100.0 * acc


class QM9Problem(Problem):
    name = "qm9"
    metric_name = "MAE"
    higher_is_better = False
    input_key = "x"

    def __init__(self, *, seed: int, tiny: bool, targets=("mu", "homo"), max_train: int = 20_000,
                 max_test: int = 5_000):
        from experiments.data.qm9 import QM9_TARGETS, QM9_UNITS, load_qm9
        from experiments.models import MLPEncoder, StackedMLP

        self.task_names = tuple(targets)
        idx = [QM9_TARGETS.index(t) for t in targets]
        units = {QM9_UNITS[i] for i in idx}
        self.metric_unit = units.pop() if len(units) == 1 else "/".join(QM9_UNITS[i] for i in idx)
        self._units = tuple(QM9_UNITS[i] for i in idx)
        if tiny:
            max_train, max_test = 512, 512
        data = load_qm9(seed=0, max_train=max_train, max_val=0, max_test=max_test)
        self.train = {"x": data.x_train, "y": data.y_train[:, idx]}
        self.test = {"x": data.x_test, "y": data.y_test[:, idx]}
        self.std = np.asarray(data.target_std)[idx]
        hidden = (64, 64) if tiny else (256, 256, 256)

        def init():
            rngs = nnx.Rngs(seed)
            enc = MLPEncoder(data.num_features, hidden, rngs=rngs)
            heads = StackedMLP(2, hidden[-1], (), 1, rngs=rngs)
            return imtl_jax.MTLParams(_pure(enc), _stacked_heads(heads), jnp.zeros(2))

        self.init_params = jax.jit(init)()
        self.encoder = lambda p, batch: mlp_encoder(p, batch["x"])

    def head_loss(self, head_t, z, batch, t):
        pred = head_apply(head_t, z)[:, 0]
        return jnp.mean((pred - jnp.take(batch["y"], t, axis=1)) ** 2)

    def metric(self, params):
        pred = _batched_predict(params, mlp_encoder, self.test["x"])[..., 0]  # (2, N)
        return np.abs(pred - self.test["y"].T).mean(axis=1) * self.std  # original units


def make_problem(dataset: str, *, seed: int = 0, tiny: bool = False) -> Problem:
    if dataset == "multimnist":
        return MultiMNISTProblem(seed=seed, tiny=tiny)
    if dataset == "qm9":
        return QM9Problem(seed=seed, tiny=tiny)
    raise ValueError(f"unknown dataset {dataset!r}; expected 'multimnist' or 'qm9'")


# ------------------------------------------------------------------------------ training


def make_step(problem: Problem, method) -> imtl_jax.MTLStep:
    return imtl_jax.mtl_step(problem.encoder, imtl_jax.stacked_task_losses(problem.head_loss), method)


def make_train(problem: Problem, method, *, lr: float):
    """``train(params, batch_indices (S, B), priorities) -> (params, losses (S, 2))``.

    One ``jax.jit``-compiled step (pure pytrees in and out, priorities traced) called in a
    Python loop: on XLA:CPU a ``lax.scan`` over the same step ran 4-5x slower (the convolutions
    inside a while loop lose their fast path), so the loop stays in Python.
    """
    step = make_step(problem, method)
    opt = optax.adam(lr)
    data = {k: jnp.asarray(v) for k, v in problem.train.items()}

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, opt_state, state, data, idx, priorities):
        batch = {k: v[idx] for k, v in data.items()}
        grads, state, aux = step(params, state, batch, priorities=priorities)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, aux.losses

    def train(params, batch_indices, priorities):
        params = jax.tree.map(jnp.array, params)  # a copy: the step donates its buffers
        opt_state, state = opt.init(params), step.init(params)
        losses = []
        for idx in batch_indices:
            params, opt_state, state, loss = train_step(params, opt_state, state, data, idx, priorities)
            losses.append(loss)
        return params, jnp.stack(losses)

    train.step = train_step
    return train


def batch_indices(problem: Problem, steps: int, batch_size: int, seed: int) -> np.ndarray:
    from experiments.data import ArrayDataset, BatchIterator

    it = BatchIterator(ArrayDataset(**problem.train), batch_size, seed=seed, shuffle=True, drop_last=True)
    return np.stack([it.indices_at(s) for s in range(steps)]).astype(np.int32)


def ratio_label(r: float) -> str:
    f = Fraction(r).limit_denominator(64)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def run_sweep(dataset: str = "multimnist", *, steps: int = 300, ratios: Sequence[float] = DEFAULT_RATIOS,
              batch_size: int = 128, lr: float = 1e-3, seed: int = 0, tiny: bool = False,
              out: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train every (family, ratio) point and write ``front.png``, ``results.json``, ``results.md``."""
    t0 = time.perf_counter()
    problem = make_problem(dataset, seed=seed, tiny=tiny)
    idx = jnp.asarray(batch_indices(problem, steps, min(batch_size, len(problem.train[problem.input_key])), seed))
    rows = []
    families = (("imtl_h", "imtl_h"), ("linear", LINEAR))
    for family, method in families:
        train = make_train(problem, method, lr=lr)
        for r in ratios:
            t1 = time.perf_counter()
            p = jnp.array([1.0, r], jnp.float32)
            params, losses = train(problem.init_params, idx, p)
            m = problem.metric(params)
            final = np.asarray(losses[-max(1, steps // 10):]).mean(0)
            row = dict(family=family, ratio=float(r), label=ratio_label(r),
                       metric=[float(m[0]), float(m[1])], final_train_loss=[float(final[0]), float(final[1])],
                       seconds=round(time.perf_counter() - t1, 2))
            rows.append(row)
            log(f"{family:7s} r={row['label']:>4s}  {problem.task_names[0]}={m[0]:.4g}  "
                f"{problem.task_names[1]}={m[1]:.4g}  ({row['seconds']:.1f}s)")
    result = dict(
        dataset=problem.name, tasks=list(problem.task_names), metric=problem.metric_name,
        unit=problem.metric_unit, higher_is_better=problem.higher_is_better, steps=steps,
        batch_size=int(idx.shape[1]), lr=lr, seed=seed, tiny=tiny, ratios=[float(r) for r in ratios],
        n_train=int(len(problem.train[problem.input_key])), n_test=int(len(problem.test[problem.input_key])),
        jax_version=jax.__version__, backend=jax.default_backend(), rows=rows,
        seconds=round(time.perf_counter() - t0, 1),
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "results.md").write_text(markdown_table(result))
        plot_front(result, out / "front.png")
        log(f"wrote {out}/front.png, results.json, results.md ({result['seconds']} s)")
    return result


# ------------------------------------------------------------------------------ reporting

FAMILY_NAMES = {"imtl_h": "IMTL-H, priorities (1, r)", "linear": "linear weights (1, r)"}


def markdown_table(result: dict) -> str:
    t1, t2 = result["tasks"]
    unit = result["unit"]
    arrow = "↑" if result["higher_is_better"] else "↓"
    lines = [
        f"### {result['dataset']}: {result['metric']} ({unit}, {arrow}) after {result['steps']} steps, "
        f"batch {result['batch_size']}, Adam {result['lr']:g}, seed {result['seed']}"
        f"{' (tiny)' if result['tiny'] else ''}",
        "",
        f"| method | r | {t1} | {t2} | train loss {t1} | train loss {t2} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        name = row["family"]
        if row["ratio"] == 1.0:
            name = "IMTL-H (p = 1)" if name == "imtl_h" else "equal weighting"
        lines.append(f"| {name} | {row['label']} | {row['metric'][0]:.4g} | {row['metric'][1]:.4g} | "
                     f"{row['final_train_loss'][0]:.4g} | {row['final_train_loss'][1]:.4g} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def plot_front(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    styles = {"imtl_h": dict(marker="o", color="C0"), "linear": dict(marker="s", color="C1")}
    for family in ("imtl_h", "linear"):
        rows = sorted((r for r in result["rows"] if r["family"] == family), key=lambda r: r["ratio"])
        xs = [r["metric"][0] for r in rows]
        ys = [r["metric"][1] for r in rows]
        ax.plot(xs, ys, ls=":", lw=1, alpha=0.6, color=styles[family]["color"])
        ax.scatter(xs, ys, label=FAMILY_NAMES[family], s=36, zorder=3, **styles[family])
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        color=styles[family]["color"])
    for family, marker, name in (("linear", "*", "equal weighting"), ("imtl_h", "D", "IMTL-H, p = 1")):
        row = next((r for r in result["rows"] if r["family"] == family and r["ratio"] == 1.0), None)
        if row is not None:
            ax.scatter([row["metric"][0]], [row["metric"][1]], marker=marker, s=160, facecolors="none",
                       edgecolors="k", zorder=4, label=name)
    t1, t2 = result["tasks"]
    arrow = "higher is better" if result["higher_is_better"] else "lower is better"
    ax.set_xlabel(f"{t1} {result['metric']} ({result['unit']})")
    ax.set_ylabel(f"{t2} {result['metric']} ({result['unit']})")
    ax.set_title(f"{result['dataset']}: priorities p = (1, r), {result['steps']} steps ({arrow})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ CLI


def _ratio(s: str) -> float:
    v = float(Fraction(s))
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"ratio must be finite and positive, got {s!r}")
    return v


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.priorities", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("multimnist", "qm9"), default="multimnist")
    ap.add_argument("--steps", type=int, default=None, help="training steps per point (default 300; 20 with --tiny)")
    ap.add_argument("--ratios", type=_ratio, nargs="+", default=list(DEFAULT_RATIOS),
                    help="ratios r of p = (1, r); fractions allowed (default 1/8 1/4 1/2 1 2 4 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (32 with --tiny)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/priorities/<dataset>)")
    ap.add_argument("--tiny", action="store_true", help="a few steps on a small subset (seconds)")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (20 if a.tiny else 300)
    batch = a.batch_size if a.batch_size is not None else (32 if a.tiny else 128)
    out = a.out if a.out is not None else f"runs/priorities/{a.dataset}{'-tiny' if a.tiny else ''}"
    return run_sweep(a.dataset, steps=steps, ratios=a.ratios, batch_size=batch, lr=a.lr, seed=a.seed,
                     tiny=a.tiny, out=out)


if __name__ == "__main__":
    main()
