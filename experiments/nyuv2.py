"""NYUv2: 13-class segmentation, depth and surface normals with a U-Net encoder (GroupNorm).

    python -m experiments.nyuv2 --data-dir /data/nyuv2            # MTAN's preprocessed .npy folders
    python -m experiments.nyuv2 --data-dir /data/nyuv2 --image-size 288 384 --steps 20000
    python -m experiments.nyuv2 --tiny                            # generated fixture (smoke test)

``--data-dir`` holds ``{train,val}/{image,label,depth,normal}/{i}.npy`` (not downloadable
offline). The official val split is reported as test (as in MTAN); 5% of train is held out
as val. Metrics: mIoU, pixel accuracy, depth abs/rel error, normal angle mean/median and
% within 11.25/22.5/30 degrees.
"""

from __future__ import annotations

import sys

from experiments.harness import main_for

DEFAULTS = dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=8, lr=1e-3,
                eval_every=500)
TINY = dict(batch_size=2)


def _flags(parser):
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize to H x W (default 144 192, half resolution)")


def main(argv=None) -> int:
    return main_for("nyuv2", argv, description=__doc__.split("\n")[0], defaults=DEFAULTS,
                    tiny_defaults=TINY, add_flags=_flags, extra_keys=("image_size",))


if __name__ == "__main__":
    sys.exit(main())
