"""The front end and lowering: tracing, hoisting of scalar subexpressions, proofs, explain, and
user-defined codecs that need no compiler change."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
import sympy
import torch
from flashcompile.rules import adam, lion, sgd

import flashcompile as fc
from flashcompile.codecs import Codec, Field
from flashcompile.lowering import lower
from flashcompile.trace import check_facts, math_text, trace

RULES = [adam, lion, sgd]


def _all_flags(rule):
    for values in itertools.product([False, True], repeat=len(rule.flags)):
        yield dict(zip(rule.flags, values))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_scalar_subexpressions_are_hoisted_out_of_elementwise_code(rule):
    for flags in _all_flags(rule):
        lowered = lower(trace(rule, flags))
        code = " ".join(e for _, e in lowered.statements) + " ".join(filter(None, lowered.outputs))
        for name in ["step", *trace(rule, flags).hyper]:
            assert not re.search(rf"\b{name}\b", code), f"{name} left in the element-wise code under {flags}"
        assert all(h.free_symbols <= trace(rule, flags).scalars for h in lowered.hoisted)


def test_bias_corrections_are_computed_once_in_the_prologue():
    lowered = lower(trace(adam, dict(amsgrad=False, maximize=False, decoupled_weight_decay=True)))
    assert "betas_0**step" in lowered.prologue_source
    assert "betas_1**step" in lowered.prologue_source
    namespace: dict = {"math": __import__("math")}
    exec(lowered.prologue_source, namespace)
    values = namespace["prologue"](3, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert pytest.approx(-0.1 / (1 - 0.9**3)) in values


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_builtin_nonnegative_states_are_proven_nonnegative(rule):
    for flags in _all_flags(rule):
        check_facts(trace(rule, flags))


def test_a_state_that_can_go_negative_fails_the_proof():
    @fc.rule(defaults=dict(lr=1e-3, beta=0.9), states={"v": "nonnegative"},
             ranges={"beta": (0.0, 2.0)})
    def leaky(p, g, v, *, step, lr, beta):
        return p - lr * g, (1 - beta) * v + g * g  # 1 - beta < 0 for beta in (1, 2)

    with pytest.raises(ValueError, match="could not be proven"):
        check_facts(trace(leaky, {}))


def test_traced_math_is_readable():
    text = math_text(trace(lion, dict(maximize=False)))
    assert "sign(" in text and text.startswith("p <- ")
    assert sympy.latex(trace(lion, dict(maximize=False)).outputs[0])


def test_explain_prints_math_codecs_source_and_prologue():
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))])
    text = fc.explain(opt)
    for piece in ("exp_avg <-", "weight_split(bf16+int8)", "def step(", "def prologue(", "5.125"):
        assert piece in text


def test_command_line_explain(capsys):
    from flashcompile.__main__ import main

    main(["explain", "lion", "--dtype", "float32", "--device", "cpu"])
    assert "def step(" in capsys.readouterr().out


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
