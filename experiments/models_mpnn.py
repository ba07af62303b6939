"""The Gilmer et al. MPNN of the published QM9 tables (Nash-MTL, FAMO, LibMTL), in Flax NNX.

Architecture (``experiments/quantum_chemistry/models.py`` of Nash-MTL, hidden size D = 64)::

    h0 = relu(W0 x)                                         x: 11 node features
    3 rounds:  m_i = relu( W_root h_i + mean_{j != i} h_j^T Theta(e_ij) + b )   (NNConv, aggr="mean")
               h_i = GRU(m_i, h_i)
    q = Set2Set(h, 3 steps)  (LSTM(2D, D), softmax attention over the atoms of a molecule)
    z = relu(W1 q)  (B, D)                                  -> 11 linear heads

The graph is complete (``Complete()``): every ordered pair of distinct atoms is an edge
with features ``e_ij = [bond one-hot (4), |r_i - r_j|]`` (zero one-hot for non-bonded
pairs). The edge network is ``Theta(e) = reshape(W2 relu(W1e e + b1e) + b2, (D, D))``
with a 128-unit hidden layer, so the direct form builds a D x D matrix per edge
(``E * 128 * D^2`` multiply-adds). Because ``Theta`` is linear in the hidden layer
``u(e) = relu(W1e e + b1e)``, the message sum factorises exactly::

    sum_j h_j^T Theta(e_ij) = sum_j sum_k u_k(e_ij) (h_j^T W2_k) + sum_j h_j^T B2
                            = einsum('ijk,jkd->id', U, P) + mask @ (h B2),   P_j = h_j^T W2 (128, D)

which costs ``N * D * 128 * D + E * 128 * D`` instead -- 64x fewer multiply-adds per edge.
With complete graphs padded to 29 atoms per molecule, both contractions are dense
batched matmuls (no gathers, no segment sums, one fixed shape: one compilation);
:func:`nnconv_direct` is the plain edge-list form with ``jax.ops.segment_sum``, kept as
the reference it is tested against. Why dense and not a message-passing library (jraph):
the published graph is complete, so an edge list would gather D x 128 per edge while
the dense form is two matmuls; padding 18 atoms on average to 29 costs about 2.6x on
the pairwise part, much less than the per-edge gather it avoids.

Initialization is Flax's (LeCun normal), not PyTorch's (Kaiming uniform); the function
computed is the same.

Example::

    >>> import numpy as np, jax
    >>> from flax import nnx
    >>> from experiments.models_mpnn import MPNNMTL
    >>> from experiments.data.qm9_graph import PACK_WIDTH
    >>> model = MPNNMTL(num_tasks=11, rngs=nnx.Rngs(0))
    >>> g = np.zeros((2, 29, PACK_WIDTH), np.float32); g[:, :3, -1] = 1; g[:, :3, 11] = [0, 1, 2]
    >>> model(jax.numpy.asarray(g)).shape
    (11, 2, 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.data.qm9_graph import MAX_ATOMS, NUM_NODE, PACK_WIDTH
from experiments.models import StackedLinear

__all__ = [
    "EDGE_FEATURES",
    "unpack",
    "complete_edge_features",
    "EdgeNetwork",
    "NNConv",
    "nnconv_direct",
    "Set2Set",
    "MPNNEncoder",
    "MPNNMTL",
    "mpnn_flops",
]

EDGE_FEATURES = 5  # bond one-hot (4) + distance


def unpack(graph: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Split a packed batch (B, A, PACK_WIDTH) into ``x`` (B, A, 11), ``pos`` (B, A, 3),
    ``bond`` (B, A, A) int32 codes 0..4 and ``mask`` (B, A) bool
    (see :func:`experiments.data.qm9_graph.pack_graphs`)."""
    if graph.ndim != 3 or graph.shape[-1] != PACK_WIDTH or graph.shape[1] != MAX_ATOMS:
        raise ValueError(f"expected a packed graph batch of shape (B, {MAX_ATOMS}, {PACK_WIDTH}); got {graph.shape}")
    x = graph[..., :NUM_NODE]
    pos = graph[..., NUM_NODE:NUM_NODE + 3]
    bond = graph[..., NUM_NODE + 3:NUM_NODE + 3 + MAX_ATOMS].astype(jnp.int32)
    mask = graph[..., -1] > 0.5
    return x, pos, bond, mask


def complete_edge_features(pos: jax.Array, bond: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Edge features of the complete graph ``e`` (B, A, A, 5) and the edge mask (B, A, A):
    ``e_ij = [one_hot(bond_ij - 1, 4), |r_i - r_j|]``, an edge for every real i != j."""
    a = pos.shape[1]
    emask = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(a, dtype=bool)[None]
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    d2 = jnp.sum(diff * diff, axis=-1)
    dist = jnp.where(emask, jnp.sqrt(jnp.where(emask, d2, 1.0)), 0.0)
    onehot = jax.nn.one_hot(bond - 1, 4, dtype=pos.dtype)  # code 0 (no bond) -> zeros
    e = jnp.concatenate([onehot, dist[..., None]], axis=-1)
    return e * emask[..., None], emask


class EdgeNetwork(nnx.Module):
    """``Theta(e) = reshape(W2 relu(W1 e + b1) + b2, (D_in, D_out))`` (PyG's ``nn`` argument of NNConv)."""

    def __init__(self, edge_features: int, hidden: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden
        self.lin1 = nnx.Linear(edge_features, hidden, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, d_in * d_out, rngs=rngs)

    def hidden_units(self, e: jax.Array) -> jax.Array:
        """``u(e) = relu(W1 e + b1)``: (..., edge_features) -> (..., hidden)."""
        return jax.nn.relu(self.lin1(e))

    def __call__(self, e: jax.Array) -> jax.Array:
        """The direct form: (..., edge_features) -> (..., D_in, D_out)."""
        return self.lin2(self.hidden_units(e)).reshape(*e.shape[:-1], self.d_in, self.d_out)


class NNConv(nnx.Module):
    """Edge-conditioned convolution, mean aggregation: ``W_root h_i + mean_{j in N(i)} h_j^T Theta(e_ji) + b``."""

    def __init__(self, d: int, edge_features: int = EDGE_FEATURES, edge_hidden: int = 128, *, rngs: nnx.Rngs):
        self.d = d
        self.edge_net = EdgeNetwork(edge_features, edge_hidden, d, d, rngs=rngs)
        self.root = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))

    def __call__(self, h: jax.Array, u: jax.Array, emask: jax.Array) -> jax.Array:
        """Factorised dense form. ``h`` (B, A, D); ``u`` (B, A, A, hidden) = edge hidden units
        (zero off the edge mask); ``emask`` (B, A, A) (row i: receiver, column j: sender)."""
        k2 = self.edge_net.lin2.kernel[...].reshape(self.edge_net.hidden, self.d, self.d)  # (k, c, d)
        b2 = self.edge_net.lin2.bias[...].reshape(self.d, self.d)
        p = jnp.einsum("bjc,kcd->bjkd", h, k2)  # (B, A, hidden, D)
        msg = jnp.einsum("bijk,bjkd->bid", u, p) + jnp.einsum("bij,bjd->bid", emask.astype(h.dtype), h @ b2)
        deg = jnp.maximum(jnp.sum(emask, axis=-1, keepdims=True), 1).astype(h.dtype)
        return msg / deg + self.root(h) + self.bias[...]


def nnconv_direct(conv: NNConv, h: jax.Array, edge_index: jax.Array, edge_attr: jax.Array) -> jax.Array:
    """The direct NNConv on an edge list (PyG's form): ``Theta`` per edge, segment-sum mean.

    ``h`` (N, D) node states; ``edge_index`` (2, E) int (row 0 sender j, row 1 receiver i);
    ``edge_attr`` (E, edge_features). Nodes without incoming edges get a zero mean.
    """
    n = h.shape[0]
    src, dst = edge_index[0], edge_index[1]
    theta = conv.edge_net(edge_attr)  # (E, D, D)
    msg = jnp.einsum("ec,ecd->ed", h[src], theta)
    total = jax.ops.segment_sum(msg, dst, num_segments=n)
    count = jax.ops.segment_sum(jnp.ones_like(dst, h.dtype), dst, num_segments=n)
    return total / jnp.maximum(count, 1.0)[:, None] + conv.root(h) + conv.bias[...]


class Set2Set(nnx.Module):
    """Set2Set readout (Vinyals et al. 2016; PyG's ``Set2Set``): ``steps`` LSTM steps of
    masked softmax attention over the atoms; returns ``[q, r]`` (B, 2D)."""

    def __init__(self, d: int, steps: int = 3, *, rngs: nnx.Rngs):
        self.d, self.steps = d, steps
        self.lstm = nnx.LSTMCell(2 * d, d, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        b = h.shape[0]
        carry = (jnp.zeros((b, self.d), h.dtype), jnp.zeros((b, self.d), h.dtype))
        q_star = jnp.zeros((b, 2 * self.d), h.dtype)
        for _ in range(self.steps):
            carry, q = self.lstm(carry, q_star)
            logits = jnp.where(mask, jnp.einsum("bad,bd->ba", h, q), -jnp.inf)
            att = jax.nn.softmax(logits, axis=-1)
            att = jnp.where(mask, att, 0.0)
            r = jnp.einsum("ba,bad->bd", att, h)
            q_star = jnp.concatenate([q, r], axis=-1)
        return q_star


class MPNNEncoder(nnx.Module):
    """Shared encoder: packed graphs (B, 29, PACK_WIDTH) -> z (B, D)."""

    def __init__(self, *, dim: int = 64, edge_hidden: int = 128, rounds: int = 3, set2set_steps: int = 3,
                 node_features: int = NUM_NODE, rngs: nnx.Rngs):
        self.rounds = rounds
        self.lin0 = nnx.Linear(node_features, dim, rngs=rngs)
        self.conv = NNConv(dim, EDGE_FEATURES, edge_hidden, rngs=rngs)
        self.gru = nnx.GRUCell(dim, dim, rngs=rngs)
        self.set2set = Set2Set(dim, set2set_steps, rngs=rngs)
        self.lin1 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, graph: jax.Array) -> jax.Array:
        x, pos, bond, mask = unpack(graph)
        e, emask = complete_edge_features(pos, bond, mask)
        u = self.conv.edge_net.hidden_units(e) * emask[..., None]  # same in all rounds
        out = jax.nn.relu(self.lin0(x))
        h = out
        for _ in range(self.rounds):
            m = jax.nn.relu(self.conv(out, u, emask))
            h, out = self.gru(h, m)
        return jax.nn.relu(self.lin1(self.set2set(out, mask)))


class MPNNMTL(nnx.Module):
    """MPNN encoder + ``num_tasks`` stacked linear heads (:class:`experiments.models.StackedLinear`).

    ``model(graph)`` -> (T, B, 1); ``model.encoder`` / ``model.heads`` as every model of
    :mod:`experiments.models`.
    """

    def __init__(self, num_tasks: int = 11, *, dim: int = 64, edge_hidden: int = 128, rounds: int = 3,
                 set2set_steps: int = 3, rngs: nnx.Rngs):
        self.encoder = MPNNEncoder(dim=dim, edge_hidden=edge_hidden, rounds=rounds, set2set_steps=set2set_steps,
                                   rngs=rngs)
        self.heads = StackedLinear(num_tasks, dim, 1, rngs=rngs)

    def __call__(self, graph: jax.Array) -> jax.Array:
        return self.heads(self.encoder(graph))


def mpnn_flops(batch: int, atoms: int = MAX_ATOMS, dim: int = 64, edge_hidden: int = 128, rounds: int = 3,
               num_tasks: int = 11, steps: int = 3) -> dict[str, float]:
    """Multiply-add count x 2 (FLOPs) of one forward pass of the padded dense MPNN, and
    of the direct per-edge NNConv on the same padded graph, by component (matmuls only)."""
    n, e = batch * atoms, batch * atoms * atoms
    d, k = dim, edge_hidden
    edge_hidden_layer = 2 * e * EDGE_FEATURES * k
    per_round = 2 * n * d * k * d + 2 * e * k * d + 2 * e * d + 2 * n * d * d + 2 * n * d * d + 2 * n * 6 * d * d
    s2s = steps * (2 * batch * 2 * d * 4 * d + 2 * batch * d * 4 * d + 4 * n * d)
    rest = 2 * n * NUM_NODE * d + 2 * batch * 2 * d * d + 2 * batch * d * num_tasks
    fwd = edge_hidden_layer + rounds * per_round + s2s + rest
    return {
        "forward": float(fwd),
        "forward_direct_edge_net": float(edge_hidden_layer + 2 * e * k * d * d
                                          + rounds * (per_round - 2 * n * d * k * d - 2 * e * k * d + 2 * e * d * d)
                                          + s2s + rest),
        "train_step_estimate": float(3 * fwd),  # forward + backward ~ 3x forward
    }


def _xla_flops(fn, *args) -> float | None:
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    except Exception:  # pragma: no cover - backends without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def main(argv=None) -> int:
    """``python -m experiments.models_mpnn [--batch 120]``: the FLOP count of the MPNN at the
    published batch size -- the analytic count of :func:`mpnn_flops` and XLA's own count of
    the compiled forward pass and of the forward + backward (equal weighting)."""
    import argparse

    import numpy as np

    p = argparse.ArgumentParser(prog="python -m experiments.models_mpnn", description=main.__doc__)
    p.add_argument("--batch", type=int, default=120, help="molecules per batch (default: 120)")
    a = p.parse_args(argv)
    f = mpnn_flops(a.batch)
    model = MPNNMTL(11, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    g = np.zeros((a.batch, MAX_ATOMS, PACK_WIDTH), np.float32)
    g[:, :18, -1] = 1.0
    g = jnp.asarray(g)

    def fwd(params, g):
        return nnx.merge(graphdef, params)(g)

    def loss_grad(params, g):
        return jax.grad(lambda p: jnp.sum(fwd(p, g) ** 2))(params)

    xf, xt = _xla_flops(fwd, params, g), _xla_flops(loss_grad, params, g)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"MPNN (D=64, edge hidden 128, 3 rounds, Set2Set 3), batch {a.batch} padded to {MAX_ATOMS} atoms, "
          f"{n_params:,} parameters, jax {jax.__version__} {jax.default_backend()}")
    print(f"  forward, factorised (analytic matmul count): {f['forward'] / 1e9:.2f} GFLOP")
    print(f"  forward, direct per-edge Theta (analytic):   {f['forward_direct_edge_net'] / 1e9:.2f} GFLOP")
    if xf is not None:
        print(f"  forward, XLA cost analysis:                  {xf / 1e9:.2f} GFLOP")
    if xt is not None:
        print(f"  forward + backward, XLA cost analysis:       {xt / 1e9:.2f} GFLOP "
              f"({xt / xf:.2f}x forward)" if xf else "")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
