"""Cityscapes in MTAN's preprocessed format (7-class segmentation and disparity).

Layout: ``<root>/{train,val}/{image,label_7,depth}/{i}.npy`` with image (128, 256, 3) float
in [0, 1]; label_7 (128, 256) classes 0..6, -1 = ignore; depth (128, 256, 1) disparity,
0 = invalid. 2975 train / 500 val.
"""

from __future__ import annotations

import os
from pathlib import Path

from experiments.data.npy_folder import NpyFolderDataset, write_dense_fixture

__all__ = ["NUM_CLASSES", "SHAPE", "FIELDS", "CityscapesDataset", "write_fixture"]

NUM_CLASSES = 7
SHAPE = (128, 256)
FIELDS = {
    "image": ("image", "image"),
    "label": ("label_7", "label"),
    "depth": ("depth", "depth"),
}


class CityscapesDataset(NpyFolderDataset):
    """Cityscapes split ``train`` or ``val``: items ``{"image", "label", "depth"}`` (label from ``label_7``).

    ``image`` float32 (H, W, 3), ``label`` int32 (H, W), ``depth`` float32 (H, W, 1);
    ``resize=(h, w)`` resamples (bilinear image, nearest rest).
    """

    layout = "<root>/{train,val}/{image,label_7,depth}/{0,1,...}.npy (MTAN's preprocessed Cityscapes)"

    def __init__(self, root: str | os.PathLike, split: str = "train", resize: tuple[int, int] | None = None):
        super().__init__(root, split, FIELDS, resize=resize, name="Cityscapes")


def write_fixture(root: str | os.PathLike, n: int = 2, shape: tuple[int, int] = SHAPE, seed: int = 0) -> Path:
    """Write ``n`` random examples per split (train, val) in Cityscapes' MTAN layout under ``root``."""
    return write_dense_fixture(root, FIELDS, n, shape, NUM_CLASSES, seed=seed)
