"""A generic, resumable batch iterator shared by every data set.

The order of examples is an epoch-seeded permutation: epoch ``e`` uses
``np.random.default_rng([seed, e]).permutation(len(dataset))``. Step ``k`` is a
pure function of ``(seed, k)``, so a run resumed at step ``k`` sees exactly the
batches it would have seen without the interruption (:meth:`BatchIterator.batch_at`,
:meth:`BatchIterator.iterate` with ``start_step``).
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Iterator, Mapping, Protocol

import numpy as np

__all__ = ["Dataset", "ArrayDataset", "BatchIterator", "Subset", "first_n", "stack_examples"]


class Dataset(Protocol):
    """Anything indexable with ``len`` whose items are dicts of numpy arrays.

    A dataset may also define ``get_batch(indices) -> dict`` for a faster path.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def stack_examples(examples: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack a list of per-example dicts into one dict of batched arrays."""
    if not examples:
        raise ValueError("stack_examples needs at least one example")
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


class ArrayDataset:
    """An in-memory dataset over equal-length arrays: ``ds[i] -> {name: array[i]}``."""

    def __init__(self, **arrays: np.ndarray):
        """Wrap named arrays that share their leading (example) axis."""
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays have different lengths: {lengths}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._n = next(iter(lengths.values()))

    def __len__(self) -> int:
        """Number of examples."""
        return self._n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example ``index`` as a dict of arrays."""
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} examples")
        return {k: v[index] for k, v in self.arrays.items()}

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Examples ``indices`` as a dict of batched arrays (fancy indexing)."""
        return {k: v[indices] for k, v in self.arrays.items()}


class Subset:
    """The examples ``indices`` of ``dataset`` (keeps a fast ``get_batch`` if it has one)."""

    def __init__(self, dataset: Dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.dataset[int(self.indices[i])]

    def get_batch(self, idx) -> dict[str, np.ndarray]:
        idx = self.indices[np.asarray(idx)]
        get = getattr(self.dataset, "get_batch", None)
        if get is not None:
            return get(idx)
        return stack_examples([self.dataset[int(i)] for i in idx])


def first_n(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` examples of ``dataset`` (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, np.arange(n))


class BatchIterator:
    """Deterministic, resumable mini-batches over a :class:`Dataset`.

    Args:
      dataset: ``len`` + ``__getitem__`` returning dicts of arrays (optionally ``get_batch``).
      batch_size: examples per batch.
      seed: non-negative integer; together with the epoch it fixes the order.
      shuffle: permute each epoch (``False``: natural order, e.g. for evaluation).
      drop_last: drop the final incomplete batch of an epoch (fixed shapes for ``jit``).
      num_workers: threads used to load the examples of a batch (and to prefetch the
        next batch) for datasets without ``get_batch``; 0 loads in the caller's thread.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
    ):
        n = len(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n == 0:
            raise ValueError("dataset is empty")
        if drop_last and n < batch_size:
            raise ValueError(
                f"dataset has {n} examples, fewer than batch_size={batch_size} with drop_last=True"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = int(num_workers)
        self._n = n
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._pool: cf.ThreadPoolExecutor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self._n // self.batch_size
        return -(-self._n // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of example indices in ``epoch``."""
        if not self.shuffle:
            return np.arange(self._n)
        if self._perm_cache is not None and self._perm_cache[0] == epoch:
            return self._perm_cache[1]
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self._n)
        self._perm_cache = (epoch, perm)
        return perm

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices of global step ``step`` (epoch = step // steps_per_epoch)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        perm = self.permutation(epoch)
        return perm[k * self.batch_size : (k + 1) * self.batch_size]

    def _load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            return get_batch(indices)
        if self.num_workers > 0:
            pool = self._get_pool()
            return stack_examples(list(pool.map(self.dataset.__getitem__, (int(i) for i in indices))))
        return stack_examples([self.dataset[int(i)] for i in indices])

    def _get_pool(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.num_workers)
        return self._pool

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step ``step``: a dict of arrays with leading axis <= batch_size."""
        return self._load(self.indices_at(step))

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``batch_at(start_step)``, ``batch_at(start_step + 1)``, ... (forever if ``num_steps`` is None)."""
        step = int(start_step)
        stop = None if num_steps is None else step + int(num_steps)
        if self.num_workers > 0 and getattr(self.dataset, "get_batch", None) is None:
            # Prefetch one batch ahead on a separate thread.
            with cf.ThreadPoolExecutor(max_workers=1) as ahead:
                fut = ahead.submit(self.batch_at, step) if stop is None or step < stop else None
                while fut is not None:
                    batch = fut.result()
                    step += 1
                    fut = ahead.submit(self.batch_at, step) if stop is None or step < stop else None
                    yield batch
            return
        while stop is None or step < stop:
            yield self.batch_at(step)
            step += 1

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield the batches of one epoch."""
        spe = self.steps_per_epoch
        return self.iterate(epoch * spe, spe)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over epoch 0 (use :meth:`iterate` for multi-epoch training)."""
        return self.epoch(0)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def close(self) -> None:
        """Shut down the worker threads, if any."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"BatchIterator(n={self._n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last})"
        )


