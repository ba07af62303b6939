"""CelebA: 40 binary attributes, ResNet-18 (GroupNorm) with 40 linear heads.

    python -m experiments.celeba --data-dir /data/celeba            # needs the real data set
    python -m experiments.celeba --data-dir /data/celeba --method all --steps 20000
    python -m experiments.celeba --tiny                             # generated fixture (smoke test)

``--data-dir`` holds ``img_align_celeba/``, ``list_attr_celeba.txt`` and
``list_eval_partition.txt`` (the original "Align&Cropped" release; not downloadable offline).
Metric: accuracy per attribute (the paper's Table: mean accuracy over the 40).
"""

from __future__ import annotations

import sys

from experiments.harness import main_for

DEFAULTS = dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=64, lr=1e-3,
                eval_every=500)
TINY = dict(batch_size=2)


def _flags(parser):
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize images to H x W (default 64 64)")
    parser.add_argument("--max-eval", type=int, default=None,
                        help="evaluate on at most this many val/test images")


def main(argv=None) -> int:
    return main_for("celeba", argv, description=__doc__.split("\n")[0], defaults=DEFAULTS,
                    tiny_defaults=TINY, add_flags=_flags, extra_keys=("image_size", "max_eval"))


if __name__ == "__main__":
    sys.exit(main())
