"""MultiMNIST (and MultiFashion, Multi-(Fashion+MNIST)): the project's main job.

    python -m experiments.multimnist            # IMTL-H vs EW vs single-task, 2 seeds, ~3 CPU min
    python -m experiments.multimnist --method imtl_h imtl_g imtl_l equal single_task --seeds 0-2
    python -m experiments.multimnist --dataset multifashion --steps 2000

Writes ``runs/multimnist/{results.json,results.md,plots/}`` and prints the results table.
See ``python -m experiments.multimnist --help`` for every flag (shared: experiments/cli.py).
"""

from __future__ import annotations

import sys

from experiments.harness import main_for

# About 2-3 CPU minutes on 2 cores: IMTL-H, equal weighting and the two single-task runs (the
# Δm baseline), 2 seeds, 600 steps of batch 128 (~19 epochs of the 4,000 training pairs).
DEFAULTS = dict(methods=["imtl_h", "equal", "single_task"], seeds=[0, 1], steps=600, batch_size=128,
                lr=1e-3, eval_every=200)


def _flags(parser):
    parser.add_argument("--dataset", default="multimnist",
                        choices=["multimnist", "multifashion", "multi_fashion_mnist"],
                        help="which two-task overlay data set (MultiFashion needs the Debian "
                             "package dataset-fashion-mnist)")


def main(argv=None) -> int:
    return main_for("multimnist", argv, description=__doc__.split("\n")[0], defaults=DEFAULTS,
                    add_flags=_flags, extra_keys=("dataset",))


if __name__ == "__main__":
    sys.exit(main())
