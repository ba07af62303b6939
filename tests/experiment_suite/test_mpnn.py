"""The Gilmer MPNN: the factorised dense NNConv equals the direct per-edge form (numpy float64
oracle and the segment-sum edge-list form), Set2Set against a numpy oracle, padding and
batch-composition invariance, and one compilation across batches of different molecules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.data.qm9_graph import MAX_ATOMS, NUM_NODE, PACK_WIDTH
from experiments.models_mpnn import MPNNMTL, NNConv, Set2Set, complete_edge_features, nnconv_direct, unpack

# The message-passing network's oracles compile large programs: CI's slow step.
pytestmark = pytest.mark.slow

A = MAX_ATOMS


def _random_graphs(rng, sizes):
    """Packed batch of random molecules (random features, symmetric bond codes, positions)."""
    g = np.zeros((len(sizes), A, PACK_WIDTH), np.float32)
    for b, n in enumerate(sizes):
        g[b, :n, :NUM_NODE] = rng.integers(0, 3, (n, NUM_NODE))
        g[b, :n, NUM_NODE:NUM_NODE + 3] = rng.normal(0, 1.5, (n, 3))
        codes = np.triu(rng.choice(5, (n, n), p=[0.7, 0.15, 0.05, 0.05, 0.05]), 1)
        g[b, :n, NUM_NODE + 3:NUM_NODE + 3 + n] = codes + codes.T
        g[b, :n, -1] = 1
    return g


def _np_edge_attr(pos, codes, i, j):
    onehot = np.zeros(4)
    if codes[i, j] > 0:
        onehot[int(codes[i, j]) - 1] = 1
    return np.concatenate([onehot, [np.linalg.norm(pos[i] - pos[j])]])


def _np_params(conv):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    en = conv.edge_net
    return (f(en.lin1.kernel[...]), f(en.lin1.bias[...]), f(en.lin2.kernel[...]), f(en.lin2.bias[...]),
            f(conv.root.kernel[...]), f(conv.bias[...]))


def _np_nnconv(conv, h, graph):
    """PyG NNConv(aggr='mean') on the complete graph in float64, Theta built per edge (the
    direct form, vectorised per molecule): the independent oracle."""
    w1, b1, w2, b2, wr, bias = _np_params(conv)
    d = wr.shape[0]
    out = np.zeros((graph.shape[0], A, d))
    for b in range(graph.shape[0]):
        n = int(graph[b, :, -1].sum())
        pos = graph[b, :n, NUM_NODE:NUM_NODE + 3].astype(np.float64)
        codes = graph[b, :n, NUM_NODE + 3:NUM_NODE + 3 + n]
        e = np.array([[_np_edge_attr(pos, codes, i, j) for j in range(n)] for i in range(n)]).reshape(n, n, 5)
        theta = (np.maximum(e @ w1 + b1, 0) @ w2 + b2).reshape(n, n, d, d)  # (i, j, c, d)
        msg = np.einsum("jc,ijcd->ijd", h[b, :n], theta)
        off = ~np.eye(n, dtype=bool)
        mean = (msg * off[..., None]).sum(1) / max(n - 1, 1)
        out[b, :n] = h[b, :n] @ wr + mean + bias
    return out


def _edge_list(graph):
    """Flat nodes and the complete graph's directed edges (sender j -> receiver i), numpy."""
    nodes, src, dst, attr, offset = [], [], [], [], 0
    for b in range(graph.shape[0]):
        n = int(graph[b, :, -1].sum())
        pos = graph[b, :n, NUM_NODE:NUM_NODE + 3].astype(np.float64)
        codes = graph[b, :n, NUM_NODE + 3:NUM_NODE + 3 + n]
        for i in range(n):
            for j in range(n):
                if i != j:
                    src.append(offset + j)
                    dst.append(offset + i)
                    attr.append(_np_edge_attr(pos, codes, i, j))
        nodes += [(b, k) for k in range(n)]
        offset += n
    return nodes, np.array([src, dst]), np.array(attr, np.float32).reshape(-1, 5)


def _close(a, ref):
    """Float32 round-off of sums of ~10^4 products: 2e-5 of the output's scale."""
    np.testing.assert_allclose(np.asarray(a, np.float64), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_factorised_nnconv_equals_direct_form(seed):
    rng = np.random.default_rng(seed)
    sizes = [29, 9, 1, 2] if seed == 0 else list(rng.integers(1, 30, 5))
    graph = _random_graphs(rng, sizes)
    conv = NNConv(64, rngs=nnx.Rngs(seed))
    # larger-than-init biases so the edge network's bias and ReLU matter
    conv.edge_net.lin1.bias[...] = jnp.asarray(rng.normal(0, 0.5, 128), jnp.float32)
    conv.edge_net.lin2.bias[...] = jnp.asarray(rng.normal(0, 0.1, 64 * 64), jnp.float32)
    conv.bias[...] = jnp.asarray(rng.normal(0, 0.1, 64), jnp.float32)
    h = rng.normal(0, 1, (len(sizes), A, 64)).astype(np.float32)
    ref = _np_nnconv(conv, h.astype(np.float64), graph)

    _, pos, bond, mask = unpack(jnp.asarray(graph))
    e, emask = complete_edge_features(pos, bond, mask)
    u = conv.edge_net.hidden_units(e) * emask[..., None]
    dense = np.asarray(conv(jnp.asarray(h), u, emask))

    nodes, edge_index, edge_attr = _edge_list(graph)
    hflat = np.stack([h[b, k] for b, k in nodes])
    direct = np.asarray(nnconv_direct(conv, jnp.asarray(hflat), jnp.asarray(edge_index), jnp.asarray(edge_attr)))
    rows = np.array([b for b, _ in nodes]), np.array([k for _, k in nodes])
    _close(dense[rows], ref[rows])
    _close(direct, ref[rows])
    _close(dense[rows], direct.astype(np.float64))


def test_set2set_against_numpy():
    rng = np.random.default_rng(3)
    d = 8
    s2s = Set2Set(d, steps=3, rngs=nnx.Rngs(0))
    for name in ("hi", "hf", "hg", "ho"):
        lin = getattr(s2s.lstm, name)
        lin.bias[...] = jnp.asarray(rng.normal(0, 0.3, d), jnp.float32)
    h = rng.normal(0, 1, (3, A, d)).astype(np.float32)
    sizes = [29, 4, 1]
    mask = np.arange(A)[None, :] < np.array(sizes)[:, None]
    got = np.asarray(s2s(jnp.asarray(h), jnp.asarray(mask)))

    P = {n: (np.asarray(getattr(s2s.lstm, n).kernel[...], np.float64),
             None if getattr(s2s.lstm, n).bias is None else np.asarray(getattr(s2s.lstm, n).bias[...], np.float64))
         for n in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")}
    lin = lambda n, x: x @ P[n][0] + (0 if P[n][1] is None else P[n][1])  # noqa: E731
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    for b, n in enumerate(sizes):
        x = h[b, :n].astype(np.float64)
        c, hh, q_star = np.zeros(d), np.zeros(d), np.zeros(2 * d)
        for _ in range(3):
            i, f = sig(lin("ii", q_star) + lin("hi", hh)), sig(lin("if_", q_star) + lin("hf", hh))
            gg, o = np.tanh(lin("ig", q_star) + lin("hg", hh)), sig(lin("io", q_star) + lin("ho", hh))
            c = f * c + i * gg
            hh = o * np.tanh(c)
            a = np.exp(x @ hh - (x @ hh).max())
            a /= a.sum()
            q_star = np.concatenate([hh, a @ x])
        np.testing.assert_allclose(got[b], q_star, rtol=1e-5, atol=1e-5)


def test_padding_and_batch_composition_do_not_change_a_molecule():
    rng = np.random.default_rng(4)
    model = MPNNMTL(11, rngs=nnx.Rngs(0))
    g1 = _random_graphs(rng, [7, 13, 3])
    g2 = np.concatenate([_random_graphs(rng, [20]), g1[1:2], _random_graphs(rng, [5])])
    garbage = g2.copy()
    garbage[2, 5:, :-1] = rng.normal(0, 5, garbage[2, 5:, :-1].shape)  # padding slots, mask stays 0
    out1 = np.asarray(model(jnp.asarray(g1)))
    out2 = np.asarray(model(jnp.asarray(g2)))
    out3 = np.asarray(model(jnp.asarray(garbage)))
    assert out1.shape == (11, 3, 1)
    np.testing.assert_allclose(out2[:, 1], out1[:, 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out3, out2, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out1).all()


def test_one_compilation_across_batches_of_different_molecules():
    rng = np.random.default_rng(5)
    model = MPNNMTL(11, dim=16, edge_hidden=32, rounds=1, set2set_steps=1, rngs=nnx.Rngs(0))  # shapes, not depth
    graphdef, params = nnx.split(model)
    traces = []

    @jax.jit
    def loss_grad(params, graph, y):
        traces.append(1)

        def loss(p):
            pred = nnx.merge(graphdef, p)(graph)[:, :, 0].T
            return jnp.mean((pred - y) ** 2)

        return jax.value_and_grad(loss)(params)

    for sizes in ([3, 29, 12, 5], [18, 18, 2, 9], [29, 29, 29, 29]):
        val, grads = loss_grad(params, jnp.asarray(_random_graphs(rng, sizes)), jnp.ones((4, 11)))
        assert np.isfinite(float(val))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(grads))
    assert len(traces) == 1


def test_unpack_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="packed graph batch"):
        unpack(jnp.zeros((2, 29, 10)))


# ------------------------------------------------------------ the benchmark and the accelerator command


@pytest.mark.slow
def test_qm9_mpnn_command_tiny_end_to_end(tmp_path, capsys):
    pytest.importorskip("rdkit")
    import json

    from experiments.__main__ import main

    out = tmp_path / "run"
    rc = main(["qm9_mpnn", "--tiny", "--methods", "equal", "imtl_h", "--out", str(out), "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"equal", "imtl_h"}
    for r in results["runs"]:
        assert r["status"] == "ok" and r["steps_done"] == 4
        assert all(np.isfinite(v) for v in r["test"].values())
    report = capsys.readouterr().out
    assert "molecules/s" in report and "full protocol" in report
    # resuming a finished slice does not train again
    assert main(["qm9_mpnn", "--tiny", "--methods", "equal", "imtl_h", "--out", str(out), "--quiet", "--resume"]) == 0


@pytest.mark.slow
def test_full_protocol_config_and_first_batch():
    from experiments.data import qm9 as Q

    try:
        Q.qm9pack_data_dir()
    except Q.DataUnavailableError as e:
        pytest.skip(str(e))
    pytest.importorskip("rdkit")
    from experiments import suites
    from experiments.suites import qm9_mpnn
    from experiments.data.batching import BatchIterator
    from experiments.options import Options
    from experiments.runs import RunConfig

    o = Options(benchmark="qm9_mpnn", **qm9_mpnn.DEFAULTS["qm9_mpnn"])
    bench = suites.build("qm9_mpnn", o)
    assert (len(bench.train), len(bench.val), len(bench.test)) == (110_831, 10_000, 10_000)
    cfg = RunConfig.from_options(o, bench)
    assert cfg.steps == 300 * 923 and cfg.batch_size == 120 and cfg.lr == 1e-3
    assert (cfg.schedule, cfg.plateau_patience, cfg.plateau_factor, cfg.eval_every) == ("plateau", 5, 0.7, 923)
    y = bench.train.y
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(0, ddof=1), 1, atol=1e-4)
    batch = BatchIterator(bench.train, 120, seed=0, shuffle=True, drop_last=True).batch_at(0)
    assert batch["graph"].shape == (120, MAX_ATOMS, PACK_WIDTH) and batch["y"].shape == (120, 11)
    model = bench.make_model(0)
    pred = np.asarray(model(jnp.asarray(batch["graph"])))
    assert pred.shape == (11, 120, 1) and np.isfinite(pred).all()
