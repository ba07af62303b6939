"""Kill/resume soak through the real entry point (issue 26; CI's slow step).

``experiments.soak`` on the generated QM9 fixture: FAMO and IMTL-H with seeds 0 1 2 as one
vmapped group, MGDA with seeds 0 1 one at a time; 16 steps, checkpoints every 4. Each job is
stopped by faults drawn at random (SIGKILL and SIGTERM at random times, SIGKILL between the
per-seed saves of a group, inside orbax's save and before a checkpoint's manifest, SIGTERM
inside a save and right after a train step, SIGKILL while fetching a batch), resumed after
each with ``--resume``, and finally compared with its uninterrupted run: every result record,
history and checkpoint bit for bit. ``python -m experiments.soak`` runs longer soaks.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

KILLS = 14


def test_soak_resumes_bit_identical(tmp_path, monkeypatch):
    from experiments import soak
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    lines = []
    reports = soak.soak(tmp_path, kills=KILLS, seed=0, tiny=True, steps=16, checkpoint_every=4, eval_every=4,
                        log=lines.append)
    for r in reports:
        assert r["failures"] == [] and r["differences"] == [], r
    landed = [f for r in reports for f in r["landed"]]
    assert len(landed) >= 10, lines
    kinds = {f["kind"] for f in landed}
    # kills between the per-seed saves of a vmapped group and inside a save, SIGTERMs too
    grouped = {f["kind"] for r in reports if r["job"] != "mgda" for f in r["landed"]}
    assert {"kill_between_seed_saves", "kill_inside_save"} <= grouped, lines
    assert any(f["rc"] in (130, -15) for f in landed) and any(f["rc"] == -9 for f in landed), lines
    assert len(kinds) >= 5, lines
    print(f"soak: {len(landed)} faults, {sum(r['resumes'] for r in reports)} resumes, kinds {sorted(kinds)}")
