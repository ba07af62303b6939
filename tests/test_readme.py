"""The README's Python blocks run as written, and the README's test command is what CI runs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    """The README's python blocks, except those preceded by a ``<!-- skip -->`` line
    (multi-host snippets that need a cluster)."""
    return [b for marker, b in re.findall(r"(<!-- skip -->\n)?```python\n(.*?)```", README, flags=re.S)
            if not marker]


def test_quickstart_runs_and_balances(capsys):
    blocks = python_blocks()
    quickstart = next(b for b in blocks if "mtl_step" in b)
    assert len(quickstart.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    aux = namespace["aux"]
    assert abs(float(aux.weights.sum()) - 1.0) < 1e-5
    # IMTL-L drove every scaled loss towards 1 although the raw losses differ by orders of magnitude.
    assert "alpha" in capsys.readouterr().out


def test_other_blocks_execute():
    for block in python_blocks():
        if "mtl_step" in block:
            continue
        exec(compile(block, "README block", "exec"), {})


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests:\n\n```bash\n(.*?)\n```", README, flags=re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
