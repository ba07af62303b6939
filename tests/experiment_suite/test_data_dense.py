import os

import numpy as np
import pytest

from experiments.data import BatchIterator, DataUnavailableError
from experiments.data import cityscapes, nyuv2


def test_nyuv2_fixture_round_trip_full_size(tmp_path):
    root = nyuv2.write_fixture(tmp_path / "nyu", n=2)
    for split in ("train", "val"):
        for field in ("image", "label", "depth", "normal"):
            assert sorted(os.listdir(root / split / field)) == ["0.npy", "1.npy"]
    ds = nyuv2.NYUv2Dataset(root, "val")
    assert len(ds) == 2
    ex = ds[1]
    assert set(ex) == {"image", "label", "depth", "normal"}
    assert ex["image"].shape == (288, 384, 3) and ex["image"].dtype == np.float32
    assert ex["label"].shape == (288, 384) and ex["label"].dtype == np.int32
    assert ex["depth"].shape == (288, 384, 1) and ex["normal"].shape == (288, 384, 3)
    on_disk = {f: np.load(root / "val" / f / "1.npy") for f in ("image", "label", "depth", "normal")}
    np.testing.assert_array_equal(ex["image"], on_disk["image"])
    np.testing.assert_array_equal(ex["label"], on_disk["label"].astype(np.int32))
    np.testing.assert_array_equal(ex["depth"], on_disk["depth"])
    np.testing.assert_array_equal(ex["normal"], on_disk["normal"])
    assert ex["label"].min() == -1 and ex["label"].max() <= 12
    assert (ex["depth"] == 0).any() and (np.abs(ex["normal"]).sum(-1) == 0).any()
    valid = np.abs(ex["normal"]).sum(-1) > 0
    np.testing.assert_allclose(np.linalg.norm(ex["normal"][valid], axis=-1), 1, atol=1e-5)


def test_nyuv2_resize_and_batches(tmp_path):
    root = nyuv2.write_fixture(tmp_path / "nyu", n=5, shape=(24, 32))
    ds = nyuv2.NYUv2Dataset(root, "train", resize=(12, 16))
    ex = ds[0]
    assert ex["image"].shape == (12, 16, 3) and ex["label"].shape == (12, 16)
    assert ex["depth"].shape == (12, 16, 1) and ex["normal"].shape == (12, 16, 3)
    full = nyuv2.NYUv2Dataset(root, "train")[0]
    np.testing.assert_array_equal(ex["label"], full["label"][1::2, 1::2])  # nearest = every other pixel
    it = BatchIterator(ds, 2, seed=0)
    b = it.batch_at(3)
    assert b["image"].shape == (2, 12, 16, 3) and b["label"].dtype == np.int32
    idx = it.indices_at(3)
    np.testing.assert_array_equal(b["depth"][1], ds[int(idx[1])]["depth"])


def test_cityscapes_fixture_round_trip(tmp_path):
    root = cityscapes.write_fixture(tmp_path / "cs", n=3)
    assert sorted(os.listdir(root / "train")) == ["depth", "image", "label_7"]
    ds = cityscapes.CityscapesDataset(root, "train")
    assert len(ds) == 3
    ex = ds[2]
    assert set(ex) == {"image", "label", "depth"}
    assert ex["image"].shape == (128, 256, 3) and ex["label"].shape == (128, 256)
    assert ex["depth"].shape == (128, 256, 1)
    np.testing.assert_array_equal(ex["label"], np.load(root / "train" / "label_7" / "2.npy").astype(np.int32))
    assert ex["label"].min() == -1 and ex["label"].max() <= 6
    assert ex["depth"].dtype == np.float32


def test_channel_first_and_2d_depth_are_tolerated(tmp_path):
    root = cityscapes.write_fixture(tmp_path / "cs", n=1, shape=(8, 16))
    d = np.load(root / "train" / "depth" / "0.npy")
    np.save(root / "train" / "depth" / "0.npy", d[..., 0])
    ex = cityscapes.CityscapesDataset(root, "train")[0]
    np.testing.assert_array_equal(ex["depth"], d)


def test_missing_paths_raise_with_layout(tmp_path):
    with pytest.raises(DataUnavailableError, match="image,label,depth,normal"):
        nyuv2.NYUv2Dataset(tmp_path / "absent")
    root = nyuv2.write_fixture(tmp_path / "nyu", n=2, shape=(4, 4))
    with pytest.raises(DataUnavailableError, match="split folder"):
        nyuv2.NYUv2Dataset(root, "test")
    (root / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(DataUnavailableError, match="normal"):
        nyuv2.NYUv2Dataset(root, "val")
    for f in os.listdir(root / "train" / "depth"):
        os.unlink(root / "train" / "depth" / f)
    os.rmdir(root / "train" / "depth")
    with pytest.raises(DataUnavailableError, match=r"depth.*label_7|image,label,depth,normal"):
        nyuv2.NYUv2Dataset(root, "train")
    cs = cityscapes.write_fixture(tmp_path / "cs", n=3, shape=(4, 4))
    os.rename(cs / "val" / "image" / "1.npy", cs / "val" / "image" / "7.npy")
    with pytest.raises(DataUnavailableError, match="not numbered"):
        cityscapes.CityscapesDataset(cs, "val")
    with pytest.raises(DataUnavailableError, match="label_7"):
        cityscapes.CityscapesDataset(tmp_path / "nyu", "val")
