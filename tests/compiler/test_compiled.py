"""The compiled plan equals the same generated function run eagerly; hyperparameter changes never
recompile; one parameter's flash AdamW update is one kernel. Compiled plans are cached process-wide,
so this file compiles each of its few plans once (C++ through Inductor on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashcompile as fc
from strategies import rule_of
from flashcompile.codecs import PARAM
from flashcompile.compiler.explain import count_kernels, inductor_source, plan_of

PLANS = {
    "adamw_flash_bf16": (lambda p: fc.AdamW(p), torch.bfloat16),
    "sgd_flash_fp32": (lambda p: fc.SGD(p, momentum=0.9, nesterov=True), torch.float32),
    "lion_flash_fp16": (lambda p: fc.Lion(p), torch.float16),
    "adam_fp32_amsgrad": (lambda p: fc.Adam(p, amsgrad=True, codecs="fp32"), torch.float32),
    "lamb_flash_bf16": (lambda p: fc.LAMB(p), torch.bfloat16),  # norms: reductions over the param
}


def _plan(name):
    make, dtype = PLANS[name]
    return plan_of(make([torch.nn.Parameter(torch.zeros(64, dtype=dtype))]))


@pytest.mark.parametrize("name", sorted(PLANS))
@settings(max_examples=6)
@given(groups=st.sampled_from([1, 3, 7]), seed=st.integers(0, 2**16))
def test_compiled_equals_eager_up_to_one_code_step(name, groups, seed):
    # The compiled kernel itself, before any fallback: Plan.verify would hide a miscompile.
    assert _plan(name).compare_compiled("cpu", groups, seed) is None


def test_changing_hyperparameters_never_recompiles():
    from torch._dynamo.utils import counters

    params = [torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16)) for _ in range(2)]
    opt = fc.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)  # cycles beta1

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()

    step()
    step()
    graphs = counters["stats"]["unique_graphs"]
    for i in range(8):
        opt.param_groups[0]["weight_decay"] = 0.01 * i
        opt.param_groups[0]["eps"] = 10.0 ** -(6 + i % 3)
        step()
    assert counters["stats"]["unique_graphs"] == graphs


def test_flash_adamw_update_of_one_parameter_is_one_kernel():
    code = "\n".join(inductor_source(_plan("adamw_flash_bf16"), "cpu"))
    assert count_kernels(code) == 1


def test_plans_are_shared_between_optimizers():
    a = fc.AdamW([torch.nn.Parameter(torch.zeros(40, dtype=torch.bfloat16))])
    b = fc.AdamW([torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))], lr=0.5)
    assert plan_of(a) is plan_of(b)
    assert plan_of(a).codecs[PARAM] == fc.codecs.weight_split


@fc.rule(defaults=dict(lr=0.1), states={"m": "signed"})
def softmax_step(p, g, m, *, step, lr):
    """Every element depends on all others; a padding lane would add exp(0) = 1 to the sum."""
    m = 0.5 * m + g
    return p - lr * m * fc.exp(g) / fc.sum_all(fc.exp(g)) * fc.norm(p), m


def test_compiled_reductions_span_odd_sized_params_without_their_padding():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (33,), (3, 11), (64,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    refs = [(p.detach().double(), torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    opt = fc.Optimizer(params, softmax_step, codecs="fp32")
    with warnings.catch_warnings():  # the compiled kernel runs, not the eager fallback
        warnings.filterwarnings("error", "flashcompile", RuntimeWarning)
        for _ in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen)
                w, m = refs[i]
                g = p.grad.double()
                m = 0.5 * m + g
                refs[i] = (w - 0.1 * m * g.exp() / g.exp().sum() * w.norm(), m)
            opt.step()
    for p, (w, _) in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_a_plan_compiles_once_for_every_group_count():
    """The self-check's inputs and every real call keep the group size (dim 1) static, so one graph
    serves all sizes. A symbolic group size compiled a looped two-pass reduction on CUDA (5x
    slower) and recompiled at the first real call."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (4096, 96 * 33)]
    opt = fc.Lion(params, codecs={"exp_avg": "linear_int8"}, flat=False)  # a plan no test shares
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.parametrize("name", sorted(n for n in PLANS if not _plan(n).reduces))
@settings(max_examples=4)
@given(groups=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**16))
def test_one_parameter_variant_equals_eager_up_to_one_code_step(name, groups, seed):
    # step_one: a whole parameter of groups * 32 - 5 values (its tail padded inside the graph)
    assert _plan(name).compare_compiled("cpu", groups, seed, variant="one") is None


def test_per_tensor_steps_call_the_compiled_graph_without_dynamo():
    sizes = (1000, 64, 7, 4096)  # tails, whole groups, one group
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in sizes]
    opt = fc.AdamW(params, flat=False)
    plan = plan_of(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # compiles (and verifies) what these sizes need
    before = plan.fn_one.direct_calls
    for _ in range(3):
        opt.step()
    assert plan.fn_one.direct_calls - before == 3 * len(sizes)


def test_the_compiled_self_check_leaves_the_global_rng_as_it_was():
    """Plan.verify (run at every new plan's first step) draws its inputs from its own generator:
    seeded runs keep their own dropout masks and data order."""
    torch.manual_seed(1234)
    torch.rand(3)  # a state that is not a fresh seed's
    state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    assert _plan("sgd_flash_fp32").compare_compiled("cpu") is None
    assert torch.initial_seed() == 1234 and torch.equal(torch.get_rng_state(), state)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))


def _every_rule_plan():
    from flashcompile.codecs.presets import resolve_codecs
    from flashcompile.compiler.plan import PlanKey, get_plan
    from flashcompile.language.trace import trace
    from flashcompile.optim.optimizers import OPTIMIZERS

    rules = {rule_of(cls) for cls in OPTIMIZERS.values()}
    for rule in sorted(rules, key=lambda r: r.name):
        if rule.shaped:  # no flat kernel: tests/optim/test_adafactor.py checks its own self-check
            continue
        for setting in rule.flag_settings():
            flags = tuple(sorted(setting.items()))
            live = trace(rule, dict(flags)).live_states()
            codecs = resolve_codecs(rule, "flash", torch.bfloat16, live)
            yield pytest.param(get_plan(PlanKey(rule, flags, codecs, "cpu", False)),
                               id=f"{rule.name}-{'-'.join(k if v is True else f'{k}={v}' for k, v in flags if v) or 'plain'}")


@pytest.mark.parametrize("plan", _every_rule_plan())
def test_self_check_inputs_are_states_the_rule_reaches_and_stay_finite(plan):
    """The compiled-vs-eager check runs on states the rule reaches, inside its domain: NaN on both
    sides would fail the comparison and send a correct kernel to eager."""
    from flashcompile.compiler.verify import decode_inputs, sample_inputs

    args = sample_inputs(plan, 4, "cpu")
    before = decode_inputs(plan, args)
    with torch.no_grad():
        plan.eager(*args)
    for name, value in {**before, **decode_inputs(plan, args)}.items():
        assert torch.isfinite(value).all(), name


def test_compiled_centered_rmsprop_keeps_its_kernel_on_cpu():
    """Its self-check once compared NaN with NaN and fell back to eager (27x slower steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
        opt = fc.RMSprop([p], centered=True, momentum=0.9)
        p.grad = torch.randn_like(p)
        opt.step()
    plan = plan_of(opt)  # per tensor on CPU: the one-parameter variant ran, verified
    assert plan.fn_one is not plan.eager_one and torch.isfinite(p).all()
