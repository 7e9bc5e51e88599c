"""The public testing API itself: its envelope encloses the truth, catches wrong kernels and lying
codecs, and stays tight enough to mean something."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import sympy
import torch
from flashcompile.rules import adam, lion, sgd
from hypothesis import given
from hypothesis import strategies as st

import flashcompile as fc
from flashcompile.codecs.companded import LinearInt8
from flashcompile.language.dsl import PRIMITIVES, Rule
from flashcompile.language.sensitivity import Unsupported, _Program
from flashcompile.testing import (
    SPECIAL_VALUES,
    UntrackedRule,
    check_codec,
    check_rule,
    gradient,
    special_lanes,
    track_fp64,
    value_tensors,
)

x, y = sympy.symbols("x y", real=True)
EXPRESSIONS = [
    x * y - x, x / (sympy.sqrt(y * y) + 1e-3), sympy.Abs(x) * y**2, sympy.sign(x - y) * y,
    sympy.Max(x, y) - sympy.Min(x, 2 * y), sympy.Piecewise((x, x > y), (y * y, True)),
    sympy.sqrt(sympy.Abs(x)) / (1 + y * y), sympy.exp(-x * x) + sympy.log(1 + y * y), 1 / (x - 3),
]


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=str)
@given(lo=st.tuples(st.floats(-4, 4), st.floats(-4, 4)), width=st.tuples(st.floats(0, 3),
                                                                         st.floats(0, 3)),
       where_=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_interval_evaluation_encloses_every_point_of_the_box(expr, lo, width, where_):
    box = [(np.array([a]), np.array([a + w])) for a, w in zip(lo, width)]
    point = [np.array([a + w * t]) for a, w, t in zip(lo, width, where_)]
    (vlo,), (vhi,) = _Program([expr], [x, y]).run(box)[0]
    value = float(sympy.lambdify([x, y], expr, "numpy")(*point)[0]) if not isinstance(
        expr, sympy.Piecewise) else float(expr.subs({x: point[0][0], y: point[1][0]}))
    if np.isfinite(value):
        assert vlo - 1e-9 * abs(value) <= value <= vhi + 1e-9 * abs(value)


def _mutant(rule: Rule, factor: float) -> Rule:
    """``rule`` whose float64 interpretation takes lr * factor: what a kernel computing the wrong
    step looks like to the tracking check."""
    twin = Rule(rule.fn, f"{rule.name}_twin", rule.defaults, rule.states, rule.ranges)
    track_fp64(twin, {"lr": 1e-2}, [(40, 3)], 0, torch.float32, "flash", 1)  # trace and plan it
    fn = rule.fn

    def wrong(p, g, *states, lr, **kw):
        return fn(p, g, *states, lr=lr * factor, **kw)

    object.__setattr__(twin, "fn", wrong)
    return twin


@pytest.mark.parametrize("rule", [adam, lion, sgd], ids=lambda r: r.name)
def test_tracking_catches_a_kernel_one_percent_off(rule):
    hyper = {"lr": 1e-2, "momentum": 0.9} if rule is sgd else {"lr": 1e-2}
    with pytest.raises(AssertionError, match="exceeds the envelope"):
        track_fp64(_mutant(rule, 1.01), hyper, [(40, 33)], 0, torch.bfloat16, "flash", 20)


@pytest.mark.parametrize("rule", [adam, lion, sgd], ids=lambda r: r.name)
@pytest.mark.parametrize("codec_spec", ["flash", "fp32"])
def test_master_weight_envelope_is_a_small_part_of_the_distance_travelled(rule, codec_spec):
    """The envelope is not vacuous: after 20 steps the median master weight's envelope is smaller
    than the distance it travelled, so a kernel that skipped the update would fail. (Measured:
    about 0.09 for flash Adam and SGD, 0.005 for flash Lion, under 0.002 with fp32 storage.)"""
    hyper = {"lr": 1e-2, "momentum": 0.9} if rule is sgd else {"lr": 1e-2}
    dtype = torch.bfloat16 if codec_spec == "flash" else torch.float32
    report = track_fp64(rule, hyper, [(64, 33)], 1, dtype, codec_spec, 20)
    assert report.worst_ratio <= 1 and report.envelope_over_travel < 1


def test_tracking_holds_with_the_paper_codecs_and_loud_lanes():
    """sqrt_uint8 drops the quiet second moments next to a loud lane; the envelope allows it
    (the codec's declared bound admits 0), so the property suite passes: collapse is a separate
    study (``python -m flashcompile study collapse``)."""
    lanes = [(0.1, "loud"), (0.4, "zero"), (0.6, "subnormal")]
    report = track_fp64(adam, {"lr": 1e-2}, [(64, 33)], 2, torch.bfloat16,
                        {"exp_avg_sq": "sqrt_uint8"}, 20, 1.0, lanes)
    assert report.worst_ratio <= 1


@dataclass(frozen=True)
class _Boastful(LinearInt8):
    """linear_int8 claiming half its real error bound."""

    name = "boastful_int8"

    def error_bound(self, x):
        return super().error_bound(x) / 2


def test_check_codec_catches_a_codec_understating_its_bound():
    with pytest.raises(AssertionError, match="exceeds its error_bound"):
        check_codec(_Boastful(), max_examples=30)


@given(x=value_tensors())
def test_value_tensors_are_fp32_groups_of_32(x):
    assert x.dtype == torch.float32 and x.shape[1] == 32 and x.shape[0] >= 1


@given(lanes=special_lanes, scale=st.sampled_from([1e-4, 1.0, 100.0]))
def test_special_lanes_land_in_the_gradient_and_stay_in_range(lanes, scale):
    g = gradient((7, 9), scale, lanes, torch.float16, torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all() and g.abs().max() <= 1e4
    for where_, kind in lanes:
        value = g.view(-1)[int(where_ * 63)].item()
        if kind == "zero" and not any(k != "zero" and int(w * 63) == int(where_ * 63)
                                      for w, k in lanes):
            assert value == 0


def test_special_values_include_signed_zeros_subnormals_and_extremes():
    assert {0.0, 1e-40, 1e30, -1e30} <= set(SPECIAL_VALUES)


@fc.rule(defaults={"lr": 1e-2, "beta": 0.9}, states={"buffer": "signed"},
         ranges={"beta": (0.0, 1.0)})
def warm_started(p, g, buffer, *, step, lr, beta):
    """A buffer that starts empty at step 1, written with the idiom fc.rule's docstring gives."""
    buffer = fc.where(step == 1, 0.0, beta * buffer + (1 - beta) * g)
    return p - lr * (g + buffer), buffer


def test_check_rule_runs_a_rule_whose_state_is_a_number_at_step_one():
    # the float64 interpretation gets a bare float for the state at step 1
    check_rule(warm_started, max_examples=3, steps=3, track_steps=4)


def test_every_dsl_primitive_but_the_reductions_and_the_matrix_stage_has_an_interval_rule():
    """Property 4 covers a rule only where the envelope can bound each op: a primitive added to
    the DSL without an interval rule must fail here, not skip property 4 unnoticed. (``total``
    feeds shared numbers only, and a rule with them is never tracked: check_rule says so.)"""
    x, y, z = sympy.symbols("x y z", real=True)
    args = {"where": (x > 0, y, z), "maximum": (x, y), "minimum": (x, y),
            "orthogonalize": (x, 5, 3.4445, -4.775, 2.0315, 1e-7, 0)}
    for op, (_, builder, _) in PRIMITIVES.items():
        expr = builder(*args.get(op, (x,)))
        if op in ("sum_all", "total", "orthogonalize", "row_mean", "col_mean", "mean_all"):
            with pytest.raises(Unsupported):
                _Program([expr], [x, y, z])
        else:
            _Program([expr], [x, y, z])


def test_check_rule_says_when_it_cannot_track_float64():
    with pytest.warns(UntrackedRule, match="sum_all"):
        check_rule(_normalized, max_examples=2, steps=2, track_steps=2)


@fc.rule(defaults={"lr": 1e-2, "beta": 0.9}, states={"buf": "signed"})
def _normalized(p, g, buf, *, step, lr, beta):
    buf = beta * buf + (1 - beta) * g
    return p - lr * buf / (fc.norm(buf) + 1e-8), buf
