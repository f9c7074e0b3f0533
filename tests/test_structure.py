"""The package's structure: no import cycle, the registry a leaf, the public API written out as
plain functions and classes that agree with the registry, and a type checker's view of it."""

import ast
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import brl_triton
from brl_triton import functional, modules, registry

PACKAGE = Path(brl_triton.__file__).parent


def _imports_of(path: Path) -> set[str]:
    """The package modules a module imports (relative imports and ``brl_triton.x``), as dotted
    names under ``brl_triton``; TYPE_CHECKING-only imports included, function-level ones too."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("brl_triton"):
                continue
            for alias in node.names:  # "from . import x" imports the submodule x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("brl_triton")}
    return {name for name in found if name != module}


def _exists(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {name.removesuffix(".__init__") for name in _imports_of(path)}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if child == "brl_triton":  # the package's own __init__ only re-exports
                continue
            if state.get(child) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(child):] + [child]))
            if child not in state:
                visit(child)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_registry_is_a_leaf_and_triton_backend_does_not_import_torch_backend():
    graph = _graph()
    assert graph["brl_triton.registry"] == set()
    assert "brl_triton.torch_backend" not in graph["brl_triton.triton_backend"]


PUBLIC_SPECS = [spec for spec in registry.LOSSES if registry.public(spec)]


@pytest.mark.parametrize("spec", PUBLIC_SPECS, ids=lambda s: s.name)
def test_each_public_function_is_written_out_and_agrees_with_its_registry_entry(spec):
    function = getattr(brl_triton, spec.function_name)
    assert inspect.getsource(function).startswith(f"def {spec.function_name}(")
    assert spec.function_name in functional.__all__
    parameters = inspect.signature(function).parameters
    positional = ["logits", "targets"] + (["regression_losses"] if spec.regression else []) + ["delta"]
    assert [n for n, p in parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    assert parameters["delta"].default == spec.delta
    keywords = [n for n, p in parameters.items() if p.kind == p.KEYWORD_ONLY]
    assert keywords == list(registry.variants(spec)) + ["backend", "process_group", "deterministic",
                                                        "allow_targets_above_one", "validate"]
    assert all(parameters[option].default is False for option in registry.variants(spec))
    # the docstring's Args list every parameter, and its example calls the function
    doc = inspect.getdoc(function)
    args = doc.split("Args:")[1].split("Returns:")[0]
    for name in positional + list(registry.variants(spec)):
        assert f"\n{name}: " in "\n" + textwrap.dedent(args), f"{spec.function_name}: {name} not in Args"
    assert "backend, process_group, deterministic, allow_targets_above_one, validate" in args
    assert ">>> " in doc and f"{spec.function_name}(" in doc.split("Example:")[1]


@pytest.mark.parametrize("spec", PUBLIC_SPECS, ids=lambda s: s.name)
def test_each_module_is_written_out_and_agrees_with_its_registry_entry(spec):
    cls = getattr(brl_triton, spec.module)
    assert inspect.getsource(cls).startswith(f"class {spec.module}(")
    assert spec.module in modules.__all__ and cls.spec is spec
    forward = inspect.signature(cls.forward).parameters
    assert list(forward) == ["self", "logits", "targets"] + (["regression_losses"] if spec.regression else [])
    init = inspect.signature(cls.__init__).parameters
    assert init["delta"].default is None and cls().delta == spec.delta
    assert list(registry.variants(spec)) == [n for n in init if n in registry.variants(spec)]


def test_every_public_loss_of_the_registry_has_a_function_and_a_module():
    assert sorted(functional.__all__) == sorted(spec.function_name for spec in PUBLIC_SPECS)
    assert sorted(modules.__all__) == sorted(spec.module for spec in PUBLIC_SPECS)


USER_SCRIPT = '''
import torch
import brl_triton
from brl_triton.detection import convert_to_rank_based, init_box_predictor
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

logits = torch.randn(2, 100, 8, requires_grad=True)
targets = torch.zeros(2, 100, 8)
regression = torch.rand(3)
ranking, sorting = brl_triton.bucketed_rank_sort_loss(logits, targets, 0.5, backend="torch")
ranking2, sorting2 = brl_triton.rank_sort_loss(logits, targets, deterministic=True)
ap: torch.Tensor = brl_triton.ap_loss(logits, targets, interpolated=True)
bap: torch.Tensor = brl_triton.bucketed_ap_loss(logits, targets)
classification, localisation = brl_triton.alrp_loss(logits, targets, regression)
classification2, localisation2 = brl_triton.bucketed_alrp_loss(logits, targets, regression, 1.0)
modules: list[torch.nn.Module] = [brl_triton.BucketedRankSortLoss(), brl_triton.RankSortLoss(0.25),
                                  brl_triton.BucketedAPLoss(), brl_triton.APLoss(interpolated=True)]
pair: tuple[torch.Tensor, torch.Tensor] = brl_triton.ALRPLoss()(logits, targets, regression)
pair2: tuple[torch.Tensor, torch.Tensor] = brl_triton.BucketedALRPLoss()(logits, targets, regression_losses=regression)
balance = brl_triton.SelfBalancingWeight(period=10)
total = balance(classification, localisation)
weight: float = balance.weight
detector = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
predictor: torch.nn.Module = init_box_predictor(detector.roi_heads.box_predictor)
model = convert_to_rank_based(detector, "brs", box_balance="unit", box_weighting="uniform")
error: type[ValueError] = brl_triton.NonFiniteError
'''


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mypy") is None and not any(
    Path(p, "mypy").exists() for p in sys.path), reason="mypy is not installed (pip install brl_triton[dev])")
def test_mypy_sees_the_public_api_in_a_user_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental",
                             "--follow-imports=silent", str(script)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "MYPYPATH": str(PACKAGE.parent)}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
