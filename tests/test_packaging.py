"""The built wheel installs into a fresh virtual environment and works there, and
``python -m brl_triton`` reports versions and backends."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import torch, brl_triton
logits = torch.randn(2, 500, 8, requires_grad=True)
targets = torch.zeros(2, 500, 8)
targets[0, :4, 2] = torch.tensor([0.9, 0.8, 0.7, 0.6])
ranking, sorting = brl_triton.bucketed_rank_sort_loss(logits, targets, backend="torch")
(ranking + sorting).backward()
assert 0 <= float(ranking) <= 1 and logits.grad.abs().sum() > 0
classification, localisation = brl_triton.alrp_loss(logits.detach(), targets, torch.rand(4), backend="torch")
print("smoke ok", brl_triton.__file__)
"""


def test_python_m_brl_triton_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "brl_triton"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("brl_triton ") and "torch " in out
    for backend in ("torch", "reference", "triton"):
        assert f"  {backend} " in out
    assert "bucketed_alrp_loss" in out


@pytest.mark.slow
@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import build"]).returncode != 0,
                    reason="needs the 'build' package (pip install build)")
def test_wheel_installs_in_a_fresh_venv_and_passes_a_smoke_test(tmp_path):
    # --no-isolation: the build backend (setuptools) comes from this environment, no download
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next((tmp_path / "dist").glob("brl_triton-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "brl_triton/py.typed" in names and any(n.endswith("LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    # a fresh environment that sees this one's torch but not brl_triton's source. Not
    # system_site_packages: run from inside a virtual environment, that would see the base
    # interpreter's packages, not this environment's (where torch is)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    Path(site_packages, "outer_environment.pth").write_text("\n".join(_package_directories()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    result = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smoke ok" in result.stdout and str(env_dir) in result.stdout  # the wheel's copy, not the source tree


def _package_directories() -> list[str]:
    """This interpreter's package directories (where torch and its dependencies live), as plain
    path entries: a directory named in a .pth file has its own .pth files (e.g. an editable
    install of brl_triton) left unprocessed, and comes after the new environment's own packages."""
    return [entry for entry in sys.path
            if entry and Path(entry).is_dir() and Path(entry).name in ("site-packages", "dist-packages")]
