"""The documentation: the site builds with `mkdocs build --strict`, and every ```python and ```bash
block of the README and of docs/ runs (each page's blocks in order, in one fresh process, in an empty
folder). Blocks fenced as ```py or without a language are shown, not run: installing, cloning,
mpiexec, TensorBoard, long experiments."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = [p for p in PAGES if "```python\n" in p.read_text()]
SHELL = [p for p in PAGES if "```bash\n" in p.read_text()]


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "site" / "batchnorm" / "index.html").exists()
    assert "bnnet.layers.BatchNorm" in (tmp_path / "site" / "api" / "index.html").read_text()


def test_every_page_has_what_the_readme_links_to():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)]+)\)", readme):
        assert (ROOT / link).exists(), link
    assert len(readme.encode()) <= 10_000


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_every_python_block_runs(page, tmp_path):
    code = "\n\n".join(python_blocks(page.read_text()))
    assert code.strip()
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert res.returncode == 0, f"{page.name}:\n{res.stderr[-3000:]}"


def test_measured_numbers_are_what_the_results_files_say():
    """Every generated block of the README and docs/ equals what benchmarks/readme.py renders from
    the committed results files (run it after a new measurement)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "benchmarks" / "readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    pages = readme.rendered_pages(str(ROOT / "README.md"), str(ROOT / "benchmarks" / "results" / "latest.json"))
    stale = [Path(p).name for p, text in pages.items() if Path(p).read_text() != text]
    assert not stale, f"run python benchmarks/readme.py: these pages differ from the results files: {stale}"


@pytest.mark.parametrize("page", SHELL, ids=[p.name for p in SHELL])
def test_every_bash_block_runs(page, tmp_path):
    """With this environment's bnnet command first on PATH."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", page.read_text(), flags=re.S | re.M)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for block in blocks:
        res = subprocess.run(
            ["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
        )
        assert res.returncode == 0, f"{page.name}:\n{block}\n{res.stderr[-3000:]}"
