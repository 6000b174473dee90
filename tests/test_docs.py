"""The README's and the docs' commands run as written (they are the tests of what users read).

Every ```bash and ```python block of a page runs, in page order, in one fresh folder per page,
with the project's `scdca` on PATH; ```console blocks are shown, not run (long jobs, clusters,
files a user has). A page whose commands fail fails here, naming the block.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/quickstart.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "tutorials").glob("*.md")
)
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.S | re.M)


def blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / page).read_text())


def test_every_tutorial_has_something_to_run():
    runnable = {page: len(blocks(page)) for page in PAGES}
    silent = [page for page, n in runnable.items() if n == 0 and "scale" not in page]
    assert not silent, f"pages without a runnable block: {silent}"


@pytest.mark.slow  # the pages together run for about a minute; `make test` runs them
@pytest.mark.parametrize("page", PAGES)
def test_the_pages_commands_run(page, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["SCDCA_CACHE"] = str(tmp_path / "cache")
    for i, (kind, code) in enumerate(blocks(page)):
        command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{page}, block {i + 1} ({kind}) failed:\n{code}\n{done.stderr[-3000:]}"


def test_the_readmes_make_targets_exist():
    targets = set(re.findall(r"^make (\S+)", (ROOT / "README.md").read_text(), re.M))
    assert {"demo", "test"} <= targets
    for target in targets:
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"


NUMBER = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")  # a figure: two decimals or more


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_every_figure_on_a_page_comes_from_results_or_the_code(page):
    """A figure in the README or the docs is one RESULTS.md reports (where it was measured, with
    its command) or a constant of the code: a number typed into a page by hand drifts."""
    sources = (ROOT / "RESULTS.md").read_text() + "".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    stray = [
        x
        for x in NUMBER.findall((ROOT / page).read_text())
        if not re.search(rf"(?<![\w.]){re.escape(x)}(?!\d)", sources)
    ]
    assert not stray, f"{page}: figures found neither in RESULTS.md nor in src/: {stray}"
