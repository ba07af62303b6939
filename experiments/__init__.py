"""Experiment suite for imtl-jax: data sets, models, losses and metrics.

This package is not installed with ``imtl_jax``; run scripts and tests from the
repository root so that ``import experiments`` resolves.
"""
