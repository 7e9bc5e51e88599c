"""``Optimizer.clip_grad_norm_`` clips as ``torch.nn.utils.clip_grad_norm_`` does (to the fp64
norm within fp32 accumulation), reading each flat bucket's gradient buffer whole."""

from __future__ import annotations

import pytest
import torch

import flashcompile as fc
from flashcompile.optim import clipping


def _mixed_model():
    """bf16 convolutions and the fp32 BatchNorm params ``cast_model`` keeps: two gradient dtypes,
    numels that do not fill whole groups."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    return fc.cast_model(model).to(memory_format=torch.channels_last)


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=gen).bfloat16()
    (model(x).float().square().mean() * 100).backward()


@pytest.mark.parametrize("grad_views", [True, False], ids=["views", "staged"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["clips", "leaves"])
def test_clip_scales_gradients_to_the_fp64_norm_within_one_rounding(grad_views, max_norm):
    model = _mixed_model()
    opt = fc.AdamW(model.parameters(), lr=1e-3, flat=True, compile=False)
    opt.grad_views = grad_views
    for seed in range(2):  # the first clip runs before the buckets exist, the second with them
        _backward(model, seed)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
        total = opt.clip_grad_norm_(max_norm)
        n = sum(g.numel() for g in grads)
        # fp32 sums of squares over n values: relative error at most about n * 2^-24
        assert abs(float(total) - float(exact)) <= n * 2.0 ** -24 * float(exact)
        coefficient = min(1.0, max_norm / (float(exact) + 1e-6))
        for g, p in zip(grads, model.parameters()):
            expected = g.double() * coefficient
            # one rounding to the gradient's dtype, after the coefficient's own fp32 error
            relative = torch.finfo(g.dtype).eps / 2 + 2 * n * 2.0 ** -24
            assert torch.all((p.grad.double() - expected).abs()
                             <= relative * expected.abs() + torch.finfo(g.dtype).tiny)
        opt.step()
        opt.zero_grad()


def test_clip_reads_each_flat_bucket_whole():
    model = _mixed_model()
    opt = fc.AdamW(model.parameters(), lr=1e-3, flat=True, compile=False)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()  # from here on, autograd accumulates into the buckets' gradient buffers
    _backward(model, 1)
    whole, rest = clipping._flat_and_rest(opt, list(model.parameters()))
    assert len(whole) == 2 and rest == []  # one buffer per gradient dtype, nothing left over


def test_clip_raises_on_a_non_finite_norm_when_asked():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fc.AdamW([p], compile=False)
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
