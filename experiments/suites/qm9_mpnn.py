"""QM9 the published way: the Gilmer MPNN on molecular graphs, the Nash-MTL / FAMO schedule.

Protocol (Nash-MTL Table 6, FAMO Table 2): PyG-equivalent graphs
(:mod:`experiments.data.qm9_graph`: 11 node features, complete graph with bond one-hot +
distance), the MPNN encoder (NNConv + GRU x 3, Set2Set, D = 64;
:mod:`experiments.models_mpnn`) with 11 linear heads; the fixed 110,831 / 10,000 / 10,000
split; targets z-scored with the training split's mean and (unbiased) std; per-task MSE;
Adam 1e-3, batch 120, 300 epochs, learning rate x 0.7 when the validation Δm has not
improved for 5 evaluations (one per epoch); test MAE at the evaluation with the best
validation Δm. Metrics: MAE per target in the papers' units (energies in meV).

Δm is reported twice: against our own single-task runs (``--methods single_task ...``, the
suite's usual baseline) and against the single-task MAEs the papers publish
(:data:`PUBLISHED_STL_MAE`, :func:`delta_m_published`).

Level: the suite's gradient methods weight the per-task gradients of the shared feature z
(the library's default level). The published gradient methods act on the shared parameters;
Nash-MTL reports Δm 62 there and 179 on the shared feature -- compare like with like
(``imtl_jax.mtl_step`` has ``level="parameters"``; the suite does not expose it per method yet).

    python -m experiments qm9_mpnn --tiny                               # CPU smoke run (fixture)
    python -m experiments qm9_mpnn --epochs 2 --seeds 0 --methods equal imtl_h imtl_g nash_mtl \\
        --data-dir qm9_graphs.npz --out runs/qm9_mpnn_slice             # a slice on one GPU
    python -m experiments qm9_mpnn ... --resume                         # continue it after an interruption

After the comparison table the command prints, per method, the step time, the throughput
(molecules/s = batch x vmapped seeds / step time) and the estimated wall time of the full
protocol (300 epochs x 923 steps, 3 seeds, one evaluation of the 10,000 + 10,000
validation/test molecules per epoch), plus Δm% against the published single-task MAEs
(:func:`throughput_report`). The estimate scales the measured step time linearly from the
measured number of vmapped seeds to 3 (an upper bound where the device is not yet busy).

``--data-dir`` takes the exported graph file (``python -m experiments.data.qm9_graph export
qm9_graphs.npz``: no qm9pack or RDKit needed) or a folder of qm9pack-format CSVs; without it
the graphs are built from the installed ``qm9pack`` with RDKit once and cached.
"""

from __future__ import annotations

import numpy as np

from experiments.suites import Benchmark, regression, tmpdir

STEPS_PER_EPOCH = 110_831 // 120  # 923: the published batches of one epoch (last partial one dropped)
DEFAULTS = {"qm9_mpnn": dict(methods=["single_task", "equal", "imtl_h", "imtl_g", "nash_mtl"], seeds=[0, 1, 2],
                             steps=None, epochs=300, batch_size=120, lr=1e-3, schedule="plateau", plateau_patience=5,
                             plateau_factor=0.7, eval_every=STEPS_PER_EPOCH, max_train=None)}
TINY = dict(seeds=[0], steps=4, epochs=None, batch_size=4, eval_every=2, max_train=None)
#: the MPNN has no normalization layers to choose.
UNUSED_FLAGS = ("norm",)

# Single-task test MAEs published with the protocol (Nash-MTL's ``BASE``; units of QM9_PAPER_UNITS).
PUBLISHED_STL_MAE = {"mu_mae": 0.0671, "alpha_mae": 0.1814, "homo_mae": 60.576, "lumo_mae": 53.915,
                     "r2_mae": 0.5027, "zpve_mae": 4.539, "U0_mae": 58.838, "U_mae": 64.244, "H_mae": 63.852,
                     "G_mae": 66.223, "cv_mae": 0.07212}


def delta_m_published(metrics: dict) -> float:
    """Δm% of test MAEs against :data:`PUBLISHED_STL_MAE`: ``100/11 Σ_k (M_k - B_k) / B_k`` (lower is better).

    >>> round(delta_m_published({k: 2 * v for k, v in PUBLISHED_STL_MAE.items()}), 6)
    100.0
    """
    missing = [k for k in PUBLISHED_STL_MAE if k not in metrics]
    if missing:
        raise ValueError(f"delta_m_published: metrics lack {missing}")
    return 100.0 * float(np.mean([(metrics[k] - b) / b for k, b in PUBLISHED_STL_MAE.items()]))


FULL_EPOCHS = 300
PROTOCOL_SEEDS = 3
EVAL_MOLECULES = 20_000  # validation + test, evaluated once per epoch


def throughput_report(results: dict) -> str:
    """Per-method step time, molecules/s and the full-protocol estimate from a ``results.json``
    payload (its ``runs``): what ``python -m experiments qm9_mpnn`` prints after the table.

    Estimate per method: ``300 x (923 + 20,000 / 120 / 3) x step time at 3 seeds`` -- the
    training steps plus one evaluation of 20,000 molecules per epoch counted as forward
    passes (1/3 of a training step each); the step time at 3 seeds is the measured one
    scaled by ``3 / measured seeds``.
    """
    lines = ["", "qm9_mpnn throughput (measured) and full-protocol estimate:"]
    total_h = 0.0
    by_method: dict[str, list] = {}
    for r in results.get("runs", []):
        key = "single_task" if r.get("single_task") is not None else r["method"]
        by_method.setdefault(key, []).append(r)
    machine = None
    for method, runs in by_method.items():
        r = runs[0]
        machine = r.get("machine", machine)
        cfg = r["config"]
        step_ms = r.get("step_time_ms")
        k = max(int(r.get("group_size") or 1), 1)
        if not step_ms:
            lines.append(f"  {method}: no timed steps (run more than one step)")
            continue
        mol_s = cfg["batch_size"] * k / (step_ms / 1e3)
        n_runs = PROTOCOL_SEEDS * (11 if method == "single_task" else 1)  # the protocol's runs of it
        step3_ms = step_ms * n_runs / k  # all of the method's protocol runs, scaled linearly from k
        # one evaluation = 20,000 molecules forward; a forward is ~1/3 of a training step (XLA's
        # count: forward + backward = 2.99 x forward, python -m experiments.models_mpnn)
        eval3_s = EVAL_MOLECULES / cfg["batch_size"] * step3_ms / 3 / 1e3
        full_s = FULL_EPOCHS * (STEPS_PER_EPOCH * step3_ms / 1e3 + eval3_s)
        total_h += full_s / 3600
        dm = ""
        try:
            if method == "single_task":
                raise ValueError("single-task runs: one task each")
            dm = f"; Δm vs published STL {delta_m_published(r['test']):+.1f}%"
        except (ValueError, KeyError, TypeError):
            pass
        if cfg["batch_size"] != 120:
            dm += f" [measured at batch {cfg['batch_size']}, not the protocol's 120: the estimate does not apply]"
        lines.append(f"  {method}: {step_ms:.1f} ms/step for {k} seed(s) x batch {cfg['batch_size']} = "
                     f"{mol_s:,.0f} molecules/s; full protocol "
                     f"({n_runs} runs vmapped, {FULL_EPOCHS} epochs) ~ {full_s / 3600:.1f} h{dm}")
    if machine:
        lines.append(f"  machine: {machine.get('backend')} {machine.get('devices')}, {machine.get('cpus')} CPUs, "
                     f"load {machine.get('load_1min') or 0:.1f}")
    lines.append(f"  all of them: ~ {total_h:.1f} h (estimate; excludes compilation"
                 + ("" if "single_task" in by_method else " and the 11 x 3 single-task baseline runs") + ")")
    return "\n".join(lines)


#: printed after the comparison table by ``python -m experiments qm9_mpnn`` (see :mod:`experiments.suites`).
report = throughput_report


def add_flags(parser, name):
    g = parser.add_argument_group("qm9_mpnn")
    g.add_argument("--max-eval", type=int, default=None,
                   help="evaluate on at most this many validation/test molecules (default: all 10,000)")


def _graphs(data_dir):
    """``--data-dir``: an exported graph file (``.npz``), a folder of qm9pack CSVs, or None (qm9pack)."""
    from pathlib import Path
    from experiments.data import qm9_graph as G

    if data_dir is not None and (str(data_dir).endswith(".npz") or Path(data_dir).is_file()):
        return G.load_qm9_graphs(graph_file=data_dir)
    return G.load_qm9_graphs(data_dir=data_dir, log_every=10_000)


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments.data import qm9 as Q
    from experiments.data import qm9_graph as G
    from experiments.models_mpnn import MPNNMTL

    cleanup = None
    if o.tiny:
        root, cleanup = tmpdir("qm9mpnn")
        Q.write_fixture(root / "csv", n=40, seed=0)
        graphs = G.load_qm9_graphs(data_dir=root / "csv", cache_dir=root / "cache")
        dims = dict(dim=16, edge_hidden=32)
    else:
        graphs = _graphs(o.data_dir)
        dims = {}
    split = G.published_split(len(graphs["n_atoms"]))
    max_eval = getattr(o, "max_eval", None)
    rows = {"train": split["train"][:o.max_train], "val": split["val"][:max_eval], "test": split["test"][:max_eval]}
    y = graphs["targets"][split["train"]]  # statistics of the full training split (the protocol's)
    mean, std = y.mean(0), y.std(0, ddof=1)
    targets = tuple(Q.QM9_TARGETS)
    splits = {k: G.GraphDataset(graphs, r, mean, std) for k, r in rows.items()}
    metric_std = np.asarray(std * np.asarray(Q.QM9_PAPER_SCALE), np.float32)  # MAE in the papers' units
    T = len(targets)

    def make_model(seed):
        return MPNNMTL(T, rngs=nnx.Rngs(seed), **dims)

    n = {k: len(v) for k, v in splits.items()}
    src = np.bincount(graphs["source"], minlength=4)
    return regression(
        name, targets, splits, make_model, input_key="graph", metric_std=metric_std,
        eval_batch_size=500, cleanup=cleanup,
        notes=[f"QM9 graphs ({'generated fixture' if o.tiny else 'qm9pack, RDKit bonds'}): {n['train']} train / "
               f"{n['val']} val / {n['test']} test molecules (fixed protocol split); {int(src[1:].sum())} of "
               f"{len(graphs['source'])} molecules' perceived bonds differ from their SMILES",
               f"Gilmer MPNN (NNConv + GRU x 3, Set2Set, D = {dims.get('dim', 64)}) + {T} linear heads; MSE on "
               "z-scored targets; metric: MAE in the papers' units (meV for energies), lower is better; "
               "Δm also against the published single-task MAEs (delta_m_published)"],
        fingerprint={"data": "qm9_graph", "n_train": n["train"], "tiny": o.tiny, "dims": dims})
