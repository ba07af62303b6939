"""CelebA (40 binary attributes) from the original aligned-and-cropped release.

Layout under ``root``:
  * ``img_align_celeba/000001.jpg ...`` (178 wide x 218 high JPEGs),
  * ``list_attr_celeba.txt``: line 1 the image count, line 2 the 40 attribute names,
    then ``<file> <40 values of -1 or 1>`` (whitespace separated; -1 -> 0),
  * ``list_eval_partition.txt``: ``<file> <0|1|2>`` (train / val / test).
Official sizes: 162,770 train / 19,867 val / 19,962 test. Images are read with Pillow,
converted to RGB and resized (bilinear) to ``image_size``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from experiments.data import DataUnavailableError

__all__ = ["ATTRIBUTES", "SPLITS", "parse_attributes", "parse_partition", "CelebADataset", "write_fixture"]

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
SPLITS = {"train": 0, "val": 1, "test": 2}
LAYOUT = (
    "<root>/img_align_celeba/000001.jpg..., <root>/list_attr_celeba.txt, "
    "<root>/list_eval_partition.txt (the original CelebA 'Align&Cropped' release)"
)
_IMG_DIR = "img_align_celeba"
_ATTR_FILE = "list_attr_celeba.txt"
_PART_FILE = "list_eval_partition.txt"


def _require(path: Path) -> Path:
    if not path.exists():
        raise DataUnavailableError(f"CelebA: missing {path}; expected layout {LAYOUT}")
    return path


def parse_attributes(path: str | os.PathLike) -> tuple[list[str], tuple[str, ...], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` -> (file names, attribute names, (N, 40) int8 in {0, 1})."""
    with open(_require(Path(path))) as fh:
        lines = fh.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a names line")
    count = int(lines[0].split()[0])
    names = tuple(lines[1].split())
    files, values = [], []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}: row {parts[0]!r} has {len(parts) - 1} values, expected {len(names)}")
        files.append(parts[0])
        values.append(parts[1:])
    if len(files) != count:
        raise ValueError(f"{path}: header says {count} images but {len(files)} rows follow")
    attrs = np.array(values, dtype=np.int8).reshape(len(files), len(names))
    if not np.isin(attrs, (-1, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1 or 1")
    return files, names, (attrs > 0).astype(np.int8)


def parse_partition(path: str | os.PathLike) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` -> {file name: 0 (train) | 1 (val) | 2 (test)}."""
    out = {}
    with open(_require(Path(path))) as fh:
        for line in fh:
            parts = line.split()
            if parts:
                out[parts[0]] = int(parts[1])
    return out


class CelebADataset:
    """One CelebA split; items ``{"image": float32 (H, W, 3) in [0, 1], "attributes": int32 (40,)}``.

    Args:
      root: folder holding ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``.
      split: ``train``, ``val`` or ``test``.
      image_size: (height, width) after a bilinear resize of the whole 178x218 image.
      max_examples: keep only the first k examples of the split (in file order).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: tuple[int, int] = (64, 64),
        max_examples: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataUnavailableError(f"CelebA root not found: {self.root}; expected layout {LAYOUT}")
        self.image_dir = _require(self.root / _IMG_DIR)
        files, names, attrs = parse_attributes(self.root / _ATTR_FILE)
        part = parse_partition(self.root / _PART_FILE)
        missing = [f for f in files if f not in part]
        if missing:
            raise ValueError(f"CelebA: {len(missing)} images have no partition entry (e.g. {missing[0]})")
        keep = np.array([part[f] == SPLITS[split] for f in files], dtype=bool)
        sel = np.flatnonzero(keep)[:max_examples]
        self.split = split
        self.attribute_names = names
        self.files = [files[i] for i in sel]
        self.attributes = attrs[sel].astype(np.int32)
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        """Number of examples in the split."""
        return len(self.files)

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index`` as float32 (H, W, 3) in [0, 1], resized to ``image_size``."""
        try:
            from PIL import Image
        except ImportError as e:
            raise DataUnavailableError(f"CelebA images need Pillow ({e}); install it with: pip install pillow") from e
        p = self.image_dir / self.files[index]
        if not p.is_file():
            raise DataUnavailableError(f"CelebA image missing: {p}; expected layout {LAYOUT}")
        with Image.open(p) as im:
            im = im.convert("RGB")
            h, w = self.image_size
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example ``index``: ``{"image", "attributes"}``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return {"image": self.load_image(index), "attributes": self.attributes[index]}

    def __repr__(self) -> str:
        return (f"CelebADataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"image_size={self.image_size})")


def write_fixture(root: str | os.PathLike, n: int = 9, seed: int = 0, image_hw: tuple[int, int] = (218, 178)) -> Path:
    """Write ``n`` random images with attributes and a partition (cycling train, val, test) in CelebA's layout."""
    from PIL import Image

    root = Path(root)
    (root / _IMG_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    attrs = rng.choice([-1, 1], size=(n, len(ATTRIBUTES)))
    for f in files:
        img = (rng.random((image_hw[0], image_hw[1], 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / _IMG_DIR / f, quality=90)
    with open(root / _ATTR_FILE, "w") as fh:
        fh.write(f"{n}\n")
        fh.write(" ".join(ATTRIBUTES) + " \n")
        for f, a in zip(files, attrs):
            fh.write(f + " " + " ".join(f"{v:2d}" for v in a) + "\n")
    with open(root / _PART_FILE, "w") as fh:
        for i, f in enumerate(files):
            fh.write(f"{f} {i % 3}\n")
    return root
