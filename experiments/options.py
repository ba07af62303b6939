"""The resolved command-line options of one invocation (typed; see :mod:`experiments.cli`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Options"]


@dataclasses.dataclass
class Options:
    """Flags after defaults (benchmark's, then ``--tiny``'s) are applied.

    ``extra`` holds the chosen study's own flags (e.g. ``ratios`` of the priorities sweep).
    """

    benchmark: str
    study: str = "compare"
    methods: list = dataclasses.field(default_factory=lambda: ["imtl_h", "equal"])
    seeds: list = dataclasses.field(default_factory=lambda: [0])
    steps: Optional[int] = 1000
    epochs: Optional[float] = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: int = 0
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    eval_every: int = 100
    checkpoint_every: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    max_skipped: int = 20
    loss_scale_task: Optional[str] = None
    loss_scale: float = 1.0
    max_train: Optional[int] = None
    max_eval: Optional[int] = None
    data_dir: Optional[str] = None
    image_size: Optional[tuple] = None
    norm: Optional[str] = None
    targets: Optional[list] = None
    out: Optional[str] = None
    tiny: bool = False
    quiet: bool = False
    parallel_seeds: Optional[int] = None
    tensorboard: bool = True
    plots: bool = True
    extra: dict = dataclasses.field(default_factory=dict)
