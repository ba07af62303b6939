"""Shared loader for MTAN-style ``<root>/<split>/<field>/<i>.npy`` dense-prediction data sets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from experiments.data import DataUnavailableError
from experiments.data.transforms import resize_bilinear, resize_nearest

__all__ = ["NpyFolderDataset", "write_dense_fixture"]

_NPY_RE = re.compile(r"^(\d+)\.npy$")


class NpyFolderDataset:
    """Items ``i`` of ``<root>/<split>/<dir>/<i>.npy`` for each field, as a dict of arrays.

    ``fields`` maps output key -> (directory name, kind) where kind is ``image``
    (float32, bilinear resize), ``label`` (int32, nearest, -1 = ignore), ``depth``
    (float32 (H, W, 1), nearest, 0 = invalid) or ``normal`` (float32 (H, W, 3), nearest,
    all-zero = invalid).
    """

    layout: str = "<root>/{train,val}/<field>/{0,1,...}.npy"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        fields: Mapping[str, tuple[str, str]],
        resize: tuple[int, int] | None = None,
        name: str = "dataset",
    ):
        self.root = Path(root)
        self.split = split
        self.fields = dict(fields)
        self.resize = tuple(resize) if resize is not None else None
        self.name = name
        split_dir = self.root / split
        if not self.root.is_dir():
            raise DataUnavailableError(f"{name} root not found: {self.root}; expected layout {self.layout}")
        if not split_dir.is_dir():
            raise DataUnavailableError(f"{name} split folder not found: {split_dir}; expected layout {self.layout}")
        indices = None
        for dirname, _ in self.fields.values():
            d = split_dir / dirname
            if not d.is_dir():
                raise DataUnavailableError(f"{name} folder missing: {d}; expected layout {self.layout}")
            found = sorted(int(m.group(1)) for f in os.listdir(d) if (m := _NPY_RE.match(f)))
            if not found:
                raise DataUnavailableError(f"{name}: no <i>.npy files in {d}; expected layout {self.layout}")
            if found != list(range(len(found))):
                missing = sorted(set(range(max(found) + 1)) - set(found))[:5]
                raise DataUnavailableError(f"{name}: files in {d} are not numbered 0..{len(found) - 1} "
                                           f"(missing e.g. {missing})")
            if indices is not None and len(found) != indices:
                raise DataUnavailableError(
                    f"{name}: {d} has {len(found)} files but other fields of {split_dir} have {indices}"
                )
            indices = len(found)
        self._n = int(indices or 0)

    def __len__(self) -> int:
        """Number of examples in the split."""
        return self._n

    def path(self, key: str, index: int) -> Path:
        """File of field ``key`` for example ``index``."""
        return self.root / self.split / self.fields[key][0] / f"{index}.npy"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example ``index`` as a dict of float32/int32 arrays (see class docstring)."""
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} examples")
        out = {}
        for key, (_, kind) in self.fields.items():
            p = self.path(key, index)
            try:
                a = np.load(p, allow_pickle=False)
            except FileNotFoundError as e:
                raise DataUnavailableError(f"{self.name}: file missing: {p}") from e
            out[key] = self._convert(a, kind)
        return out

    def _convert(self, a: np.ndarray, kind: str) -> np.ndarray:
        if kind == "image":
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = np.moveaxis(a, 0, -1)  # tolerate channel-first files
            a = a.astype(np.float32)
            if self.resize is not None and a.shape[:2] != self.resize:
                a = resize_bilinear(a, self.resize, batched=False)
            return a
        if kind == "label":
            a = np.squeeze(a)
            a = np.rint(a).astype(np.int32) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int32)
            a = np.where(a < 0, -1, a)
        elif kind == "depth":
            a = a.astype(np.float32)
            if a.ndim == 2:
                a = a[..., None]
            elif a.ndim == 3 and a.shape[0] == 1 and a.shape[-1] != 1:
                a = np.moveaxis(a, 0, -1)
        elif kind == "normal":
            a = a.astype(np.float32)
            if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
                a = np.moveaxis(a, 0, -1)
        else:
            raise ValueError(f"unknown field kind {kind!r}")
        if self.resize is not None and a.shape[:2] != self.resize:
            a = resize_nearest(a, self.resize)
        return a

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={self._n}, "
                f"resize={self.resize})")


def write_dense_fixture(
    root: str | os.PathLike,
    fields: Mapping[str, tuple[str, str]],
    n: int,
    shape: tuple[int, int],
    num_classes: int,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write ``n`` random examples per split in the MTAN ``.npy`` layout (labels/depth/normals with invalid pixels)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = shape
    for split in splits:
        for dirname, _ in fields.values():
            (root / split / dirname).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for dirname, kind in fields.values():
                if kind == "image":
                    a = rng.random((h, w, 3), dtype=np.float32)
                elif kind == "label":
                    a = rng.integers(0, num_classes, (h, w)).astype(np.float32)
                    a[rng.random((h, w)) < 0.1] = -1.0
                elif kind == "depth":
                    a = rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32)
                    a[rng.random((h, w)) < 0.1] = 0.0
                elif kind == "normal":
                    v = rng.normal(size=(h, w, 3))
                    a = (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
                    a[rng.random((h, w)) < 0.1] = 0.0
                else:
                    raise ValueError(kind)
                np.save(root / split / dirname / f"{i}.npy", a)
    return root
