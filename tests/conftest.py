"""Shared pytest fixtures (oracles live in tests/oracles.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from oracles import x64


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs a test in float32 and (with x64 enabled) float64."""
    if request.param == "float64":
        with x64():
            yield np.float64
    else:
        yield np.float32


@pytest.fixture(params=["float32", "float64"])
def fdtype(request):
    """The same as ``dtype`` (name used by the method tests)."""
    if request.param == "float64":
        with x64():
            yield np.float64
    else:
        yield np.float32


DEFAULT_MARKS = "not slow and not stress"  # pyproject's addopts: the default suite


def pytest_configure(config):
    """The default suite compiles with XLA's backend (LLVM) optimisation level 0.

    Its time is mostly XLA compiling hundreds of small programs once each; level 0 cuts the
    suite by about a fifth (measured on this 2-core machine) while XLA's own graph passes
    (fusion, layout) still run. Generated code may then round a sum in another order, so every
    tolerance in the tests is a rounding bound that holds for any order; the precision-critical
    files run again at full optimisation in CI's slow step (.ci/run), as does every slow or
    stress test. ``IMTL_TEST_XLA_OPT=default`` (or an explicit ``--xla_backend_optimization_level``
    in ``XLA_FLAGS``) keeps the default level. Runs before any test initialises the backend, in
    each pytest-xdist worker too.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if (config.option.markexpr == DEFAULT_MARKS and os.environ.get("IMTL_TEST_XLA_OPT") != "default"
            and "xla_backend_optimization_level" not in flags):
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def pytest_collection_modifyitems(config, items):
    """The eager (``__without_jit``) variant of every chex property test runs in CI's slow step:
    without jit each ``lax.while_loop`` of a solver compiles on every call, so it costs many times
    its jitted twin, which stays in the default suite and checks the same property."""
    for item in items:
        if item.name.endswith("__without_jit"):
            item.add_marker(pytest.mark.slow)
