"""The torch.optim contract: skipped params, closures, hooks, groups, checkpoints, clear errors."""

from __future__ import annotations

import io

import pytest
import torch

import flashcompile as fc
from flashcompile.plan import PARAM


def _params(*shapes, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_params_without_grad_are_skipped():
    a, b = _params(5, 7)
    opt = fc.AdamW([a, b], compile=False)
    before = b.detach().clone()
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(b, before) and not opt.state.get(b)
    assert not torch.equal(a.detach(), _params(5, 7)[0].detach())


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    (p,) = _params(10, dtype=torch.float32)
    opt = fc.SGD([p], lr=0.1, compile=False)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and p.grad is not None


def test_step_hooks_run():
    (p,) = _params(3)
    opt = fc.Lion([p], compile=False)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]


def test_param_groups_keep_their_own_hyperparameters():
    a, b = _params(33, 33, dtype=torch.float32)
    ra, rb = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ours = fc.Adam([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=1e-3, codecs="fp32", compile=False)
    ref = torch.optim.Adam([{"params": [ra], "lr": 0.1}, {"params": [rb]}], lr=1e-3, foreach=False)
    for seed in range(3):
        _grads([a, b], seed)
        _grads([ra, rb], seed)
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-5, atol=1e-6)


def test_a_group_may_mix_dtypes():
    params = _params(40, dtype=torch.float32) + _params(40, dtype=torch.bfloat16)
    opt = fc.AdamW(params, compile=False)
    _grads(params, 0)
    opt.step()
    assert "param.residual" in opt.state[params[1]] and "param.residual" not in opt.state[params[0]]


def test_states_a_rule_never_uses_get_no_storage():
    (p,) = _params(64)
    opt = fc.Adam([p], compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    # no max_exp_avg_sq without amsgrad; bound_sq is the step guard's one number per param
    assert sorted(opt.state[p]) == ["bound_sq", "exp_avg.codes", "exp_avg.scale",
                                    "exp_avg_sq.codes", "exp_avg_sq.scale", "param.residual", "step"]
    # bf16 weight 2 + int8 residual 1 + two 8-bit states with an fp16 scale per 32: 5.125 B/param
    stored = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if t.dim())
    assert stored + p.numel() * p.element_size() == 5.125 * 64


def test_state_dict_resumes_bit_identically_through_torch_save():
    params = _params(70, (3, 37), 1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a, b = fc.AdamW(params, compile=False), fc.AdamW(twins, compile=False)
    for seed in range(3):
        _grads(params, seed)
        _grads(twins, seed)
        a.step()
        b.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    c = fc.AdamW(fresh_params, compile=False)
    c.load_state_dict(torch.load(buf, weights_only=True))
    for seed in range(3, 6):
        _grads(fresh_params, seed)
        _grads(twins, seed)
        c.step()
        b.step()
    for p, q in zip(fresh_params, twins):
        assert torch.equal(p, q)
        assert all(torch.equal(c.state[p][k], b.state[q][k]) for k in b.state[q])


@pytest.mark.parametrize("other", ["sgd", "shape"])
def test_state_dict_that_does_not_fit_is_rejected_and_nothing_changes(other):
    (p,) = _params(64)
    opt = fc.AdamW([p], compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    if other == "sgd":
        (q,) = _params(64)
        src = fc.SGD([q], momentum=0.9, compile=False)
    else:
        (q,) = _params(96)
        src = fc.AdamW([q], compile=False)
    q.grad = torch.ones_like(q)
    src.step()
    with pytest.raises(ValueError, match="different optimizer|shape"):
        opt.load_state_dict(src.state_dict())
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_nan_gradient_propagates_into_its_param_only():
    a, b = _params(64, 64)
    opt = fc.AdamW([a, b], compile=False)
    _grads([a, b], 0)
    a.grad[3] = float("nan")
    opt.step()
    assert torch.isnan(a[3]) and torch.isfinite(b).all()
    assert torch.isfinite(a[32:]).all()  # the other groups of 32 of the same param stay finite


def test_master_weight_tracks_fp32_sgd_within_the_accumulated_split_bound():
    (p,) = _params(256)
    ref = torch.nn.Parameter(p.detach().float())
    opt = fc.SGD([p], lr=1e-4, compile=False)
    ref_opt = torch.optim.SGD([ref], lr=1e-4)
    steps = 5
    for seed in range(steps):
        _grads([p], seed)
        ref.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    err = (opt.master_weight(p) - ref.detach()).abs()
    # Each step re-encodes once (its bound) after one fp32 rounding of p - lr * g.
    per_step = fc.codecs.weight_split.error_bound(ref.detach().view(-1, 32)).view(-1)
    assert torch.all(err <= steps * (per_step + ref.detach().abs() * 2.0**-24))
    assert err.max() < (p.detach().float() - ref.detach()).abs().max() / 5  # bf16 alone loses far more


def _step_fp32_param_with_weight_split():
    params = _params(3, dtype=torch.float32)
    opt = fc.AdamW(params, codecs={"param": "weight_split"}, compile=False)
    _grads(params, 0)
    opt.step()


def _bad_rule_negative_state():
    @fc.rule(defaults=dict(lr=1e-3), states={"v": "nonnegative"})
    def bad(p, g, v, *, step, lr):
        return p - lr * g, v - g

    return bad


ERRORS = {
    "sparse param": (lambda: fc.SGD([torch.nn.Parameter(torch.eye(3).to_sparse())]), "sparse"),
    "complex param": (lambda: fc.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.cfloat))]),
                      "complex"),
    "float64 param": (lambda: fc.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]),
                      "float64"),
    "negative lr": (lambda: fc.AdamW(_params(3), lr=-1.0), "lr"),
    "negative eps": (lambda: fc.Adam(_params(3), eps=-1e-8), "eps"),
    "beta of 1": (lambda: fc.Adam(_params(3), betas=(0.9, 1.0)), r"betas\[1\]"),
    "negative beta": (lambda: fc.Lion(_params(3), betas=(-0.1, 0.99)), r"betas\[0\]"),
    "unknown codec": (lambda: fc.AdamW(_params(3), codecs={"exp_avg": "int3"}), "int3"),
    "unknown state": (lambda: fc.AdamW(_params(3), codecs={"momentum": "fp32"}), "momentum"),
    "unknown preset": (lambda: fc.AdamW(_params(3), codecs="tiny"), "preset"),
    "unsigned codec for signed state": (
        lambda: fc.AdamW(_params(3), codecs={"exp_avg": "sqrt_uint8"}), "nonnegative"),
    "weight split on fp32 param": (_step_fp32_param_with_weight_split, "cast"),
    "nesterov without momentum": (lambda: fc.SGD(_params(3), nesterov=True), "Nesterov"),
    "unknown hyperparameter": (lambda: fc.Optimizer(_params(3), fc.rules.lion, momentum=0.9),
                               "momentum"),
    "state going negative": (lambda: fc.Optimizer(_params(3), _bad_rule_negative_state()), "'v'"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_raises_a_message_naming_it(case):
    make, match = ERRORS[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        make()


def test_rule_returning_the_wrong_number_of_values_is_rejected_at_definition():
    with pytest.raises(TypeError, match="returned 1 values; it must return 2"):
        @fc.rule(defaults=dict(lr=1e-3), states={"m": "signed"})
        def bad(p, g, m, *, step, lr):
            return (p - lr * g,)


def test_branching_on_a_traced_value_explains_where_instead():
    with pytest.raises(TypeError, match="where"):
        @fc.rule(defaults=dict(lr=1e-3), states={})
        def bad(p, g, *, step, lr):
            return (p - lr * g if g > 0 else p,)


def test_master_weight_of_a_param_never_stepped_is_the_param():
    (p,) = _params(5)
    assert torch.equal(fc.AdamW([p]).master_weight(p), p.detach().float())
    assert PARAM == "param"


@pytest.mark.parametrize("make", [fc.Lion, fc.Rprop], ids=["lion", "rprop"])
def test_a_nan_gradient_is_visible_in_its_param_when_the_rule_takes_a_sign(make):
    # torch.sign(nan) == 0: the NaN used to vanish, and Lion's group of 32 stopped moving unseen
    a, b = _params(64, 64)
    opt = make([a, b], compile=False)
    _grads([a, b], 0)
    a.grad[3] = float("nan")
    opt.step()
    assert torch.isnan(a[3]) and torch.isfinite(b).all()
