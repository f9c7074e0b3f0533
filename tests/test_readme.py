"""The README's Python blocks run, in order, in one namespace, offline (no weight download)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_usage_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("bucketed_rank_sort_loss" in b for b in blocks) and any("alrp_loss" in b for b in blocks)


def test_readme_python_blocks_run():
    """In a fresh interpreter (the distributed block initialises a process group), with
    downloads made impossible: a block that fetches weights fails."""
    program = "\n".join([
        "import urllib.request",
        "def _offline(*args, **kwargs):",
        "    raise RuntimeError('the README blocks must run offline')",
        "urllib.request.urlopen = _offline",
        "import torch.hub",
        "torch.hub.download_url_to_file = _offline",
        *python_blocks(),
        "print('README blocks ran')",
    ])
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "README blocks ran" in result.stdout
