"""QM9 graphs: PyG's node/edge features on hand-checked molecules, the packed layout, the
cache and split, and (slow) agreement of the full build with the raw CSV data."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit")

from experiments.data import qm9 as Q  # noqa: E402
from experiments.data import qm9_graph as G  # noqa: E402

# QM9 molecule 214 (benzene), verbatim from qm9pack (Angstrom): ring C0..C5, H6+k on Ck.
BENZENE_Z = [6, 6, 6, 6, 6, 6, 1, 1, 1, 1, 1, 1]
BENZENE_R = [[-0.0263621, 1.3835087, 0.010387], [1.1708019, 2.096581, 0.0023046], [2.3868916, 1.4163753, -0.013138],
             [2.4057295, 0.0230978, -0.0205116], [1.2085609, -0.6899727, -0.0124064],
             [-0.0075248, -0.0097718, 0.0030452],
             [-0.9733415, 1.9132329, 0.0224498], [1.1560436, 3.1816075, 0.0080224], [3.3191395, 1.9717269, -0.0194567],
             [3.3527114, -0.506622, -0.0325112], [1.2233264, -1.7750001, -0.0181457],
             [-0.9397757, -0.5651181, 0.0093265]]

# PyG's definitions written out by hand: [H, C, N, O, F, Z, aromatic, sp, sp2, sp3, num_hs]
C_SP3_4H = [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4]
H_ATOM = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


def _graph_of(z, r, smiles):
    bonds, aro, hyb, source, skel = G.perceive_molecule(np.array(z), np.array(r), smiles)
    g = {"n_atoms": np.array([len(z)], np.int8), "z": np.array(z, np.int8), "pos": np.array(r, np.float32),
         "aromatic": aro, "hybrid": hyb, "n_bonds": np.array([len(bonds)], np.int16), "bonds": bonds}
    return g, bonds, source, skel


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return Q.write_fixture(tmp_path_factory.mktemp("qm9g") / "csv", n=12, seed=1)


@pytest.fixture(scope="module")
def fixture_graphs(fixture_dir, tmp_path_factory):
    return G.load_qm9_graphs(data_dir=fixture_dir, cache_dir=tmp_path_factory.mktemp("cache"))


def test_methane_water_features_by_hand(fixture_graphs):
    g = fixture_graphs
    x = G.node_features(g)
    # molecule 1 = methane (C first, then 4 H), molecule 3 = water (O, H, H): real QM9 rows.
    np.testing.assert_array_equal(x[:5], [C_SP3_4H] + [H_ATOM] * 4)
    start = int(g["n_atoms"][:2].sum())
    np.testing.assert_array_equal(x[start:start + 3], [[0, 0, 0, 1, 0, 8, 0, 0, 0, 1, 2]] + [H_ATOM] * 2)
    np.testing.assert_array_equal(g["bonds"][:4], [[0, 1, 1], [0, 2, 1], [0, 3, 1], [0, 4, 1]])
    assert list(g["source"][:5]) == [0, 0, 0, 0, 0]  # the five real molecules agree with their SMILES


def test_triple_bonds_acetylene_and_hcn(fixture_graphs):
    g = fixture_graphs
    x = G.node_features(g)
    a0 = int(g["n_atoms"][:3].sum())  # acetylene C C H H
    np.testing.assert_array_equal(x[a0:a0 + 2], [[0, 1, 0, 0, 0, 6, 0, 1, 0, 0, 1]] * 2)
    b0 = int(g["n_bonds"][:3].sum())
    np.testing.assert_array_equal(g["bonds"][b0:b0 + 3], [[0, 1, 3], [0, 3, 1], [1, 2, 1]])
    a1 = a0 + 4  # HCN: C N H
    np.testing.assert_array_equal(x[a1:a1 + 3], [[0, 1, 0, 0, 0, 6, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 7, 0, 1, 0, 0, 0],
                                                 H_ATOM])
    b1 = b0 + 3
    np.testing.assert_array_equal(g["bonds"][b1:b1 + 2], [[0, 1, 3], [0, 2, 1]])


def test_benzene_is_aromatic_sp2():
    g, bonds, source, skel = _graph_of(BENZENE_Z, BENZENE_R, "C1=CC=CC=C1")
    assert source == 0 and not skel
    x = G.node_features(g)
    np.testing.assert_array_equal(x[:6], [[0, 1, 0, 0, 0, 6, 1, 0, 1, 0, 1]] * 6)
    np.testing.assert_array_equal(x[6:], [H_ATOM] * 6)
    ring = {(min(k, (k + 1) % 6), max(k, (k + 1) % 6), 4) for k in range(6)}
    ch = {(k, k + 6, 1) for k in range(6)}
    assert {tuple(map(int, b)) for b in bonds} == ring | ch


def test_pack_layout_matches_pyg_complete_graph():
    g, bonds, _, _ = _graph_of(BENZENE_Z, BENZENE_R, "C1=CC=CC=C1")
    p = G.pack_graphs(g)
    assert p.shape == (1, Q.MAX_ATOMS, G.PACK_WIDTH) and p.dtype == np.float32
    np.testing.assert_array_equal(p[0, :12, :11], G.node_features(g))
    np.testing.assert_array_equal(p[0, :12, 11:14], np.array(BENZENE_R, np.float32))
    np.testing.assert_array_equal(p[0, :, -1], [1] * 12 + [0] * 17)
    adj = p[0, :, 14:43]
    assert np.array_equal(adj, adj.T) and np.count_nonzero(adj) == 2 * len(bonds)
    assert adj[0, 1] == 4 and adj[0, 6] == 1 and adj[0, 2] == 0
    assert not p[0, 12:].any()


def test_counts_and_targets_agree_with_raw(fixture_dir, fixture_graphs):
    raw = Q.parse_qm9_csvs(fixture_dir)
    g = fixture_graphs
    np.testing.assert_array_equal(g["n_atoms"], raw["n_atoms"])
    np.testing.assert_array_equal(g["z"], raw["Z"][raw["Z"] > 0])
    np.testing.assert_array_equal(g["targets"], raw["targets"])
    np.testing.assert_array_equal(g["index"], raw["index"])
    # every molecule, synthetic ones included, got bonds between its own atoms only
    for k, (na, nb) in enumerate(zip(g["n_atoms"], g["n_bonds"])):
        b = g["bonds"][int(g["n_bonds"][:k].sum()):][:nb]
        assert (b[:, :2] < na).all() and (b[:, 0] < b[:, 1]).all() and np.isin(b[:, 2], [1, 2, 3, 4]).all()
    assert set(np.unique(g["source"])) <= {0, 1, 2, 3}


def test_cache_export_and_graph_file_roundtrip(fixture_dir, tmp_path):
    cache = tmp_path / "cache"
    g1 = G.load_qm9_graphs(data_dir=fixture_dir, cache_dir=cache)
    assert len(list(cache.glob("qm9-graph-*.npz"))) == 1
    dest = G.export_graphs(tmp_path / "out" / "g.npz", data_dir=fixture_dir, cache_dir=cache)
    g2 = G.load_qm9_graphs(graph_file=dest)
    assert set(g1) == set(g2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    with pytest.raises(Q.DataUnavailableError, match="export"):
        G.load_qm9_graphs(graph_file=tmp_path / "missing.npz")


def test_dataset_batches_and_split(fixture_graphs):
    g = fixture_graphs
    s = G.published_split(len(g["n_atoms"]))
    allrows = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(allrows.tolist()) == list(range(len(g["n_atoms"]))) and len(s["val"]) == len(s["test"]) == 1
    mean, std = g["targets"].mean(0), g["targets"].std(0)
    ds = G.GraphDataset(g, s["train"], mean, std)
    b = ds.get_batch(np.array([0, 2]))
    assert b["graph"].shape == (2, Q.MAX_ATOMS, G.PACK_WIDTH)
    np.testing.assert_allclose(b["y"][1], (g["targets"][s["train"][2]] - mean) / std, rtol=1e-6)
    np.testing.assert_array_equal(b["graph"][1], G.pack_graphs(g, s["train"][2:3])[0])


def test_published_split_sizes():
    s = G.published_split(130_831)
    assert [len(s[k]) for k in ("train", "val", "test")] == [110_831, 10_000, 10_000]


@pytest.mark.slow
def test_full_qm9_graphs_agree_with_raw_and_report_counts():
    try:
        Q.qm9pack_data_dir()  # located without importing qm9pack (it needs pkg_resources)
    except Q.DataUnavailableError as e:
        pytest.skip(str(e))
    raw = Q.load_qm9_raw()
    g = G.load_qm9_graphs(log_every=20_000)
    assert len(g["n_atoms"]) == len(raw["index"]) == 130_831
    np.testing.assert_array_equal(g["n_atoms"], raw["n_atoms"])
    np.testing.assert_array_equal(g["z"], raw["Z"][raw["Z"] > 0])
    np.testing.assert_array_equal(g["pos"], raw["R"][raw["Z"] > 0])
    np.testing.assert_array_equal(g["targets"], raw["targets"])
    # chemistry: every H and F has exactly one neighbour, C at most 4, O at most 2 (valences)
    na, nb = g["n_atoms"].astype(np.int64), g["n_bonds"].astype(np.int64)
    first = np.repeat(np.cumsum(na) - na, nb)
    b = g["bonds"].astype(np.int64)
    deg = np.bincount(np.r_[first + b[:, 0], first + b[:, 1]], minlength=len(g["z"]))
    z = g["z"]
    assert (deg[z == 1] == 1).all() and (deg[z == 9] == 1).all()
    assert deg[z == 6].max() <= 4 and deg[z == 8].max() <= 2 and deg[z == 6].min() >= 1
    src = np.bincount(g["source"], minlength=4)
    print("\n" + G._summary(g))
    assert src[0] > 0.9 * len(g["n_atoms"])  # most molecules' perceived bonds equal their SMILES
