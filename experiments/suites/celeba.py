"""CelebA: 40 binary face attributes (the MGDA/IMTL setting), ResNet-18 + 40 linear heads.

Data: ``--data-dir ROOT`` holding ``img_align_celeba/``, ``list_attr_celeba.txt`` and
``list_eval_partition.txt`` (the official train/val/test partition). Metric: accuracy per
attribute. ``--image-size H W`` (default 64 64) resizes the 178x218 images.
"""

from __future__ import annotations

from experiments import losses as L
from experiments import metrics as M
from experiments.suites import Benchmark, need_data_dir, tmpdir

DEFAULTS = {"celeba": dict(methods=["imtl_h", "equal"], seeds=[0], steps=3000, batch_size=128, lr=1e-3,
                           eval_every=500, image_size=(64, 64), norm="batch")}
TINY = dict(seeds=[0], steps=4, batch_size=4, eval_every=2)


def add_flags(parser, name):
    g = parser.add_argument_group("celeba")
    g.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many images (default: all)")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="resize images to H x W (default: 64 64)")


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments import pure_model
    from experiments.data import celeba as C
    from experiments.models import ResNet18MTL

    cleanup = None
    if o.tiny:
        root, cleanup = tmpdir("celeba")
        C.write_fixture(root, n=12, seed=0, image_hw=(44, 36))
        size, width = (16, 16), 4
    else:
        root = need_data_dir("celeba", C.LAYOUT, o.data_dir)
        size, width = tuple(o.image_size or (64, 64)), 32
    norm = o.norm or "batch"
    train = C.CelebADataset(root, "train", size, max_examples=o.max_train)
    val = C.CelebADataset(root, "val", size, max_examples=o.max_eval)
    test = C.CelebADataset(root, "test", size, max_examples=o.max_eval)
    tasks = tuple(train.attribute_names)
    specs = tuple(M.MetricSpec(f"{a}_acc", a, True) for a in tasks)

    def make_model(seed):
        return ResNet18MTL(len(tasks), width=width, norm=norm, rngs=nnx.Rngs(seed))

    def pure(model, loss_factors=None):
        return pure_model.stacked(model, name=name, num_tasks=len(tasks), input_key="image",
                                  target_key="attributes", loss=L.binary_ce_losses, loss_factors=loss_factors)

    def stats(preds, batch):
        return M.binary_stats(preds, batch["attributes"])

    def finalize(totals):
        return {s.name: float(v) for s, v in zip(specs, M.accuracy_from_stats(totals))}

    return Benchmark(
        name=name, task_names=tasks, train=train, val=val, test=test, make_model=make_model,
        pure_model=pure, metrics=specs, stats=stats, finalize=finalize, eval_batch_size=256,
        num_workers=4, cleanup=cleanup,
        notes=[f"CelebA ({'generated fixture' if o.tiny else root}): {len(train)} train / {len(val)} val / "
               f"{len(test)} test images at {size[0]}x{size[1]}; ResNet-18 (width {width}, {norm} norm) + "
               f"{len(tasks)} linear heads; metric: accuracy per attribute"],
        vmap_on_cpu=False,
        fingerprint={"data": "celeba", "n_train": len(train), "size": list(size), "norm": norm, "tiny": o.tiny})
