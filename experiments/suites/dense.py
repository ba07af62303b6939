"""NYUv2 (segmentation, depth, surface normals) and Cityscapes (segmentation, disparity): dense
prediction with a U-Net-style encoder and one conv head per task (MTAN's preprocessed ``.npy``
layout, ``--data-dir ROOT``).

The official val split is the test split (as in MTAN); the validation split is held out of
train (the last 5 %). Metrics: mIoU and pixel accuracy; depth absolute and relative error;
normal mean/median angle and the share within 11.25/22.5/30 degrees.
"""

from __future__ import annotations

import numpy as np

from experiments import losses as L
from experiments import metrics as M
from experiments.suites import Benchmark, need_data_dir, tmpdir
from experiments.data.batching import Subset, first_n

_TASKS = {"nyuv2": ("segmentation", "depth", "normal"), "cityscapes": ("segmentation", "depth")}
_SIZE = {"nyuv2": (144, 192), "cityscapes": (64, 128)}
DEFAULTS = {n: dict(methods=["imtl_h", "equal"], seeds=[0], steps=2000, batch_size=8, lr=1e-3,
                    eval_every=250, image_size=_SIZE[n], norm="batch") for n in _TASKS}
TINY = dict(seeds=[0], steps=4, batch_size=2, eval_every=2)

_SEG = (M.MetricSpec("seg_miou", "segmentation", True), M.MetricSpec("seg_pixel_acc", "segmentation", True))
_DEPTH = (M.MetricSpec("depth_abs_err", "depth", False), M.MetricSpec("depth_rel_err", "depth", False))
_NORMAL = (M.MetricSpec("normal_mean", "normal", False), M.MetricSpec("normal_median", "normal", False),
           *[M.MetricSpec(f"normal_within_{t:g}", "normal", True) for t in M.NORMAL_THRESHOLDS])


def add_flags(parser, name):
    g = parser.add_argument_group(name)
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help=f"resize to H x W (default: {_SIZE[name][0]} {_SIZE[name][1]})")


def _module(name):
    if name == "nyuv2":
        from experiments.data import nyuv2 as D
        return D, D.NYUv2Dataset
    from experiments.data import cityscapes as D
    return D, D.CityscapesDataset


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments import pure_model
    from experiments.models import DenseMTL

    D, Dataset = _module(name)
    tasks = _TASKS[name]
    cleanup = None
    if o.tiny:
        root, cleanup = tmpdir(name)
        D.write_fixture(root, n=8, shape=(16, 24), seed=0)
        resize, width, levels = None, 4, 1
    else:
        root = need_data_dir(name, Dataset.layout, o.data_dir)
        resize, width, levels = tuple(o.image_size or _SIZE[name]), 16, 3
    norm = o.norm or "batch"
    full = Dataset(root, "train", resize=resize)
    test = Dataset(root, "val", resize=resize)
    n_hold = len(full) // 2 if o.tiny else max(1, len(full) // 20)
    train = first_n(Subset(full, np.arange(len(full) - n_hold)), o.max_train)
    val = Subset(full, np.arange(len(full) - n_hold, len(full)))
    specs = _SEG + _DEPTH + (_NORMAL if "normal" in tasks else ())

    def make_model(seed):
        return DenseMTL(D.NUM_CLASSES, tasks, width=width, levels=levels, norm=norm, rngs=nnx.Rngs(seed))

    def pure(model, loss_factors=None):
        return pure_model.per_task(model, [model.heads.heads[t] for t in tasks], name=name, task_names=tasks,
                                   input_key="image", loss=L.dense_losses, loss_factors=loss_factors)

    def stats(preds, batch):
        out = {f"seg_{k}": v for k, v in M.segmentation_stats(preds["segmentation"], batch["label"]).items()}
        out.update({f"depth_{k}": v for k, v in M.depth_stats(preds["depth"], batch["depth"]).items()})
        if "normal" in tasks:
            out.update({f"normal_{k}": v for k, v in M.normal_stats(preds["normal"], batch["normal"]).items()})
        return out

    def finalize(totals):
        def sub(p):
            return {k[len(p):]: v for k, v in totals.items() if k.startswith(p)}

        seg = M.segmentation_from_confusion(totals["seg_confusion"])
        d = M.depth_from_stats(sub("depth_"))
        out = {"seg_miou": seg["miou"], "seg_pixel_acc": seg["pixel_acc"], "depth_abs_err": d["abs_err"],
               "depth_rel_err": d["rel_err"]}
        if "normal" in tasks:
            out.update({f"normal_{k}": v for k, v in M.normal_from_stats(sub("normal_")).items()})
        return {s.name: out[s.name] for s in specs}

    return Benchmark(
        name=name, task_names=tasks, train=train, val=val, test=test, make_model=make_model, pure_model=pure,
        metrics=specs, stats=stats, finalize=finalize, eval_batch_size=4 if o.tiny else 8, num_workers=2,
        cleanup=cleanup,
        notes=[f"{name} ({'generated fixture' if o.tiny else root}): {len(train)} train / {len(val)} val "
               f"(held out of train) / {len(test)} test (the official val split, as in MTAN); resize "
               f"{resize or 'none'}; U-Net encoder (width {width}, {levels} levels, {norm} norm) + per-task "
               "conv heads"],
        vmap_on_cpu=False,
        fingerprint={"data": name, "n_train": len(train), "resize": list(resize or []), "norm": norm,
                     "tiny": o.tiny})
