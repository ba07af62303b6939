"""experiments/checkpoints.py (issue 14): every byte that affects a resumed run is verified.

The oracle for every damage below is the pair of states that were saved: a restore must give
back the newest state bit for bit, or fall back (one warning line naming the checkpoint) to the
previous state bit for bit, never anything else. Process-level faults (SIGKILL, a full disk
through a file-size limit, the real CLI) are in ``test_faults.py`` (slow).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sys

import numpy as np
import pytest

from experiments import checkpoints as C
from experiments.checkpoints import MANIFEST, RunCheckpoints, StorageError, storage_error
from experiments.cli import CheckpointError

RNG = np.random.default_rng(0)
STATES = {s: [RNG.standard_normal(300).astype(np.float32), RNG.standard_normal((4, 5)).astype(np.float64),
              np.array(s, np.int32), np.array(s % 2 == 0)] for s in (10, 20)}
METAS = {s: {"key": [0, s], "skipped_total": s // 10, "consecutive_skipped": 0,
             "history": {"loss": [[0.5, 0.25 * s]], "step": [s]}, "fingerprint": {"seed": 0}} for s in (10, 20)}
TEMPLATE = [np.zeros_like(x) for x in STATES[10]]


def bits(leaves):
    return [(np.asarray(x).dtype.str, np.shape(x), np.asarray(x).tobytes()) for x in leaves]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint folder with steps 10 and 20, written once; tests copy it."""
    d = tmp_path_factory.mktemp("ck") / "ckpt"
    ck = RunCheckpoints(d, keep=2)
    for s in (10, 20):
        ck.save(s, STATES[s], METAS[s])
    ck.close()
    return d


@pytest.fixture
def ckdir(pristine, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(pristine, d)
    return d


def restore(d):
    logs = []
    ck = RunCheckpoints(d)
    try:
        got = ck.restore_latest(TEMPLATE, log=logs.append)
    finally:
        ck.close()
    return got, logs


def assert_fell_back(d, got, logs, reason=None):
    step, leaves, meta, bad = got
    assert step == 10 and bits(leaves) == bits(STATES[10])
    assert {k: meta[k] for k in METAS[10]} == METAS[10] and meta["step"] == 10
    assert bad == [str(d / "20")]
    assert len(logs) == 1 and "\n" not in logs[0] and str(d / "20") in logs[0], logs
    assert "falling back to the previous checkpoint" in logs[0]
    if reason:
        assert reason in logs[0], logs[0]
    assert (d / "20.corrupt").is_dir() and not (d / "20").exists()  # kept, not deleted


def test_roundtrip_is_bitwise_and_keeps_the_metadata(ckdir):
    (step, leaves, meta, bad), logs = restore(ckdir)
    assert step == 20 and bits(leaves) == bits(STATES[20]) and bad == [] and logs == []
    assert {k: meta[k] for k in METAS[20]} == METAS[20]
    assert meta["step"] == 20 and meta["format"] == C.FORMAT and meta["num_leaves"] == 4
    files = json.loads((ckdir / "20" / MANIFEST).read_text())["files"]
    assert "meta/metadata" in files and any(f.startswith("state/") for f in files)


def _files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())


def test_every_file_of_the_newest_checkpoint_is_covered(pristine, tmp_path):
    """Flip one byte of, truncate, or delete any file of checkpoint 20 (orbax's arrays and
    metadata, our JSON, the manifest): the restore falls back to 10, bit for bit."""
    names = _files(pristine / "20")
    assert len(names) >= 8
    for k, name in enumerate(names):
        for damage in ("flip", "truncate", "delete"):
            d = tmp_path / f"{k}-{damage}"
            shutil.copytree(pristine, d)
            f = d / "20" / name
            data = bytearray(f.read_bytes())
            if damage == "flip":
                if not data:
                    continue
                data[len(data) // 2] ^= 0x01
                f.write_bytes(bytes(data))
            elif damage == "truncate":
                f.write_bytes(bytes(data[: len(data) // 2]))
            else:
                f.unlink()
            got, logs = restore(d)
            assert_fell_back(d, got, logs)


@pytest.mark.parametrize("field,value", [("step", 21), ("step", 10), ("skipped_total", 7),
                                         ("key", [0, 21]), ("history", {"loss": [[0.5, 5.5]], "step": [20]}),
                                         ("checksum", "0" * 64)])
def test_edited_metadata_is_caught_even_with_a_regenerated_manifest(ckdir, field, value):
    """The issue's probe: "step": 20 -> 21 resumed silently. Edit the metadata and rewrite the
    file manifest to match, so only the metadata digest can tell."""
    p = ckdir / "20" / "meta" / "metadata"
    meta = json.loads(p.read_text())
    meta[field] = value
    p.write_text(json.dumps(meta))
    C._write_manifest(ckdir / "20")
    got, logs = restore(ckdir)
    assert_fell_back(ckdir, got, logs, reason="metadata digest mismatch")


def test_step_is_cross_checked_against_its_directory(ckdir):
    os.rename(ckdir / "20", ckdir / "25")
    got, logs = restore(ckdir)
    step, leaves, _, bad = got
    assert step == 10 and bits(leaves) == bits(STATES[10]) and bad == [str(ckdir / "25")]
    assert "metadata says step 20 but the directory is 25" in logs[0]


def test_interrupted_save_without_manifest_is_not_used(ckdir):
    (ckdir / "20" / MANIFEST).unlink()
    got, logs = restore(ckdir)
    assert_fell_back(ckdir, got, logs, reason="the save did not finish")


def test_unexpected_file_is_caught(ckdir):
    (ckdir / "20" / "state" / "extra").write_bytes(b"x")
    got, logs = restore(ckdir)
    assert_fell_back(ckdir, got, logs, reason="unexpected ['state/extra']")


def test_two_corrupt_checkpoints_give_one_clean_error(ckdir):
    for s in (10, 20):
        (ckdir / str(s) / "meta" / "metadata").write_text("{}")
    logs = []
    with pytest.raises(CheckpointError) as info:
        RunCheckpoints(ckdir).restore_latest(TEMPLATE, log=logs.append)
    msg = str(info.value)
    assert "\n" not in msg and f"no usable checkpoint in {ckdir}" in msg and "--overwrite" in msg
    assert len(logs) == 2 and sorted(p.name for p in ckdir.iterdir()) == ["10.corrupt", "20.corrupt"]


def test_resave_after_fallback_and_keep(ckdir):
    (ckdir / "20" / MANIFEST).unlink()
    got, _ = restore(ckdir)
    assert got[0] == 10
    ck = RunCheckpoints(ckdir, keep=2)
    ck.save(20, STATES[20], METAS[20])
    ck.save(30, STATES[10], METAS[10])
    ck.close()
    assert RunCheckpoints(ckdir).steps() == [20, 30]
    (step, leaves, meta, _), logs = restore(ckdir)
    assert step == 30 and bits(leaves) == bits(STATES[10]) and meta["step"] == 30 and logs == []


# --- A failing save: one line, partial output removed, earlier checkpoints intact ------------

@pytest.mark.parametrize("where", ["orbax", "manifest"])
def test_disk_full_during_save(ckdir, monkeypatch, where):
    before = {p: p.read_bytes() for p in (ckdir / "10").rglob("*") if p.is_file()}
    ck = RunCheckpoints(ckdir, keep=3)
    if where == "orbax":
        def failing_save(self_, step, *a, **k):
            (ckdir / f"{step}.orbax-checkpoint-tmp-7").mkdir()  # what orbax leaves behind
            raise ValueError("OUT_OF_RANGE: Error writing ... Failed to write 3497026 bytes to file 13: "
                             "No space left on device [os_error_code='28']")
        monkeypatch.setattr(type(ck._mngr()), "save", failing_save)
    else:
        def failing_manifest(step_dir):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(C, "_write_manifest", failing_manifest)
    with pytest.raises(StorageError) as info:
        ck.save(30, STATES[20], METAS[20])
    msg = str(info.value)
    assert "\n" not in msg and str(ckdir / "30") in msg and "the disk is full (ENOSPC)" in msg
    assert "--resume" in msg and info.value.__cause__ is None
    assert sorted(p.name for p in ckdir.iterdir()) == ["10", "20"]
    assert {p: p.read_bytes() for p in (ckdir / "10").rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    (step, leaves, _, _), logs = restore(ckdir)
    assert step == 20 and bits(leaves) == bits(STATES[20]) and logs == []


def test_unrelated_save_errors_are_not_disguised(ckdir, monkeypatch):
    ck = RunCheckpoints(ckdir, keep=3)

    def broken(self_, *a, **k):
        raise TypeError("a bug")
    monkeypatch.setattr(type(ck._mngr()), "save", broken)
    with pytest.raises(TypeError, match="a bug"):
        ck.save(30, STATES[20], METAS[20])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=r"permission denied.*make the output folder writable"):
            RunCheckpoints(d / "ckpt").save(1, STATES[10], METAS[10])
    finally:
        d.chmod(0o700)


def test_storage_error_classification():
    e = storage_error(OSError(errno.EFBIG, "File too large"), "x")
    assert isinstance(e, StorageError) and "file-size limit" in str(e) and "(EFBIG)" in str(e)
    wrapped = RuntimeError("orbax failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied")
    assert "make the output folder writable" in str(storage_error(wrapped, "y"))
    assert "read-only" in str(storage_error(ValueError("... Read-only file system ..."), "z"))
    assert storage_error(ValueError("DATA_LOSS: checksum"), "w") is None
    assert storage_error(OSError(errno.ENOENT, "missing"), "w") is None


# --- orbax's "Event loop is closed" noise ---------------------------------------------------

def _closed_loop_error():
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as e:
        return e
    raise AssertionError("no error")


def test_only_the_closed_loop_noise_is_filtered(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    C._install_noise_filter()
    C._install_noise_filter()  # idempotent
    noise = _closed_loop_error()
    other = RuntimeError("Event loop is closed")  # same text, raised elsewhere
    for exc in (noise, other, ValueError("x")):
        sys.unraisablehook(type("U", (), {"exc_type": type(exc), "exc_value": exc,
                                          "exc_traceback": exc.__traceback__})())
    assert len(seen) == 2 and seen[0] is other and isinstance(seen[1], ValueError)


def test_failure_gives_one_line_and_a_status_per_cause():
    from experiments import errors as E
    cases = [(E.CLIError("bad\nflag"), E.EXIT_USAGE), (E.DataUnavailableError("no data"), E.EXIT_DATA),
             (CheckpointError("none usable"), E.EXIT_CHECKPOINT), (StorageError("full"), E.EXIT_STORAGE),
             (OSError(errno.ENOSPC, "No space left on device", "/o/result.json"), E.EXIT_STORAGE),
             (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/o/file/runs"), E.EXIT_STORAGE)]
    for exc, status in cases:
        got = E.failure(exc)
        assert got is not None and got[0] == status and "\n" not in got[1], exc
    assert "could not write /o/result.json: the disk is full (ENOSPC)" in E.failure(cases[4][0])[1]
    assert "pass another --out" in E.failure(cases[5][0])[1]
    assert len({E.EXIT_OK, E.EXIT_BUG, E.EXIT_USAGE, E.EXIT_DATA, E.EXIT_CHECKPOINT, E.EXIT_STORAGE,
                E.EXIT_INTERRUPTED}) == 7
    for bug in (KeyError("x"), OSError(errno.ENOENT, "missing"), ValueError("shape mismatch")):
        assert E.failure(bug) is None  # a bug keeps its traceback
