"""PNG plots of an experiment folder (matplotlib, Agg).

* ``compare_validation.png``: one panel per task (its first metric): every method's validation
  metric over training, the mean over seeds as a line and the min-max over seeds as a band
  (single-task runs: task t's panel shows the run trained on task t alone).
* ``weights_<method>.png``: task weights α_t and loss scales e^{s_t} over training (mean over
  seeds); a constant quantity (equal weighting's α, a method without loss scales) is not drawn,
  and the file is skipped when both are constant.
* ``losses_<method>.png``: per-task training loss (moving average, mean over seeds) and the
  validation loss at each evaluation.
Axes are labelled; titles name the method and the seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_all", "plot_compare", "plot_method"]

MAX_PANELS = 12


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, np.ones(window) / window, mode="valid")


def _seed_stack(hists: list, key: str):
    seqs = [np.asarray(h[key], dtype=np.float64) for h in hists if h.get(key)]
    if not seqs:
        return None, None
    n = min(len(s) for s in seqs)
    steps = np.asarray(next(h["step"] for h in hists if h.get(key))[:n])
    return steps, np.stack([s[:n] for s in seqs])


def _constant(a: np.ndarray) -> bool:
    """True when every task's curve (``a``: (seeds, steps, T)) is flat over training."""
    a = np.where(np.isfinite(a), a, np.nan)
    if np.all(np.isnan(a)):
        return True
    spread = np.nanmax(a, axis=1) - np.nanmin(a, axis=1)
    return bool(np.all(np.nan_to_num(spread) <= 1e-9 * max(1.0, float(np.nanmax(np.abs(a))))))


def plot_method(out_dir: Path, method: str, hists: list, seeds: Sequence[int], task_names: Sequence[str]) -> list:
    """weights_<method>.png (unless constant) and losses_<method>.png; returns the written paths."""
    plt = _plt()
    written = []
    T = len(task_names)
    legend = T <= 12
    colors = plt.get_cmap("tab20" if T > 10 else "tab10")
    who = f"{method}, mean over seeds {', '.join(map(str, seeds))}"
    steps, w = _seed_stack(hists, "weight")
    _, sc = _seed_stack(hists, "scale")
    panels = [(k, v) for k, v in (("weight", w), ("scale", sc)) if v is not None and not _constant(v)]
    panels = [(k, np.nanmean(v, axis=0)) for k, v in panels]
    if steps is not None and panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        win = max(1, len(steps) // 50)
        for ax, (kind, mean) in zip(axes[0], panels):
            for t in range(T):
                y = _smooth(mean[:, t], win) if kind == "weight" else mean[:, t]
                ax.plot(steps, y, color=colors(t % 20), lw=1.2, label=task_names[t])
            if kind == "weight":
                ax.set_ylabel(f"task weight α_t (moving average over {win} steps)")
            else:
                ax.set_ylabel("loss scale e^(s_t)")
                f = mean[np.isfinite(mean)]
                if f.size and f.min() > 0 and f.max() / f.min() > 10:
                    ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_title(who, fontsize=9)
            ax.grid(alpha=0.3)
            if legend:
                ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"weights_{method}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    steps, L = _seed_stack(hists, "loss")
    if steps is not None:
        win = max(1, len(steps) // 50)
        mean = np.nanmean(L, axis=0)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for t in range(T):
            ax.plot(steps, _smooth(mean[:, t], win), color=colors(t % 20), lw=1.1,
                    label=f"{task_names[t]} train" if legend else None)
        vals = [h["val"] for h in hists if h.get("val")]
        if vals:
            n = min(len(v) for v in vals)
            vs = [e["step"] for e in vals[0][:n]]
            vl = np.mean([[e["losses"] for e in v[:n]] for v in vals], axis=0)
            for t in range(T):
                ax.plot(vs, vl[:, t], "o--", color=colors(t % 20), ms=3, lw=0.8,
                        label=f"{task_names[t]} validation" if legend else None)
        if np.all(mean[np.isfinite(mean)] > 0):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"per-task loss (train: moving average over {win} steps)")
        ax.set_title(who, fontsize=9)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / f"losses_{method}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def plot_compare(out_dir: Path, bench, results: Sequence[dict], histories: dict) -> list:
    """compare_validation.png: per task, each method's validation metric over training (mean, min-max band)."""
    plt = _plt()
    tasks = list(bench.task_names)[:MAX_PANELS]
    curves: dict = {}  # (method, task index) -> list of (steps, values)
    for r in results:
        h = histories.get((r["method"], r["seed"]))
        if not h or not h.get("val"):
            continue
        for t, _task in enumerate(tasks):
            if r.get("single_task") is not None and r["single_task"] != t:
                continue
            metric = bench.metric_names_of_task(t)[0]
            label = "single_task" if r.get("single_task") is not None else r["method"]
            curves.setdefault((label, t), []).append(
                ([e["step"] for e in h["val"]], [e["metrics"].get(metric) for e in h["val"]]))
    if not curves:
        return []
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    methods = list(dict.fromkeys(m for m, _ in curves))
    seeds = sorted({r["seed"] for r in results})
    for t, task in enumerate(tasks):
        ax = axes[t // cols][t % cols]
        metric = bench.metric_names_of_task(t)[0]
        for i, m in enumerate(methods):
            runs = curves.get((m, t))
            if not runs:
                continue
            n = min(len(s) for s, _ in runs)
            x = np.asarray(runs[0][0][:n])
            y = np.asarray([[np.nan if v is None else v for v in vals[:n]] for _, vals in runs], np.float64)
            ax.plot(x, np.nanmean(y, axis=0), color=f"C{i % 10}", lw=1.3, label=f"{m} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=f"C{i % 10}", alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        if t == 0:
            ax.legend(fontsize=7)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{bench.name}: validation metric per task over training; line = mean, band = min–max over "
                 f"seeds {', '.join(map(str, seeds))}", fontsize=10)
    fig.tight_layout()
    p = out_dir / "compare_validation.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def plot_all(out_dir: Path, bench, results: Sequence[dict], histories: dict) -> list:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plot_compare(out_dir, bench, results, histories)
    for m in dict.fromkeys(r["method"] for r in results):
        hs = [h for (mm, _), h in histories.items() if mm == m]
        seeds = sorted(s for (mm, s) in histories if mm == m)
        if hs:
            written += plot_method(out_dir, m, hs, seeds, bench.task_names)
    return written
