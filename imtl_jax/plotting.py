"""Plots for imtl-jax diagnostics. matplotlib is imported when a function is called, never at
``import imtl_jax`` (it is not a dependency of the library: ``pip install matplotlib``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("imtl_jax.plotting needs matplotlib: pip install matplotlib "
                          "(or the project's 'experiments' extra).") from err
    return plt


def plot_affinity(affinity: Any, *, task_names: Optional[Sequence[str]] = None,
                  groups: Optional[Sequence[Sequence[int]]] = None, title: Optional[str] = None,
                  ax: Any = None, vmax: Optional[float] = None, annotate: Optional[bool] = None):
    """Draws a (T, T) task-affinity matrix as a heat map (diverging colours centred on 0).

    Args:
      affinity: (T, T) matrix, e.g. ``affinity_stats(state).mean`` (mean gradient cosines) or a
        look-ahead affinity (row = the task whose step is taken, column = the affected task).
      task_names: T labels for the axes (default ``0..T-1``).
      groups: optional grouping (e.g. from :func:`imtl_jax.propose_groups`): tasks are reordered
        group by group and the groups are outlined.
      title: axes title.
      ax: a matplotlib Axes to draw on (default: a new figure).
      vmax: the colour range is ``[-vmax, vmax]`` (default: the largest off-diagonal |value|).
      annotate: write the values in the cells (default: when T <= 12).

    Returns:
      The matplotlib Axes.

    Example:
      >>> import matplotlib; matplotlib.use("Agg")
      >>> import numpy as np
      >>> from imtl_jax.plotting import plot_affinity
      >>> a = np.array([[1., .8, -.1], [.8, 1., 0.], [-.1, 0., 1.]])
      >>> ax = plot_affinity(a, task_names=["a", "b", "c"], groups=[(0, 1), (2,)])
      >>> [t.get_text() for t in ax.get_xticklabels()]
      ['a', 'b', 'c']
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"`affinity` must be a square (T, T) matrix, got shape {a.shape}.")
    t = a.shape[0]
    names = [str(i) for i in range(t)] if task_names is None else [str(n) for n in task_names]
    if len(names) != t:
        raise ValueError(f"`task_names` has {len(names)} entries for T = {t} tasks.")
    order = list(range(t)) if groups is None else [int(i) for g in groups for i in g]
    if sorted(order) != list(range(t)):
        raise ValueError(f"`groups` must partition range({t}), got {groups!r}.")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.45 * t, 0.6 + 0.45 * t))
    shown = a[np.ix_(order, order)]
    off = shown[~np.eye(t, dtype=bool)]
    if vmax is None:
        finite = off[np.isfinite(off)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(t))
    ax.set_xticklabels([names[i] for i in order], rotation=90)
    ax.set_yticks(range(t))
    ax.set_yticklabels([names[i] for i in order])
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    if annotate is None:
        annotate = t <= 12
    if annotate:
        for r in range(t):
            for c in range(t):
                if np.isfinite(shown[r, c]):
                    ax.text(c, r, f"{shown[r, c]:.2f}", ha="center", va="center", fontsize=7)
    if groups is not None:
        start = 0
        for g in groups:
            n = len(g)
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), n, n, fill=False, lw=2, ec="k"))
            start += n
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return ax
