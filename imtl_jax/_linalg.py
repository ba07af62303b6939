"""Small numerical kernels shared by IMTL-G and the baseline solvers.

* :func:`pow2_normalize` / :func:`ldexp` — exact power-of-two rescaling built from the bit
  patterns (integer operations only), so it is exact for every finite input: the largest
  float32/float64 values, and subnormals, which XLA's CPU backend otherwise reads as zero
  (denormals-are-zero: ``x * 2`` and ``x > 0`` both see 0 for ``x = 1e-40`` in float32).
* :func:`symmetric_pinv` — a scale-relative pseudo-inverse of a symmetric PSD matrix (``eigh``).
* :func:`spd_inverse` — the inverse of a symmetric matrix by Cholesky when a conditioning test
  passes, else :func:`symmetric_pinv`, behind ``lax.cond``: on GPU/TPU only the branch taken
  runs, so a well-conditioned system never pays for an eigendecomposition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# dtype itemsize -> (unsigned int type, mantissa bits, exponent bias, exponent mask)
_LAYOUT = {4: (jnp.uint32, 23, 127, 0xFF), 8: (jnp.uint64, 52, 1023, 0x7FF)}


def _layout(dtype):
    dtype = jnp.dtype(dtype)
    if dtype.itemsize not in _LAYOUT or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"expected float32 or float64, got {dtype}")
    return _LAYOUT[dtype.itemsize]


def _effective_exponent(bits, utype, mant_bits):
    """Biased exponent and normalized mantissa field of |x|, subnormals normalized."""
    width = 8 * jnp.dtype(utype).itemsize
    field = (bits >> utype(mant_bits)) & utype((1 << (width - 1 - mant_bits)) - 1)
    mant = bits & utype((1 << mant_bits) - 1)
    # Subnormal: value = mant * 2^(1 - bias - mant_bits) = 1.f * 2^(p - bias - mant_bits + 1 ...):
    # with p the position of the leading bit of mant, the biased exponent is p - mant_bits + 1.
    lead = (width - 1) - lax.clz(mant).astype(jnp.int32)             # -1 when mant == 0
    sub_exp = lead - mant_bits + 1
    shift = jnp.clip(mant_bits - lead, 0, width - 1).astype(utype)
    sub_mant = (mant << shift) & utype((1 << mant_bits) - 1)
    normal = field > 0
    exp = jnp.where(normal, field.astype(jnp.int32), sub_exp)
    return exp, jnp.where(normal, mant, sub_mant), (field == 0) & (mant == 0)


def pow2_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(y, k)`` with ``y = x * 2^-k`` exactly and ``max|y|`` in ``[0.5, 1)`` (``k = 0``, ``y = x``
    when ``x`` is all zero).

    Built on the bit patterns (no multiplication), so it is exact for every finite ``x``,
    including the largest finite values and subnormals. Entries smaller than
    ``2^-(bias-1)`` times ``max|x|`` (``~1e-38`` relative in float32) become 0: far below the
    round-off of anything computed from ``y``. Non-finite entries give non-finite ``y``.
    """
    utype, mant_bits, bias, _ = _layout(x.dtype)
    width = 8 * jnp.dtype(utype).itemsize
    bits = lax.bitcast_convert_type(x, utype)
    sign = bits & utype(1 << (width - 1))
    exp, mant, zero = _effective_exponent(bits, utype, mant_bits)
    top = jnp.max(jnp.where(zero, jnp.iinfo(jnp.int32).min, exp))
    k = jnp.where(jnp.all(zero), 0, top - (bias - 1))                 # the max gets exponent -1
    new_exp = exp - k
    finite_field = (bits >> utype(mant_bits)) & utype((1 << (width - 1 - mant_bits)) - 1)
    nonfinite = finite_field == utype((1 << (width - 1 - mant_bits)) - 1)
    out_bits = sign | (jnp.clip(new_exp, 1, 2 * bias).astype(utype) << utype(mant_bits)) | mant
    y = lax.bitcast_convert_type(out_bits, x.dtype)
    y = jnp.where(zero | (new_exp < 1), jnp.zeros((), x.dtype), y)
    y = jnp.where(nonfinite, x, y)
    return y, k.astype(jnp.int32)


def _pow2(k, dtype):
    """``2^k`` as a normal number of ``dtype`` (``k`` must lie in the normal range)."""
    utype, mant_bits, bias, _ = _layout(dtype)
    return lax.bitcast_convert_type((k + bias).astype(utype) << utype(mant_bits), dtype)


def ldexp(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x * 2^k`` rounded once (exact unless the result over/underflows), for ``|k|`` up to twice
    the exponent range: two multiplications by normal powers of two."""
    k = jnp.asarray(k, jnp.int32)
    half = k // 2
    return (x * _pow2(half, x.dtype)) * _pow2(k - half, x.dtype)


def symmetric_pinv(k: jax.Array, rtol: jax.Array) -> jax.Array:
    """Pseudo-inverse of the symmetric PSD ``k`` with eigenvalues below ``rtol * lambda_max`` cut."""
    evals, evecs = jnp.linalg.eigh(k)
    keep = evals > rtol * jnp.max(jnp.abs(evals))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    p = jnp.matmul(evecs * inv[None, :], evecs.T, precision=HIGHEST)
    return 0.5 * (p + p.T)


def spd_inverse(k: jax.Array, max_cond: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P, used_cholesky)``: ``P = k^-1`` by Cholesky when ``cond_1(k) <= max_cond`` (measured on
    the computed inverse: ``||k||_1 ||k^-1||_1``, an upper bound of the 2-norm condition number),
    else the pseudo-inverse :func:`symmetric_pinv` with eigenvalue cutoff ``1 / max_cond``.

    The test and the fallback sit behind ``lax.cond``: on accelerators the eigendecomposition runs
    only when the Cholesky route fails (under ``vmap`` both branches run, as for any cond).
    Non-finite ``k`` gives a NaN ``P``.
    """
    n = k.shape[0]
    eye = jnp.eye(n, dtype=k.dtype)
    factor = jnp.linalg.cholesky(k)
    inverse = jax.scipy.linalg.cho_solve((factor, True), eye)
    inverse = 0.5 * (inverse + inverse.T)
    norm1 = jnp.max(jnp.sum(jnp.abs(k), axis=0))
    cond1 = norm1 * jnp.max(jnp.sum(jnp.abs(inverse), axis=0))
    ok = jnp.all(jnp.isfinite(inverse)) & (cond1 <= max_cond)
    finite = jnp.all(jnp.isfinite(k))
    safe_k = jnp.where(finite, k, eye)
    p = lax.cond(ok, lambda: inverse, lambda: symmetric_pinv(safe_k, 1.0 / max_cond))
    p = jnp.where(finite, p, jnp.nan)
    return p, ok
