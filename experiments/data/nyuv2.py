"""NYUv2 in MTAN's preprocessed format (13-class segmentation, depth, surface normals).

Layout: ``<root>/{train,val}/{image,label,depth,normal}/{i}.npy`` with image (288, 384, 3)
float in [0, 1]; label (288, 384) classes 0..12, -1 = ignore; depth (288, 384, 1) metres,
0 = invalid; normal (288, 384, 3) unit vectors, all-zero = invalid. 795 train / 654 val.
"""

from __future__ import annotations

import os
from pathlib import Path

from experiments.data.npy_folder import NpyFolderDataset, write_dense_fixture

__all__ = ["NUM_CLASSES", "SHAPE", "FIELDS", "NYUv2Dataset", "write_fixture"]

NUM_CLASSES = 13
SHAPE = (288, 384)
FIELDS = {
    "image": ("image", "image"),
    "label": ("label", "label"),
    "depth": ("depth", "depth"),
    "normal": ("normal", "normal"),
}


class NYUv2Dataset(NpyFolderDataset):
    """NYUv2 split ``train`` or ``val``: items ``{"image", "label", "depth", "normal"}``.

    ``image`` float32 (H, W, 3), ``label`` int32 (H, W), ``depth`` float32 (H, W, 1),
    ``normal`` float32 (H, W, 3); ``resize=(h, w)`` resamples (bilinear image, nearest rest).
    """

    layout = "<root>/{train,val}/{image,label,depth,normal}/{0,1,...}.npy (MTAN's preprocessed NYUv2)"

    def __init__(self, root: str | os.PathLike, split: str = "train", resize: tuple[int, int] | None = None):
        super().__init__(root, split, FIELDS, resize=resize, name="NYUv2")


def write_fixture(root: str | os.PathLike, n: int = 2, shape: tuple[int, int] = SHAPE, seed: int = 0) -> Path:
    """Write ``n`` random examples per split (train, val) in NYUv2's MTAN layout under ``root``."""
    return write_dense_fixture(root, FIELDS, n, shape, NUM_CLASSES, seed=seed)
