"""torch.optim <-> flashcompile state dicts: a run moves between them and continues."""

from __future__ import annotations

import pytest
import torch

import flashcompile as fc

PAIRS = {
    "sgd": (lambda p, **kw: fc.SGD(p, lr=0.05, momentum=0.9, compile=False, **kw),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False)),
    "adam": (lambda p, **kw: fc.Adam(p, lr=1e-2, weight_decay=0.01, compile=False, **kw),
             lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.01, foreach=False)),
    "adamw": (lambda p, **kw: fc.AdamW(p, lr=1e-2, compile=False, **kw),
              lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False)),
}
SHAPES = [(37, 5), (64,), (3,)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _run(opt, params, seeds):
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _twins():
    a, b = _params(), _params()
    return a, b


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_torch_run_continues_in_flashcompile_and_back(name):
    ours, theirs = PAIRS[name]
    a, ref = _twins()
    torch_opt, ref_opt = theirs(a), theirs(ref)
    _run(torch_opt, a, range(3))
    _run(ref_opt, ref, range(3))
    fc_opt = ours(a, codecs="fp32")
    fc_opt.load_state_dict(torch_opt.state_dict())
    _run(fc_opt, a, range(3, 6))
    _run(ref_opt, ref, range(3, 6))
    for p, q in zip(a, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    back = theirs(a)
    back.load_state_dict(fc_opt.torch_state_dict())
    _run(back, a, range(6, 9))
    _run(ref_opt, ref, range(6, 9))
    for p, q in zip(a, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_torch_states_load_into_flash_codecs_within_their_bounds(name):
    ours, theirs = PAIRS[name]
    params = _params()
    torch_opt = theirs(params)
    _run(torch_opt, params, range(3))
    opt = ours(params)
    opt.load_state_dict(torch_opt.state_dict())
    for p in params:
        for state, codec in opt.plan_for(p, opt.flags_of(opt.param_groups[0])).codecs.items():
            if state == "param":
                continue
            want = torch_opt.state[p][state]
            padded = torch.zeros(-(-want.numel() // 32) * 32)
            padded[: want.numel()] = want.reshape(-1)
            bound = codec.error_bound(padded.view(-1, 32)).reshape(-1)[: want.numel()]
            assert torch.all((opt.state_value(p, state) - want).abs().reshape(-1) <= bound), state
        # torch's SGD keeps no step: a loaded momentum buffer counts as one step taken
        assert opt.state[p]["step"].item() == (1 if name == "sgd" else 3)


def test_another_optimizers_torch_state_dict_is_rejected():
    params = _params()
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _run(sgd, params, range(2))
    opt = fc.AdamW(params, compile=False)
    with pytest.raises(ValueError, match="different optimizer"):
        opt.load_state_dict(sgd.state_dict())
