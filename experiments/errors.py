"""The errors a user can fix, each reported as one line naming the cause and the remedy, and
the runner's exit statuses (all defined here, in one place).

``ExperimentError`` is the base; ``CLIError`` (a bad flag), ``CheckpointError`` (no usable or a
mismatching checkpoint), ``StorageError`` (a file could not be written: disk full, file-size
limit, quota, permissions) and the data loaders' ``DataUnavailableError`` are what the runner
turns into one stderr line instead of a traceback (:func:`experiments.cli.run_main`, through
:func:`failure`). An ``OSError`` from a write that fails for lack of space or permission is
reported the same way. Anything else is a bug and keeps its traceback (exit status 1).

======  =====================================================================
status  meaning
======  =====================================================================
0       finished (runs that stopped after too many non-finite steps included:
        their ``result.json`` says ``"status": "diverged"``)
1       an unexpected error (a bug): Python's traceback
2       a bad flag or configuration (``CLIError``)
3       data missing: a data set, file or package (``DataUnavailableError``)
4       no usable checkpoint, or one of another configuration (``CheckpointError``)
5       a file could not be written (``StorageError``): earlier checkpoints and
        results are intact; free space / fix permissions and rerun with ``--resume``
130     interrupted (Ctrl-C or SIGTERM); the line says what can be resumed
======  =====================================================================
"""

from __future__ import annotations

import errno
from typing import Optional

from experiments.data import DataUnavailableError

__all__ = ["ExperimentError", "HarnessError", "CLIError", "CheckpointError", "DataUnavailableError",
           "StorageError", "one_line", "storage_error", "failure", "EXIT_OK", "EXIT_BUG", "EXIT_USAGE",
           "EXIT_DATA", "EXIT_CHECKPOINT", "EXIT_STORAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_STORAGE = 5
EXIT_INTERRUPTED = 130


class ExperimentError(RuntimeError):
    """An error the user can fix: one line on stderr; the exit status is its class's (table above;
    2 for this base class and :class:`CLIError`)."""


HarnessError = ExperimentError  # the name before the experiment suite was split up


class CLIError(ExperimentError):
    """A bad command-line flag."""


class CheckpointError(ExperimentError):
    """No usable checkpoint, or a checkpoint written by a different configuration."""


class StorageError(ExperimentError):
    """A file could not be written (disk full, file-size limit, quota, permissions)."""


_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file-size limit was reached",
                   errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.ENOTDIR: "a file is in the way (a folder is needed)",
                   errno.EEXIST: "a file is in the way (a folder is needed)"}
_STORAGE_TEXT = (("no space left", errno.ENOSPC), ("file too large", errno.EFBIG),
                 ("quota exceeded", errno.EDQUOT), ("read-only file system", errno.EROFS),
                 ("permission denied", errno.EACCES))


def _storage_errno(exc: BaseException) -> Optional[int]:
    """The storage errno behind ``exc`` (its cause/context chain, or the message of a
    tensorstore/orbax error that wraps it), or None."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return e.errno
        if not isinstance(e, OSError):
            text = str(e).lower()
            for needle, code in _STORAGE_TEXT:
                if needle in text:
                    return code
        e = e.__cause__ or e.__context__
    return None


def storage_error(exc: BaseException, what: str) -> Optional[StorageError]:
    """A one-line :class:`StorageError` when ``exc`` is a failed write (no space, file-size
    limit, quota, permissions, read-only), else None. ``what`` names what was being written."""
    code = _storage_errno(exc)
    if code is None:
        return None
    cause = _STORAGE_ERRNOS[code]
    if code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        remedy = "make the output folder writable or pass another --out"
    else:
        remedy = "free space (or raise the limit) and rerun with --resume"
    return StorageError(f"could not write {what}: {cause} ({errno.errorcode.get(code, code)}); "
                        f"earlier checkpoints and results are intact; {remedy}")


def failure(exc: BaseException) -> Optional[tuple[int, str]]:
    """``(exit status, one line)`` for an error the user can fix, or None for a bug."""
    if isinstance(exc, StorageError):
        return EXIT_STORAGE, one_line(exc)
    if isinstance(exc, CheckpointError):
        return EXIT_CHECKPOINT, one_line(exc)
    if isinstance(exc, DataUnavailableError):
        return EXIT_DATA, one_line(exc)
    if isinstance(exc, ExperimentError):
        return EXIT_USAGE, one_line(exc)
    if isinstance(exc, OSError):
        err = storage_error(exc, f"{exc.filename}" if getattr(exc, "filename", None) else "a file")
        if err is not None:
            return EXIT_STORAGE, one_line(err)
    return None


def one_line(text: object) -> str:
    """``text`` squeezed onto one line (newlines and runs of spaces become single spaces)."""
    return " ".join(str(text).split())
