import csv
import importlib.util
import time

import numpy as np
import pytest

from experiments.data import DataUnavailableError
from experiments.data import qm9

METHANE_U0_ATOM_EV = -17.1722


@pytest.fixture
def fixture_dir(tmp_path):
    return qm9.write_fixture(tmp_path / "qm9csv", n=40, seed=0)


def _naive_cm_eig(z, r_ang):
    r = r_ang * qm9.BOHR_PER_ANGSTROM
    n = len(z)
    c = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            c[i, j] = 0.5 * z[i] ** 2.4 if i == j else z[i] * z[j] / np.linalg.norm(r[i] - r[j])
    ev = np.linalg.eigvalsh(c)
    ev = ev[np.argsort(-np.abs(ev), kind="stable")]
    return np.pad(ev, (0, qm9.MAX_ATOMS - n))


def test_fixture_has_qm9pack_header(fixture_dir):
    files = sorted(fixture_dir.glob("qm9_part*.csv"))
    assert len(files) == 3
    with open(files[0], newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == qm9._HEADER
    assert rows[1][0] == "dsgdb9nsd_000001.xyz" and len(rows[1]) == len(qm9._HEADER)


def test_parse_fixture(fixture_dir):
    raw = qm9.parse_qm9_csvs(fixture_dir)
    n = 40
    assert raw["index"].tolist() == list(range(1, n + 1))
    assert raw["Z"].shape == (n, 29) and raw["Z"].dtype == np.int8
    assert raw["R"].shape == (n, 29, 3) and raw["targets"].shape == (n, 11)
    t = dict(zip(qm9.QM9_TARGETS, raw["targets"][0]))  # methane
    assert abs(t["U0"] - METHANE_U0_ATOM_EV) < 1e-3
    # by hand: (-40.47893 - (-37.846772 - 4 * 0.500273)) * 27.211386
    assert t["U0"] == pytest.approx((-40.47893 - (-37.846772 + 4 * -0.500273)) * 27.211386, abs=1e-9)
    assert t["G"] == pytest.approx((-40.498597 - (-37.861317 + 4 * -0.510927)) * 27.211386, abs=1e-9)
    assert t["homo"] == pytest.approx(-0.3877 * 27.211386)
    assert t["zpve"] == pytest.approx(0.044749 * 27.211386)
    assert t["mu"] == 0.0 and t["alpha"] == 13.21 and t["r2"] == 35.3641 and t["cv"] == 6.469
    assert raw["Z"][0, :6].tolist() == [6, 1, 1, 1, 1, 0]
    assert raw["counts"][0].tolist() == [4, 1, 0, 0, 0]
    assert raw["counts"][2].tolist() == [2, 0, 0, 1, 0]  # water
    np.testing.assert_allclose(raw["R"][0, 1], [0.002150416, -0.0060313176, 0.0019761204], rtol=1e-6)
    assert (raw["counts"].sum(1) == raw["n_atoms"]).all()
    assert ((raw["Z"] > 0).sum(1) == raw["n_atoms"]).all()
    assert np.isfinite(raw["targets"]).all()


def test_coulomb_eigenvalues_match_naive(fixture_dir):
    raw = qm9.parse_qm9_csvs(fixture_dir)
    ev = qm9.coulomb_eigenvalues(raw["Z"], raw["R"], chunk=7)
    for i in [0, 2, 5, 17, 39]:
        n = raw["n_atoms"][i]
        ref = _naive_cm_eig(raw["Z"][i, :n].astype(float), raw["R"][i, :n].astype(float))
        np.testing.assert_allclose(ev[i], ref, rtol=1e-5, atol=1e-5)
    # invariant to atom order and to rotation
    i = 7
    n = raw["n_atoms"][i]
    perm = np.random.default_rng(0).permutation(n)
    Z2 = raw["Z"][i : i + 1].copy()
    R2 = raw["R"][i : i + 1].copy()
    Z2[0, :n] = Z2[0, :n][perm]
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    R2[0, :n] = R2[0, :n][perm] @ q.T.astype(np.float32)
    np.testing.assert_allclose(qm9.coulomb_eigenvalues(Z2, R2)[0], ev[i], rtol=1e-4, atol=1e-4)
    f = qm9.qm9_features(raw)
    assert f.shape == (40, 34) and f.dtype == np.float32
    np.testing.assert_array_equal(f[:, 29:], raw["counts"])
    assert qm9.qm9_features(raw, "cm_sorted").shape == (40, 440)
    with pytest.raises(ValueError):
        qm9.qm9_features(raw, "nope")


def test_load_qm9_fixture_split_and_standardization(fixture_dir, tmp_path):
    d = qm9.load_qm9(n_train=30, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path / "c")
    assert d.x_train.shape == (30, 34) and d.y_train.shape == (30, 11)
    assert d.x_val.shape == (5, 34) and d.x_test.shape == (5, 34)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.float32
    idx = np.concatenate([d.train_index, d.val_index, d.test_index])
    assert sorted(idx.tolist()) == list(range(40))
    np.testing.assert_allclose(d.y_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(d.y_train.std(0), 1, atol=1e-4)
    raw = qm9.parse_qm9_csvs(fixture_dir)
    np.testing.assert_allclose(d.destandardize(d.y_test), raw["targets"][d.test_index], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d.target_mean, raw["targets"][d.train_index].mean(0))
    assert d.target_names == qm9.QM9_TARGETS and d.target_units[6] == "eV"
    ds = d.split("train")
    assert len(ds) == 30 and set(ds[0]) == {"x", "y"}
    # determinism, seeds, subsampling
    e = qm9.load_qm9(n_train=30, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path / "c2", use_cache=False)
    np.testing.assert_array_equal(d.x_train, e.x_train)
    f = qm9.load_qm9(seed=1, n_train=30, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path / "c")
    assert not np.array_equal(d.train_index, f.train_index)
    g = qm9.load_qm9(n_train=30, n_val=5, max_train=10, max_test=2, data_dir=fixture_dir, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(g.train_index, d.train_index[:10])
    assert g.x_test.shape == (2, 34)
    with pytest.raises(ValueError):
        qm9.load_qm9(n_train=38, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path / "c")


def test_load_qm9_uses_cache(fixture_dir, tmp_path, monkeypatch):
    qm9.load_qm9(n_train=30, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("qm9-raw-*.npz"))) == 1
    assert len(list(tmp_path.glob("qm9-feat-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(qm9, "parse_qm9_csvs", boom)
    monkeypatch.setattr(qm9, "qm9_features", boom)
    qm9.load_qm9(n_train=30, n_val=5, data_dir=fixture_dir, cache_dir=tmp_path)
    with pytest.raises(AssertionError):
        qm9.load_qm9(n_train=30, n_val=5, features="cm_sorted", data_dir=fixture_dir, cache_dir=tmp_path)


def test_missing_data_messages(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="pip install qm9pack"):
        qm9.load_qm9(data_dir=tmp_path / "nope", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="qm9_part"):
        qm9.parse_qm9_csvs(tmp_path / "empty")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataUnavailableError, match="pip install qm9pack"):
        qm9.qm9pack_data_dir()


@pytest.mark.slow
def test_real_qm9pack(tmp_path, capsys):
    """All 130,831 molecules of the installed qm9pack (pip install qm9pack)."""
    data_dir = qm9.qm9pack_data_dir()
    with open(data_dir / "qm9_part1.csv", newline="") as fh:
        assert next(csv.reader(fh)) == qm9._HEADER
    t0 = time.perf_counter()
    d = qm9.load_qm9(cache_dir=tmp_path)
    t1 = time.perf_counter()
    d2 = qm9.load_qm9(cache_dir=tmp_path)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\nQM9 first load {t1 - t0:.1f} s, cached {t2 - t1:.2f} s")
    assert len(d.x_train) == 110_000 and len(d.x_val) == 10_000 and len(d.x_test) == 10_831
    assert d.x_train.shape[1] == 34
    np.testing.assert_array_equal(d.x_test, d2.x_test)
    raw = qm9.load_qm9_raw(cache_dir=tmp_path)
    assert len(raw["index"]) == 130_831
    assert raw["index"][0] == 1 and raw["n_atoms"].max() == 29
    t = dict(zip(qm9.QM9_TARGETS, raw["targets"][0]))
    assert abs(t["U0"] - METHANE_U0_ATOM_EV) < 1e-3
    for split in (d.x_train, d.x_val, d.x_test, d.y_train, d.y_test):
        assert np.isfinite(split).all()
    # sanity of units: atomization energies negative, homo negative, in eV range
    assert (raw["targets"][:, 6] < 0).all() and raw["targets"][:, 2].max() < 0
    assert -120 < raw["targets"][:, 6].min()


def test_protocol_split_is_fixed_across_seeds_and_disjoint(fixture_dir, tmp_path):
    a = qm9.load_qm9(seed=0, split="protocol", data_dir=fixture_dir, cache_dir=tmp_path / "c")
    b = qm9.load_qm9(seed=7, split="protocol", data_dir=fixture_dir, cache_dir=tmp_path / "c")
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, f"{s}_index"), getattr(b, f"{s}_index"))
    rows = np.concatenate([a.train_index, a.val_index, a.test_index])
    assert sorted(rows.tolist()) == list(range(40))  # a partition of every molecule
    assert len(a.val_index) == len(a.test_index) == 3  # 10,000 / 130,831 of 40, rounded
    with pytest.raises(ValueError, match="split="):
        qm9.load_qm9(split="fixed", data_dir=fixture_dir, cache_dir=tmp_path / "c")


def test_protocol_split_sizes_and_stored_digest():
    import hashlib

    s = qm9.protocol_split(sum(qm9.PROTOCOL_SIZES))
    assert tuple(len(s[k]) for k in ("train", "val", "test")) == (110_831, 10_000, 10_000)
    allrows = np.concatenate([s["train"], s["val"], s["test"]])
    assert np.array_equal(np.sort(allrows), np.arange(130_831))
    # the digest is recomputed here from the returned indices, independently of the function's check
    assert hashlib.sha256(allrows.astype(np.int64).tobytes()).hexdigest() == qm9.PROTOCOL_SPLIT_SHA256
    with pytest.raises(ValueError, match="sum to"):
        qm9.protocol_split(100)


def test_paper_units_scale_only_energies():
    scale = dict(zip(qm9.QM9_TARGETS, qm9.QM9_PAPER_SCALE))
    units = dict(zip(qm9.QM9_TARGETS, qm9.QM9_UNITS))
    for t in qm9.QM9_TARGETS:
        assert scale[t] == (1000.0 if units[t] == "eV" else 1.0)
