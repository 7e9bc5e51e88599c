"""Lowering and code generation: hoisting of scalar subexpressions, whole-parameter reductions,
scalar states on the host, explain and its command line, and user codecs that need no compiler
change."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
from flashcompile.rules import adam, lion, sgd
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import all_flags, seeds

import flashcompile as fc
from flashcompile.codecs import Codec, Field
from flashcompile.compiler.explain import plan_of
from flashcompile.compiler.lowering import lower
from flashcompile.language.dsl import PRIMITIVES
from flashcompile.language.trace import check_facts, keeps_zero, math_text, trace

RULES = [adam, lion, sgd]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_scalar_subexpressions_are_hoisted_out_of_elementwise_code(rule):
    for flags in all_flags(rule):
        lowered = lower(trace(rule, flags))
        code = " ".join(e for _, e in lowered.statements) + " ".join(filter(None, lowered.outputs))
        for name in ["step", *trace(rule, flags).hyper]:
            assert not re.search(rf"\b{name}\b", code), f"{name} left in the element-wise code under {flags}"
        assert all(h.free_symbols <= trace(rule, flags).scalars for h in lowered.hoisted)


def test_bias_corrections_are_computed_once_in_the_prologue():
    lowered = lower(trace(adam, dict(amsgrad=False, maximize=False, decoupled_weight_decay=True,
                                     step_guard=True)))
    assert "betas_0**step" in lowered.prologue_source
    assert "betas_1**step" in lowered.prologue_source
    namespace: dict = {"math": __import__("math")}
    exec(lowered.prologue_source, namespace)
    values = namespace["prologue"](3, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   bound_sq=0.1)
    assert pytest.approx(-0.1 / (1 - 0.9**3)) in values
    # the scalar state's new value comes last: Q <- beta1^2 / beta2 * Q + (1 - beta1)^2 / (1 - beta2)
    assert values[-1] == pytest.approx(0.81 / 0.999 * 0.1 + 0.01 / 0.001)


def test_explain_prints_math_codecs_source_and_prologue():
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))])
    text = fc.explain(opt)
    for piece in ("exp_avg <-", "weight_split(bf16+int8)", "def step(", "def prologue(", "5.125"):
        assert piece in text


def test_command_line_explain(capsys):
    from flashcompile.__main__ import main

    main(["explain", "lion", "--dtype", "float32", "--device", "cpu"])
    assert "def step(" in capsys.readouterr().out
    main(["explain", "AdamW", "--dtype", "float32", "--device", "cpu"])  # as the class is named
    assert "rule adam" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["explain", "adamw", "--device", "quux"], "--device 'quux'"),
    (["bench", "--workloads", "nope", "--device", "cpu"], "no workload 'nope'"),
    (["bench", "--optimizers", "adamw_flsh", "--device", "cpu"], "unknown optimizers"),
    (["memory", "--models", "gpt5", "--device", "cpu"], "unknown models ['gpt5']"),
    (["memory", "--setups", "nope", "--device", "cpu"], "unknown setups ['nope']"),
])
def test_command_line_refuses_a_bad_name_with_the_known_ones(argv, named, capsys):
    from flashcompile.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


@dataclass(frozen=True)
class Int16Linear(Codec):
    """A user's codec: int16 codes of x / absmax per group, defined outside the compiler."""

    name = "int16_linear"
    fields = (Field("codes", torch.int16), Field("scale", torch.float32, per_group=True))

    def encode(self, x):
        scale = x.abs().amax(dim=-1, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(x / safe * 32767).to(torch.int16), scale

    def decode(self, codes, scale):
        return codes.float() / 32767 * scale

    def error_bound(self, x):
        return x.abs().amax(dim=-1, keepdim=True) * (1 / 65534 + 2.0**-21)


def test_a_user_codec_runs_without_touching_the_compiler():
    p = torch.nn.Parameter(torch.randn(100))
    q = torch.nn.Parameter(p.detach().clone())
    ours = fc.Adam([p], codecs={"exp_avg": Int16Linear(), "exp_avg_sq": "fp32"}, compile=False)
    ref = torch.optim.Adam([q], foreach=False)
    for _ in range(5):
        g = torch.randn(100)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.state[p]["exp_avg.codes"].dtype == torch.int16
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-4)


@fc.rule(defaults=dict(lr=0.1), states={"m": "signed"})
def softmax_step(p, g, m, *, step, lr):
    """A test rule whose every element depends on all others: pads in the sum would show (exp(0) =
    1 per padding lane), as would a sum over a part of the param."""
    m = 0.5 * m + g
    return p - lr * m * fc.exp(g) / fc.sum_all(fc.exp(g)) * fc.norm(p), m


def softmax_step_reference(p, g, m, lr=0.1):
    m = 0.5 * m + g
    return p - lr * m * g.exp() / g.exp().sum() * p.norm(), m


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (3, 11), (2, 70)])
def test_sum_all_spans_the_whole_param_and_skips_padding(shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ref, m = p.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    opt = fc.Optimizer([p], softmax_step, codecs="fp32", compile=False)
    for _ in range(3):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
        ref, m = softmax_step_reference(ref, p.grad.double(), m)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


@fc.rule(defaults=dict(lr=0.1, eps=1e-8), states={})
def standardized_step(p, g, *, step, lr, eps):
    """A test rule with a sum of a sum: the variance needs the mean first (two reduction phases)."""
    n = fc.sum_all(g * 0 + 1)
    centred = g - fc.sum_all(g) / n
    return p - lr * centred / fc.sqrt(fc.sum_all(centred * centred) / n + eps),


@pytest.mark.parametrize("compiled", [False, True])
def test_a_sum_of_a_sum_runs_in_a_later_phase_and_matches_torch(compiled):
    shapes = [(33,), (3, 11), (64,)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    refs = [p.detach().double().clone() for p in params]
    opt = fc.Optimizer(params, standardized_step, codecs="fp32", compile=compiled, flat=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for i, p in enumerate(params):
            g = p.grad.double()
            refs[i] = refs[i] - 0.1 * (g - g.mean()) / ((g - g.mean()).square().mean() + 1e-8).sqrt()
    assert [len(sums) for _, sums in plan_of(opt).lowered.phases] == [2, 1]
    for p, ref in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_reductions_lower_to_masked_per_param_sums_over_every_group_and_are_never_hoisted():
    from flashcompile.compiler.explain import plan_of

    @fc.rule(defaults=dict(lr=0.1), states={})
    def count(p, g, *, step, lr):
        return p - lr * g / fc.sum_all(g * 0 + 1) * fc.sum_all(lr * g),  # sum_all(1): numel

    lowered = lower(trace(count, {}))
    (statements, sums), = lowered.phases  # one phase: neither sum reads the other
    assert len(sums) == 2 and "_sum0" in lowered.outputs[0] and "_sum1" in lowered.outputs[0]
    assert "sum_all" not in lowered.prologue_source
    source = plan_of(fc.Optimizer([torch.nn.Parameter(torch.zeros(3))], count, compile=False)).source
    # the count's argument is the same on every lane: each group adds its valid lanes instead
    assert source.count("_segment_totals(torch.where(_valid, ") == 1
    assert source.count("_segment_totals(_lanes.to(torch.float32) * (") == 1
    source = fc.Optimizer([torch.nn.Parameter(torch.zeros(3))], count, compile=False)
    p = source.param_groups[0]["params"][0]
    p.grad = torch.ones(3)
    source.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.1 * 0.1 * 3 / 3))
    # a padding lane would count as one more element: the sums take each group's valid lanes
    # (_lanes), so params of any size still share a flat buffer
    plan = plan_of(source)
    assert "torch.arange(32, device=_grad.device) < _lanes" in plan.source
    assert not plan.reductions_skip_pads and plan.masks_lanes and plan.steps_flat


def test_a_state_set_to_a_reduction_is_broadcast_and_proven_nonnegative():
    @fc.rule(defaults=dict(lr=0.1), states={"sq": "nonnegative"})
    def grad_energy(p, g, sq, *, step, lr):
        return p - lr * g, fc.sum_all(g * g)

    check_facts(trace(grad_energy, {}))
    p = torch.nn.Parameter(torch.zeros(40))
    opt = fc.Optimizer([p], grad_energy, codecs="fp32", compile=False)
    p.grad = torch.arange(40.0)
    opt.step()
    torch.testing.assert_close(opt.state_value(p, "sq"), torch.full((40,), (p.grad**2).sum()))


def test_a_reduction_is_not_zero_in_padding_lanes():
    @fc.rule(defaults=dict(lr=0.1), states={"m": "signed"})
    def leaky(p, g, m, *, step, lr):
        return p - lr * g * fc.norm(g), m + fc.sum_all(g)  # m + sum: nonzero where g = 0

    traced = trace(leaky, {})
    assert keeps_zero(traced, 0) and not keeps_zero(traced, 1)
    assert "sum_all(g**2)" in math_text(traced) and r"\sum" in math_text(traced, latex=True)


def test_rules_whose_sums_would_count_padding_step_flat_with_lane_masks():
    """exp(0) = 1 on every padding lane: the flat bucket's sums take each group's valid lanes, so
    params of odd sizes laid end to end step exactly as each alone."""
    runs = {}
    for flat in (False, True):
        params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)))
                  for n in (40, 7, 33)]
        opt = fc.Optimizer(params, softmax_step, codecs="fp32", compile=False, flat=flat)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        assert len(opt._buckets) == flat
        runs[flat] = params
    for p, q in zip(*runs.values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


FAMILY = [fc.rules.adagrad, fc.rules.rmsprop, fc.rules.adadelta, fc.rules.adamax, fc.rules.nadam,
          fc.rules.radam, fc.rules.asgd, fc.rules.rprop]


@pytest.mark.parametrize("rule", FAMILY, ids=lambda r: r.name)
def test_family_scalars_and_scalar_states_stay_out_of_elementwise_code(rule):
    for flags in all_flags(rule):
        traced = trace(rule, flags)
        check_facts(traced)
        lowered = lower(traced)
        code = " ".join(e for _, e in lowered.statements) + " ".join(filter(None, lowered.outputs))
        for name in ["step", *traced.hyper, *rule.scalar_states]:
            assert not re.search(rf"\b{name}\b", code), f"{name} left in the kernel under {flags}"


@fc.rule(defaults=dict(lr=0.1, decay=0.5), states={"scale": "scalar", "m": "signed"})
def decayed(p, g, scale, m, *, step, lr, decay):
    scale = fc.where(step == 1, 1.0, scale) * decay  # decay^step, one number per param
    m = m + scale * g
    return p - lr * m, scale, m


def test_a_scalar_state_is_computed_on_the_host_and_kept_per_param():
    traced = trace(decayed, {})
    assert traced.live_states() == ("m",)
    assert "scale" in lower(traced).prologue_source.splitlines()[0]  # a prologue argument
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 40)]
    opt = fc.Optimizer(params, decayed, codecs="fp32", compile=False)
    want = [torch.zeros(n) for n in (3, 40)]
    for t in range(1, 4):
        for p, w in zip(params, want):
            p.grad = torch.full_like(p, float(t))
            w += 0.5**t * t
        opt.step()
    for p, w in zip(params, want):
        assert opt.state[p]["scale"].shape == () and float(opt.state[p]["scale"]) == 0.5**3
        torch.testing.assert_close(opt.state_value(p, "m"), w)
    assert torch.equal(opt.state_value(params[0], "scale"), torch.tensor(0.5**3))


@fc.rule(defaults=dict(lr=0.1), states={})
def guarded(p, g, *, step, lr):
    # sqrt(step - 3) and 1 / (step - 2) are undefined (math errors on the host) where not taken
    p = p - lr * fc.where(step > 3, fc.sqrt(step - 3) * g, g)
    return (p - fc.where(step > 2, g / (step - 2), g) * fc.where(step > 2, 1 / (step - 2), lr),)


def test_scalars_inside_a_branch_of_a_scalar_condition_run_only_where_taken():
    lowered = lower(trace(guarded, {}))
    namespace: dict = {"math": __import__("math")}
    exec(lowered.prologue_source, namespace)
    for step in range(1, 7):  # step 2 would divide by zero, steps 1-2 take the sqrt of < 0
        namespace["prologue"](step, lr=0.1)
    p = torch.nn.Parameter(torch.zeros(5))
    opt = fc.Optimizer([p], guarded, codecs="fp32", compile=False)
    want = torch.zeros(5)
    for step in range(1, 6):
        p.grad = torch.ones(5)
        opt.step()
        want -= 0.1 * (step - 3) ** 0.5 if step > 3 else 0.1
        want -= 1 / (step - 2) ** 2 if step > 2 else 0.1
    torch.testing.assert_close(p.detach(), want)


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 3000), cuts=st.lists(st.floats(0, 1), max_size=6), seed=seeds,
       block=st.sampled_from([4, 1024]))
def test_segment_totals_sum_each_params_groups_within_fp32_rounding(groups, cuts, seed, block):
    from unittest import mock

    from flashcompile.codecs.layout import segment_ends
    from flashcompile.compiler import segments
    # blocks of 4 rows: superblocks of 16, so rows, blocks and superblocks all take part
    x = torch.randn(groups, 32, generator=torch.Generator().manual_seed(seed))
    bounds = sorted({0, groups, *(int(c * groups) for c in cuts)})
    pieces = list(zip(bounds, bounds[1:]))
    with mock.patch.object(segments, "SCAN_BLOCK", block):
        got = segments.segment_totals(x, segment_ends([b - a for a, b in pieces], "cpu"))
    want = torch.tensor([x[a:b].double().sum() for a, b in pieces] + [0.0], dtype=torch.float64)
    scale = torch.tensor([x[a:b].double().abs().sum() for a, b in pieces] + [0.0])
    # fp32 row sums of 32 lanes (31 roundings), then float64, then one rounding to fp32
    tol = 31 * 2.0**-24 * scale + 2.0**-24 * want.abs()
    assert torch.all((got.double() - want).abs() <= tol)


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 3000), seed=seeds, block=st.sampled_from([4, 1024]))
def test_grand_total_in_its_gpu_form_sums_every_element_within_its_rows_rounding(groups, seed,
                                                                                 block):
    """A rule's ``total`` on the GPU: fp32 sums per row (32 lanes), then float64 sums per block of
    rows and over the blocks (padding rows add 0) give the sum of every element, as the one
    float64 sum of the CPU form does: within the rows' fp32 rounding (31 roundings of at most the
    row's sum of magnitudes) and float64's."""
    from unittest import mock

    from flashcompile.compiler import segments
    x = torch.randn(groups, 32, generator=torch.Generator().manual_seed(seed))
    with mock.patch.object(segments, "SCAN_BLOCK", block), \
            mock.patch.object(segments, "on_cuda", lambda t: True):
        got = segments.grand_total(x)
    want = segments.grand_total(x)  # the CPU form: one sum
    assert got.dtype == torch.float64
    magnitude = x.double().abs().sum().item()
    exact = math.fsum(x.double().flatten().tolist())
    float64 = 3 * (groups * 32) * 2.0**-53 * magnitude
    assert abs(want.item() - exact) <= float64
    assert abs(got.item() - exact) <= 31 * 2.0**-24 * magnitude + float64


def test_a_scalar_state_takes_no_codec():
    with pytest.raises(ValueError, match="scalar state"):
        fc.Optimizer([torch.nn.Parameter(torch.zeros(3))], decayed, codecs={"scale": "fp32"})


# Each primitive's operands: positive where its domain needs it (sqrt, log).
_OPERANDS = {"sqrt": lambda p, g: (abs(g) + 1,), "log": lambda p, g: (abs(g) + 1,),
             "where": lambda p, g: (g > 0, g, p), "maximum": lambda p, g: (g, p),
             "minimum": lambda p, g: (g, p), "sum_all": lambda p, g: (g * g,)}


# the torch forms' arguments the DSL function fills in (orthogonalize: steps, a, b, c, eps, ratio)
_DEFAULTS = {"orthogonalize": (5, 3.4445, -4.775, 2.0315, 1e-7, 0)}


@pytest.mark.parametrize("op", sorted(PRIMITIVES))
def test_every_primitive_lowers_to_what_its_torch_form_computes(op):
    """One row of the op table, three readers: the DSL's torch form (the reference here), its sympy
    form (traced), and the lowering that prints it back to torch source. A primitive added without
    a lowering, or lowered to another function, fails here."""
    torch_fn = PRIMITIVES[op][0]
    operands = _OPERANDS.get(op, lambda p, g: (g,))
    primitive = getattr(fc, op)

    if op == "total":  # a sum over every parameter: a shared number reads it
        @fc.rule(defaults=dict(lr=0.0), states={}, shared={"t": 0.0})
        def applies(p, g, *, step, lr, t):
            return p - lr * g, primitive(*operands(p, g))
    else:
        @fc.rule(defaults=dict(lr=0.0), states={"s": "signed"})
        def applies(p, g, s, *, step, lr):
            return p - lr * g, primitive(*operands(p, g)) + 0 * s

    gen = torch.Generator().manual_seed(0)
    # a matrix stage and the means along rows and columns: a matrix
    shape = (10, 7) if op in ("orthogonalize", "row_mean", "col_mean") else (70,)
    param = torch.nn.Parameter(torch.randn(shape, generator=gen))
    param.grad = torch.randn(shape, generator=gen)
    want = torch_fn(*operands(param.detach(), param.grad), *_DEFAULTS.get(op, ()))
    opt = fc.Optimizer([param], applies, codecs="fp32", compile=False)
    opt.step()
    got = opt.param_groups[0]["t"].float() if op == "total" else opt.state_value(param, "s")
    torch.testing.assert_close(got, want.expand_as(got), rtol=1e-6, atol=1e-6)
