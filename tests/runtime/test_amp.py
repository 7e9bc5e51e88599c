"""GradScaler's protocol for fused optimizers: a found inf skips the step and its count, and the
gradients are unscaled in fp32 inside the kernel, so fp16 parameters train under a GradScaler."""

from __future__ import annotations

import pytest
import torch
from test_contract import assert_same_state_dict, make, set_grads, trained

import flashcompile as fc
from flashcompile.optim.optimizers import OPTIMIZERS


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_found_inf_skips_the_step_and_its_count(name, flat):
    opt, params = trained(name, flat=flat)
    before, weights = opt.state_dict(), [p.detach().clone() for p in params]
    set_grads(params, 5)
    opt.grad_scale = torch.tensor(8.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert_same_state_dict(opt.state_dict(), before)


def test_grad_scale_unscales_in_fp32_where_fp16_would_flush_the_gradient():
    scale = 2.0**16
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.float16))
    opt = fc.SGD([p], lr=1.0, codecs="fp32", compile=False)  # fp16 weight + fp32 master
    true_grad = torch.linspace(1e-9, 1e-6, 64)  # below fp16's normal range once unscaled
    p.grad = (true_grad * scale).half()
    unscaled = p.grad.float() / scale
    assert not torch.equal((p.grad / scale).float(), unscaled)  # fp16 storage would round these
    opt.grad_scale = torch.tensor(scale)
    opt.step()
    assert torch.equal(opt.master_weight(p), 1.0 - unscaled)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _loss(model, x, y):
    return ((model(x).float() - y) ** 2).mean()


@pytest.mark.parametrize("flat", [False, True])
def test_gradscaler_trains_fp16_params_as_unscaled_gradients_would(flat):
    """A power-of-two loss scale scales every fp16 gradient exactly, and the kernel unscales it
    exactly: the run equals one on unscaled gradients. An overflowing step is skipped."""
    models = [fc.cast_model(Net(), torch.float16) for _ in range(2)]
    opts = [fc.AdamW(m.parameters(), lr=1e-2, compile=False, flat=flat) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 16, generator=gen).half()
        y = torch.randn(8, 1, generator=gen)
        if step == 2:  # an inf in the forward: the scaler skips this step and halves its scale
            x[0, 0] = float("inf")
        for m, opt in zip(models, opts):
            opt.zero_grad()
        scaler.scale(_loss(models[0], x, y)).backward()
        scaler.step(opts[0])
        scaler.update()
        if step != 2:
            _loss(models[1], x, y).backward()
            opts[1].step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), step
    assert scaler.get_scale() == 2.0**9
    assert all(float(opts[0].state[p]["step"]) == 3 for p in models[0].parameters())


def test_gradscaler_with_gradient_release_raises():
    model = fc.cast_model(Net(), torch.float16)
    opt = fc.AdamW(model.parameters(), compile=False)
    fc.enable_gradient_release(model, opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, torch.randn(4, 16).half(), torch.randn(4, 1))).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_a_copy_and_a_reload_keep_working_after_scaled_steps():
    opt, params = trained("adamw", flat=True)
    opt.grad_scale = torch.tensor(4.0)
    set_grads(params, 3)
    opt.step()
    del opt.grad_scale
    twin = make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in params], flat=True)
    twin.load_state_dict(opt.state_dict())
    set_grads(params, 4)
    set_grads([p for g in twin.param_groups for p in g["params"]], 4)
    opt.step()
    twin.step()
    assert_same_state_dict(opt.state_dict(), twin.state_dict())
