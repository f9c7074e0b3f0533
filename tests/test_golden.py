"""Every backend against the official implementation's outputs (tests/data/official_cases.pt)."""

import pytest
import torch

from conftest import assert_close, run_loss

NUM_CASES = 21

# loss name -> (golden key, logits key, targets key, delta key)
GOLDEN_KEYS = {
    "bucketed_rank_sort": ("brs", "logits", "targets", "delta_rs"),
    "rank_sort": ("rs", "logits", "targets", "delta_rs"),
    "bucketed_ap": ("bap", "logits_bin", "targets_bin", "delta_ap"),
    "interpolated_ap": ("ap_interp", "logits_bin", "targets_bin", "delta_ap"),
}


def test_golden_file_has_all_cases(golden_cases):
    assert len(golden_cases) == NUM_CASES
    assert sum("ap_interp" in case for case in golden_cases) >= 15


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(GOLDEN_KEYS))
@pytest.mark.parametrize("index", range(NUM_CASES))
def test_matches_official(golden_cases, index, name, backend):
    case = golden_cases[index]
    key, logits_key, targets_key, delta_key = GOLDEN_KEYS[name]
    if key not in case:
        pytest.skip("the official interpolated AP loss needs delta > 0; this case has delta == 0")
    losses, grad = run_loss(
        name, case[logits_key], case[targets_key], case[delta_key], backend, upstream=(1.0, 1.0)
    )
    assert grad.dtype == case[logits_key].dtype
    assert_close(torch.stack(losses), torch.tensor([float(v) for v in case[key]]), atol=1e-7, rtol=1e-5,
                 what=f"case {index} {name} losses")
    assert_close(grad, case[key + "_grad"], atol=1e-6, rtol=0, what=f"case {index} {name} grad")
