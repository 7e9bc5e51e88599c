"""``max_grad_norm=``: a global gradient-norm clip inside the step, for every shipped optimizer."""

from __future__ import annotations

import pytest
import torch
from strategies import rule_of, shapes_for
from torch import nn

import flashcompile as fc
from flashcompile.optim.optimizers import OPTIMIZERS

SHAPES = [(30, 20), (7,), (64,)]


def _params(name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes_for(rule_of(OPTIMIZERS[name]), SHAPES)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_max_grad_norm_equals_clip_grad_norm_then_step(name, flat):
    """fp32 codecs: the same clip coefficient times the same gradients, multiplied in the kernel
    instead of in ``.grad``; the coefficient's norm may sum in another order (one fp32 ulp)."""
    ours, theirs = _params(name), _params(name)
    a = OPTIMIZERS[name](ours, codecs="fp32", compile=False, flat=flat, max_grad_norm=1.0)
    b = OPTIMIZERS[name](theirs, codecs="fp32", compile=False, flat=flat)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        scale = (0.001, 5.0, 5.0)[step]  # below the bound (no clip), then above it
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad, q.grad = g.clone(), g.clone()
        unclipped = [p.grad.clone() for p in ours]
        a.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        b.step()
        torch.testing.assert_close(a.last_grad_norm, norm, rtol=1e-6, atol=0)
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, unclipped))  # .grad untouched
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_max_grad_norm_under_a_grad_scaler_clips_the_unscaled_gradients():
    """As ``scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt)``."""
    ours, theirs = _params("adamw"), _params("adamw")
    a = fc.AdamW(ours, codecs="fp32", compile=False, max_grad_norm=0.5)
    b = fc.AdamW(theirs, codecs="fp32", compile=False)
    scale = 1024.0
    for p, q in zip(ours, theirs):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        p.grad, q.grad = g * scale, g.clone()
    a.grad_scale = torch.tensor(scale)
    a.step()
    torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_under_gradient_release_each_bucket_is_clipped_to_its_share():
    """A bucket steps before the others' gradients exist: its own norm is clipped to
    max_grad_norm * sqrt(its share of the values). With one bucket that is the global clip."""
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    runs = []
    for release in (False, True):
        model = _Net()
        opt = fc.AdamW(model.parameters(), lr=0.1, codecs="fp32", compile=False, flat=True,
                       max_grad_norm=0.01)
        if release:
            fc.enable_gradient_release(model, opt)  # one bucket: 227 values, far under its cap
        model(x).square().sum().backward()
        opt.step()
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_max_grad_norm_must_be_positive():
    with pytest.raises(ValueError, match="max_grad_norm"):
        fc.AdamW([nn.Parameter(torch.zeros(3))], max_grad_norm=0.0)
