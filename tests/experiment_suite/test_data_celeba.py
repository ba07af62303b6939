import numpy as np
import pytest

from experiments.data import BatchIterator, DataUnavailableError
from experiments.data import celeba



def test_celeba_fixture_round_trip(tmp_path):
    root = celeba.write_fixture(tmp_path / "celeba", n=9)
    files, names, attrs = celeba.parse_attributes(root / "list_attr_celeba.txt")
    assert names == celeba.ATTRIBUTES and len(names) == 40
    assert files[0] == "000001.jpg" and attrs.shape == (9, 40)
    raw_rows = (root / "list_attr_celeba.txt").read_text().splitlines()[2:]
    first = np.array(raw_rows[0].split()[1:], dtype=int)
    np.testing.assert_array_equal(attrs[0], (first == 1).astype(np.int8))
    part = celeba.parse_partition(root / "list_eval_partition.txt")
    assert part["000001.jpg"] == 0 and part["000002.jpg"] == 1 and part["000003.jpg"] == 2
    sizes = {s: len(celeba.CelebADataset(root, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 3, "test": 3}
    ds = celeba.CelebADataset(root, "val", image_size=(32, 24))
    assert ds.files == ["000002.jpg", "000005.jpg", "000008.jpg"]
    ex = ds[1]
    assert ex["image"].shape == (32, 24, 3) and ex["image"].dtype == np.float32
    assert 0 <= ex["image"].min() and ex["image"].max() <= 1
    np.testing.assert_array_equal(ex["attributes"], attrs[4])
    assert ex["attributes"].dtype == np.int32
    from PIL import Image

    with Image.open(root / "img_align_celeba" / "000005.jpg") as im:
        assert im.size == (178, 218)
        ref = np.asarray(im.convert("RGB").resize((24, 32), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(ex["image"], ref)
    b = BatchIterator(celeba.CelebADataset(root, "train"), 2, seed=0, num_workers=2).batch_at(0)
    assert b["image"].shape == (2, 64, 64, 3) and b["attributes"].shape == (2, 40)
    assert len(celeba.CelebADataset(root, "train", max_examples=2)) == 2


def test_celeba_errors(tmp_path):
    with pytest.raises(DataUnavailableError, match="img_align_celeba"):
        celeba.CelebADataset(tmp_path / "none")
    root = celeba.write_fixture(tmp_path / "c", n=3)
    (root / "img_align_celeba" / "000001.jpg").unlink()
    ds = celeba.CelebADataset(root, "train")
    with pytest.raises(DataUnavailableError, match="000001.jpg"):
        ds[0]
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DataUnavailableError, match="list_eval_partition.txt"):
        celeba.CelebADataset(root, "train")
    bad = tmp_path / "bad.txt"
    bad.write_text("2\nA B\n1.jpg -1 1\n")
    with pytest.raises(ValueError, match="header says 2"):
        celeba.parse_attributes(bad)
    with pytest.raises(ValueError):
        celeba.CelebADataset(root, "dev")
