"""Shared pytest fixtures (oracles live in tests/oracles.py)."""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):
    """The eager (``__without_jit``) variant of every chex property test runs in CI's slow step:
    without jit each ``lax.while_loop`` of a solver compiles on every call, so it costs many times
    its jitted twin, which stays in the default suite and checks the same property."""
    for item in items:
        if item.name.endswith("__without_jit"):
            item.add_marker(pytest.mark.slow)
