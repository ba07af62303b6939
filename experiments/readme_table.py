"""Regenerate the README's main-job table from a committed ``results.json``.

    python -m experiments.readme_table                    # rewrite README.md between the markers
    python -m experiments.readme_table --check            # exit 1 if README.md is stale
    python -m experiments.readme_table --results results/multimnist/results.json --readme README.md

The table (test metrics selected on validation, mean ± 95 % Student-t interval, n seeds, Δm and
the paired difference to equal weighting) is written between ``<!-- results:main:start -->``
and ``<!-- results:main:end -->`` together with the exact command, the number of seeds and the
machine, so the README cannot drift from the committed results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["render", "update", "main", "START", "END"]

START, END = "<!-- results:main:start -->", "<!-- results:main:end -->"
DEFAULT_RESULTS = "results/multimnist/results.json"


def _pm(d, scale=1.0, signed=False) -> str:
    from experiments import stats
    if not d or d.get("mean") is None:
        return "n/a"
    half = d.get("ci95")
    return stats.format_ci(d["mean"] * scale, (half * scale) if half is not None else float("nan"), 2, signed)


def render(payload: dict, source: str) -> str:
    """The markdown block for one results.json payload."""
    metrics = payload["metrics"]
    summary = payload["summary"]
    runs = payload.get("runs") or []
    machine = (runs[0].get("machine") or {}) if runs else {}
    seeds = sorted({r["seed"] for r in runs})
    pct = [m["name"].endswith("_acc") for m in metrics]
    cols = ["method", "n"] + [f"{m['name']}{' (%)' if p else ''} {'↑' if m['higher_is_better'] else '↓'}"
                              for m, p in zip(metrics, pct)]
    has_dm = any("delta_m" in e for e in summary.values())
    has_ew = any("delta_m_minus_ew" in e for e in summary.values())
    cols += (["Δm% ↓"] if has_dm else []) + (["Δm − EW"] if has_ew else [])
    lines = [f"Command: `{payload.get('command', '')}` — {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             f"machine: {machine.get('processor', '?')}, {machine.get('cpus', '?')} CPUs, {machine.get('backend', '?')}, "
             f"jax {machine.get('jax', '?')}; source: `{source}`. Test metrics at the best validation step, "
             "mean ± 95 % Student-t interval over n seeds; Δm% against "
             f"{payload.get('baseline_label') or 'no baseline'}; Δm − EW: paired per-seed difference.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for method, e in summary.items():
        row = [method, str(e["n_seeds"])] + [_pm(e["test"][m["name"]], 100.0 if p else 1.0)
                                             for m, p in zip(metrics, pct)]
        if has_dm:
            row.append(_pm(e.get("delta_m"), signed=True))
        if has_ew:
            row.append(_pm(e.get("delta_m_minus_ew"), signed=True))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def update(readme_text: str, block: str) -> str:
    """``readme_text`` with ``block`` between the markers (ValueError when they are missing)."""
    if START not in readme_text or END not in readme_text:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.readme_table", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=DEFAULT_RESULTS, help=f"results.json to read (default: {DEFAULT_RESULTS})")
    ap.add_argument("--readme", default="README.md", help="the file to update (default: README.md)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 when the README is stale")
    a = ap.parse_args(argv)
    path = Path(a.results)
    if not path.is_file():
        print(f"python -m experiments.readme_table: error: {path} not found; run the main job and commit its "
              "results.json there first", file=sys.stderr)
        return 2
    readme = Path(a.readme)
    text = readme.read_text()
    new = update(text, render(json.loads(path.read_text()), a.results))
    if a.check:
        if new != text:
            print(f"{readme} is stale: run python -m experiments.readme_table", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
