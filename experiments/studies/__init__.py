"""The studies: what ``python -m experiments <study> --benchmark <name>`` runs.

A study module defines ``DESCRIPTION`` (one line), ``USAGE`` (examples for ``--help``),
optional ``DEFAULTS``/``TINY`` (flag values that override the benchmark's), optional
``add_flags(parser)`` and ``run(options, command) -> dict``. Adding a study is one new module
plus one line in :data:`STUDIES` (see ``docs/contributing_experiments.md``).
"""

from __future__ import annotations

import importlib

__all__ = ["STUDIES", "module"]

#: study name -> module. ``compare`` is what ``python -m experiments <benchmark>`` runs.
STUDIES: dict[str, str] = {
    "compare": "experiments.studies.compare",
    "robustness": "experiments.studies.robustness",
    "ablation_z_vs_theta": "experiments.studies.ablation_z_vs_theta",
    "priorities": "experiments.studies.priorities",
    "grouping": "experiments.studies.grouping",
    "affinity_levels": "experiments.studies.affinity_levels",
    "overfitting": "experiments.studies.overfitting",
    "tuning": "experiments.studies.tuning",
}


def module(name: str):
    from experiments.errors import CLIError
    if name not in STUDIES:
        raise CLIError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])
