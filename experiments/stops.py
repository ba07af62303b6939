"""Stopping a training run safely, and checking a checkpoint's label against its contents.

During training SIGINT and SIGTERM only *request* a stop (:class:`_StopRequests`); the loop of
:mod:`experiments.train` honours it between two steps, where the state, the step counter, the
history and the evaluations are consistent, saves there and raises :class:`RunInterrupted`. A
second signal stops at once without saving. On load, :func:`_check_label` refuses a checkpoint
whose optimizer and method step counters disagree with the number of updates its label implies.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import numpy as np

from experiments.checkpoints import LabelMismatch

__all__ = ["RunInterrupted"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``str()`` says what was saved and how to continue."""


class _StopRequests:
    """SIGINT/SIGTERM handling of :func:`run_experiment` (main thread only).

    While ``deferring`` (inside the training loop) the first signal only sets ``requested``;
    the loop checks it between steps. A second signal, or any signal outside the loop,
    raises KeyboardInterrupt at once (nothing half-updated is saved then). A signal that was
    ignored (SIG_IGN, e.g. SIGINT of a background job) stays ignored."""

    def __init__(self):
        self.requested: Optional[str] = None
        self.deferring = False
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if not self.deferring or self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


_COUNTER = "count"


def _counters(state) -> list:
    """(path, value) of the step counters in a run's state: optax's ``count`` in the optimizer
    state (Adam) and a method state's own ``count`` (DWA, FAMO, GradNorm, PCGrad, RLW, ...),
    each advanced once per applied update. A method's inner optimizer (FAMO's logits' Adam,
    one step behind by design) is not one of them."""
    import jax
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if names and names[-1] == _COUNTER and "opt_state" not in names[1:-1] and np.ndim(leaf) == 0:
            out.append((jax.tree_util.keystr(path), int(np.asarray(leaf))))
    return out


def _check_label(treedef, step: int, leaves: list, meta: dict) -> None:
    """Raises :class:`LabelMismatch` when the checkpoint filed as ``step`` holds a state whose
    counters disagree with it: the updates applied (finite steps of the history, which for a
    run still training covers every step up to ``step``) must equal each counter."""
    import jax
    h = meta.get("history") or {}
    finite = h.get("finite") or []
    status = meta.get("status", "ok")
    if status == "ok" and (len(h.get("step") or []) != step or (step and h["step"][-1] != step)):
        raise LabelMismatch(f"labelled step {step}, its history holds {len(h.get('step') or [])} steps")
    updates = sum(bool(x) for x in finite)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    wrong = [f"{name} = {value}" for name, value in _counters(state) if value != updates]
    if wrong:
        skipped = len(finite) - updates
        raise LabelMismatch(
            f"labelled step {step}, i.e. {updates} updates applied" + (f" ({skipped} steps skipped)" if skipped else "")
            + f", but the state holds {', '.join(wrong)}: its contents belong to another step")


def _stop_message(runs, cfg, start, done, last_saved, forced, save) -> str:
    """Saves (a requested stop with checkpoints on) and says what was kept, in one line."""
    where = runs[0].dir.parent.parent
    if forced:
        if last_saved is not None and cfg.checkpoint_every != 0:
            return (f"stopped at once by a second interrupt, without saving; the checkpoints at step {last_saved} "
                    f"under {where} are intact — rerun the same command with --resume to continue")
        return ("stopped at once (a second interrupt) before anything of these runs was saved; nothing to resume "
                "for them (finished runs are kept; --resume skips them)")
    if cfg.checkpoint_every == 0:
        return (f"interrupted at step {done}; checkpoints are off (--checkpoint-every 0), so these runs "
                "cannot be resumed (finished runs are kept; --resume skips them)")
    if done > start:
        if last_saved != done:
            save()
        return (f"interrupted at step {done}; checkpoint written under {where} — rerun the same command with "
                "--resume to continue")
    if start > 0:
        return (f"interrupted before step {start + 1}; the checkpoints at step {start} under {where} are "
                "intact — rerun the same command with --resume to continue")
    return ("interrupted before the first training step; nothing to resume for these runs (finished "
            "runs are kept; --resume skips them)")
