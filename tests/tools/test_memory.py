"""The memory benchmark's accounting on a tiny model (the GPU numbers come from the same code)."""

from __future__ import annotations

import pytest
import torch

from flashcompile.tools.memory import SETUPS, measure


@pytest.mark.parametrize("setup", ["adamw_flash", "adamw_flash_release", "torch_adamw_fp32"])
def test_resident_bytes_per_param_match_the_papers_accounting_within_2_percent(setup):
    row = measure("tiny_llama", SETUPS[setup], torch.device("cpu"), batch=2, seq=16, steps=2)
    # RMSNorm weights stay fp32 (4 bytes + fp32 states): a fraction of a percent of the params
    assert abs(row.resident_bytes_per_param / row.paper_bytes_per_param - 1) < 0.02
    assert (row.split["gradients"] == 0) == SETUPS[setup].release
