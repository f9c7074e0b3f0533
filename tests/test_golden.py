"""Every backend against the official implementation's outputs (tests/data/official_cases.pt)."""

import pytest
import torch

from conftest import GOLDEN, GOLDEN_KEYS, assert_close, run_loss, triton_case_marks

NUM_CASES = 21
LARGE = (5, 12, 19)  # N = 50,000: minutes in the Triton interpreter, so on a GPU only
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [pytest.param(index, backend, id=f"{index}-{backend}") for backend in ("torch", "reference")
         for index in range(NUM_CASES)]
SIZES = [case["logits"].numel() for case in torch.load(GOLDEN, weights_only=False)["cases"]]
CASES += [pytest.param(index, "triton", id=f"{index}-triton", marks=triton_case_marks(SIZES[index]))
          for index in range(NUM_CASES) if DEVICE == "cuda" or index not in LARGE]


def test_golden_file_has_all_cases(golden_cases):
    assert len(golden_cases) == NUM_CASES
    assert sum("ap_interp" in case for case in golden_cases) >= 15


@pytest.mark.parametrize("name", list(GOLDEN_KEYS))
@pytest.mark.parametrize("index,backend", CASES)
def test_matches_official(golden_cases, index, name, backend):
    case = golden_cases[index]
    key, logits_key, targets_key, delta_key = GOLDEN_KEYS[name]
    if key not in case:
        pytest.skip("the official interpolated AP loss needs delta > 0; this case has delta == 0")
    device = DEVICE if backend == "triton" else "cpu"
    losses, grad = run_loss(name, case[logits_key].to(device), case[targets_key].to(device), case[delta_key], backend,
                            upstream=(1.0, 1.0))
    assert grad.dtype == case[logits_key].dtype
    assert_close(torch.stack([v.cpu() for v in losses]), torch.tensor([float(v) for v in case[key]]), atol=1e-7,
                 rtol=1e-5, what=f"case {index} {name} losses")
    assert_close(grad.cpu(), case[key + "_grad"], atol=1e-6, rtol=0, what=f"case {index} {name} grad")
