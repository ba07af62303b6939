"""Rewrite the QM9 split recorded in the fingerprints of finished runs made before the fix.

Until 2026-12-07 every QM9 run recorded ``"split": "test"`` in its fingerprint: the suite's loop
over the train/val/test parts reused the variable that held the chosen split, so ``--split
protocol`` and ``--split random`` runs had the same fingerprint (and ``--resume`` could have mixed
them in one folder). The fingerprint now records the chosen split. Without this rewrite every
finished QM9 run would look foreign to ``--resume`` and be trained again.

``python -m experiments.migrate_fingerprints --split protocol results/qm9_converged ...`` sets the
split of every QM9 fingerprint that reads ``"test"`` under the given folders to ``--split`` (the
split their command used: ``protocol`` unless it passed ``--split random``); run it once per
split. Files are rewritten atomically in the format the runs write (``result.json`` indented,
the folder summaries ``results.json`` as they were); nothing else in them changes. Checkpoints of
an unfinished run are not rewritten (their metadata is hashed): such a run resumes only with
``--overwrite`` (the error names the differing field).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from experiments.records import write_text_atomic

LEGACY_SPLIT = "test"


def _rewrite(node: Any, split: str) -> int:
    """Sets ``split`` in every QM9 fingerprint dict under ``node`` that records the legacy value;
    returns how many it changed."""
    changed = 0
    if isinstance(node, dict):
        if node.get("data") == "qm9" and node.get("split") == LEGACY_SPLIT and "n_train" in node:
            node["split"] = split
            changed += 1
        for value in node.values():
            changed += _rewrite(value, split)
    elif isinstance(node, list):
        for value in node:
            changed += _rewrite(value, split)
    return changed


def migrate(folders: list[Path], split: str) -> dict[Path, int]:
    """``{file: fingerprints changed}`` for every ``result.json``/``results.json`` under
    ``folders`` that held a legacy QM9 fingerprint."""
    done: dict[Path, int] = {}
    for folder in folders:
        for path in sorted(folder.rglob("result*.json")):
            text = path.read_text()
            if f'"split": "{LEGACY_SPLIT}"' not in text:
                continue
            data = json.loads(text)
            n = _rewrite(data, split)
            if n:
                second = text.split("\n", 2)[1] if "\n" in text else ""
                indent = (len(second) - len(second.lstrip(" "))) or None   # as the file was written
                write_text_atomic(path, json.dumps(data, indent=indent) + ("\n" if text.endswith("\n") else ""))
                done[path] = n
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="results folders to rewrite")
    ap.add_argument("--split", required=True, choices=("protocol", "random"),
                    help="the split the runs under these folders were made with")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    done = migrate(args.folders, args.split)
    print(f"{sum(done.values())} fingerprints in {len(done)} files set to split {args.split!r}")


if __name__ == "__main__":
    main()
