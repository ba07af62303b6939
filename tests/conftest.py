"""Shared pytest fixtures (oracles live in tests/oracles.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

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
    _share_compilations(config)
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


_CACHE_ENV = "IMTL_TEST_COMPILATION_CACHE"


def _share_compilations(config):
    """One persistent XLA compilation cache per test session, shared by its pytest-xdist workers
    and by every subprocess a test starts (entry points, kill-and-resume runs).

    Many tests compile the same program: the same method's step on the same small problem in
    several test files, and above all every restart of an interrupted training run. With the
    cache, whichever process compiles a program first serves the others. The cache starts empty
    in every session (a fresh temporary folder, removed at the end), so a run never reuses
    programs compiled by an earlier version of the code. The controller creates the folder and
    exports it through JAX's own environment variables before the workers and subprocesses
    start; each process that imported JAX earlier is pointed at it too.
    ``IMTL_TEST_COMPILATION_CACHE=off`` disables it.
    """
    import jax

    path = os.environ.get(_CACHE_ENV)
    if path == "off":
        return
    if not path:
        path = tempfile.mkdtemp(prefix="imtl-jax-test-xla-cache-")
        os.environ[_CACHE_ENV] = path
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
