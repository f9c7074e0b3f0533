"""Every example in the public API's docstrings runs as written (doctest)."""

import doctest

import pytest
import torch

import brl_triton

PUBLIC = {name: getattr(brl_triton, name) for name in brl_triton.__all__}
try:
    from brl_triton import detection
except ImportError:  # torchvision missing: the detection examples are skipped
    detection = None
else:
    PUBLIC["detection.convert_to_rank_based"] = detection.convert_to_rank_based
    PUBLIC["detection.init_box_predictor"] = detection.init_box_predictor


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_example_runs(name):
    obj = PUBLIC[name]
    namespace = {"torch": torch, **vars(brl_triton), **(vars(detection) if detection else {})}
    # module=False: the examples run in one namespace of the package's names, not their modules' globals
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, module=False, globs=namespace)
    examples = [t for t in tests if t.examples]
    assert examples, f"{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} of its docstring examples failed (output above)"
