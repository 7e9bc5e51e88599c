"""Gradient release: the same training as stepping after backward, with every grad freed."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import flashcompile as fc

STEPS = 4


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 33), nn.LayerNorm(33), nn.GELU(), nn.Linear(33, 3))
    # bf16 linears (weight split), fp32 LayerNorm behind casts: two dtypes
    return fc.cast_model(model, keep_fp32=fc.NORM_LAYERS)


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 10, generator=gen).bfloat16(), torch.randint(0, 3, (8,), generator=gen)


def _loss(model, step):
    x, y = _batch(step)
    return nn.functional.cross_entropy(model(x).float(), y)


OPTIMIZERS = {
    "adamw": lambda ps, **kw: fc.AdamW(ps, lr=1e-2, **kw),
    "sgd": lambda ps, **kw: fc.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw),
    "lion": lambda ps, **kw: fc.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
}


def _train(model, opt, release: bool):
    handle = fc.enable_gradient_release(model, opt) if release else None
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(STEPS):
        _loss(model, step).backward()
        if release:
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        sched.step()
        opt.zero_grad()
    return handle


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gradient_release_is_bit_identical_to_stepping_after_backward(name, flat):
    base, released = _model(), _model()
    opt_base = OPTIMIZERS[name](base.parameters(), compile=False, flat=flat)
    opt_rel = OPTIMIZERS[name](released.parameters(), compile=False, flat=flat)
    _train(base, opt_base, release=False)
    _train(released, opt_rel, release=True)
    for p, q in zip(base.parameters(), released.parameters()):
        assert torch.equal(p, q)
        assert q.grad is None
        assert opt_base.state[p].keys() == opt_rel.state[q].keys()
        assert all(torch.equal(opt_base.state[p][k], opt_rel.state[q][k]) for k in opt_base.state[p])


def test_gradient_release_is_bit_identical_when_compiled():
    base, released = _model(), _model()
    opt_base, opt_rel = fc.AdamW(base.parameters()), fc.AdamW(released.parameters())
    _train(base, opt_base, release=False)
    _train(released, opt_rel, release=True)
    for p, q in zip(base.parameters(), released.parameters()):
        assert torch.equal(p, q)


def test_remove_restores_stepping_after_backward():
    model = _model()
    opt = fc.AdamW(model.parameters(), compile=False)
    handle = _train(model, opt, release=True)
    handle.remove()
    before = [opt.master_weight(p) for p in model.parameters()]
    _loss(model, 9).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(opt.master_weight(p), b) for p, b in zip(model.parameters(), before))
    opt.step()  # a 16-bit weight may not move in one small step; its master weight does
    assert not any(torch.equal(opt.master_weight(p), b) for p, b in zip(model.parameters(), before))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # allowed again


def _released_model():
    model = _model()
    opt = fc.AdamW(model.parameters(), compile=False)
    return model, opt, fc.enable_gradient_release(model, opt)


def test_accumulating_over_micro_batches_raises_before_any_param_moves():
    model, _opt, handle = _released_model()
    _loss(model, 0).backward()
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulated over micro-batches"):
        _loss(model, 1).backward()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after_first))
    handle.remove()


def test_closure_raises():
    model, opt, handle = _released_model()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: _loss(model, 0))
    handle.remove()


def test_global_norm_clipping_raises():
    model, _opt, handle = _released_model()
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="global norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    handle.remove()


def test_clipping_through_a_reference_imported_before_the_release_raises():
    from torch.nn.utils import clip_grad_value_

    from flashcompile.optim.release import (
        _original_clip as clip_grad_norm_,  # as bound before any release
    )

    assert clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"  # torch's own, not a wrapper
    model, _opt, handle = _released_model()
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="global norm"):
        clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="register_hook"):
        clip_grad_value_(model.parameters(), 1.0)
    handle.remove()


def test_ddp_is_refused_with_a_pointer_to_fsdp2():
    model = _model()
    opt = fc.AdamW(model.parameters(), compile=False)
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    with pytest.raises(TypeError, match="FSDP2"):
        fc.enable_gradient_release(ddp, opt)


def test_torch_optimizers_are_refused():
    model = _model()
    with pytest.raises(TypeError, match="flashcompile optimizer"):
        fc.enable_gradient_release(model, torch.optim.AdamW(model.parameters()))


def test_release_frees_the_flat_gradient_buffer():
    model = _model()
    opt = fc.AdamW(model.parameters(), compile=False, flat=True)
    _loss(model, 0).backward()
    opt.step()  # builds the flat buckets: grads are views into one buffer
    assert opt._buckets
    handle = fc.enable_gradient_release(model, opt)
    assert not opt._buckets and all(p.grad is None for p in model.parameters())
    handle.remove()


class _Tied(nn.Module):
    """Gradients arrive out of registration order: a tied embedding/head, and a param unused in
    the forward (no gradient, never stepped)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.mid = nn.Linear(24, 24)
        self.norm = nn.LayerNorm(24)
        self.unused = nn.Parameter(torch.ones(5))

    def forward(self, x):
        h = self.norm(torch.relu(self.mid(self.embed(x))))
        return h @ self.embed.weight.t()


def _tied_run(release: bool, bucket_mb: float, steps: int = 3):
    torch.manual_seed(0)
    model = fc.cast_model(_Tied())
    opt = fc.AdamW(model.parameters(), lr=1e-2, compile=False, flat=True)
    handle = fc.enable_gradient_release(model, opt, bucket_mb=bucket_mb) if release else None
    launches = 0
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, 40, (6, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        with mock.patch.object(fc.optim.optimizer.Optimizer, "step_param",
                               autospec=True, side_effect=fc.optim.optimizer.Optimizer.step_param) as one:
            loss.backward()
            if step:  # the first backward shows the order gradients come in and which never do
                launches += one.call_count
        opt.step()
        opt.zero_grad()
    return model, opt, handle, launches


@pytest.mark.parametrize("bucket_mb", [2e-4, 25.0], ids=["small_buckets", "one_bucket"])
def test_bucketed_release_is_bit_identical_to_stepping_after_backward(bucket_mb):
    base, opt_base, _, _ = _tied_run(False, bucket_mb)
    released, opt_rel, handle, singles = _tied_run(True, bucket_mb)
    for p, q in zip(base.parameters(), released.parameters()):
        assert torch.equal(p, q) and q.grad is None
        assert all(torch.equal(opt_base.state[p][k], opt_rel.state[q][k]) for k in opt_base.state[p])
    # no gradient: never stepped, as without release (its state is allocated up front, packed)
    assert opt_rel.state[released.unused]["step"] == 0
    assert singles == 0  # every stepped param stepped with its bucket, in one launch
    buckets = handle._buckets.buckets
    assert (len(buckets) > 2) == (bucket_mb < 1) and all(not b[1].keep_grads for b in buckets)


def test_release_buckets_follow_the_order_gradients_arrived():
    model, opt, handle, _ = _tied_run(True, 2e-4, steps=1)
    order = [p for entry in handle._buckets.buckets for p in entry[1].params]
    # the tied embedding is registered first but its gradient is complete last
    assert order[-2] is model.embed.weight and order[-1] is model.unused
    assert order[0] is model.norm.bias or order[0] is model.norm.weight


def test_a_state_dict_loaded_under_release_is_the_state_the_buckets_step():
    model, opt, handle, _ = _tied_run(True, 2e-4, steps=2)
    saved = opt.state_dict()
    ref_model, ref_opt, _, _ = _tied_run(True, 2e-4, steps=3)
    opt.load_state_dict(saved)  # the same state: the next step must continue from it
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 40, (6, 5), generator=gen)
    nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.flatten()).backward()
    opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(opt.state_value(p, "exp_avg"), ref_opt.state_value(q, "exp_avg"))
               for p, q in zip(model.parameters(), ref_model.parameters()) if opt.state[p]["step"])
