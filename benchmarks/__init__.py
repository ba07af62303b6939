"""Benchmark scripts for imtl-jax (run as modules: ``python -m benchmarks.step_cost``)."""
