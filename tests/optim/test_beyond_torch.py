"""Optimizers torch.optim lacks (LAMB, LARS, AdEMAMix, Adan, ADOPT, cautious AdamW, MARS, schedule-free
AdamW): with codecs="fp32" each tracks a plain
float64 torch implementation written here from its paper (and, for Adan, the authors' code); under
the flash codecs each passes check_rule; the compiled LAMB plan equals its eager function."""

from __future__ import annotations

import math

import pytest
import torch
from flashcompile.rules import (
    adamw_schedule_free,
    adan,
    ademamix,
    adopt,
    cautious_adamw,
    lamb,
    lars,
    mars,
)
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds, shape_lists

import flashcompile as fc
from flashcompile import codecs
from flashcompile.compiler.explain import plan_of
from flashcompile.testing import UntrackedRule, check_rule

STEPS = 12
# fp32 kernel against float64 references: a few fp32 roundings per step, 12 steps. An element that
# ends near zero keeps the rounding of the larger terms that cancelled there (the weight and the
# momentum), which are of the order of the tensor's largest values: atol scales with max |p|.
RTOL, ATOL = 1e-5, 1e-6

betas2 = st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999))
decays = st.sampled_from([0.0, 1e-4, 0.1])


def _lamb(p, g, st_, t, lr, betas, eps, weight_decay, bias_correction, maximize):
    b1, b2 = betas
    g = -g if maximize else g
    m = st_["m"] = b1 * st_.get("m", 0) + (1 - b1) * g
    v = st_["v"] = b2 * st_.get("v", 0) + (1 - b2) * g * g
    if bias_correction:
        m, v = m / (1 - b1**t), v / (1 - b2**t)
    u = m / (v.sqrt() + eps) + weight_decay * p
    w_norm, u_norm = p.norm(), u.norm()
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return p - lr * ratio * u


def _lars(p, g, st_, t, lr, momentum, weight_decay, trust_coefficient, eps, maximize):
    g = -g if maximize else g
    w_norm, g_norm = p.norm(), g.norm()
    local_lr = 1.0
    if w_norm > 0 and g_norm > 0:
        local_lr = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    v = st_["v"] = momentum * st_.get("v", 0) + lr * local_lr * (g + weight_decay * p)
    return p - v


def _beta3_schedule(t, beta_start, beta_end, warmup):
    """The paper's scheduler, written through half-lives as the authors' code does."""
    if t >= warmup:
        return beta_end
    def half_life(beta):
        return (math.log(0.5) / math.log(beta) if beta > 0 else 0.0) - 1
    a = t / warmup
    h = (1 - a) * half_life(beta_start) + a * half_life(beta_end)
    return min(0.5 ** (1 / (h + 1)), beta_end)


def _ademamix(p, g, st_, t, lr, betas, alpha, eps, weight_decay, alpha_warmup, beta3_warmup,
              maximize):
    b1, b2, b3 = betas
    g = -g if maximize else g
    alpha_t = min(t * alpha / alpha_warmup, alpha) if alpha_warmup >= 1 else alpha
    b3_t = _beta3_schedule(t, b1, b3, beta3_warmup)
    m1 = st_["m1"] = b1 * st_.get("m1", 0) + (1 - b1) * g
    m2 = st_["m2"] = b3_t * st_.get("m2", 0) + (1 - b3_t) * g
    v = st_["v"] = b2 * st_.get("v", 0) + (1 - b2) * g * g
    denom = (v / (1 - b2**t)).sqrt() + eps
    update = (m1 / (1 - b1**t) + alpha_t * m2) / denom + weight_decay * p
    return p - lr * update


def _adan(p, g, st_, t, lr, betas, eps, weight_decay, no_prox, maximize):
    """As the authors' reference code: the first difference is 0 (previous gradient := g)."""
    b1, b2, b3 = betas
    g = -g if maximize else g
    diff = g - st_.get("prev", g)
    st_["prev"] = g
    m = st_["m"] = b1 * st_.get("m", 0) + (1 - b1) * g
    x = st_["x"] = b2 * st_.get("x", 0) + (1 - b2) * diff
    n = st_["n"] = b3 * st_.get("n", 0) + (1 - b3) * (g + b2 * diff) ** 2
    denom = (n / (1 - b3**t)).sqrt() + eps
    step = (m / (1 - b1**t) + b2 * x / (1 - b2**t)) / denom
    if no_prox:
        return p * (1 - lr * weight_decay) - lr * step
    return (p - lr * step) / (1 + lr * weight_decay)


def _adopt(p, g, st_, t, lr, betas, eps, weight_decay, decouple, clip, maximize):
    """As the authors' implementation (iShohei220/adopt): step 1 fills v and moves nothing."""
    b1, b2 = betas
    g = -g if maximize else g
    if decouple:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    if t == 1:
        st_["v"], st_["m"] = g * g, torch.zeros_like(g)
        return p
    normed = g / st_["v"].sqrt().clamp(min=eps)
    if clip:
        normed = normed.clamp(-((t - 1) ** 0.25), (t - 1) ** 0.25)
    m = st_["m"] = st_["m"] + (1 - b1) * (normed - st_["m"])
    st_["v"] = b2 * st_["v"] + (1 - b2) * g * g
    return p - lr * m


def _cautious_adamw(p, g, st_, t, lr, betas, eps, weight_decay, maximize):
    """As the authors' C-AdamW (kyleliang919/C-Optim)."""
    b1, b2 = betas
    g = -g if maximize else g
    m = st_["m"] = b1 * st_.get("m", 0) + (1 - b1) * g
    v = st_["v"] = b2 * st_.get("v", 0) + (1 - b2) * g * g
    mask = (m * g > 0).double()
    mask = mask * (mask.numel() / (mask.sum() + 1))
    return p * (1 - lr * weight_decay) - lr * (m / (1 - b1**t)) * mask / (
        (v / (1 - b2**t)).sqrt() + eps)


def _mars(p, g, st_, t, lr, betas, eps, weight_decay, gamma, maximize):
    """As the authors' MARS-AdamW with is_approx (AGI-Arena/MARS): the last gradient starts at 0."""
    b1, b2 = betas
    g = -g if maximize else g
    c = g + gamma * (b1 / (1 - b1)) * (g - st_.get("prev", torch.zeros_like(g)))
    st_["prev"] = g
    if c.norm() > 1:
        c = c / c.norm()
    m = st_["m"] = b1 * st_.get("m", 0) + (1 - b1) * c
    v = st_["v"] = b2 * st_.get("v", 0) + (1 - b2) * c * c
    return p * (1 - lr * weight_decay) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def _schedule_free(p, g, st_, t, lr, betas, eps, weight_decay, warmup_steps, r,
                   weight_lr_power):
    """As the authors' AdamWScheduleFree (facebookresearch/schedule_free): the param is y; its
    group's lr_max and weight_sum live in ``st_`` here (one param per group in these tests)."""
    b1, b2 = betas
    k = t - 1
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr_t = lr * sched
    st_["lr_max"] = lr_max = max(lr_t, st_.get("lr_max", 0.0))
    weight = (k + 1) ** r * lr_max**weight_lr_power
    st_["weight_sum"] = weight_sum = st_.get("weight_sum", 0.0) + weight
    ckp1 = weight / weight_sum if weight_sum else 0.0
    z = st_.setdefault("z", p.clone())
    v = st_["v"] = b2 * st_.get("v", 0) + (1 - b2) * g * g
    n = g / ((v / (1 - b2 ** (k + 1))).sqrt() + eps) + weight_decay * p
    y = p + ckp1 * (z - p) + lr_t * (b1 * (1 - ckp1) - 1) * n
    st_["z"] = z - lr_t * n
    return y


def assert_tracks_reference(make, reference, shapes, seed, zero_first, hyper):
    """``make(params)`` with fp32 codecs against ``reference`` in float64, STEPS steps. With
    ``zero_first``, the first param starts at zero (trust ratios take their zero-norm branch)."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    if zero_first:
        init[0].zero_()
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    refs = [t.double() for t in init]
    states = [{} for _ in init]
    opt = make(ours)
    for t in range(1, STEPS + 1):
        for i, p in enumerate(ours):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            refs[i] = reference(refs[i], g.double(), states[i], t, **hyper)
        opt.step()
    for p, ref in zip(ours, refs):
        atol = ATOL * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(p.detach().double(), ref, rtol=RTOL, atol=atol)


def _fp32(cls):
    return lambda **kw: (lambda params: cls(params, codecs="fp32", compile=False, **kw))


@given(shapes=shape_lists, seed=seeds, zero_first=st.booleans(), lr=st.floats(1e-4, 0.1),
       betas=betas2, eps=st.sampled_from([1e-8, 1e-6]), wd=decays, bias_correction=st.booleans(),
       maximize=st.booleans())
def test_lamb_matches_reference(shapes, seed, zero_first, lr, betas, eps, wd, bias_correction,
                                maximize):
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=bias_correction,
                 maximize=maximize)
    assert_tracks_reference(_fp32(fc.LAMB)(**hyper), _lamb, shapes, seed, zero_first, hyper)


@given(shapes=shape_lists, seed=seeds, zero_first=st.booleans(), lr=st.floats(0.01, 10.0),
       momentum=st.floats(0.0, 0.99), wd=decays, eta=st.floats(1e-4, 0.02),
       eps=st.sampled_from([1e-8, 1e-3]), maximize=st.booleans())
def test_lars_matches_reference(shapes, seed, zero_first, lr, momentum, wd, eta, eps, maximize):
    hyper = dict(lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta, eps=eps,
                 maximize=maximize)
    assert_tracks_reference(_fp32(fc.LARS)(**hyper), _lars, shapes, seed, zero_first, hyper)


# beta1 is never subnormal: at 5e-324 (seen) the beta3 warmup's log-space schedule, ln(beta1) =
# -744, is evaluated differently where fp32 flushes beta1 to 0; 1e-300 and 0 both track to 1e-5.
@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 1e-2),
       betas=st.tuples(st.floats(0.0, 0.99, allow_subnormal=False), st.floats(0.9, 0.9999),
                       st.floats(0.5, 0.9999)),
       alpha=st.floats(0.0, 10.0), wd=decays, alpha_warmup=st.sampled_from([0.0, 1.0, 7.0, 20.0]),
       beta3_warmup=st.sampled_from([0.0, 1.0, 7.0, 20.0]), maximize=st.booleans())
def test_ademamix_matches_reference(shapes, seed, lr, betas, alpha, wd, alpha_warmup,
                                    beta3_warmup, maximize):
    hyper = dict(lr=lr, betas=betas, alpha=alpha, eps=1e-8, weight_decay=wd,
                 alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup, maximize=maximize)
    assert_tracks_reference(_fp32(fc.AdEMAMix)(**hyper), _ademamix, shapes, seed, False, hyper)


@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 1e-2),
       betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.99), st.floats(0.9, 0.999)),
       wd=decays, no_prox=st.booleans(), maximize=st.booleans())
def test_adan_matches_reference(shapes, seed, lr, betas, wd, no_prox, maximize):
    hyper = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=wd, no_prox=no_prox,
                 maximize=maximize)
    assert_tracks_reference(_fp32(fc.Adan)(**hyper), _adan, shapes, seed, False, hyper)


@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 1e-2), betas=betas2,
       eps=st.sampled_from([1e-6, 1e-8]), wd=decays, decouple=st.booleans(), clip=st.booleans(),
       maximize=st.booleans())
def test_adopt_matches_reference(shapes, seed, lr, betas, eps, wd, decouple, clip, maximize):
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, decouple=decouple, clip=clip,
                 maximize=maximize)
    assert_tracks_reference(_fp32(fc.ADOPT)(**hyper), _adopt, shapes, seed, False, hyper)


@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 1e-2), betas=betas2, wd=decays,
       maximize=st.booleans())
def test_cautious_adamw_matches_reference(shapes, seed, lr, betas, wd, maximize):
    hyper = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=wd, maximize=maximize)
    assert_tracks_reference(_fp32(fc.CautiousAdamW)(**hyper), _cautious_adamw, shapes, seed,
                            False, hyper)


@given(shapes=shape_lists, seed=seeds, lr=st.floats(1e-4, 1e-2),
       betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.999)), wd=decays,
       gamma=st.sampled_from([0.0, 0.025, 0.5]), scale=st.sampled_from([1e-3, 1.0]),
       maximize=st.booleans())
def test_mars_matches_reference(shapes, seed, lr, betas, wd, gamma, scale, maximize):
    hyper = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=wd, gamma=gamma, maximize=maximize)
    make = _fp32(fc.MARS)(**hyper)

    def small(params):  # gradients of norm below 1 too, where the clip leaves c alone
        opt = make(params)
        def shrink(*_):
            for p in params:
                p.grad.mul_(scale)

        return opt, opt.register_step_pre_hook(shrink)
    assert_tracks_reference(lambda ps: small(ps)[0], _scaled(_mars, scale), shapes, seed, False,
                            hyper)


def _scaled(reference, scale):
    return lambda p, g, st_, t, **hyper: reference(p, g * scale, st_, t, **hyper)


@given(shape=st.sampled_from([(40,), (7, 3), (1,)]), seed=seeds, lr=st.floats(1e-4, 1e-2),
       betas=st.tuples(st.floats(0.05, 0.99), st.floats(0.9, 0.9999)), wd=decays,
       warmup=st.sampled_from([0.0, 5.0]), r=st.sampled_from([0.0, 1.0]))
def test_schedule_free_adamw_matches_reference_and_evaluates_at_the_average(shape, seed, lr, betas,
                                                                            wd, warmup, r):
    hyper = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=wd, warmup_steps=warmup, r=r,
                 weight_lr_power=2.0)
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ref, st_ = p.detach().double(), {}
    opt = fc.AdamWScheduleFree([p], codecs="fp32", compile=False, **hyper)
    for t in range(1, STEPS + 1):
        g = torch.randn(shape, generator=gen)
        p.grad = g.clone()
        ref = _schedule_free(ref, g.double(), st_, t, **hyper)
        opt.step()
    atol = ATOL * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(p.detach().double(), ref, rtol=RTOL, atol=atol)
    opt.eval()  # x = y + (1 - 1/beta1)(z - y); 1/beta1 magnifies fp32's rounding of z - y
    x = ref + (1 - 1 / betas[0]) * (st_["z"] - ref)
    torch.testing.assert_close(p.detach().double(), x, rtol=RTOL / betas[0], atol=atol / betas[0])
    opt.train()
    torch.testing.assert_close(p.detach().double(), ref, rtol=RTOL, atol=atol)


def test_schedule_free_adamw_refuses_to_step_in_eval_mode():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fc.AdamWScheduleFree([p], compile=False)
    opt.eval()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()


def test_rules_pass_the_codec_property_suite_under_flash_codecs():
    for rule in (ademamix, adan, adopt, adamw_schedule_free):
        check_rule(rule, max_examples=6)
    for rule in (lamb, lars, cautious_adamw, mars):  # reductions: property 4 says it skips
        with pytest.warns(UntrackedRule, match="sum_all"):
            check_rule(rule, max_examples=6)


@pytest.mark.parametrize("make", [fc.LAMB, fc.LARS, fc.CautiousAdamW, fc.MARS])
@pytest.mark.parametrize("compiled", [False, True])
def test_reducing_rules_step_a_flat_bucket_as_each_param_alone(make, compiled):
    # One launch over params laid end to end: each norm (or count) sums its own param's groups,
    # and the padding lanes after the odd sizes add nothing to them (or are masked out).
    shapes = [(40,), (7,), (64, 33), (1,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for flat in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params, lr=0.05, codecs="fp32", flat=flat, compile=compiled)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        assert len(opt._buckets) == flat and plan_of(opt).reduces and plan_of(opt).steps_flat
        runs[flat] = params
    for p, q in zip(*runs.values()):
        # the same fp32 row sums and float64 prefixes; a norm may round to another fp32 ulp
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_compiled_lamb_equals_eager_on_odd_sizes():
    # The kernel itself, before any fallback; then whole optimizer steps over odd sizes, where
    # the tail's padding lanes must stay out of the norms.
    plan = plan_of(fc.LAMB([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))]))
    for groups in (1, 5):
        assert plan.compare_compiled("cpu", groups) is None
    shapes = [(33,), (5, 3), (64,), (1,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = fc.LAMB(a, lr=0.05, codecs="fp32")
    opt_b = fc.LAMB(b, lr=0.05, codecs="fp32", compile=False)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        # the compiled sums may add in another order: the norms differ by a few fp32 ulps
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_release_steps_trust_ratio_rules_like_stepping_after_backward():
    # Release packs states in a bucket's buffers; a reduction rule must still step each param alone.
    def train(release):
        torch.manual_seed(0)
        model = fc.cast_model(torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.GELU(),
                                                  torch.nn.Linear(33, 3)))
        opt = fc.LAMB(model.parameters(), lr=1e-2, compile=False)
        if release:
            fc.enable_gradient_release(model, opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 10, generator=gen).bfloat16()
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [opt.master_weight(p) for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make, one_pass, sums_read", [
    # LAMB's norms read the weight (3), the grad (2) and both 8-bit states (1.0625 each)
    (lambda p: fc.LAMB(p), 12.25, 3 + 2 + 2 * 1.0625),
    (lambda p: fc.LARS(p), 10.125, 3 + 2),  # ||p|| and ||g||; the momentum is not summed
    (lambda p: fc.AdamW(p), 12.25, 0.0),
])
def test_bytes_moved_count_what_the_sums_read_a_second_time(make, one_pass, sums_read):
    plan = plan_of(make([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))]))
    assert plan.bytes_moved_per_param(2.0) == pytest.approx(one_pass + sums_read)


@pytest.mark.parametrize("make, state", [(fc.Adan, "prev_grad"), (fc.MARS, "last_grad")])
def test_previous_gradient_is_kept_exactly_on_a_bf16_model(make, state):
    """The flash preset keeps the previous gradient in bf16: a bf16 gradient bit for bit (the
    rules step on g - g_prev, a difference of two close values), where an 8-bit code would not."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100, generator=gen).bfloat16())
    opt = make([p], compile=False)
    for _ in range(2):
        p.grad = (torch.randn(100, generator=gen) * torch.logspace(-3, 1, 100)).bfloat16()
        opt.step()
    kept = opt.state[p][state]  # padded to whole groups of 32
    assert kept.dtype == torch.bfloat16
    assert torch.equal(kept[: p.numel()], p.grad)


@pytest.mark.parametrize("make, state, codec", [
    (fc.Adan, "prev_grad", "softsign_adaptive"), (fc.MARS, "last_grad", "softsign_adaptive"),
    (fc.AdEMAMix, "exp_avg_slow", "softsign_adaptive_sr"),
    (fc.Prodigy, "s", "softsign_adaptive_sr")])
def test_checkpoint_with_an_8_bit_state_loads_into_the_bf16_default(make, state, codec):
    """State saved when the previous gradient (Adan, MARS) or the slow EMA (AdEMAMix, Prodigy)
    was an 8-bit adaptive state (the defaults before 2026-12-07) loads into today's bf16 default
    as the values it stood for, rounded to bf16, and steps on: a previous gradient becomes the
    new gradient exactly, an EMA moves and stays finite."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(100, generator=gen).bfloat16())
    old = make([p], codecs={state: codec}, compile=False)
    for _ in range(3):
        p.grad = torch.randn(100, generator=gen).bfloat16()
        old.step()
    saved = old.state[p]
    stood_for = codecs.get(codec).decode(saved[f"{state}.codes"].view(-1, 32),
                                         saved[f"{state}.scale"].view(-1, 1)).view(-1)[:100]
    assert stood_for.count_nonzero() > 50  # so a lost state (zeros) cannot pass as loaded
    q = torch.nn.Parameter(p.detach().clone())
    new = make([q], compile=False)
    new.load_state_dict(old.state_dict())
    assert torch.equal(new.state[q][state][:100], stood_for.bfloat16())
    q.grad = torch.randn(100, generator=gen).bfloat16()
    new.step()
    kept = new.state[q][state][:100]
    if state in ("prev_grad", "last_grad"):
        assert torch.equal(kept, q.grad)
    else:
        assert torch.isfinite(kept).all() and not torch.equal(kept, stood_for.bfloat16())


def test_ademamix_slow_ema_follows_its_fp32_value_on_a_bf16_model():
    """The slow EMA (beta3 = 0.9999) kept in bf16 rounded stochastically (the flash preset) under
    a constant gradient stands at 1 - 0.9999^2000 = 0.18 of each element's gradient after 2000
    steps, on average over 256 elements (each wanders by its rounding noise, a few % over 2000
    steps: the mean, within 2%). Rounded to nearest it stalls once an increment, about 1/t of the
    state, falls below half a bf16 ULP (2^-9 to 2^-8 relative, t near 256-512): under half."""
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(256, generator=gen).abs() + 0.5).bfloat16()
    want = (1 - 0.9999**2000) * g.double()
    got = {}
    for name, spec in (("sr", "flash"), ("nearest", {"exp_avg_slow": "bf16"})):
        p = torch.nn.Parameter(torch.randn(256, generator=gen).bfloat16())
        opt = fc.AdEMAMix([p], lr=0.0, codecs=spec, compile=False)
        kept = plan_of(opt).codecs["exp_avg_slow"].name
        assert kept == {"sr": "bf16_sr", "nearest": "bf16"}[name]
        for _ in range(2000):
            p.grad = g.clone()
            opt.step()
        got[name] = (opt.state[p]["exp_avg_slow"][:256].double() / want).mean().item()
    assert abs(got["sr"] - 1) < 0.02, got
    assert got["nearest"] < 0.5, got
