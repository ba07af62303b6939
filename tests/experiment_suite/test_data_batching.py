import numpy as np
import pytest

from experiments.data import ArrayDataset, BatchIterator
from experiments.data.batching import stack_examples


class GetItemOnly:
    """A dataset without get_batch (exercises the per-example path)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((2,), i, dtype=np.int64), "y": np.int32(i % 3)}


def test_array_dataset_basics():
    ds = ArrayDataset(x=np.arange(10).reshape(5, 2), y=np.arange(5))
    assert len(ds) == 5
    assert ds[2]["x"].tolist() == [4, 5] and ds[2]["y"] == 2
    b = ds.get_batch(np.array([4, 0]))
    assert b["y"].tolist() == [4, 0]
    with pytest.raises(ValueError):
        ArrayDataset(x=np.zeros(3), y=np.zeros(4))
    with pytest.raises(IndexError):
        ds[5]


def test_batch_at_is_a_function_of_seed_and_step():
    ds = ArrayDataset(i=np.arange(23))
    a = BatchIterator(ds, 5, seed=3)
    b = BatchIterator(ds, 5, seed=3)
    assert a.steps_per_epoch == 4 and len(a) == 4
    for step in [0, 1, 3, 4, 11, 7, 0]:
        np.testing.assert_array_equal(a.batch_at(step)["i"], b.batch_at(step)["i"])
    c = BatchIterator(ds, 5, seed=4)
    assert not np.array_equal(a.indices_at(0), c.indices_at(0))


def test_resume_reproduces_order():
    ds = ArrayDataset(i=np.arange(17))
    it = BatchIterator(ds, 4, seed=11)
    full = [b["i"] for b in it.iterate(0, 20)]
    resumed = [b["i"] for b in BatchIterator(ds, 4, seed=11).iterate(9, 11)]
    for x, y in zip(full[9:], resumed):
        np.testing.assert_array_equal(x, y)


def test_epochs_are_permutations_and_differ():
    ds = ArrayDataset(i=np.arange(20))
    it = BatchIterator(ds, 5, seed=0)
    e0 = np.concatenate([b["i"] for b in it.epoch(0)])
    e1 = np.concatenate([b["i"] for b in it.epoch(1)])
    assert sorted(e0.tolist()) == list(range(20)) == sorted(e1.tolist())
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.concatenate([it.batch_at(s)["i"] for s in range(4, 8)]), e1)


def test_drop_last_and_no_shuffle():
    ds = ArrayDataset(i=np.arange(10))
    it = BatchIterator(ds, 4, shuffle=False, drop_last=False)
    batches = [b["i"].tolist() for b in it]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    it = BatchIterator(ds, 4, shuffle=True, drop_last=True, seed=1)
    assert [len(b["i"]) for b in it] == [4, 4]
    with pytest.raises(ValueError):
        BatchIterator(ArrayDataset(i=np.arange(3)), 4)


def test_getitem_path_and_workers_agree():
    ds = GetItemOnly(13)
    serial = BatchIterator(ds, 3, seed=5)
    threaded = BatchIterator(ds, 3, seed=5, num_workers=3)
    a = list(serial.iterate(2, 6))
    b = list(threaded.iterate(2, 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["x"], y["x"])
        np.testing.assert_array_equal(x["y"], y["y"])
        assert x["x"].shape == (3, 2)
    np.testing.assert_array_equal(a[0]["x"][:, 0], serial.indices_at(2))
    threaded.close()


def test_stack_examples():
    out = stack_examples([{"a": np.zeros(2)}, {"a": np.ones(2)}])
    assert out["a"].shape == (2, 2)
