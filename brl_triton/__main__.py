"""``python -m brl_triton``: versions, and which backends run on this machine (and why not)."""

from __future__ import annotations

import platform
import sys


def backend_report() -> list[tuple[str, bool, str]]:
    """(backend, available, why) for every backend on this machine."""
    import torch

    from ._backends import _interpreting, _triton_installed

    rows = [("torch", True, "plain torch ops, any device"), ("reference", True, "O(P*N) float64 loops (tests)")]
    if not _triton_installed():
        rows.append(("triton", False, "the triton package is not installed (pip install brl_triton[triton])"))
    elif torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if torch.version.hip is None and capability < (7, 0):
            rows.append(("triton", False, f"GPU compute capability {capability} < 7.0"))
        else:
            rows.append(("triton", True, f"CUDA tensors on {torch.cuda.get_device_name()}"))
    elif _interpreting():
        rows.append(("triton", True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1; slow)"))
    else:
        rows.append(("triton", False, "no CUDA GPU; CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)"))
    return rows


def main() -> None:
    import torch

    import brl_triton
    from brl_triton import registry

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"brl_triton {brl_triton.__version__}, torch {torch.__version__}, triton {triton_version}, "
          f"python {platform.python_version()} ({sys.platform})")
    print("backends:")
    for name, available, why in backend_report():
        print(f"  {name:<10} {'yes' if available else 'no ':<4} {why}")
    print("losses: " + ", ".join(spec.function_name for spec in registry.LOSSES if registry.public(spec)))


if __name__ == "__main__":
    main()
