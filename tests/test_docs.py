"""The documentation is executable and builds.

* every docstring example of every module in ``imtl_jax/`` and ``imtl_jax/methods/`` runs
  (``doctest`` with ``NORMALIZE_WHITESPACE | ELLIPSIS``);
* every ```` ```python ```` block of ``docs/*.md`` runs; the blocks of one page run in order in
  one fresh namespace (like a notebook). A block preceded by ``<!-- skip -->`` is not run;
* the multi-device page also runs on 4 simulated CPU devices (a subprocess with
  ``--xla_force_host_platform_device_count=4``);
* the tutorial runs as a plain script in its tiny setting (``IMTL_TUTORIAL_TINY=1``);
* slow (``pytest -m slow``): the Sphinx site builds with warnings as errors, and the wheel
  builds, installs and imports outside the checkout.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import imtl_jax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TUTORIAL = ROOT / "tutorials" / "multimnist_tutorial.py"
DOCTEST_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
SKIP_MARKER = "<!-- skip -->"


# --------------------------------------------------------------------------------- doctests

def _library_modules() -> list[str]:
    names = ["imtl_jax"]
    names += [m.name for m in pkgutil.walk_packages(imtl_jax.__path__, prefix="imtl_jax.")]
    return sorted(names)


# The default suite runs the examples of the core modules (the solve, the step, optax, NNX, Linen,
# the exact level, MGDA) and of every module whose examples take well under a second; the other
# method files, the safety wrappers, affinity and accumulation (which train small models, 2-10 s
# each) run in CI's slow step.
_SLOW_DOCTESTS = {"imtl_jax._accumulate", "imtl_jax._safety", "imtl_jax._affinity",
                  "imtl_jax.methods.db_mtl", "imtl_jax.methods.cr_mogm", "imtl_jax.methods.dualproj",
                  "imtl_jax.methods.config", "imtl_jax.methods.gradvac", "imtl_jax.methods.rlw",
                  "imtl_jax.methods.fairgrad", "imtl_jax.methods.modo", "imtl_jax.methods.sdmgrad",
                  "imtl_jax.methods.preference", "imtl_jax.methods.excess_mtl"}


@pytest.mark.parametrize("module_name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_DOCTESTS
                                         else n for n in _library_modules()])
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS, verbose=False)
    for test in finder.find(module, module_name):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing doctest example(s) in {module_name}:\n{out.getvalue()}"


def _public_functions():
    for name in imtl_jax.__all__:
        obj = getattr(imtl_jax, name)
        if inspect.isfunction(obj):
            yield f"imtl_jax.{name}", obj
    for name in imtl_jax.methods.__dict__:
        obj = getattr(imtl_jax.methods, name)
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == "imtl_jax.methods":
            yield f"imtl_jax.methods.{name}", obj


def test_public_api_functions_have_docstrings():
    missing = [name for name, obj in _public_functions() if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public functions without a docstring: {missing}"


def test_top_level_functions_have_runnable_examples():
    no_example = [name for name, obj in _public_functions()
                  if name.count(".") == 1 and ">>>" not in (inspect.getdoc(obj) or "")]
    assert not no_example, f"public functions of imtl_jax without a docstring example: {no_example}"


# ---------------------------------------------------------------------- docs code blocks

_FENCE = re.compile(r"^(?P<fence>```+)[ \t]*(?P<lang>[^\s`{]*)[^\n]*\n(?P<code>.*?)^(?P=fence)[ \t]*$",
                    re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(first line number, code, skipped)`` of every ```python block of a Markdown page.

    A block is skipped when the last non-blank line before its opening fence is ``<!-- skip -->``.
    """
    blocks = []
    for match in _FENCE.finditer(text):
        if match["lang"].lower() not in ("python", "python3", "py"):
            continue
        before = text[:match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP_MARKER
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, match["code"], skipped))
    return blocks


#: pages cheap enough for the default suite. They run there only, not in the slow parametrization
#: below, so that a page which registers a method runs once per process.
FAST_PAGES = ("custom_method.md",)


def _doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if p.name not in FAST_PAGES) if DOCS.is_dir() else []


def run_page(path: Path) -> int:
    """Runs the page's python blocks in order in one fresh namespace; returns how many ran."""
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    ran = 0
    for line, code, skipped in python_blocks(path.read_text(encoding="utf-8")):
        if skipped:
            continue
        # Pad so that tracebacks point at the page's own line numbers.
        source = "\n" * (line - 1) + code
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102
        ran += 1
    return ran


def test_block_extraction_and_skip_marker():
    page = textwrap.dedent("""\
        text
        ```python
        a = 1
        ```
        <!-- skip -->

        ```python
        raise RuntimeError
        ```
        ```bash
        echo no
        ```
        ````python
        b = 2
        ````
        """)
    assert python_blocks(page) == [(3, "a = 1\n", False), (8, "raise RuntimeError\n", True),
                                   (14, "b = 2\n", False)]


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: p.name)
@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_docs_code_blocks_run(page, monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # anything a page writes lands in a temporary folder
    run_page(page)


@pytest.mark.parametrize("name", FAST_PAGES)
def test_fast_docs_pages_run(name, monkeypatch, tmp_path):
    # The custom-method example registers a method under its own name and trains it in mtl_step;
    # the registry is restored afterwards, so tests that read the whole registry later in the
    # same worker (e.g. test_task_mask's coverage test) see only the library's methods.
    monkeypatch.setattr(imtl_jax.methods, "_REGISTRY", dict(imtl_jax.methods._REGISTRY))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    assert run_page(DOCS / name) > 0


def test_docs_pages_have_code():
    # The pages that teach the API must keep runnable examples (a guard against a page whose
    # blocks were all marked skip, or whose fences lost their language).
    for name in ("getting_started.md", "method.md", "optax.md", "flax_nnx.md", "distributed.md", "custom_method.md"):
        blocks = [b for b in python_blocks((DOCS / name).read_text(encoding="utf-8")) if not b[2]]
        assert blocks, f"docs/{name} has no runnable python block"


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_distributed_page_runs_on_four_devices(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import jax
        assert jax.device_count() == 4, jax.devices()
        from test_docs import run_page
        from pathlib import Path
        print("ran", run_page(Path({str(DOCS / 'distributed.md')!r})), "blocks")
        """)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=_subprocess_env(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "ran" in proc.stdout


# ------------------------------------------------------------------------------- tutorial

def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.slow  # heavy end-to-end run: CI's second step
def test_tutorial_runs_tiny(tmp_path):
    missing = _missing("matplotlib", "mlxtend", "flax")
    if missing:
        pytest.skip(f"the tutorial needs {missing}: pip install -e '.[experiments]'")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(TUTORIAL)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=_subprocess_env(IMTL_TUTORIAL_TINY="1", IMTL_TUTORIAL_OUT=str(out),
                            IMTL_JAX_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    png = out / "multimnist_alpha.png"
    assert png.is_file() and png.stat().st_size > 1000, list(out.iterdir()) if out.exists() else out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "imtl_h" in proc.stdout and "equal" in proc.stdout


def test_tutorial_is_jupytext_percent_format():
    text = TUTORIAL.read_text(encoding="utf-8")
    assert "format_name: percent" in text
    assert text.count("\n# %%") >= 5
    if importlib.util.find_spec("jupytext") is None:
        pytest.skip("jupytext is not installed (pip install -e '.[docs]'); header checked only")
    import jupytext

    notebook = jupytext.reads(text, fmt="py:percent")
    kinds = {cell.cell_type for cell in notebook.cells}
    assert kinds == {"markdown", "code"}, kinds
    assert sum(cell.cell_type == "code" for cell in notebook.cells) >= 5


# ----------------------------------------------------------------------------- slow checks

@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    missing = _missing("sphinx")
    if missing:
        pytest.skip("sphinx is not installed: pip install -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=_subprocess_env())
    assert proc.returncode == 0, f"sphinx failed:\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-10000:]}"
    html = tmp_path / "html"
    for page in ("index", "getting_started", "method", "optax", "flax_nnx", "distributed", "choosing",
                 "experiments", "tutorial", "api", "changelog"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text(encoding="utf-8")
    for name in ("imtl_jax.mtl_step", "imtl_jax.imtl_g_solve", "imtl_jax.imtl_g", "imtl_jax.aggregate",
                 "imtl_jax.MTLParams", "imtl_jax.methods.get_method", "module-imtl_jax.methods.imtl",
                 "module-imtl_jax.nnx"):
        assert f'id="{name}"' in api, f"{name} missing from the API reference"


@pytest.mark.slow
def test_wheel_builds_installs_and_imports(tmp_path):
    missing = _missing("build", "setuptools")
    if missing:
        pytest.skip(f"packaging check needs {missing}: pip install build setuptools")
    dist = tmp_path / "dist"
    # No build isolation: setuptools comes from this environment, so the check runs offline.
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    wheels = list(dist.glob("imtl_jax-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    assert f"-{imtl_jax.__version__}-" in wheel.name

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "imtl_jax/__init__.py" in names and "imtl_jax/methods/imtl.py" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "experiments", "benchmarks", "docs",
                                                         "tutorials")], names
    assert any(n.endswith("LICENSE") for n in names), "LICENSE is not in the wheel"
    assert f"Version: {imtl_jax.__version__}" in metadata
    for dep in ("jax", "optax", "flax", "numpy"):
        assert re.search(rf"^Requires-Dist: {dep}\b", metadata, re.MULTILINE), dep

    # Install the wheel alone into a folder (its dependencies are this environment's) and import
    # it from there, outside the checkout: PYTHONPATH comes before site-packages and the
    # editable install of the checkout.
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    script = textwrap.dedent("""
        import jax.numpy as jnp, imtl_jax
        print(imtl_jax.__file__)
        print(imtl_jax.__version__)
        print(imtl_jax.imtl_g_weights(jnp.array([[3.0, 0.0], [0.0, 1.0]])).tolist())
        print(len(imtl_jax.methods.method_names()))
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    file_, version, alpha, count = proc.stdout.strip().splitlines()
    assert Path(file_).resolve().is_relative_to(target.resolve()), file_
    assert version == imtl_jax.__version__
    assert alpha == "[0.25, 0.75]"
    assert int(count) == len(imtl_jax.methods.method_names())
