"""Shared command-line flags of the experiment scripts, and their error handling.

Every script (``python -m experiments.multimnist``, ``.qm9``, ``.celeba``, ``.nyuv2``,
``.cityscapes``, ``.robustness``, ``.ablation_z_vs_theta``) builds its parser with
:func:`make_parser` and runs through :func:`run_main`, so that

* every script has the same flags (``--method``, ``--seeds``, ``--steps``/``--epochs``,
  ``--batch-size``, ``--lr``, ``--out``, ``--data-dir``, ``--eval-every``,
  ``--checkpoint-every``, ``--resume``, ``--overwrite``, ``--max-skipped``,
  ``--loss-scale-task``/``--loss-scale``, ``--max-train``, ``--tiny``, ``--quiet``);
* a bad flag, a missing data set or an unusable checkpoint ends the process with **one line**
  on stderr that names the fix, exit status 2, and no traceback.

Flags left unset take the script's defaults, or the ``--tiny`` defaults (a handful of steps on
tiny generated or sub-sampled data: the smoke-test mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = [
    "CLIError",
    "HarnessError",
    "CheckpointError",
    "Settings",
    "make_parser",
    "parse_settings",
    "run_main",
    "one_line",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class HarnessError(RuntimeError):
    """An error the user can fix (bad flag, missing data, unusable checkpoint): one line, exit 2."""


class CLIError(HarnessError):
    """A bad command-line flag."""


class CheckpointError(HarnessError):
    """No usable checkpoint, or a checkpoint written by a different configuration."""


def one_line(text: str) -> str:
    """``text`` squeezed onto one line (newlines and runs of spaces become single spaces)."""
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`CLIError` instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{message} (see `{self.prog} --help`)")


@dataclasses.dataclass
class Settings:
    """The resolved flags of one invocation (see :func:`make_parser` for their meaning)."""

    prog: str
    methods: list[str]
    seeds: list[int]
    steps: Optional[int]
    epochs: Optional[float]
    batch_size: int
    lr: float
    out: str
    data_dir: Optional[str]
    eval_every: int
    checkpoint_every: int
    resume: bool
    overwrite: bool
    max_skipped: int
    loss_scale_task: Optional[str]
    loss_scale: float
    max_train: Optional[int]
    tiny: bool
    quiet: bool
    extra: dict = dataclasses.field(default_factory=dict)


# Defaults every script starts from; scripts override some of them; --tiny overrides again.
BASE_DEFAULTS = dict(
    methods=["imtl_h", "equal"], seeds=[0], steps=1000, epochs=None, batch_size=128, lr=1e-3,
    out=None, data_dir=None, eval_every=0, checkpoint_every=0, max_skipped=20,
    loss_scale_task=None, loss_scale=1.0, max_train=None,
)
TINY_DEFAULTS = dict(seeds=[0], steps=4, batch_size=4, eval_every=2)


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _nonneg_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return parse


def _positive_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {s}")
        return v
    return parse


def _seed_list(s: str) -> list[int]:
    out = []
    for part in s.replace(",", " ").split():
        if "-" in part[1:]:  # a range "0-4"
            a, b = part.split("-", 1)
            try:
                lo, hi = int(a), int(b)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--seeds: bad range {part!r}; write e.g. 0-4") from None
            if lo < 0 or hi < lo:
                raise argparse.ArgumentTypeError(f"--seeds: bad range {part!r}; write e.g. 0-4")
            out.extend(range(lo, hi + 1))
            continue
        try:
            v = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds takes non-negative integers, got {part!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"--seeds takes non-negative integers, got {v}")
        out.append(v)
    return out


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The shared parser; scripts may add their own flags before calling :func:`parse_settings`."""
    p = _Parser(prog=prog, description=description,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("methods and runs")
    g.add_argument("--method", "--methods", dest="methods", nargs="+", metavar="NAME", default=None,
                   help="registered method names (see imtl_jax.methods.method_names()), 'all' for "
                        "every registered method, and/or 'single_task' (T single-task runs, the "
                        "baseline of Δm)")
    g.add_argument("--seeds", nargs="+", type=_seed_list, default=None, metavar="SEED",
                   help="seeds: '0 1 2', '0,1,2' or '0-2'")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=_positive_int("--steps"), default=None,
                       help="training steps per run")
    steps.add_argument("--epochs", type=_positive_float("--epochs"), default=None,
                       help="training epochs per run (instead of --steps)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None)
    g.add_argument("--lr", type=_positive_float("--lr"), default=None, help="Adam learning rate")
    g.add_argument("--max-train", type=_positive_int("--max-train"), default=None,
                   help="use at most this many training examples")
    g = p.add_argument_group("input and output")
    g.add_argument("--out", default=None, help="output folder (results.json, results.md, plots, runs/)")
    g.add_argument("--data-dir", default=None,
                   help="root of the real data set (CelebA, NYUv2, Cityscapes; QM9: a folder of "
                        "qm9pack CSVs)")
    g.add_argument("--tiny", action="store_true",
                   help="a handful of steps on tiny generated/sub-sampled data (smoke test)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("evaluation, checkpoints, safety")
    g.add_argument("--eval-every", type=_nonneg_int("--eval-every"), default=None,
                   help="evaluate on val every k steps (0: only at the end)")
    g.add_argument("--checkpoint-every", type=_nonneg_int("--checkpoint-every"), default=None,
                   help="orbax checkpoint every k steps and at the end (0: no checkpoints)")
    g.add_argument("--resume", action="store_true",
                   help="continue each run from its latest good checkpoint; skip finished runs")
    g.add_argument("--overwrite", action="store_true",
                   help="discard checkpoints of earlier runs in --out instead of refusing to start")
    g.add_argument("--max-skipped", type=_positive_int("--max-skipped"), default=None,
                   help="stop a run after this many consecutive non-finite (skipped) steps")
    g = p.add_argument_group("loss rescaling (robustness)")
    g.add_argument("--loss-scale-task", default=None, metavar="TASK",
                   help="task index or name whose training loss is multiplied by --loss-scale")
    g.add_argument("--loss-scale", type=_positive_float("--loss-scale"), default=None, metavar="K")
    return p


def parse_settings(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                   defaults: Optional[dict] = None, tiny_defaults: Optional[dict] = None,
                   extra_keys: Sequence[str] = ()) -> Settings:
    """Parses ``argv`` and fills unset flags from ``tiny_defaults`` (with --tiny), ``defaults``
    and the shared :data:`BASE_DEFAULTS`, in that order. Raises :class:`CLIError`."""
    ns = parser.parse_args(list(argv) if argv is not None else None)
    merged = dict(BASE_DEFAULTS)
    merged.update(defaults or {})
    if ns.tiny:
        merged.update(TINY_DEFAULTS)
        merged.update(tiny_defaults or {})
    values = {}
    for key in BASE_DEFAULTS:
        given = getattr(ns, key, None)
        values[key] = given if given is not None else merged.get(key)
    if ns.seeds is not None:
        values["seeds"] = [s for group in ns.seeds for s in group]
        if not values["seeds"]:
            raise CLIError(f"--seeds: give at least one seed (see `{parser.prog} --help`)")
    if ns.epochs is not None:
        values["steps"] = None
    elif ns.steps is None and values.get("epochs") is not None:
        values["steps"] = None
    if values["steps"] is None and values["epochs"] is None:
        raise CLIError(f"give --steps or --epochs (see `{parser.prog} --help`)")
    if ns.loss_scale is not None and ns.loss_scale != 1.0 and ns.loss_scale_task is None \
            and values.get("loss_scale_task") is None:
        raise CLIError("--loss-scale needs --loss-scale-task TASK (a task index or name)")
    if values["out"] is None:
        raise CLIError("give --out FOLDER")
    extra = {k: getattr(ns, k) for k in extra_keys}
    return Settings(prog=parser.prog, methods=list(values["methods"] or []), seeds=list(values["seeds"]),
                    steps=values["steps"], epochs=values["epochs"],
                    batch_size=int(values["batch_size"]), lr=float(values["lr"]), out=values["out"],
                    data_dir=values["data_dir"], eval_every=int(values["eval_every"]),
                    checkpoint_every=int(values["checkpoint_every"]), resume=bool(ns.resume),
                    overwrite=bool(ns.overwrite), max_skipped=int(values["max_skipped"]),
                    loss_scale_task=values["loss_scale_task"], loss_scale=float(values["loss_scale"]),
                    max_train=values["max_train"], tiny=bool(ns.tiny), quiet=bool(ns.quiet),
                    extra=extra)


def run_main(prog: str, body: Callable[[], Any]) -> int:
    """Runs ``body()`` and turns user-fixable errors into one stderr line and exit status 2.

    Returns the exit status (0 on success) so that ``main(argv)`` can be called in-process;
    the ``__main__`` blocks pass it to ``sys.exit``.
    """
    from experiments.data import DataUnavailableError  # local: keep `--help` fast

    try:
        body()
    except SystemExit as e:  # argparse --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except (HarnessError, DataUnavailableError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume to continue from the last checkpoint "
              "(needs --checkpoint-every > 0)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
