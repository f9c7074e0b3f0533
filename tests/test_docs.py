"""The documentation runs: every page's Python blocks run, in order, in one fresh interpreter per
page, offline (no weight download); and every relative link points to a file that exists."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves these out

REPOSITORY = Path(__file__).resolve().parent.parent
README = REPOSITORY / "README.md"


def documentation_pages() -> list[Path]:
    """README.md, CHANGELOG.md, every page under docs/, and every README.md under examples/ and
    benchmarks/: a new page there is tested without being listed here. Generated tables
    (benchmarks/figures/, examples/study/summary.md) are not pages."""
    pages = {README, REPOSITORY / "CHANGELOG.md", *(REPOSITORY / "docs").rglob("*.md")}
    for folder in ("examples", "benchmarks"):
        pages.update((REPOSITORY / folder).rglob("README.md"))
    return sorted(page for page in pages if page.is_file())


PAGES = documentation_pages()


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _name(page: Path) -> str:
    return str(page.relative_to(REPOSITORY))


def test_the_pages_are_found():
    names = {_name(page) for page in PAGES}
    assert {"README.md", "CHANGELOG.md", "docs/losses.md", "docs/design.md", "docs/detection.md",
            "docs/detection_detr.md", "examples/README.md", "examples/study/README.md",
            "benchmarks/README.md"} <= names


def test_readme_has_the_usage_blocks():
    blocks = python_blocks(README)
    assert len(blocks) >= 3
    for call in ("bucketed_rank_sort_loss", "alrp_loss", "convert_to_rank_based"):
        assert any(call in block for block in blocks), call


def test_readme_test_command_is_the_one_ci_runs():
    """.ci/run takes the first line that matches this pattern, comment stripped, and runs it."""
    lines = [line for line in README.read_text().splitlines() if re.match(r"^pip install .* && python -m pytest", line)]
    assert lines, "README.md has no 'pip install ... && python -m pytest' line"
    options = re.sub(r" *#.*$", "", lines[0]).split("python -m pytest", 1)[1].split()
    # the whole suite: no marker or keyword selection, no test paths
    assert not {"-m", "-k"} & set(options) and all(option.startswith("-") or option == "auto" for option in options)


@pytest.mark.parametrize("page", [page for page in PAGES if python_blocks(page)], ids=_name)
def test_python_blocks_of_the_page_run(page):
    """In a fresh interpreter (a block may initialise a process group), with downloads made
    impossible: a block that fetches weights fails."""
    program = "\n".join([
        "import urllib.request",
        "def _offline(*args, **kwargs):",
        f"    raise RuntimeError('the Python blocks of {_name(page)} must run offline')",
        "urllib.request.urlopen = _offline",
        "import torch.hub",
        "torch.hub.download_url_to_file = _offline",
        *python_blocks(page),
        "print('the blocks ran')",
    ])
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600,
                            env=environment, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the blocks ran" in result.stdout


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_point_to_files_that_exist(page):
    """Markdown links and images that are not URLs, resolved against the page's folder (an
    #anchor is dropped)."""
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{_name(page)}: links to missing files: {missing}"
