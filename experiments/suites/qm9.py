"""QM9: 11 molecular property regressions (mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv).

The CPU protocol (issue 18): all 130,831 molecules in the fixed, stored split 110,831 / 10,000 /
10,000 (``--split protocol``, the default; the same molecules for every seed), targets z-scored on
the training split, model: MLP on the sorted Coulomb-matrix eigenvalues + atom counts (34
features) with 11 stacked linear heads, MSE on the standardized targets, Adam with
reduce-on-plateau on the validation Δm, best-validation selection. Metric: MAE per target in
the papers' units (energies homo, lumo, zpve, U0, U, H, G in meV; the others as QM9).
The MLP widths (``--hidden``) were chosen once on single-task validation
(``results/qm9_model_selection``) and then fixed.
Data: the PyPI package ``qm9pack`` (or ``--data-dir`` with qm9pack-format CSVs).
``--targets mu homo`` trains on a subset of the targets (the priorities sweep uses two);
``--split random --max-train N`` gives the earlier seeded random split and a subsample.
"""

from __future__ import annotations

import numpy as np

from experiments.suites import Benchmark, regression, tmpdir
from experiments.errors import CLIError

DEFAULT_HIDDEN = (256, 256, 256)  # chosen on single-task validation: results/qm9_model_selection
# 110,831 / 512 = 216 steps an epoch: evaluate every epoch, 30 epochs.
DEFAULTS = {"qm9": dict(methods=["imtl_h", "equal", "single_task"], seeds=[0, 1, 2], steps=None, epochs=30,
                        batch_size=512, lr=1e-3, schedule="plateau", plateau_patience=3, plateau_factor=0.5,
                        eval_every=216, max_train=None)}
TINY = dict(seeds=[0], steps=6, epochs=None, batch_size=4, eval_every=2, max_train=None)
#: an MLP without normalization layers.
UNUSED_FLAGS = ("norm",)


def add_flags(parser, name):
    g = parser.add_argument_group("qm9")
    g.add_argument("--max-eval", type=int, default=None,
                   help="evaluate on at most this many validation/test molecules (default: all)")
    g.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="train on these targets only (default: all 11)")
    g.add_argument("--split", choices=("protocol", "random"), default="protocol",
                   help="'protocol': the fixed stored 110,831/10,000/10,000 split, the same for every seed; "
                        "'random': a split drawn from seed 0 with 10,000 validation molecules (default: protocol)")
    g.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN), metavar="WIDTH",
                   help=f"MLP trunk widths (default: {' '.join(map(str, DEFAULT_HIDDEN))}, chosen on "
                        "single-task validation)")
    return ("split", "hidden")


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments.data import qm9 as Q
    from experiments.models import MLPMTL

    cleanup = None
    if o.tiny:
        root, cleanup = tmpdir("qm9")
        Q.write_fixture(root / "csv", n=60, seed=0)
        data = Q.load_qm9(data_dir=root / "csv", n_train=30, n_val=12, max_test=12,
                          cache_dir=root / "cache", seed=0)
        hidden = (16, 16)
    else:
        split = o.extra.get("split") or "protocol"
        data = Q.load_qm9(data_dir=o.data_dir, seed=0, split=split, max_train=o.max_train,
                          max_val=o.max_eval, max_test=o.max_eval)
        hidden = tuple(o.extra.get("hidden") or DEFAULT_HIDDEN)
    all_targets = tuple(data.target_names)
    targets = tuple(o.targets) if o.targets else all_targets
    unknown = [t for t in targets if t not in all_targets]
    if unknown:
        raise CLIError(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(all_targets)}")
    idx = np.asarray([all_targets.index(t) for t in targets])
    # MAE in the papers' units: standardized error x target std (QM9 units) x paper scale (eV -> meV)
    std = (np.asarray(data.target_std, np.float64) * np.asarray(Q.QM9_PAPER_SCALE))[idx].astype(np.float32)
    units = [Q.QM9_PAPER_UNITS[all_targets.index(t)] for t in targets]
    splits = {}
    for part in ("train", "val", "test"):
        ds = data.split(part)
        splits[part] = type(ds)(x=ds.arrays["x"], y=ds.arrays["y"][:, idx])
    nf, T = data.num_features, len(targets)

    def make_model(seed):
        return MLPMTL(nf, T, hidden=hidden, rngs=nnx.Rngs(seed))

    n = {k: len(v) for k, v in splits.items()}
    return regression(
        name, targets, splits, make_model, input_key="x", metric_std=std,
        eval_batch_size=2048, cleanup=cleanup,
        notes=[f"QM9 ({'generated fixture' if o.tiny else 'qm9pack'}): {n['train']} train / {n['val']} val / "
               f"{n['test']} test molecules; {nf} Coulomb-eigenvalue features; MLP {hidden} + {T} linear "
               "heads; MSE on standardized targets; metric: MAE in the papers' units ("
               + ", ".join(f"{t} {u}" for t, u in zip(targets, units)) + "; lower is better)"],
        fingerprint={"data": "qm9", "n_train": n["train"], "targets": list(targets), "tiny": o.tiny,
                     "split": "fixture" if o.tiny else split, "hidden": list(hidden), "units": units})
