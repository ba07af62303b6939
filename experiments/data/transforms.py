"""Small numpy image transforms shared by the loaders (no PIL or jax needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["bilinear_resize_matrix", "resize_bilinear", "resize_nearest"]


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of 1-D bilinear resampling with half-pixel centres (edge-clamped)."""
    x = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    x = np.clip(x, 0.0, in_size - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    w_hi = x - lo
    m = np.zeros((out_size, in_size), dtype=np.float64)
    m[np.arange(out_size), lo] += 1.0 - w_hi
    m[np.arange(out_size), hi] += w_hi
    return m


def resize_bilinear(images: np.ndarray, out_hw: tuple[int, int], batched: bool = True) -> np.ndarray:
    """Bilinearly resize (N, H, W[, C]) images (or one (H, W[, C]) image with ``batched=False``) to ``out_hw``;
    float32."""
    x = np.asarray(images, dtype=np.float32)
    if not batched:
        return resize_bilinear(x[None], out_hw)[0]
    rh = bilinear_resize_matrix(x.shape[1], out_hw[0]).astype(np.float32)
    rw = bilinear_resize_matrix(x.shape[2], out_hw[1]).astype(np.float32)
    if x.ndim == 3:
        return np.einsum("ih,nhw,jw->nij", rh, x, rw, optimize=True).astype(np.float32)
    return np.einsum("ih,nhwc,jw->nijc", rh, x, rw, optimize=True).astype(np.float32)


def resize_nearest(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of one (H, W[, C]) array (labels, masks); keeps the dtype."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * h / out_hw[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * w / out_hw[1]).astype(int), w - 1)
    return image[rows][:, cols]
