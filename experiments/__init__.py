"""Experiment suite for imtl-jax: ``python -m experiments <benchmark|study> [flags]``.

One training loop (``train.py``: runs of a method vmapped into one program, evaluation every
``eval_every`` steps, test metrics at the best validation step, checkpoints, records), one file
per benchmark in the registry (``suites/``) and the studies on top (``studies/``); see
``docs/experiments.md`` and ``docs/contributing_experiments.md``. This package is not installed
with ``imtl_jax``; run it from the repository root so that ``import experiments`` resolves.
"""
