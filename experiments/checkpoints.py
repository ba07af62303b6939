"""Checkpoints of one run (moved unchanged from ``experiments/harness.py``).

Orbax ``CheckpointManager``, one per run under ``<out>/runs/<method>/seed<k>/ckpt``: the state
leaves are saved with ``StandardSave`` and a JSON item holds the step, key, history and a SHA-256
of every leaf. Restoring verifies the structure and the checksum; a corrupt or partial checkpoint
is reported (one line naming it), renamed to ``<step>.corrupt`` (kept for inspection, never
deleted) and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from experiments.cli import CheckpointError, one_line

__all__ = ["RunCheckpoints"]


def _leaves_checksum(leaves) -> str:
    h = hashlib.sha256()
    for x in leaves:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _quiet_absl():
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # pragma: no cover
        pass


class RunCheckpoints:
    """Orbax checkpoints of one run: state leaves (``StandardSave``) + JSON metadata.

    The state pytree (params, optimizer state, method state) is saved as a flat dict of its
    leaves, ``{"00000": leaf0, ...}``: restoring needs only the leaf shapes/dtypes of a fresh
    initial state, and empty nodes (stateless methods, optax ``EmptyState``) need no handling.
    The metadata (JSON) holds the step, the PRNG key data, the history, counters, the
    configuration fingerprint and a SHA-256 over all leaves.
    """

    def __init__(self, directory: os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp
        _quiet_absl()
        self.ocp = ocp
        self.directory = Path(directory).absolute()
        self.keep = max(1, int(keep))
        self._manager = None

    def _mngr(self):
        if self._manager is None:
            opts = self.ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                     enable_async_checkpointing=False)
            self._manager = self.ocp.CheckpointManager(self.directory, options=opts,
                                                       item_names=("state", "meta"))
        return self._manager

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def save(self, step: int, leaves: list, meta: dict) -> None:
        meta = dict(meta, step=int(step), num_leaves=len(leaves), checksum=_leaves_checksum(leaves))
        tree = {f"{i:05d}": x for i, x in enumerate(leaves)}
        m = self._mngr()
        if step in m.all_steps():  # re-save after a fallback: replace
            m.delete(step)
        m.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(tree),
                                                  meta=self.ocp.args.JsonSave(meta)))
        m.wait_until_finished()

    def close(self):
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def _restore_step(self, step: int, template_leaves: list):
        import jax
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
                    for i, x in enumerate(template_leaves)}
        r = self._mngr().restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()))
        meta = r.meta
        if not isinstance(meta, dict) or "checksum" not in meta:
            raise ValueError("metadata missing or incomplete")
        state = r.state
        if sorted(state) != sorted(abstract):
            raise ValueError("state leaves do not match the model")
        leaves = [np.asarray(state[f"{i:05d}"]) for i in range(len(template_leaves))]
        for a, t in zip(leaves, template_leaves):
            if a.shape != np.shape(t) or a.dtype != np.asarray(t).dtype:
                raise ValueError(f"leaf shape/dtype mismatch ({a.shape} {a.dtype} vs {np.shape(t)})")
        if meta.get("num_leaves") != len(leaves) or meta["checksum"] != _leaves_checksum(leaves):
            raise ValueError("checksum mismatch: the array data are damaged")
        return leaves, meta

    def restore_latest(self, template_leaves: list, log=print):
        """(step, leaves, meta) of the newest checkpoint that restores and verifies, or None.

        A checkpoint that fails (missing/truncated/altered files) is reported in one line,
        renamed to ``<step>.corrupt`` (never deleted) and the next older one is tried. Raises
        :class:`CheckpointError` when checkpoints exist but none is usable.
        """
        steps = self.steps()
        bad = []
        for step in reversed(steps):
            path = self.directory / str(step)
            try:
                leaves, meta = self._restore_step(step, template_leaves)
            except Exception as e:  # orbax/tensorstore raise assorted types
                reason = one_line(f"{type(e).__name__}: {e}")[:240]
                self._manager = None  # re-list the steps after the rename below
                target = self._quarantine(path)
                bad.append(str(path))
                log(f"warning: checkpoint {path} is corrupt or partial ({reason}); moved to "
                    f"{target.name}, falling back to the previous checkpoint")
                continue
            return step, leaves, meta, bad
        if steps:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} (all of steps {steps} are corrupt, kept as "
                "*.corrupt); rerun without --resume and with --overwrite to start over")
        return None

    def _quarantine(self, path: Path) -> Path:
        target = path.with_name(f"{path.name}.corrupt")
        k = 1
        while target.exists():
            target = path.with_name(f"{path.name}.corrupt{k}")
            k += 1
        os.replace(path, target)
        return target


def _diff(a, b) -> str:
    if not isinstance(a, dict):
        return "no fingerprint"
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)) or "?"
