"""Trace-time argument checks shared by the whole package.

Every check runs on static shape/dtype information only, so it raises at trace time under
``jax.jit`` and costs nothing at run time. Messages name the argument and the shapes seen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_float_array(x: Any, name: str, ndim: int | None = None) -> jax.Array:
    """Returns ``x`` as a floating-point array, or raises naming ``name``.

    Raises:
      TypeError: integer, boolean or complex dtype.
      ValueError: wrong number of dimensions (when ``ndim`` is given).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating-point dtype (float16/bfloat16/float32/"
            f"float64), got dtype {x.dtype} with shape {x.shape}."
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"`{name}` must be a rank-{ndim} array, got shape {x.shape} (rank {x.ndim})."
        )
    return x


def check_num_tasks(num_tasks: int, what: str, shape: tuple[int, ...], expected_name: str,
                    expected: int) -> None:
    """Raises ValueError when the task axis of ``what`` (shape ``shape``) differs."""
    if num_tasks != expected:
        raise ValueError(
            f"`{what}` has {num_tasks} tasks (shape {shape}) but `{expected_name}` has "
            f"{expected}; the leading axis of both must be the task axis T."
        )


def check_task_vector(x: Any, name: str, num_tasks: int, ref_name: str,
                      ref_shape: tuple[int, ...]) -> jax.Array:
    """Checks ``x`` is a float vector of length ``num_tasks`` (the T of ``ref_name``)."""
    x = check_float_array(x, name)
    if x.shape != (num_tasks,):
        raise ValueError(
            f"`{name}` must have shape ({num_tasks},) to match `{ref_name}` with shape "
            f"{ref_shape}, got shape {x.shape}."
        )
    return x
