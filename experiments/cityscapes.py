"""Cityscapes: 7-class segmentation and disparity with a U-Net encoder (GroupNorm).

    python -m experiments.cityscapes --data-dir /data/cityscapes   # MTAN's preprocessed .npy folders
    python -m experiments.cityscapes --data-dir /data/cityscapes --image-size 128 256
    python -m experiments.cityscapes --tiny                        # generated fixture (smoke test)

``--data-dir`` holds ``{train,val}/{image,label_7,depth}/{i}.npy`` (not downloadable offline).
The official val split is reported as test (as in MTAN); 5% of train is held out as val.
Metrics: mIoU, pixel accuracy, disparity abs/rel error. (The paper's Cityscapes also has an
instance task; MTAN's preprocessed release has the two tasks used here.)
"""

from __future__ import annotations

import sys

from experiments.harness import main_for

DEFAULTS = dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=8, lr=1e-3,
                eval_every=500)
TINY = dict(batch_size=2)


def _flags(parser):
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize to H x W (default 64 128, half resolution)")


def main(argv=None) -> int:
    return main_for("cityscapes", argv, description=__doc__.split("\n")[0], defaults=DEFAULTS,
                    tiny_defaults=TINY, add_flags=_flags, extra_keys=("image_size",))


if __name__ == "__main__":
    sys.exit(main())
