"""QM9: 11 regression targets (mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv), MLP on
Coulomb-matrix eigenvalues.

    python -m experiments.qm9                          # IMTL-H vs EW, 20k training molecules
    python -m experiments.qm9 --max-train 110000 --steps 20000 --method all
    python -m experiments.qm9 --data-dir FOLDER        # a folder of qm9pack-format CSVs

Data: the PyPI package ``qm9pack`` (``pip install qm9pack``); parsed CSVs and features are
cached in ``~/.cache/imtl_jax`` (``$IMTL_JAX_CACHE``). Split: 110,000 train / 10,000 val /
the rest test (seeded); ``--max-train`` and ``--max-eval`` sub-sample for CPU runs.
Metric: MAE per target in original units (eV for energies), lower is better.
"""

from __future__ import annotations

import sys

from experiments.harness import main_for

DEFAULTS = dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=128, lr=1e-3,
                eval_every=500)


def _flags(parser):
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on at most this many val/test molecules (default: 10000 / all)")


def main(argv=None) -> int:
    def add(parser):
        _flags(parser)
    return main_for("qm9", argv, description=__doc__.split("\n")[0], defaults=DEFAULTS,
                    add_flags=add, extra_keys=("max_eval",))


if __name__ == "__main__":
    sys.exit(main())
