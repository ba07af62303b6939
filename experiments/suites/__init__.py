"""The benchmark registry: one file per benchmark declares its data, model, losses, metrics,
defaults and tiny settings.

A benchmark module defines

* ``DEFAULTS``: ``{name: {flag: value}}``, the full-size defaults shown by ``--help``;
* ``TINY``: ``{flag: value}``, what ``--tiny`` overrides (a handful of steps on tiny data);
* ``add_flags(parser, name)``: its own flags (optional);
* ``build(name, options) -> Benchmark``;
* ``report(results) -> str`` (optional): lines printed after the comparison table of
  ``python -m experiments <name>``, from the ``results.json`` payload (qm9_mpnn: throughput
  and the full-protocol estimate).

Adding a benchmark is one new module here plus one line in :data:`REGISTRY`
(see ``docs/contributing_experiments.md``).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from experiments.errors import CLIError, DataUnavailableError
from experiments.metrics import MetricSpec

__all__ = ["Benchmark", "REGISTRY", "names", "module", "defaults", "tiny_defaults", "add_flags", "build",
           "options", "tmpdir", "need_data_dir", "regression"]

#: benchmark name -> module that builds it (a module may serve several names).
REGISTRY: dict[str, str] = {
    "multimnist": "experiments.suites.multimnist",
    "multifashion": "experiments.suites.multimnist",
    "multi_fashion_mnist": "experiments.suites.multimnist",
    "qm9": "experiments.suites.qm9",
    "qm9_mpnn": "experiments.suites.qm9_mpnn",
    "celeba": "experiments.suites.celeba",
    "nyuv2": "experiments.suites.dense",
    "cityscapes": "experiments.suites.dense",
}


@dataclasses.dataclass
class Benchmark:
    """A data set, its model and how to score it.

    Attributes:
      name: used in folder names and tables.
      task_names: the T task names, in head order.
      train, val, test: datasets (``len`` + ``__getitem__``, optionally ``get_batch``).
      make_model: ``seed -> nnx.Module`` with ``.encoder`` and ``.heads``.
      pure_model: ``(model, loss_factors) -> experiments.pure_model.PureModel``.
      metrics: the reported metrics (each names its task, one of ``task_names``).
      stats: ``(preds, batch) -> dict`` of summable statistics (jit-able).
      finalize: ``totals -> {metric name: value}``.
      eval_batch_size, num_workers: evaluation batch size, loader threads.
      notes: lines describing data and model (written to results.md).
      fingerprint: what must match for a checkpoint to be resumed.
      cleanup: called once when every run is done (removes generated fixtures).
      vmap_on_cpu: whether runs of one method are vmapped into one program on a CPU backend by
        default. False for convolutional models: vmapping per-run kernels turns every convolution
        into a grouped one, which XLA:CPU runs slower than K separate ones
        (``benchmarks/vmapped_seeds.py``); accelerators always vmap.
    """

    name: str
    task_names: tuple
    train: Any
    val: Any
    test: Any
    make_model: Callable[[int], Any]
    pure_model: Callable[..., Any]
    metrics: tuple
    stats: Callable
    finalize: Callable
    eval_batch_size: int = 256
    num_workers: int = 0
    notes: list = dataclasses.field(default_factory=list)
    fingerprint: dict = dataclasses.field(default_factory=dict)
    cleanup: Optional[Callable[[], None]] = None
    vmap_on_cpu: bool = True

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def metric_specs(self) -> tuple:
        return tuple(self.metrics)

    @property
    def higher_is_better(self) -> dict:
        return {s.name: s.higher_is_better for s in self.metrics}

    @property
    def metric_tasks(self) -> dict:
        return {s.name: s.task for s in self.metrics}

    def task_of_metric_index(self) -> dict:
        """{metric name: index of its task in ``task_names``}."""
        return {s.name: list(self.task_names).index(s.task) for s in self.metrics}

    def metric_names_of_task(self, t: int) -> list:
        return [s.name for s in self.metrics if s.task == self.task_names[t]]

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def names() -> list:
    return list(REGISTRY)


def module(name: str):
    if name not in REGISTRY:
        raise CLIError(f"unknown benchmark {name!r}; choose from {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def defaults(name: str) -> dict:
    return dict(module(name).DEFAULTS[name])


def tiny_defaults(name: str) -> dict:
    m = module(name)
    tiny = getattr(m, "TINY", {})
    return dict(tiny.get(name, tiny) if name in tiny else tiny)


def add_flags(parser, name: str) -> tuple:
    """Adds the benchmark's own flags; returns the keys that go to ``Options.extra``."""
    fn = getattr(module(name), "add_flags", None)
    return tuple(fn(parser, name) or ()) if fn is not None else ()


def options(name: str, *, tiny: bool = False, **overrides):
    """The :class:`experiments.options.Options` of ``python -m experiments <name> [--tiny]`` with
    ``overrides`` (any field: ``lr=``, ``weight_decay=``, ``schedule=``, ``steps=``, ``seeds=``, ...)."""
    import dataclasses
    from experiments.cli import BASE_DEFAULTS
    from experiments.options import Options
    values = {**BASE_DEFAULTS, **defaults(name), **(tiny_defaults(name) if tiny else {})}
    fields = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"options({name!r}): unknown fields {unknown}; choose from {sorted(fields)}")
    values = {k: v for k, v in values.items() if k in fields}
    values.update(overrides)
    if values.get("image_size") is not None:
        values["image_size"] = tuple(values["image_size"])
    return Options(benchmark=name, tiny=tiny, **values)


def build(name: str, options) -> Benchmark:
    bench = module(name).build(name, options)
    specs: Sequence[MetricSpec] = bench.metrics
    missing = {s.task for s in specs} - set(bench.task_names)
    if missing:
        raise ValueError(f"{name}: metrics name tasks {sorted(missing)} that are not in task_names")
    return bench


# ------------------------------------------------------------------ helpers for benchmark files


def tmpdir(prefix: str):
    """A fresh temporary folder and the function that removes it."""
    d = tempfile.mkdtemp(prefix=f"imtl-{prefix}-")
    return Path(d), (lambda: shutil.rmtree(d, ignore_errors=True))


def need_data_dir(name: str, layout: str, data_dir) -> Path:
    """``--data-dir`` as a Path, or a one-line error naming the expected layout."""
    if data_dir is None:
        raise CLIError(f"{name} needs the real data set: pass --data-dir ROOT with {layout} "
                       "(or --tiny to run on generated fixtures)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataUnavailableError(f"--data-dir {root} does not exist; pass the {name} root holding {layout}")
    return root


def regression(name: str, targets: Sequence[str], splits: dict, make_model: Callable[[int], Any], *,
               input_key: str, metric_std, **fields) -> Benchmark:
    """A benchmark of scalar regression targets, one stacked linear head each (the two QM9
    benchmarks): per-task MSE on standardized targets (``batch["y"]``, inputs ``batch[input_key]``)
    and one MAE metric ``<target>_mae`` per target, lower is better, in the units that
    ``metric_std`` (T,) converts a standardized error to. ``splits``: ``{"train", "val", "test"}``
    datasets; ``fields``: the other :class:`Benchmark` fields (notes, fingerprint, cleanup, ...)."""
    from experiments import losses as L
    from experiments import metrics as M
    from experiments import pure_model

    targets = tuple(targets)
    specs = tuple(MetricSpec(f"{t}_mae", t, False) for t in targets)

    def pure(model, loss_factors=None):
        return pure_model.stacked(model, name=name, num_tasks=len(targets), input_key=input_key, target_key="y",
                                  loss=L.regression_losses, loss_factors=loss_factors)

    def stats(preds, batch):
        return M.regression_stats(preds, batch["y"], metric_std)

    def finalize(totals):
        return {s.name: float(v) for s, v in zip(specs, M.mae_from_stats(totals))}

    return Benchmark(name=name, task_names=targets, train=splits["train"], val=splits["val"], test=splits["test"],
                     make_model=make_model, pure_model=pure, metrics=specs, stats=stats, finalize=finalize,
                     **fields)
