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
