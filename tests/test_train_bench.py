"""flashcompile train-bench on CPU: the tiny models train end to end under each core setup and
report every figure the GPU runs report (the GPU runs time real models, see the README)."""

from __future__ import annotations

import math

import pytest
import torch

from flashcompile import train_bench


@pytest.mark.parametrize("setup", ["torch_fused_fp32_autocast", "flash", "flash_release"])
def test_a_setup_trains_the_tiny_cnn_and_reports_its_iteration(setup):
    row = train_bench.measure("tiny_cnn", setup, "cpu", steps=2, warmup=1)
    assert not row.error and row.params > 0 and len(row.losses) == 3
    figures = [row.iteration_ms, row.forward_ms, row.backward_ms, row.step_ms, row.throughput,
               row.final_loss]
    assert all(math.isfinite(v) and v >= 0 for v in figures)
    assert (row.clip_ms > 0) == (setup != "flash_release")  # release cannot clip by global norm


def test_flash_keeps_the_channels_last_model_in_its_format():
    spec = train_bench.MODELS["tiny_cnn"]
    model = train_bench._cast(spec.build(), "flash").to(memory_format=torch.channels_last)
    opt, _ = train_bench.SETUPS["flash"].prepare(model, False)
    x, y = spec.batch(torch.Generator().manual_seed(0), torch.device("cpu"), 4)
    spec.loss(model, (x, y)).backward()
    opt.step()
    conv = model[0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
