"""The shared command-line flags and their error handling.

``python -m experiments <benchmark> [flags]`` and ``python -m experiments <study> --benchmark
<name> [flags]`` build one parser from :func:`make_parser` (shared flags, with the chosen
benchmark's real defaults in ``--help``), the benchmark's own flags and the study's; the result
is an :class:`experiments.options.Options`. A study or benchmark module lists the shared flags
it does not read in ``UNUSED_FLAGS`` (their ``dest`` names); ``--help`` then does not offer them.
A bad flag, missing data, an unusable checkpoint or a failed write ends the process with **one
line** on stderr naming the fix, Ctrl-C with one line saying whether and how the run can be
resumed; the exit statuses are listed once, in :mod:`experiments.errors`.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Optional, Sequence

from experiments.errors import (EXIT_INTERRUPTED, EXIT_USAGE, CheckpointError, CLIError, ExperimentError,
                                HarnessError, failure, one_line)
from experiments.options import Options

__all__ = ["CLIError", "HarnessError", "ExperimentError", "CheckpointError", "one_line", "BASE_DEFAULTS",
           "merge_defaults", "make_parser", "show_defaults", "parse_options", "run_main", "command_line",
           "EXIT_USAGE", "EXIT_INTERRUPTED"]


#: defaults every benchmark starts from; the benchmark's ``DEFAULTS`` override them; ``--tiny``
#: applies the benchmark's ``TINY`` on top.
BASE_DEFAULTS = dict(
    methods=["imtl_h", "equal"], seeds=[0], steps=1000, epochs=None, batch_size=128, lr=1e-3,
    weight_decay=0.0, schedule="constant", warmup=0, plateau_patience=3, plateau_factor=0.5,
    eval_every=100, checkpoint_every=None, max_skipped=20, loss_scale_task=None, loss_scale=1.0,
    max_train=None, max_eval=None, image_size=None, norm=None, targets=None, data_dir=None,
    parallel_seeds=None,
)


def merge_defaults(*layers: dict) -> dict:
    """The layers of defaults (base, benchmark, study; or the ``--tiny`` ones), later ones winning.

    ``steps`` and ``epochs`` are one choice: a layer that sets one of them (not None) and does not
    mention the other clears the other, so ``--help`` never shows a default that is not used
    (a study with ``steps=300`` on a benchmark whose default is ``epochs=30`` trains 300 steps).
    """
    out: dict = {}
    for layer in layers:
        out.update(layer)
        for key, other in (("steps", "epochs"), ("epochs", "steps")):
            if layer.get(key) is not None and other not in layer:
                out[other] = None
    return out


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`CLIError` instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def number(kind: type, name: str, low: float, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int/float) >= ``low`` (> ``low`` when ``strict``), finite."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {s!r}") from None
        if (v <= low if strict else v < low) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {low:g}, got {s}")
        return v
    return parse


def _seed_list(s: str) -> list[int]:
    out = []
    for part in s.replace(",", " ").split():
        if "-" in part[1:]:
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


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return str(v)


class _Group:
    """An argument group that leaves out the flags whose ``dest`` is in ``omit`` and records the
    others in ``shared`` (the flags whose help shows the merged defaults)."""

    def __init__(self, group, omit, shared: set):
        self._group, self._omit, self._shared = group, omit, shared

    def add_argument(self, *names, **kw):
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        if dest not in self._omit:
            self._shared.add(dest)
            self._group.add_argument(*names, **kw)

    def add_mutually_exclusive_group(self):
        return _Group(self._group.add_mutually_exclusive_group(), self._omit, self._shared)


def make_parser(prog: str, description: str, defaults: dict, tiny: dict, epilog: str = "",
                omit: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The shared parser; ``defaults``/``tiny`` are shown in each flag's help. Flags whose
    ``dest`` is in ``omit`` (what a study or benchmark does not read) are not offered."""
    p = _Parser(prog=prog, description=description, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    omit = frozenset(omit)
    p.shared_flags = set()  # type: ignore[attr-defined]

    def d(key: str, extra: str = "") -> str:
        s = f" (default: {_fmt(defaults.get(key))}"
        if key in tiny and tiny[key] != defaults.get(key):
            s += f"; with --tiny: {_fmt(tiny[key])}"
        return s + (f"; {extra}" if extra else "") + ")"

    g = _Group(p.add_argument_group("methods and runs"), omit, p.shared_flags)
    g.add_argument("--method", "--methods", dest="methods", nargs="+", metavar="NAME", default=None,
                   help="registered method names (imtl_jax.methods.method_names()), 'linear' (constant "
                        "weights), 'all' (every registered method) and/or 'single_task' (one run per task, "
                        "the baseline of Δm)" + d("methods"))
    g.add_argument("--seeds", nargs="+", type=_seed_list, default=None, metavar="SEED",
                   help="seeds: '0 1 2', '0,1,2' or '0-2'" + d("seeds"))
    g.add_argument("--parallel-seeds", type=number(int, "--parallel-seeds", 0), default=None, metavar="K",
                   help="train at most K runs of a method as one vmapped program; 0 = all of them, 1 = one "
                        "by one (default: all on an accelerator and for MLPs on CPU; one by one on CPU for "
                        "convolutional models and parameter-level methods, where vmapped runs are slower)")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=number(int, "--steps", 1), default=None,
                       help="training steps per run" + d("steps"))
    steps.add_argument("--epochs", type=number(float, "--epochs", 0, strict=True), default=None,
                       help="training epochs per run, instead of --steps" + d("epochs"))
    g.add_argument("--batch-size", type=number(int, "--batch-size", 1), default=None,
                   help="training batch size" + d("batch_size"))
    g.add_argument("--max-train", type=number(int, "--max-train", 1), default=None,
                   help="use at most this many training examples" + d("max_train", "none = all"))
    g = _Group(p.add_argument_group("optimizer and schedule"), omit, p.shared_flags)
    g.add_argument("--lr", type=number(float, "--lr", 0, strict=True), default=None,
                   help="Adam learning rate" + d("lr"))
    g.add_argument("--weight-decay", type=number(float, "--weight-decay", 0), default=None,
                   help="decoupled weight decay (AdamW)" + d("weight_decay"))
    g.add_argument("--schedule", choices=("constant", "cosine", "plateau"), default=None,
                   help="learning-rate schedule: constant, cosine decay to 0, or reduce-on-plateau of the "
                        "validation Δm (checked every --eval-every steps)" + d("schedule"))
    g.add_argument("--warmup", type=number(int, "--warmup", 0), default=None,
                   help="linear warm-up steps" + d("warmup"))
    g.add_argument("--plateau-patience", type=number(int, "--plateau-patience", 1), default=None,
                   help="evaluations without improvement before the rate is cut" + d("plateau_patience"))
    g.add_argument("--plateau-factor", type=number(float, "--plateau-factor", 0, strict=True), default=None,
                   help="factor the rate is multiplied by on a plateau" + d("plateau_factor"))
    g = _Group(p.add_argument_group("input and output"), omit, p.shared_flags)
    g.add_argument("--out", default=None, help="output folder: results.json, results.md, plots/, runs/ "
                                               f"(default: {defaults.get('out')})")
    g.add_argument("--data-dir", default=None, help="root of the real data set (CelebA, NYUv2, Cityscapes; "
                                                    "QM9: a folder of qm9pack CSVs)" + d("data_dir"))
    g.add_argument("--norm", choices=("batch", "group", "none"), default=None,
                   help="normalization layers of the conv encoders (CelebA, NYUv2, Cityscapes)" + d("norm"))
    g.add_argument("--tiny", action="store_true",
                   help="a handful of steps on tiny generated or sub-sampled data (a smoke test, seconds)")
    g.add_argument("--quiet", action="store_true", help="no progress bars (the one-line summaries stay)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="do not write TensorBoard event files (runs/<method>/seed<k>/tb)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the PNG plots")
    g = _Group(p.add_argument_group("evaluation, checkpoints, safety"), omit, p.shared_flags)
    g.add_argument("--eval-every", type=number(int, "--eval-every", 0), default=None,
                   help="evaluate validation and test every k steps; the reported test metrics are those "
                        "at the step with the best validation Δm (0: only at the end)" + d("eval_every"))
    g.add_argument("--checkpoint-every", type=number(int, "--checkpoint-every", 0), default=None,
                   help="checkpoint every k steps and at the end; 0 = never; unset = every minute of "
                        "training and on Ctrl-C")
    g.add_argument("--resume", action="store_true",
                   help="continue each run from its latest good checkpoint; skip finished runs")
    g.add_argument("--overwrite", action="store_true",
                   help="discard checkpoints of earlier runs in --out instead of refusing to start")
    g.add_argument("--max-skipped", type=number(int, "--max-skipped", 1), default=None,
                   help="stop a run after this many consecutive non-finite (skipped) steps" + d("max_skipped"))
    g = _Group(p.add_argument_group("loss rescaling (robustness)"), omit, p.shared_flags)
    g.add_argument("--loss-scale-task", default=None, metavar="TASK",
                   help="task index or name whose training loss is multiplied by --loss-scale"
                        + d("loss_scale_task"))
    g.add_argument("--loss-scale", type=number(float, "--loss-scale", 0, strict=True), default=None, metavar="K",
                   help="the factor" + d("loss_scale"))
    return p


def show_defaults(parser: argparse.ArgumentParser, overrides: dict) -> None:
    """Rewrites the ``(default: ...)`` of flags declared elsewhere (a benchmark's own flags) to
    the values ``overrides`` gives them (a study's ``DEFAULTS``), so that ``--help`` is true."""
    import re
    for action in parser._actions:
        shared = getattr(parser, "shared_flags", set())
        if action.dest in overrides and action.dest not in shared and action.help and "(default:" in action.help:
            action.help = re.sub(r"\(default: [^)]*\)", f"(default: {_fmt(overrides[action.dest])})", action.help,
                                 count=1)


_KEYS = [f.name for f in __import__("dataclasses").fields(Options)
         if f.name not in ("benchmark", "study", "out", "tiny", "quiet", "resume", "overwrite", "extra",
                           "tensorboard", "plots")]


def parse_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], *, benchmark: str,
                  study: str, defaults: dict, tiny: dict, extra_keys: Sequence[str] = ()) -> Options:
    """Parses ``argv``; unset flags come from ``tiny`` (with --tiny), then ``defaults``."""
    ns = parser.parse_args(list(argv) if argv is not None else None)
    merged = dict(BASE_DEFAULTS, **defaults)
    if getattr(ns, "tiny", False):
        merged.update(tiny)
    values = {}
    for key in _KEYS:
        given = getattr(ns, key, None)
        values[key] = given if given is not None else merged.get(key)
    if getattr(ns, "seeds", None) is not None:
        values["seeds"] = [s for group in ns.seeds for s in group]
        if not values["seeds"]:
            raise CLIError(f"--seeds: give at least one seed (see `{parser.prog} --help`)")
    if getattr(ns, "epochs", None) is not None:
        values["steps"] = None
    if values["steps"] is None and values["epochs"] is None:
        raise CLIError(f"give --steps or --epochs (see `{parser.prog} --help`)")
    if getattr(ns, "loss_scale", None) not in (None, 1.0) and values.get("loss_scale_task") is None:
        raise CLIError("--loss-scale needs --loss-scale-task TASK (a task index or name)")
    if values.get("image_size") is not None:
        values["image_size"] = tuple(values["image_size"])
    out = (getattr(ns, "out", None) or merged.get("out")
           or (f"runs/{benchmark}" if study == "compare" else f"runs/{study}/{benchmark}"))

    def flag(name: str, default: bool = False) -> bool:  # an omitted flag keeps its default
        return bool(getattr(ns, name, default))
    return Options(benchmark=benchmark, study=study, out=out, tiny=flag("tiny"), quiet=flag("quiet"),
                   resume=flag("resume"), overwrite=flag("overwrite"), tensorboard=flag("tensorboard", True),
                   plots=flag("plots", True), extra={k: getattr(ns, k, None) for k in extra_keys},
                   **{k: values[k] for k in _KEYS})


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_main(prog: str, body: Callable[[], Any]) -> int:
    """Runs ``body()``; user-fixable errors (bad flag, missing data, unusable checkpoint, a
    file that cannot be written) become one stderr line and the exit status of
    :mod:`experiments.errors`; Ctrl-C or SIGTERM one line (what was saved, how to continue) and
    130. Returns the exit status."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if main_thread else None
    try:
        body()
    except SystemExit as e:  # argparse --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt as e:
        msg = str(e) or ("interrupted outside training (loading data, compiling or writing reports); finished "
                         "runs are kept and checkpoints are intact — rerun with --resume to continue")
        print(f"{prog}: {one_line(msg)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - a bug (failure() is None) keeps its traceback
        known = failure(e)
        if known is None:
            raise
        print(f"{prog}: error: {known[1]}", file=sys.stderr)
        return known[0]
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def command_line(prog: str, argv) -> str:
    """The command as typed (``argv`` None: this process's own arguments)."""
    import shlex
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join([prog] + [shlex.quote(a) for a in args])
