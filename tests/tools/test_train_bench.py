"""flashcompile train-bench on CPU: the tiny models train end to end under each core setup and
report every figure the GPU runs report (the GPU runs time real models, see docs/performance.md)."""

from __future__ import annotations

import math

import pytest
import torch

from flashcompile.tools import train_bench


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


def test_rounds_merge_to_medians_and_ratios_pair_rounds():
    def row(setup, ms):
        return train_bench.Row("m", setup, iteration_ms=ms, forward_ms=ms / 2, backward_ms=1,
                               clip_ms=0, step_ms=1, throughput=1e3 / ms, first_iteration_s=1,
                               peak_gib=1, resident_gib=1)
    # the host slows down in round 2: both setups feel it, the paired ratio does not
    base = train_bench.merge_rounds([row("base", 10), row("base", 20), row("base", 11)])
    flash = train_bench.merge_rounds([row("flash", 9), row("flash", 18), row("flash", 9.9)])
    assert base.iteration_ms == 11 and base.rounds_ms == [10, 20, 11]
    assert train_bench.ratio_to(flash, base) == pytest.approx(0.9)
    failed = train_bench.Row("m", "flash", error="exit 1")
    assert train_bench.merge_rounds([row("flash", 9), failed]).error == "exit 1"
