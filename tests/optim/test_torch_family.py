"""torch.optim's element-wise family: Adagrad, RMSprop, Adadelta, Adamax, NAdam, RAdam, ASGD, Rprop.
With codecs="fp32" each reproduces its torch.optim twin (foreach=False), params and states, under LR
schedulers; with the flash codecs each rule passes the public property suite. Plans run eagerly."""

from __future__ import annotations

import sys

import pytest
import torch
from flashcompile.rules import adadelta, adagrad, adamax, asgd, nadam, radam, rmsprop, rprop
from hypothesis import given
from hypothesis import strategies as st
from parity import assert_tracks
from strategies import seeds, shape_lists

import flashcompile as fc
from flashcompile.testing import check_rule, check_steps

T = torch.optim
lrs = st.floats(1e-4, 0.3)
# The Adam family at lr <= 0.05 and beta2 >= 0.9, as in test_torch_parity.py: below that the
# quotient m / sqrt(v) is ill-conditioned (an ulp of the L2 sum g + wd * p, which torch fuses and
# the rule rounds twice, moves the step by more than 1e-5 relative), not a different update.
adam_lrs = st.floats(1e-4, 0.05)
betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999))
decays = st.sampled_from([0.0, 1e-4, 0.1])
epss = st.sampled_from([1e-8, 1e-3])
plain = st.sampled_from(["step", "exponential"])  # no momentum or beta1 for OneCycleLR to cycle
any_scheduler = st.sampled_from(["step", "exponential", "onecycle"])


def _tracks(ours, theirs, kw, shapes, seed, sched, theirs_as=None):
    assert_tracks(lambda p: ours(p, codecs="fp32", compile=False, **kw),
                  lambda p: theirs(p, foreach=False, **kw), shapes, seed, sched, states=True,
                  theirs_as=theirs_as)


@given(shapes=shape_lists, seed=seeds, lr=lrs, lr_decay=st.sampled_from([0.0, 0.01, 0.5]),
       wd=decays, init=st.sampled_from([0.0, 0.1, 1.0]), eps=st.sampled_from([1e-10, 1e-6]),
       maximize=st.booleans(), sched=plain)
def test_adagrad_matches_torch(shapes, seed, lr, lr_decay, wd, init, eps, maximize, sched):
    kw = dict(lr=lr, lr_decay=lr_decay, weight_decay=wd, initial_accumulator_value=init, eps=eps,
              maximize=maximize)
    _tracks(fc.Adagrad, T.Adagrad, kw, shapes, seed, sched)


# alpha >= 0.5: centered RMSprop divides by sqrt(v - m^2), a difference that cancels as alpha -> 0
# (alpha = 0: exactly 0, a step of g / eps), where one rounding apart is a different step.
@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 0.05), alpha=st.floats(0.5, 0.999),
       eps=epss, wd=decays, momentum=st.sampled_from([0.0, 0.5, 0.9]), centered=st.booleans(),
       maximize=st.booleans(), sched=any_scheduler)
def test_rmsprop_matches_torch(shapes, seed, lr, alpha, eps, wd, momentum, centered, maximize,
                               sched):
    kw = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum, centered=centered,
              maximize=maximize)
    _tracks(fc.RMSprop, T.RMSprop, kw, shapes, seed, sched)


@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-2, 1.0), rho=st.floats(0.0, 0.99),
       eps=st.sampled_from([1e-6, 1e-3]), wd=decays, maximize=st.booleans(), sched=plain)
def test_adadelta_matches_torch(shapes, seed, lr, rho, eps, wd, maximize, sched):
    kw = dict(lr=lr, rho=rho, eps=eps, weight_decay=wd, maximize=maximize)
    _tracks(fc.Adadelta, T.Adadelta, kw, shapes, seed, sched)


@given(shapes=shape_lists, seed=seeds, lr=adam_lrs, betas=betas, eps=epss, wd=decays,
       maximize=st.booleans(), sched=any_scheduler)
def test_adamax_matches_torch(shapes, seed, lr, betas, eps, wd, maximize, sched):
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, maximize=maximize)
    _tracks(fc.Adamax, T.Adamax, kw, shapes, seed, sched)


# OneCycleLR cycles beta1, so mu_product (a scalar state) multiplies a different mu each step.
@given(shapes=shape_lists, seed=seeds, lr=adam_lrs, betas=betas, eps=epss, wd=decays,
       momentum_decay=st.sampled_from([4e-3, 0.1]), decoupled=st.booleans(),
       maximize=st.booleans(), sched=any_scheduler)
def test_nadam_matches_torch(shapes, seed, lr, betas, eps, wd, momentum_decay, decoupled,
                             maximize, sched):
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, momentum_decay=momentum_decay,
              decoupled_weight_decay=decoupled, maximize=maximize)
    _tracks(fc.NAdam, T.NAdam, kw, shapes, seed, sched)


# beta2 = 0.6 gives rho_inf = 4: never rectified, and the unclamped rectification would divide by
# rho_inf - 4 = 0.
@given(shapes=shape_lists, seed=seeds, lr=adam_lrs, beta1=st.floats(0.0, 0.99),
       beta2=st.one_of(st.just(0.6), st.floats(0.9, 0.9999)), eps=epss, wd=decays,
       decoupled=st.booleans(), maximize=st.booleans(), sched=any_scheduler)
def test_radam_matches_torch(shapes, seed, lr, beta1, beta2, eps, wd, decoupled, maximize, sched):
    kw = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
              decoupled_weight_decay=decoupled, maximize=maximize)
    _tracks(fc.RAdam, T.RAdam, kw, shapes, seed, sched)


# t0 small enough that averaging starts within the run; eta lags the scheduler's lr by one step.
@given(shapes=shape_lists, seed=seeds, lr=lrs, lambd=st.sampled_from([1e-4, 0.1]),
       alpha=st.floats(0.5, 1.0), t0=st.sampled_from([0.0, 3.0, 1e6]), wd=decays,
       maximize=st.booleans(), sched=plain)
def test_asgd_matches_torch(shapes, seed, lr, lambd, alpha, t0, wd, maximize, sched):
    kw = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=wd, maximize=maximize)
    _tracks(fc.ASGD, T.ASGD, kw, shapes, seed, sched)


@given(shapes=shape_lists, seed=seeds, lr=lrs, etas=st.tuples(st.floats(0.1, 0.9),
       st.floats(1.1, 2.0)), step_sizes=st.tuples(st.sampled_from([1e-6, 1e-3]),
       st.sampled_from([0.05, 50.0])), maximize=st.booleans(), sched=plain)
def test_rprop_matches_torch(shapes, seed, lr, etas, step_sizes, maximize, sched):
    kw = dict(lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)
    _tracks(fc.Rprop, T.Rprop, kw, shapes, seed, sched, theirs_as={"prev": torch.sign})


def test_rprop_rejects_etas_that_do_not_shrink_and_grow():
    with pytest.raises(ValueError, match="etaminus < 1 < etaplus"):
        fc.Rprop([torch.nn.Parameter(torch.zeros(3))], etas=(1.2, 0.5))


# Centered RMSprop under 8-bit states: v and m are coded apart, and v - m^2 cancels. Where the
# variance is a small part of v (small alpha, early steps, steady gradients), the codes' error
# exceeds it: the fp32 math then clamps it to 0 and steps g / eps (~1e8), beyond the fp16 scale of
# the 8-bit codecs (65504), which store NaN. A real limit of these codecs for this rule (see
# test_centered_rmsprop_stays_within_codec_bounds_at_practical_alpha), not the tolerance model.
# hypothesis reports two distinct failures of one property as an ExceptionGroup of them
_GROUPS = (ExceptionGroup,) if sys.version_info >= (3, 11) else ()
FLASH_RULES = [adagrad, adadelta, adamax, nadam, radam, asgd, rprop, pytest.param(
    rmsprop, marks=pytest.mark.xfail(raises=(AssertionError, *_GROUPS), strict=False,
                                     reason="centered, small alpha: v - m^2 cancels in 8 bits"))]


@pytest.mark.parametrize("rule", FLASH_RULES, ids=lambda r: r.name)
def test_family_rules_pass_the_public_property_suite(rule):
    check_rule(rule, max_examples=6)


@given(alpha=st.floats(0.95, 0.999), momentum=st.sampled_from([0.0, 0.9]), centered=st.booleans(),
       shapes=shape_lists, seed=seeds, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
def test_centered_rmsprop_stays_within_codec_bounds_at_practical_alpha(
        alpha, momentum, centered, shapes, seed, dtype, grad_scale):
    hyper = dict(lr=1e-2, alpha=alpha, momentum=momentum, centered=centered, weight_decay=1e-2)
    check_steps(rmsprop, hyper, shapes, seed, dtype, steps=5, grad_scale=grad_scale)


@pytest.mark.parametrize("make", [
    lambda p, **kw: fc.NAdam(p, lr=1e-2, **kw),
    lambda p, **kw: fc.ASGD(p, lr=1e-2, t0=2.0, **kw),
], ids=["nadam", "asgd"])
def test_flat_buckets_carry_scalar_states(make):
    """One launch for the bucket, scalar states advanced in every param, and a step where one
    param has no gradient (per-tensor steps, then the bucket again once states agree)."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in [(40,), (3, 5), (1,)]]
    flat = [torch.nn.Parameter(t.clone()) for t in init]
    each = [torch.nn.Parameter(t.clone()) for t in init]
    opts = [make(flat, codecs="fp32", compile=False, flat=True),
            make(each, codecs="fp32", compile=False, flat=False)]
    for step in range(6):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for params in (flat, each):
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if step == 2 and i == 1 else g.clone()
        for opt in opts:
            opt.step()
    assert opts[0]._buckets, "the flat optimizer stepped no bucket"
    for a, b in zip(flat, each):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
        for name in opts[0].rule.scalar_states:
            assert opts[0].state[a][name].shape == ()
            assert float(opts[0].state[a][name]) == float(opts[1].state[b][name])


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: fc.NAdam(p, lr=1e-2, codecs="fp32", compile=False),
     lambda p: T.NAdam(p, lr=1e-2, foreach=False)),
    (lambda p: fc.ASGD(p, lr=1e-2, t0=1.0, codecs="fp32", compile=False),
     lambda p: T.ASGD(p, lr=1e-2, t0=1.0, foreach=False)),
], ids=["nadam", "asgd"])
def test_scalar_states_move_between_torch_and_flashcompile(ours, theirs):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in [(7, 3), (33,)]]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(9)]

    def run(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    ref_opt, torch_opt = theirs(ref), theirs(a)
    run(ref_opt, ref, grads)
    run(torch_opt, a, grads[:3])
    mid = ours(a)
    mid.load_state_dict(torch_opt.state_dict())  # torch's 0-d mu_product / eta / mu come along
    run(mid, a, grads[3:6])
    back = theirs(a)
    back.load_state_dict(mid.torch_state_dict())
    run(back, a, grads[6:])
    for p, q in zip(a, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
