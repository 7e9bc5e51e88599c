"""Prodigy: a rule whose shared numbers (d, d_max, the numerator) are updated from sums over every
parameter (``total``) once per step.

With fp32 codecs it must track a float64 implementation written here from the paper (arXiv
2306.06101) and the authors' prodigyopt: the d it learns and the weights it moves. The kernel
computes in fp32: each step's sums and updates carry a few fp32 roundings (2^-24 relative each),
which the next steps' d amplifies by at most its growth; over 12 steps that stays below 1e-5
relative, so the bars are 1e-4 on d and on the weights (relative to the largest weight). A wrong
factor (dlr, d/d0, beta3, the decay form) moves d by tens of percent within two steps.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import flashcompile as fc

RTOL = 1e-4
SHAPES = [(37,), (8, 9), (64,)]
OPTIONS = [
    dict(),
    dict(weight_decay=0.1, decouple=False),
    dict(use_bias_correction=True, growth_rate=1.5),
    dict(safeguard_warmup=True, weight_decay=0.1),
    dict(betas=(0.8, 0.99), beta3=0.9, d_coef=0.5, eps=1e-6),
]


def prodigy_float64(params, grads_per_step, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8,
                    weight_decay=0.0, decouple=True, use_bias_correction=False,
                    safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf):
    """Prodigy's Adam form in float64, as prodigyopt 1.0 computes it, except that the update's
    eps term reads the step's d (flashcompile's one-pass form: the next d is known only after
    every parameter stepped). Returns (d, weights) after each step."""
    beta1, beta2 = betas
    beta3 = math.sqrt(beta2) if beta3 is None else beta3
    x = [p.detach().double().clone() for p in params]
    x0 = [p.clone() for p in x]
    m, v, s = ([torch.zeros_like(p) for p in x] for _ in range(3))
    d, d_max, numerator = d0, d0, 0.0
    out = []
    for k, grads in enumerate(grads_per_step, start=1):
        bias = math.sqrt(1 - beta2**k) / (1 - beta1**k) if use_bias_correction else 1.0
        dlr = d * lr * bias
        numerator *= beta3
        denominator = 0.0
        for i, g in enumerate(grads):
            g = g.double() + (weight_decay * x[i] if not decouple else 0.0)
            numerator += (d / d0) * dlr * float((g * (x0[i] - x[i])).sum())
            m[i] = beta1 * m[i] + d * (1 - beta1) * g
            v[i] = beta2 * v[i] + d * d * (1 - beta2) * g * g
            s[i] = beta3 * s[i] + (d / d0) * (d if safeguard_warmup else dlr) * g
            denominator += float(s[i].abs().sum())
        for i in range(len(x)):
            if decouple:
                x[i] = x[i] - weight_decay * dlr * x[i]
            x[i] = x[i] - dlr * m[i] / (v[i].sqrt() + d * eps)
        d_hat = d_coef * numerator / denominator if denominator > 0 else 0.0
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)
        out.append((d, [t.clone() for t in x]))
    return out


def _problem(seed, steps=12):
    """Weights of a network's scale (0.05) and gradients with a steady direction, so Prodigy's d
    grows from d0 = 1e-4 (its estimate of the distance to travel) step after step."""
    gen = torch.Generator().manual_seed(seed)
    init = [0.05 * torch.randn(s, generator=gen) for s in SHAPES]
    drift = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[d + 0.3 * torch.randn(d.shape, generator=gen) for d in drift]
             for _ in range(steps)]
    return init, grads


def _run(opt, params, grads):
    ds = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
    return ds


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("flat", [False, True])
def test_prodigy_with_fp32_codecs_tracks_float64_prodigy(options, flat):
    init, grads = _problem(0)
    want = prodigy_float64(init, grads, d0=1e-4, **options)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = fc.Prodigy(params, codecs="fp32", flat=flat, compile=False, d0=1e-4, **options)
    got = _run(opt, params, grads)
    assert want[-1][0] > 10 * 1e-4  # d grew: the sums did their work
    for k, (d, _) in enumerate(want):
        assert got[k] == pytest.approx(d, rel=RTOL), f"step {k + 1}"
    scale = max(float(t.abs().max()) for t in want[-1][1])
    for p, x in zip(params, want[-1][1]):
        assert float((p.detach().double() - x).abs().max()) <= RTOL * scale


def test_prodigy_compiled_steps_as_its_eager_plan_in_both_layouts():
    """The kernels Inductor builds (one per bucket, one per tensor) sum the totals in their own
    order, and a compiled 8-bit code may sit one code step from the eager one (fused multiply-
    adds): an element of s one step (1/127 of its group's scale) off moves ||s||_1, so d, by
    up to about 1e-4 of itself per step; 1e-3 over 6 steps."""
    init, grads = _problem(1, steps=6)
    runs = []
    for flat, compiled in [(False, False), (False, True), (True, True)]:
        params = [torch.nn.Parameter(t.clone().bfloat16()) for t in init]
        opt = fc.Prodigy(params, flat=flat, compile=compiled, d0=1e-4)
        runs.append((_run(opt, params, grads), params))
    (base, base_params), *others = runs
    for ds, params in others:
        assert ds == pytest.approx(base, rel=1e-3)
        for p, q in zip(params, base_params):
            assert torch.allclose(p.float(), q.float(), rtol=0, atol=2 ** -7 * 0.2)


def test_prodigy_resumes_from_its_state_dict_bit_for_bit():
    init, grads = _problem(2, steps=6)
    params = [torch.nn.Parameter(t.clone().bfloat16()) for t in init]
    opt = fc.Prodigy(params, d0=1e-4, compile=False)
    _run(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.detach().clone() for p in params]
    _run(opt, params, grads[3:])

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    twin = fc.Prodigy(resumed, d0=1e-4, compile=False)
    buf.seek(0)
    twin.load_state_dict(torch.load(buf))
    assert float(twin.param_groups[0]["d"]) > 1e-4
    _run(twin, resumed, grads[3:])
    for name in ("d", "d_max", "d_numerator"):
        assert torch.equal(twin.param_groups[0][name], opt.param_groups[0][name]), name
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_prodigy_shares_d_across_groups_and_a_copy_carries_it():
    init, grads = _problem(3, steps=4)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = fc.Prodigy([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.01}],
                     d0=1e-4, compile=False)
    assert opt.param_groups[1]["d"] == 1e-4  # visible before the first step, as prodigyopt's
    _run(opt, params, grads[:2])
    first, second = opt.param_groups
    assert second["d"] is first["d"] and first["d"].dtype == torch.float64
    twin = copy.deepcopy(opt)
    _run(opt, params, grads[2:])
    _run(twin, [p for g in twin.param_groups for p in g["params"]], grads[2:])
    assert torch.equal(twin.param_groups[1]["d"], opt.param_groups[0]["d"])


def test_prodigy_groups_must_agree_on_what_updates_d():
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    opt = fc.Prodigy([{"params": params[:1]}, {"params": params[1:], "d_coef": 0.5}],
                     compile=False)
    for p in params:
        p.grad = torch.randn(8)
    with pytest.raises(ValueError, match="same d_coef"):
        opt.step()


@pytest.mark.parametrize("codecs", ["fp32", "flash"])
def test_prodigy_steps_bit_identically_flat_per_tensor_and_under_release(codecs):
    """The sums over every parameter are float64 (each fp32 term): one flat bucket, one launch
    per tensor, or release's buckets inside backward (d updated when the iteration ends, at
    ``optimizer.step()``) add them in other orders and land on d within a float64 rounding,
    the same d once rounded to the fp32 the kernels read; so every layout steps the same
    weights and states bit for bit, as release promises for every rule."""
    from flashcompile.tools.bench_models import build

    runs = {}
    for mode in ("flat", "per_tensor", "release"):
        torch.manual_seed(0)
        model = fc.cast_model(build("tiny_llama", "cpu"))
        opt = fc.Prodigy(model.parameters(), d0=1e-4, flat=mode != "per_tensor", compile=False,
                         codecs=codecs)
        if mode == "release":
            fc.enable_gradient_release(model, opt)
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        for _ in range(6):  # one batch: the gradients keep their direction and d grows
            model(tokens).backward()
            opt.step()
            opt.zero_grad()
        runs[mode] = (model, opt)
    flat_model, flat_opt = runs["flat"]
    assert float(flat_opt.param_groups[0]["d"]) > 1e-3 and flat_opt._buckets
    for mode in ("per_tensor", "release"):
        model, opt = runs[mode]
        d, flat_d = opt.param_groups[0]["d"], flat_opt.param_groups[0]["d"]
        assert torch.equal(d.float(), flat_d.float()) and float(d) == pytest.approx(
            float(flat_d), rel=1e-15), mode
        for p, q in zip(flat_model.parameters(), model.parameters()):
            assert torch.equal(p, q), mode
            assert all(torch.equal(flat_opt.state[p][k], opt.state[q][k])
                       for k in flat_opt.state[p]), mode


@pytest.mark.parametrize("flat", [False, True])
def test_prodigy_keeps_the_first_weight_without_storing_it_again(flat):
    """p0 starts at the weight when the state is allocated (``starts``) and is only read: it
    holds the first weight exactly (a bf16 weight in bf16) and no step writes it, so a step
    moves 2 B/param less than with ``where(step == 1, p, p0)``. A cleared state starts again
    from the weight of that moment, as prodigyopt's."""
    init, grads = _problem(4, steps=3)
    params = [torch.nn.Parameter(t.clone().bfloat16()) for t in init]
    opt = fc.Prodigy(params, d0=1e-4, flat=flat, compile=False)
    _run(opt, params, grads)
    for p, t in zip(params, init):
        assert torch.equal(opt.state_value(p, "p0"), t.bfloat16().float())
    plan = opt.plan_for(params[0], opt.flags_of(opt.param_groups[0]))
    assert plan.lowered.outputs[list(plan.traced.rule.states).index("p0") + 1] is None
    now = [p.detach().float().clone() for p in params]
    opt.state.clear()
    _run(opt, params, grads[:1])
    for p, t in zip(params, now):
        assert torch.equal(opt.state_value(p, "p0"), t)


def test_prodigys_update_of_d_makes_its_numbers_on_the_device_without_host_copies():
    """The shared update turns numbers into tensors by fills on the totals' device: a tensor
    made from a host number (torch.tensor / as_tensor with a device) waits for the GPU stream
    on CUDA, which cost an H100 step 27 ms of host time. Same values as the step computes."""
    from unittest import mock

    from flashcompile.compiler.explain import plan_of

    p = torch.nn.Parameter(torch.randn(64))
    plan = plan_of(fc.Prodigy([p], compile=False, d0=1e-3))
    totals = torch.tensor([2.0, 4.0], dtype=torch.float64)
    held = [torch.tensor(v, dtype=torch.float64) for v in (1e-3, 1e-3, 0.5)]
    hyper = dict(lr=1.0, betas=(0.9, 0.999), beta3=0.99, eps=1e-8, weight_decay=0.0, d0=1e-3,
                 d_coef=1.0, growth_rate=math.inf)
    with mock.patch("torch.as_tensor", side_effect=AssertionError("as_tensor")), \
            mock.patch("torch.tensor", side_effect=AssertionError("tensor")):
        d, d_max, numerator = plan.shared_update(totals, *held, 3.0, **hyper)
    assert float(numerator) == pytest.approx(0.99 * 0.5 + 2.0)
    assert float(d_max) == pytest.approx((0.99 * 0.5 + 2.0) / 4.0)
    assert float(d) == pytest.approx(float(d_max))  # d == d0: it takes d_hat (no growth limit)
