"""The accelerator benchmark (benchmarks/gpu.py) runs end to end at tiny scale on the CPU.

It prints every column it promises; nothing about speed is asserted (no timed assertions).
"""

from __future__ import annotations

import re

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_tiny_run_prints_every_table(capsys):
    assert gpu.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"mlp\s+2\s+(ew|imtl_h|exact|generic)\s+([\d.]+)\s+([\d.]+)x\s+(\d+)\s+([\d.]+)\s+(\d+)$",
                     line.strip())
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert set(rows) == {"ew", "imtl_h", "exact", "generic"}, out
    for variant, (ms, ratio, throughput, peak_mb, traces) in rows.items():
        assert float(ms) > 0 and float(ratio) > 0 and int(throughput) > 0 and float(peak_mb) > 0
        assert traces == "1", (variant, traces)  # one compilation per configuration
    assert float(rows["ew"][1]) == pytest.approx(1.0, abs=0.02)  # EW against itself in each round
    bf16 = re.findall(r"^mlp-bf\s+2\s+(ew|imtl_h)\s+[\d.]+\s+[\d.]+x\s+\d+\s+[\d.]+\s+1$", out, re.M)
    assert sorted(bf16) == ["ew", "imtl_h"], out  # the bfloat16 rows, compiled once each
    solves = re.findall(r"^(imtl_g_weights on|Gramian solve|normalized_gramian on)"
                        r".*?([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+|-)$", out, re.M)
    assert len(solves) == 6, out  # T = 2 and 3, the three solves, each with its kernel counts
    for name, _, taken, slowest, passes in solves:
        assert 0 < int(taken) <= int(slowest), (name, taken, slowest)
        assert (passes == "-") == (name == "Gramian solve") and (passes == "-" or int(passes) > 0), name
    # The kernel counts descend into loop bodies and conditional branches: the Gramian helper's
    # regular path reads the (T, D) data two or three times (row maxima, possibly |G| written
    # out first at small shapes, one matmul), its fallback is a branch.
    helper = [s for s in solves if s[0] == "normalized_gramian on"]
    assert all(int(p) <= 3 and int(k) < int(w) for _, _, k, w, p in helper), helper
    routes = re.findall(r"^T = (\d+), (lean|wide|compensated)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    assert {(t, r) for t, r, *_ in routes} == {(t, r) for t in ("2", "3")
                                               for r in ("lean", "wide", "compensated")}, out
    for t, route, taken, loop_step, slowest, module, passes in routes:
        assert 0 < int(taken) <= int(slowest) <= int(module) and int(passes) > 0, (t, route)
        assert (int(loop_step) > 0) == (route == "lean"), (t, route, loop_step)  # the while body
    assert ("TorchJD IMTLG ms" in out) or ("TorchJD: not installed" in out)
