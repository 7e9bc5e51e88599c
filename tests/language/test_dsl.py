"""The rule language: tracing, the proofs of state facts (nonnegative, sign, scalar), and the
checks a rule meets at declaration."""

from __future__ import annotations

import pytest
import sympy
import torch
from flashcompile.rules import adam, lion, sgd
from strategies import all_flags

import flashcompile as fc
from flashcompile.compiler.explain import plan_of
from flashcompile.language.trace import check_facts, math_text, trace

RULES = [adam, lion, sgd]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_builtin_nonnegative_states_are_proven_nonnegative(rule):
    for flags in all_flags(rule):
        check_facts(trace(rule, flags))


def test_a_state_that_can_go_negative_fails_the_proof():
    @fc.rule(defaults=dict(lr=1e-3, beta=0.9), states={"v": "nonnegative"},
             ranges={"beta": (0.0, 2.0)})
    def leaky(p, g, v, *, step, lr, beta):
        return p - lr * g, (1 - beta) * v + g * g  # 1 - beta < 0 for beta in (1, 2)

    with pytest.raises(ValueError, match="could not be proven"):
        check_facts(trace(leaky, {}))


def test_a_sign_state_is_proven_to_hold_only_signs():
    @fc.rule(defaults=dict(lr=1e-3), states={"s": "sign"})
    def signs(p, g, s, *, step, lr):  # a where() of signs, a product of signs and constants
        return p - lr * s, fc.where(step == 1, 0.0, -fc.sign(g) * s)

    check_facts(trace(signs, {}))

    @fc.rule(defaults=dict(lr=1e-3), states={"s": "sign"})
    def halves(p, g, s, *, step, lr):
        return p - lr * s, fc.sign(g) / 2

    with pytest.raises(ValueError, match="declared a sign"):
        check_facts(trace(halves, {}))


def test_a_sign_state_is_stored_exactly_in_one_byte():
    @fc.rule(defaults=dict(lr=1e-2), states={"s": "sign"})
    def sign_memory(p, g, s, *, step, lr):
        return p - lr * (fc.sign(g) + s), fc.sign(g)

    p = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    opt = fc.Optimizer([p], sign_memory, compile=False)
    p.grad = torch.randn(100, dtype=torch.bfloat16)
    opt.step()
    assert plan_of(opt).codecs["s"].name == "sign_int8"
    assert torch.equal(opt.state_value(p, "s"), torch.sign(p.grad.float()))
    with pytest.raises(ValueError, match="stores only -1, 0 and \\+1"):
        fc.Optimizer([p], lion, codecs={"exp_avg": "sign_int8"})


def test_traced_math_is_readable():
    text = math_text(trace(lion, dict(maximize=False)))
    assert "sign(" in text and text.startswith("p <- ")
    assert sympy.latex(trace(lion, dict(maximize=False)).outputs[0])


def test_a_scalar_state_may_not_depend_on_elements():
    with pytest.raises(TypeError, match="scalar state 'scale' .* per-element values"):
        @fc.rule(defaults=dict(lr=0.1), states={"scale": "scalar"})
        def leaky(p, g, scale, *, step, lr):
            return p - lr * g, scale + g


def test_a_quotient_of_nonnegatives_is_proven_nonnegative():
    @fc.rule(defaults=dict(lr=1.0, rho=0.9, eps=1e-6), states={"v": "nonnegative"},
             ranges={"rho": (0.0, 1.0)})
    def ratio(p, g, v, *, step, lr, rho, eps):  # Adadelta's shape: (u + eps) / (v + eps) * g^2
        return p - lr * g, rho * v + (1 - rho) * (v + eps) / (v + g * g + eps) * g * g

    check_facts(trace(ratio, {}))


def test_a_zero_branch_must_name_a_float_hyperparameter():
    """``zero_branches`` names floats only: a bool is already a branch, a tuple has no single 0."""
    for name in ("nesterov", "betas", "missing"):
        with pytest.raises(ValueError, match="not a float hyperparameter"):
            @fc.rule(defaults=dict(lr=0.1, nesterov=False, betas=(0.9, 0.99)), states={},
                     zero_branches=(name,))
            def plain(p, g, *, step, lr, nesterov, betas):
                return (p - lr * g,)


def test_a_zero_branch_drops_only_the_state_its_zero_leaves_unread():
    """SGD at momentum 0 stores no momentum buffer; a state a rule writes without reading (a
    value kept for the user) stays stored: only the zero branch makes a state dead."""
    at_zero = trace(sgd, {"momentum==0": True, "nesterov": False, "maximize": False,
                          "decoupled_weight_decay": False})
    general = trace(sgd, {"nesterov": False, "maximize": False, "decoupled_weight_decay": False})
    assert at_zero.live_states() == () and general.live_states() == ("momentum_buffer",)

    @fc.rule(defaults=dict(lr=0.1), states={"last": "signed"})
    def keeps_last(p, g, last, *, step, lr):
        return p - lr * g, g

    assert trace(keeps_last, {}).live_states() == ("last",)


def test_total_is_read_only_by_shared_numbers():
    """``total`` is known once the step has seen every parameter: an update of the parameter
    or a state cannot read it (sum_all is the per-parameter sum)."""
    with pytest.raises(TypeError, match="only a shared number's new value may read it"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"n": 0.0})
        def early(p, g, *, step, lr, n):
            return p - lr * g / fc.total(g * g), n


def test_a_shared_number_may_read_elements_only_inside_total():
    with pytest.raises(TypeError, match="shared number 'n' .* per-element values"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"n": 0.0})
        def leaky(p, g, *, step, lr, n):
            return p - lr * g, n + g


def test_shared_numbers_are_declared_with_a_start_and_taken_as_keywords():
    with pytest.raises(ValueError, match="starts at 'nope'"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"n": "nope"})
        def unnamed(p, g, *, step, lr, n):
            return p - lr * g, n
    with pytest.raises(ValueError, match="has the name of a hyperparameter"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"lr": 0.0})
        def clash(p, g, *, step, lr):
            return p - lr * g, lr
    with pytest.raises(TypeError, match="every shared number"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"n": 0.0})
        def missing(p, g, *, step, lr):
            return p - lr * g, 0.0
    with pytest.raises(TypeError, match="then the new n"):
        @fc.rule(defaults=dict(lr=0.1), states={}, shared={"n": 0.0})
        def short(p, g, *, step, lr, n):
            return (p - lr * g,)


@fc.rule(defaults=dict(lr=0.1, start=0.0), states={"m": "signed"},
         shared={"count": "start", "sum_sq": 0.0})
def counting(p, g, m, *, step, lr, start, count, sum_sq):
    """Counts every element it steps (a term that is 1 on padding lanes too: masked) and sums
    the squares of the gradients; steps by the previous step's count."""
    return (p - lr * count * g, g, count + fc.total(g * 0 + 1.0),
            sum_sq + fc.total(g * g))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_totals_sum_every_element_of_every_parameter_once(flat, compiled):
    """A flat bucket lays odd sizes end to end with padding lanes between them: a total's term
    that is not 0 there (the count) is masked, one that is (g * g) needs no mask; the per-tensor
    path sums each padded parameter. Shared numbers start from their hyperparameter, are read
    by the step after, and live in every group."""
    shapes = [(40,), (7,), (5, 33)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = fc.Optimizer(params[:2], counting, codecs="fp32", flat=flat, compile=compiled,
                       start=2.0)
    opt.add_param_group({"params": params[2:]})
    assert float(opt.param_groups[0]["count"]) == 2.0
    numel = sum(p.numel() for p in params)
    summed = 0.0
    for step in range(1, 3):
        before = [p.detach().clone() for p in params]
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        count = 2.0 + numel * (step - 1)  # what this step read
        for p, b, g in zip(params, before, grads):
            torch.testing.assert_close(p.detach(), b - 0.1 * count * g)
        groups = opt.param_groups
        assert float(groups[0]["count"]) == 2.0 + numel * step
        assert groups[1]["count"] is groups[0]["count"]
        summed += sum(float((g.double() ** 2).sum()) for g in grads)
        assert float(groups[0]["sum_sq"]) == pytest.approx(summed, rel=1e-6)


def test_a_state_starts_at_the_param_only_when_declared_so():
    with pytest.raises(ValueError, match="starts="):
        @fc.rule(defaults=dict(lr=0.1), states={"w0": "signed"}, starts={"w0": "zero"})
        def bad_start(p, g, w0, *, step, lr):
            return p - lr * g, w0
    with pytest.raises(ValueError, match="starts="):
        @fc.rule(defaults=dict(lr=0.1), states={"w0": "signed"}, starts={"w1": "param"})
        def unknown(p, g, w0, *, step, lr):
            return p - lr * g, w0
