"""Validation curves of a results folder: kept compactly beside the results, and plotted.

``python -m experiments.curves <results folder>`` reads every run's ``history.json`` (the
per-step record, too large to commit), keeps its validation evaluations in
``<folder>/curves.json`` (merged with what is already there, so curves survive when the
histories are gone), and writes ``<folder>/curves.png`` and ``<folder>/curves.md``.

The budget rule: a run has *flattened* at the first evaluation after which the mean, over its
validation metrics, of the relative gap to the best value the run reaches stays below
``tol`` (1 % by default). ``curves.md`` lists that epoch per run; a budget is long enough when
every run of equal weighting and of the single-task networks flattens well before its end. Beside
it, the *late gain*: how much the run's best validation value still improved in the last 10 % of
its steps (the mean over metrics of the relative improvement), which bounds what a run whose
selected step is its last evaluation was still gaining when it stopped.

>>> relative_gap({"mae": [4.0, 2.0, 1.0]}, {"mae": False}).round(3).tolist()
[3.0, 1.0, 0.0]
>>> flattened_index(np.array([0.5, 0.2, 0.005, 0.02, 0.004, 0.0]), 0.01)
4
>>> round(late_gain({"mae": [4.0, 2.0, 1.02, 1.0]}, {"mae": False}, [10, 20, 30, 40], 0.25), 3)
0.02
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["extract", "relative_gap", "flattened_index", "late_gain", "summarize", "main", "DEFAULT_TOL",
           "LATE_FRACTION"]

DEFAULT_TOL = 0.01
LATE_FRACTION = 0.1


def _payload(folder: Path) -> dict:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _higher_is_better(folder: Path) -> dict:
    return {m["name"]: bool(m["higher_is_better"]) for m in _payload(folder).get("metrics", [])}


def _own_metrics(folder: Path, label: str, metrics: dict) -> dict:
    """A single-task run (``single_task_<t>``) is judged on its own task's metrics only."""
    if not label.startswith("single_task_"):
        return metrics
    payload = _payload(folder)
    tasks = payload.get("tasks", [])
    t = int(label.rsplit("_", 1)[1])
    own = {m["name"] for m in payload.get("metrics", []) if tasks and m["task"] == tasks[t]}
    return {k: v for k, v in metrics.items() if k in own} or metrics


def extract(folder: Path) -> dict:
    """``{label: {seed: {"step": [...], "lr": [...], "metrics": {name: [...]}}}}`` from the
    histories under ``folder/runs`` (a tuning study's: ``folder/test/<grid point>/runs``), merged
    over the curves already stored in ``curves.json``."""
    folder = Path(folder)
    stored = folder / "curves.json"
    curves = json.loads(stored.read_text())["runs"] if stored.exists() else {}
    from experiments.verdicts import run_files
    for hist_path in run_files(folder, "history.json"):
        label, seed = hist_path.parent.parent.name, hist_path.parent.name.removeprefix("seed")
        try:
            val = json.loads(hist_path.read_text()).get("val", [])
        except (OSError, ValueError):
            continue
        if not val:
            continue
        names = list(val[0]["metrics"])
        curves.setdefault(label, {})[seed] = {
            "step": [int(v["step"]) for v in val],
            "lr": [v.get("lr") for v in val],
            "metrics": {n: [v["metrics"].get(n) for v in val] for n in names},
        }
    return curves


def relative_gap(metrics: dict, higher_is_better: dict) -> np.ndarray:
    """Per evaluation, the mean over metrics of ``|m - best| / |best|`` (best over the run)."""
    gaps = []
    for name, values in metrics.items():
        v = np.asarray([np.nan if x is None else x for x in values], np.float64)
        best = np.nanmax(v) if higher_is_better.get(name, False) else np.nanmin(v)
        gaps.append(np.abs(v - best) / max(abs(best), 1e-12))
    return np.nanmean(np.stack(gaps), axis=0)


def flattened_index(gap: np.ndarray, tol: float) -> int:
    """The first index after which ``gap`` stays below ``tol`` (``len(gap)`` if it never does)."""
    above = np.nonzero(~(gap < tol))[0]
    return 0 if len(above) == 0 else int(above[-1]) + 1


def late_gain(metrics: dict, higher_is_better: dict, steps, fraction: float = LATE_FRACTION) -> float:
    """How much the best validation value improved in the last ``fraction`` of the run's steps:
    the mean over metrics of ``|best before - best| / |best|``, "before" being the evaluations at
    steps up to ``(1 - fraction)`` times the last one (NaN when there is none)."""
    steps = np.asarray(steps, np.float64)
    early = steps <= (1.0 - fraction) * steps[-1]
    if not early.any():
        return float("nan")
    gains = []
    for name, values in metrics.items():
        v = np.asarray([np.nan if x is None else x for x in values], np.float64)
        pick = np.nanmax if higher_is_better.get(name, False) else np.nanmin
        best = pick(v)
        gains.append(abs(pick(v[early]) - best) / max(abs(best), 1e-12))
    return float(np.nanmean(gains))


# Training-set sizes of the benchmarks whose curves are plotted in epochs (the split each uses).
TRAIN_SIZES = {"qm9": 110_831, "multifashion": 24_000, "multimnist": 24_000, "multifashion_mnist": 24_000}


def _steps_per_epoch(folder: Path) -> float | None:
    path = folder / "results.json"
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    size = TRAIN_SIZES.get(payload.get("benchmark"))
    for r in payload.get("runs", []):
        batch = (r.get("config") or {}).get("batch_size")
        if size and batch:
            return float(size // int(batch))
    return None


def _shown(folder: Path) -> str:
    """The folder as a path from the repository root when it lies inside it (stable in docs)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return Path(folder).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(folder).as_posix()


def summarize(folder: Path, curves: dict, tol: float) -> str:
    hib = _higher_is_better(folder)
    spe = _steps_per_epoch(folder)
    unit = "epoch" if spe else "step"
    lines = [f"# Validation curves: {folder.name}", "",
             f"Flattened: the first evaluation after which the mean relative gap of the run's validation metrics "
             f"to their best value stays below {tol:.0%}; late gain: how much the best validation value "
             f"(mean relative improvement over the metrics) still improved in the last {LATE_FRACTION:.0%} of "
             f"the steps (`python -m experiments.curves {_shown(folder)}`).", "",
             f"| run | seeds | last {unit} | flattened at {unit} (per seed) | late gain, % (per seed) "
             f"| selected step = last evaluation |",
             "|---|---|---|---|---|---|"]
    from experiments.verdicts import collect_runs, selected_last as _selected_last
    # Every finished run of the folder (results.json lists only the last call's methods).
    finished = collect_runs(folder) or _payload(folder).get("runs", [])
    selected_last = _selected_last(finished)
    finished_seeds: dict = {}
    for r in finished:
        finished_seeds.setdefault(r["method"], set()).add(int(r["seed"]))
    for label in sorted(curves, key=lambda k: (k.startswith("single_task_"), len(k), k)):
        flat, late, last = [], [], 0.0
        for seed in sorted(curves[label], key=int):
            c = curves[label][seed]
            own = _own_metrics(folder, label, c["metrics"])
            gap = relative_gap(own, hib)
            steps = np.asarray(c["step"], np.float64) / (spe or 1.0)
            i = flattened_index(gap, tol)
            flat.append("never" if i >= len(gap) else f"{steps[i]:.0f}")
            g = late_gain(own, hib, c["step"])
            late.append("–" if np.isnan(g) else f"{100 * g:.2f}")
            last = steps[-1]
        hit, n = selected_last.get(label, (0, 0))
        lacking = sorted(finished_seeds.get(label, set()) - {int(k) for k in curves[label]})
        shown = f"{len(curves[label])}" + (f" (no history: seed {', '.join(map(str, lacking))})" if lacking else "")
        lines.append(f"| {label} | {shown} | {last:.0f} | {', '.join(flat)} | {', '.join(late)} | "
                     f"{f'{hit} of {n}' if n else '–'} |")
    return "\n".join(lines) + "\n"


def plot(folder: Path, curves: dict, tol: float) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hib = _higher_is_better(folder)
    spe = _steps_per_epoch(folder) or 1.0
    labels = sorted(curves)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab20")
    for i, label in enumerate(labels):
        for j, seed in enumerate(sorted(curves[label], key=int)):
            c = curves[label][seed]
            gap = relative_gap(_own_metrics(folder, label, c["metrics"]), hib)
            x = np.asarray(c["step"], np.float64) / spe
            ax.semilogy(x, np.maximum(gap, 1e-5), color=cmap(i % 20), alpha=0.8, lw=1,
                        label=label if j == 0 else None)
    ax.axhline(tol, color="k", ls="--", lw=0.8, label=f"{tol:.0%}")
    ax.set_xlabel("epoch" if spe != 1.0 else "step")
    ax.set_ylabel("mean relative gap to the run's best\nvalidation metric (log)")
    ax.set_title(f"{folder.name}: validation curves, one line per seed")
    if len(labels) <= 24:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out = folder / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a results folder (with runs/<method>/seed<k>/history.json)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help=f"the flattening tolerance (default: {DEFAULT_TOL})")
    p.add_argument("--no-plot", action="store_true", help="write curves.json and curves.md only")
    a = p.parse_args(argv)
    curves = extract(a.folder)
    if not curves:
        print(f"no validation curves under {a.folder}")
        return 1
    _write(a.folder / "curves.json", json.dumps({"runs": curves}, separators=(",", ":")))
    text = summarize(a.folder, curves, a.tol)
    _write(a.folder / "curves.md", text)
    if not a.no_plot:
        plot(a.folder, curves, a.tol)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
