"""Checkpoints of one run, verified byte for byte before a resume.

Orbax ``CheckpointManager``, one per run under ``<out>/runs/<method>/seed<k>/ckpt``: the state
leaves (parameters, optimizer state, method state) are saved with ``StandardSave`` and a JSON
item (``meta``) holds everything else the resumed run reads: the step, the PRNG key data, the
history, the counters (``skipped_total``, ...), the plateau state, the configuration fingerprint
(benchmark, method, seed, hence the data order), and two integrity fields:

* ``checksum``: SHA-256 over every restored leaf (dtype, shape and bytes);
* ``digest``: SHA-256 over the canonical JSON of the whole metadata (``checksum`` included,
  ``digest`` itself excluded).

After orbax has finished, ``<step>/integrity.json`` records the SHA-256 of every file of the
checkpoint; it is written last, so a save that was interrupted has none. Before orbax reads
anything, the files are checked against it (so orbax never parses a damaged file).

So every byte that affects the resumed run is covered: an edited step, key, counter or history
entry changes ``digest``; damaged array data (or array metadata that restores different values)
changes ``checksum``. The metadata's ``step`` must also equal the number of the directory it is
in, and the caller's ``check`` (:mod:`experiments.train`: the optimizer's and the method's step
counters against the label) must pass. A checkpoint that fails any of these checks, or that
orbax cannot read, is reported in one line naming it and the reason, renamed to
``<step>.corrupt`` (kept for inspection, never deleted)
and the previous good checkpoint is used; when no good one is left, :class:`CheckpointError` says
so in one line. A save that fails (disk full, file-size limit, permissions) removes its partial
directory, leaves the earlier checkpoints as they were and raises :class:`StorageError` (one line:
the cause and the remedy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from experiments.errors import CheckpointError, StorageError, one_line, storage_error

__all__ = ["RunCheckpoints", "StorageError", "storage_error", "FORMAT", "LabelMismatch"]

FORMAT = 2  # 1: leaves checksum only (before issue 14); 2: + file manifest, metadata digest, step check
MANIFEST = "integrity.json"


class LabelMismatch(ValueError):
    """A checkpoint whose contents (e.g. the optimizer's step count) disagree with its label."""


class Unfinished(ValueError):
    """A checkpoint of this format whose save did not finish (killed before its manifest)."""


def _leaves_checksum(leaves) -> str:
    h = hashlib.sha256()
    for x in leaves:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``digest`` entry."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _quiet_absl():
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # pragma: no cover
        pass


@contextlib.contextmanager
def _orbax_silenced():
    """Mutes orbax's own error logs (multi-line tracebacks from its writer threads) while we
    save or restore: the exception itself reaches us and is reported in one line, or re-raised."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _write_manifest(step_dir: Path) -> None:
    """``<step>/integrity.json``: the SHA-256 of every file orbax wrote, written last (atomically),
    so a checkpoint without it is one whose save did not finish."""
    files = {name: _file_sha256(step_dir / name) for name in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def _check_manifest(step_dir: Path) -> None:
    path = step_dir / MANIFEST
    if not path.is_file():
        try:
            fmt = json.loads((step_dir / "meta" / "metadata").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = FORMAT  # orbax's own files unfinished
        if isinstance(fmt, int) and fmt >= FORMAT:
            raise Unfinished(f"no {MANIFEST}: the save did not finish (interrupted)")
        raise ValueError(f"no {MANIFEST}: the save did not finish (interrupted or an older format)")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{MANIFEST} is damaged ({type(e).__name__})") from None
    present = _files(step_dir)
    if sorted(files) != present:
        missing = sorted(set(files) - set(present))
        extra = sorted(set(present) - set(files))
        raise ValueError(f"files differ from {MANIFEST} (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, digest in files.items():
        if _file_sha256(step_dir / name) != digest:
            raise ValueError(f"file {name} differs from its SHA-256 in {MANIFEST}")


def _is_closed_loop_noise(exc_type, exc, tb) -> bool:
    """RuntimeError('Event loop is closed') raised in asyncio's call_soon_threadsafe: a
    tensorstore read that completes after orbax gave up on a failed restore and closed its loop."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


class _OrbaxThreadErrors(logging.Filter):
    """Drops orbax's log records of an exception in one of its writer threads: the same
    exception is raised to :meth:`RunCheckpoints.save` and reported there in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


def _install_noise_filter() -> None:
    """Installs (once) the two narrow filters for orbax's asynchronous noise."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxThreadErrors) for f in logger.filters):
        logger.addFilter(_OrbaxThreadErrors())
    # Drops only _is_closed_loop_noise tracebacks (reported through sys.unraisablehook from
    # tensorstore's threads); everything else is reported as before.
    if getattr(sys.unraisablehook, "_imtl_noise_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value,
                                     unraisable.exc_traceback):
            previous(unraisable)

    hook._imtl_noise_filter = True
    sys.unraisablehook = hook


class RunCheckpoints:
    """Orbax checkpoints of one run: state leaves (``StandardSave``) + JSON metadata.

    The state pytree (params, optimizer state, method state) is saved as a flat dict of its
    leaves, ``{"00000": leaf0, ...}``: restoring needs only the leaf shapes/dtypes of a fresh
    initial state, and empty nodes (stateless methods, optax ``EmptyState``) need no handling.
    The metadata (JSON) holds the step, the PRNG key data, the history, counters, the
    configuration fingerprint, a SHA-256 over all leaves and a SHA-256 over the metadata.
    """

    def __init__(self, directory: os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp
        _quiet_absl()
        _install_noise_filter()
        self.ocp = ocp
        self.directory = Path(directory).absolute()
        self.keep = max(1, int(keep))
        self._manager = None
        self.quarantined: list = []  # the paths restore_latest renamed to *.corrupt

    def _mngr(self):
        if self._manager is None:
            opts = self.ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                     enable_async_checkpointing=False)
            self._manager = self.ocp.CheckpointManager(self.directory, options=opts,
                                                       item_names=("state", "meta"))
        return self._manager

    def steps(self) -> list[int]:
        """The steps of the finished checkpoints on disk (``<step>`` directories), ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def save(self, step: int, leaves: list, meta: dict) -> None:
        """Writes checkpoint ``step``. On a storage failure the partial directory is removed,
        older checkpoints are untouched and :class:`StorageError` is raised (one line)."""
        step = int(step)
        meta = dict(meta, step=step, num_leaves=len(leaves), checksum=_leaves_checksum(leaves),
                    format=FORMAT)
        meta["digest"] = _meta_digest(meta)
        tree = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        before = set(self._entries())
        self._remove_partial(step, before)  # a tmp directory left by a killed or failed save
        try:
            with _orbax_silenced():
                m = self._mngr()
                if step in m.all_steps():  # re-save after a fallback: replace
                    m.delete(step)
                m.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(tree),
                                                          meta=self.ocp.args.JsonSave(meta)), force=True)
                m.wait_until_finished()
            _write_manifest(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
            self.close(quiet=True)
            self._remove_partial(step, before)
            err = storage_error(e, f"checkpoint {self.directory / str(step)}")
            if err is None:
                raise
            raise err from None

    def _entries(self) -> list[str]:
        try:
            return [p.name for p in self.directory.iterdir()]
        except OSError:
            return []

    def _remove_partial(self, step: int, before: set) -> None:
        """Removes what a failed save of ``step`` left: its final directory (when new) and any
        ``<step>.orbax-checkpoint-tmp*`` (never a usable checkpoint). Retried briefly, as
        orbax's writer threads may still be finishing when the error reaches us."""
        for _ in range(5):
            names = [n for n in self._entries()
                     if (n == str(step) and n not in before) or n.startswith(f"{step}.orbax-checkpoint-tmp")]
            if not names:
                return
            for name in names:
                shutil.rmtree(self.directory / name, ignore_errors=True)
            time.sleep(0.1)

    def close(self, quiet: bool = False):
        """Closes the orbax manager (joins its threads; no 'Event loop is closed' at exit)."""
        m, self._manager = self._manager, None
        if m is not None:
            try:
                m.close()
            except Exception:  # noqa: BLE001
                if not quiet:
                    raise

    def _verify(self, step: int, leaves: list, meta) -> None:
        if not isinstance(meta, dict):
            raise ValueError("metadata missing")
        missing = [k for k in ("digest", "checksum", "step", "num_leaves") if k not in meta]
        if missing:
            raise ValueError(f"metadata incomplete (no {', '.join(missing)}; a checkpoint of an older "
                             "format cannot be verified)")
        if meta["digest"] != _meta_digest(meta):
            raise ValueError("metadata digest mismatch: the metadata was altered or damaged")
        if meta["step"] != step:
            raise ValueError(f"metadata says step {meta['step']!r} but the directory is {step}")
        if meta["num_leaves"] != len(leaves) or meta["checksum"] != _leaves_checksum(leaves):
            raise ValueError("checksum mismatch: the array data are damaged")

    def _restore_step(self, step: int, template_leaves: list):
        import jax
        _check_manifest(self.directory / str(step))  # before orbax reads a byte
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                    for i, x in enumerate(template_leaves)}
        r = self._mngr().restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract), meta=self.ocp.args.JsonRestore()))
        state, meta = r.state, r.meta
        if not isinstance(state, dict) or sorted(state) != sorted(abstract):
            raise ValueError("state leaves do not match the model")
        leaves = [np.asarray(state[f"{i:05d}"]) for i in range(len(template_leaves))]
        for a, t in zip(leaves, template_leaves):
            if a.shape != np.shape(t) or a.dtype != np.asarray(t).dtype:
                raise ValueError(f"leaf shape/dtype mismatch ({a.shape} {a.dtype} vs {np.shape(t)})")
        self._verify(step, leaves, meta)
        return leaves, meta

    def restore_latest(self, template_leaves: list, log: Callable[[str], None] = print, *,
                       at_most: Optional[int] = None, check: Optional[Callable] = None):
        """(step, leaves, meta, bad) of the newest checkpoint that restores and verifies, or None.

        A checkpoint that fails (missing/truncated/altered files, altered metadata, a step that
        differs from its directory, or ``check(step, leaves, meta)`` raising
        :class:`LabelMismatch`: contents that disagree with the step they are filed under) is
        reported in one line, renamed to ``<step>.corrupt`` (never deleted) and the next older one
        is tried; ``bad`` lists those paths. ``at_most``: only checkpoints of steps ``<= at_most``
        are considered (newer ones are left alone; None when there is no older one). None too
        when the only candidates are saves that never finished (:class:`Unfinished`): the run
        starts over, as from a previous checkpoint. Raises :class:`CheckpointError` when
        checkpoints exist but none is usable.
        """
        template_leaves = [np.asarray(x) for x in template_leaves]
        steps = self.steps()
        bad, unfinished = [], []
        for step in reversed(steps):
            if at_most is not None and step > at_most:
                continue
            path = self.directory / str(step)
            try:
                with _orbax_silenced():
                    leaves, meta = self._restore_step(step, template_leaves)
                if check is not None:
                    check(step, leaves, meta)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise assorted types
                reason = one_line(f"{type(e).__name__}: {e}" if not isinstance(e, LabelMismatch) else str(e))[:300]
                self.close(quiet=True)  # re-list the steps after the rename below
                target = self._quarantine(path)
                bad.append(str(path))
                self.quarantined.append(str(path))
                if isinstance(e, Unfinished):
                    unfinished.append(str(path))
                what = "does not match its label" if isinstance(e, LabelMismatch) else "is corrupt or partial"
                log(f"warning: checkpoint {path} {what} ({reason}); moved to {target.name}, "
                    "falling back to the previous checkpoint")
                continue
            return step, leaves, meta, bad
        if bad and len(unfinished) == len(bad):
            # only saves that never finished (a kill during the first save): the start is the
            # previous checkpoint
            log(f"warning: no finished checkpoint in {self.directory}: the run starts over")
            return None
        if any(at_most is None or s <= at_most for s in steps):
            raise CheckpointError(
                f"no usable checkpoint in {self.directory} (steps {steps} are all corrupt, kept as "
                "*.corrupt); rerun without --resume and with --overwrite to start over")
        return None

    def discard_after(self, step: int) -> list[int]:
        """Removes the checkpoints of steps ``> step`` (a run rolled back to ``step`` to rejoin its
        vmapped group recomputes them bit for bit); returns their steps."""
        self.close(quiet=True)
        gone = [s for s in self.steps() if s > step]
        for s in gone:
            shutil.rmtree(self.directory / str(s))
        for name in self._entries():
            head = name.split(".", 1)[0]
            if ".orbax-checkpoint-tmp" in name and head.isdigit() and int(head) > step:
                shutil.rmtree(self.directory / name, ignore_errors=True)
        return gone

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
