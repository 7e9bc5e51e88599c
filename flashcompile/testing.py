"""Property checks for any rule x codecs, usable from a user's pytest (needs ``hypothesis``).

``check_rule(rule)`` runs, under hypothesis-drawn shapes (odd sizes, 1-element, multi-dim), seeds,
gradient magnitudes, special gradient lanes (zeros, subnormals, 1000x louder lanes), flags and
hyperparameters inside the rule's declared ranges:

1. the nonnegativity proof of every state declared ``nonnegative``, for every flag setting;
2. every codec the rule stores a state (or the master weight) with: its round trip within its
   declared error bound, on values with random per-group magnitudes and special values;
3. step by step, the rule with the requested codecs against the same rule with fp32 codecs run from
   the same decoded state: both execute the same generated fp32 math, so each decoded value must be
   within its codec's declared error bound of the fp32 value (fp32 storage: exactly equal);
4. over many steps, the stored master weight and states against the rule's float64 interpretation
   (the rule's Python function run on float64 tensors): within an envelope derived from the codecs'
   bounds and the rule's sensitivity to each state (sympy derivatives; see
   :mod:`flashcompile.language.sensitivity`), not a tuned tolerance;
5. optionally (``compiled=True``), the compiled plan against the eager one (one code step at
   rounding ties), and properties 3 and 4 through the compiled kernel.

The strategies (``shapes``, ``shape_lists``, ``seeds``, ``magnitudes``, ``special_lanes``,
``value_tensors``, ``hyperparameters(rule)``) and the single-case runners (``check_steps``,
``track_fp64``, ``check_codec``) are public for users' own properties.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcompile import codecs as _codecs
from flashcompile.codecs import GROUP, PARAM, Codec
from flashcompile.codecs.base import FP32_SLACK
from flashcompile.codecs.layout import padded
from flashcompile.codecs.presets import check_codec_spec, resolve_codecs
from flashcompile.compiler.plan import PlanKey, Shared, get_plan, state_key
from flashcompile.language.dsl import Rule
from flashcompile.language.sensitivity import Sensitivity
from flashcompile.language.trace import check_facts, trace
from flashcompile.optim.optimizer import Optimizer
from flashcompile.optim.shared import groups_of_rule, has_stepped

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
shape_lists = st.lists(shapes, min_size=1, max_size=3)
# Matrices, for rules with a matrix stage (orthogonalize): tall, wide, square, one row or column.
matrix_lists = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3)
seeds = st.integers(0, 2**31 - 1)
# Gradient magnitudes, log-spaced over the range optimizers see.
magnitudes = st.sampled_from([1e-4, 1e-2, 1.0, 100.0])
# Values a codec must survive: signed zeros, subnormals, the smallest normal, tiny, huge, units.
SPECIAL_VALUES = (0.0, -0.0, 1e-40, -1e-42, 2.0**-126, 1e-30, 1e30, -1e30, 1.0, -1.0)
# Gradient lanes that stay special every step: never updated (zero), subnormal, or 1000x louder than
# the rest (its group of 32 then mixes scales: the case that collapses group-absmax codecs).
LANE_KINDS = ("zero", "subnormal", "loud")
special_lanes = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(LANE_KINDS)),
                         max_size=4)


@st.composite
def value_tensors(draw, groups: int | None = None, nonnegative: bool = False) -> torch.Tensor:
    """fp32 ``(G, 32)`` values: a random power-of-two magnitude per group (2**-30 .. 2**30) plus
    injected :data:`SPECIAL_VALUES`."""
    g = groups or draw(st.integers(min_value=1, max_value=6))
    gen = torch.Generator().manual_seed(draw(seeds))
    exps = torch.tensor(draw(st.lists(st.integers(-30, 30), min_size=g, max_size=g)),
                        dtype=torch.float32)
    x = torch.randn(g, GROUP, generator=gen) * torch.exp2(exps)[:, None]
    for idx, val in draw(st.lists(st.tuples(st.integers(0, g * GROUP - 1),
                                            st.sampled_from(SPECIAL_VALUES)), max_size=6)):
        x.view(-1)[idx] = val
    return x.abs() if nonnegative else x


def hyperparameters(rule: Rule) -> st.SearchStrategy[dict[str, Any]]:
    """Hyperparameters near the rule's defaults (x0.1 .. x10) inside its declared ranges; flags free."""
    def near(name: str, default: float) -> st.SearchStrategy[float]:
        lo, hi = rule.range_of(name)
        if hi <= 1.0 and math.isfinite(lo):  # interval-like (betas): anywhere in [lo, hi),
            # not too close to hi
            return st.floats(lo, lo + 0.999 * (hi - lo))
        if default == 0:
            return st.sampled_from([0.0, 1e-3, 0.1])
        a, b = sorted((default / 10, default * 10))  # a negative default (a polynomial coefficient)
        return st.floats(max(lo, a), min(hi, b))

    fields = {}
    for name, default in rule.defaults.items():
        if name in rule.choices:
            fields[name] = st.sampled_from(rule.choices[name])
        elif isinstance(default, bool):
            fields[name] = st.booleans()
        elif isinstance(default, tuple):
            fields[name] = st.tuples(*(near(name, d) for d in default))
        else:
            fields[name] = near(name, float(default))
    return st.fixed_dictionaries(fields)


def bound(codec, ref: torch.Tensor, code_step: bool = False) -> torch.Tensor:
    """The codec's error bound (or, with ``code_step``, one code step) for ``ref`` laid out in
    zero-padded groups, as the optimizer stores it."""
    fn = codec.code_step if code_step else codec.error_bound
    return fn(padded(ref, torch.float32)).reshape(-1)[: ref.numel()].view_as(ref)


def fp32_step(opt: Optimizer, p: torch.Tensor):
    """One step of ``opt``'s rule with fp32 codecs from ``opt``'s decoded state for ``p``.

    Returns the plan ``opt`` runs, the fp32 step's new values (master weight and states) and the
    decoded values before the step.
    """
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    flags = opt.flags_of(group)
    flash = opt.plan_for(p, flags)
    live = tuple(k for k in flash.codecs if k != PARAM)
    rule = flash.key.rule
    plan = get_plan(PlanKey(rule, flash.key.flags, resolve_codecs(rule, "fp32", torch.float32, live),
                            p.device.type, False))
    master = opt.master_weight(p).clone()
    started = bool(opt.state.get(p))
    old = {PARAM: master.clone(),
           **{k: opt.state_value(p, k) if started else master.clone() if k in rule.starts
              else torch.zeros_like(master) for k in live}}
    stored = {state_key(k, c.fields[0]): padded(old[k], torch.float32).view(-1)
              for k, c in plan.codecs.items() if k != PARAM}
    step = int(opt.state[p]["step"].item()) + 1 if started else 1
    # scalar states (NAdam's mu_product) are read from opt's state, not advanced
    values = plan.scalars(step, opt.hyperparameters_of(group), opt.state.get(p))
    if plan.shaped:  # in the param's shape; factored states (fp32 already) from opt's state
        for k in flash.factored:
            old[k] = (opt.state_value(p, k) if started
                      else torch.zeros(plan.factored_shape(k, p.shape), device=p.device))
            stored[k] = old[k].clone()
        plan.run_shaped(master, p.grad, stored, values)
        new = {PARAM: master, **{k: stored[k][: p.numel()].view_as(p) for k in live},
               **{k: stored[k] for k in flash.factored}}
        return flash, new, old
    plan.run(master, p.grad, stored, values,
             matrices=plan.matrices([p], p.device) if plan.stages else None,
             shared=_shared_as_held(opt, rule, group, plan, p.device))
    new = {PARAM: master, **{k: stored[k][: p.numel()].view_as(p) for k in stored}}
    return flash, new, old


def _shared_as_held(opt: Optimizer, rule: Rule, group, plan, device) -> Shared | None:
    """The rule's shared numbers as ``opt``'s next step reads them (copies, and a scratch
    accumulator: the fp32 step must not add to ``opt``'s totals)."""
    if not rule.shared:
        return None
    fresh = not has_stepped(opt, groups_of_rule(opt, rule.name))
    values = {k: torch.full((1,), rule.shared_start(k, group) if fresh or k not in group
                            else float(group[k]), device=device) for k in rule.shared}
    return Shared(values, torch.zeros(len(plan.lowered.totals), dtype=torch.float64,
                                      device=device))


def assert_within_bounds(opt: Optimizer, params, refs, step: int, compiled: bool = False,
                         fp32_ulps: float = 0.0) -> None:
    """Each decoded value within its codec's bound of the fp32 step's value.

    Compiled runs (``compiled=True``) compare against eager fp32 math: a tie may then round one code
    apart (the codec's ``code_step`` plus its bound), and fused fp32 math may differ by
    ``fp32_ulps`` relative to the magnitudes entering the update.
    """
    for p, (plan, ref, old) in zip(params, refs):
        scale = old[PARAM].abs() + p.grad.float().abs()
        for key, codec in plan.codecs.items():
            got = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
            terms = scale + old[key].abs() + ref[key].abs()
            tol = bound(codec, ref[key]) + fp32_ulps * 2.0**-24 * terms
            if compiled:
                tol = tol + bound(codec, ref[key], code_step=True)
            excess = torch.nan_to_num((got - ref[key]).abs() - tol, nan=float("inf"))
            i = int(excess.reshape(-1).argmax())
            top = ref[key].reshape(-1)[i // GROUP * GROUP:(i // GROUP + 1) * GROUP].abs().max()
            note = ("; an fp16 group scale holds up to 65504" if top > 65504 and
                    any(f.dtype == torch.float16 and f.per_group for f in codec.fields) else "")
            assert excess.max() <= 0, (
                f"step {step} {key} ({codec.name}): |flash - fp32| exceeds the codec bound by "
                f"{excess.max().item():.3g} at element {i}: flash {got.reshape(-1)[i].item():.9g}, "
                f"fp32 step {ref[key].reshape(-1)[i].item():.9g} (its group's largest magnitude "
                f"{top.item():.3g}{note})"
            )
        for key in plan.factored:  # fp32 on both sides: the same sums
            got = opt.state_value(p, key)
            tol = (2 * FP32_SLACK + fp32_ulps * 2.0**-24) * (old[key].abs() + ref[key].abs())
            assert ((got - ref[key]).abs() <= tol).all(), (
                f"step {step} {key}: |flash - fp32| up to {(got - ref[key]).abs().max():.3g}, "
                "over fp32 rounding of the same means")


def check_steps(rule: Rule, hyper: Mapping[str, Any], shapes_: list[tuple[int, ...]], seed: int,
                dtype: torch.dtype, codecs: Any = "flash", steps: int = 5,
                grad_scale: float = 1.0, compiled: bool = False) -> None:
    """Property 2 for one drawn case (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes_]
    opt = Optimizer(params, rule, codecs=codecs, compile=compiled, flat=False, **hyper)
    for step in range(1, steps + 1):
        refs = []
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * grad_scale).to(dtype)
            refs.append(fp32_step(opt, p))
        opt.step()
        assert_within_bounds(opt, params, refs, step, compiled, 8.0 if compiled else 0.0)


def representable(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """``x`` clipped to what ``codec``'s storage holds: an fp16 field (weight or group scale)
    overflows past 65504, by design to Inf/NaN; nonnegative codecs hold ``|x|``."""
    if any(f.dtype == torch.float16 for f in codec.fields):
        x = x.clamp(-60000, 60000)
    if codec.domain == "sign":
        return torch.sign(x)
    return x.abs() if codec.domain == "nonnegative" else x


def check_codec(codec: Codec | str, max_examples: int = 50) -> None:
    """Property 2: ``decode(encode(x))`` within ``codec.error_bound(x)`` for drawn values."""
    codec = _codecs.get(codec)

    @settings(max_examples=max_examples, deadline=None)
    @given(x=value_tensors())
    def round_trip_within_declared_bound(x):
        x = representable(codec, x)
        y = codec.decode(*codec.encode(x))
        excess = (y - x).abs() - codec.error_bound(x)
        assert y.shape == x.shape and excess.max() <= 0, (
            f"{codec.name}: |decode(encode(x)) - x| exceeds its error_bound by "
            f"{excess.max().item():.3g} at x = {x.reshape(-1)[excess.argmax()].item():.9g}"
        )

    round_trip_within_declared_bound()


def gradient(shape, scale: float, lanes, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal noise times ``scale``, with the :data:`LANE_KINDS` of ``lanes`` ((position in [0, 1),
    kind) pairs) applied; loud lanes stay within 1e4 so every dtype and fp16 group scale holds them."""
    g = torch.randn(shape, generator=gen) * scale
    flat = g.view(-1)
    for where_, kind in lanes:
        i = int(where_ * flat.numel())
        value = {"zero": 0.0, "subnormal": 1e-40,
                 "loud": min(1000 * scale * (1 + flat[i].abs().item()), 1e4)}[kind]
        flat[i] = value
    return g.to(dtype)


@dataclass
class Tracking:
    """What :func:`track_fp64` saw: the largest ``|stored - float64| / envelope`` over all steps and
    elements (<= 1 passes), and how tight the check was: the master weight's envelope at the last
    step over the distance the float64 weights travelled (medians over elements)."""

    worst_ratio: float
    envelope_over_travel: float


def track_fp64(rule: Rule, hyper: Mapping[str, Any], shapes_: list[tuple[int, ...]], seed: int,
               dtype: torch.dtype, codecs: Any = "flash", steps: int = 20, grad_scale: float = 1.0,
               lanes=(), compiled: bool = False) -> Tracking | None:
    """Property 4 for one drawn case: run ``steps`` steps with ``codecs`` and, beside them, the rule
    in float64 from the same start and gradients; every stored value must stay within its envelope
    (:class:`flashcompile.language.sensitivity.Sensitivity`). Returns None for rules the envelope does not
    cover (per-tensor reductions)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes_]
    opt = Optimizer(params, rule, codecs=codecs, compile=compiled, flat=False, **hyper)
    group = opt.param_groups[0]
    values = opt.hyperparameters_of(group)
    traced = trace(rule, dict(opt.flags_of(group)))
    live = traced.live_states()
    sens = _sensitivity(rule, opt.flags_of(group), (PARAM, *live))
    if sens.unsupported:
        return None
    scalar_states = getattr(rule, "scalar_states", ())
    scalars = [v for name in traced.hyper for v in np.atleast_1d(values[name]).tolist()]
    ref = [{PARAM: p.detach().double(), **{
        k: p.detach().double() if k in rule.starts else torch.zeros(p.shape, dtype=torch.float64)
        for k in rule.states if k not in scalar_states}} for p in params]
    start = [r[PARAM].clone() for r in ref]
    host = [dict.fromkeys(scalar_states, 0.0) for _ in params]
    tol = [{k: np.zeros(p.numel()) for k in (PARAM, *live)} for p in params]
    worst = 0.0
    for step in range(1, steps + 1):
        refs = []
        for p in params:
            p.grad = gradient(p.shape, grad_scale, lanes, dtype, gen)
            refs.append(fp32_step(opt, p))
        opt.step()
        assert_within_bounds(opt, params, refs, step, compiled, 8.0 if compiled else 0.0)
        for i, (p, (plan, new32, old)) in enumerate(zip(params, refs)):
            g = p.grad.detach().double()
            flat = {k: v.reshape(-1).numpy() for k, v in ref[i].items()}
            bounds = {k: _bound(plan.codecs[k], new32[k], compiled) for k in tol[i]}
            tol[i] = sens.propagate(
                {k: flat[k] for k in tol[i]}, tol[i],
                {k: old[k].double().reshape(-1).numpy() for k in tol[i]},
                g.reshape(-1).numpy(), {**flat, **host[i]}, [step, *scalars], bounds)
            out = rule.fn(ref[i][PARAM], g, *(host[i][k] if k in scalar_states else ref[i][k]
                                              for k in rule.states), step=step, **values)
            # an output may be a number (where(step == 1, 0.0, ...) picks a branch on a Python
            # step): every element then holds it
            ref[i] = {PARAM: _elements(out[0], p), **{k: _elements(v, p) for k, v in
                                                      zip(rule.states, out[1:])
                                                      if k not in scalar_states}}
            host[i] = {k: float(v) for k, v in zip(rule.states, out[1:]) if k in scalar_states}
            for k in tol[i]:
                got = (opt.master_weight(p) if k == PARAM else opt.state_value(p, k)).double()
                worst = max(worst, _check_envelope(rule, k, step, got, ref[i][k], tol[i][k]))
    with np.errstate(all="ignore"):
        envelope = np.median(np.concatenate([np.nan_to_num(t[PARAM], nan=np.inf) for t in tol]))
        travel = np.median(np.concatenate([(r[PARAM] - p0).abs().reshape(-1).numpy()
                                           for r, p0 in zip(ref, start)]))
        return Tracking(worst, float(envelope / travel))


def _elements(value, p: torch.Tensor) -> torch.Tensor:
    """A float64 output of the rule as a tensor shaped like ``p``."""
    return torch.as_tensor(value, dtype=torch.float64).expand(p.shape).clone()


@functools.cache
def _sensitivity(rule: Rule, flags: tuple[tuple[str, bool], ...], tracked: tuple[str, ...]):
    return Sensitivity(trace(rule, dict(flags)), tracked, PARAM)


def _bound(codec: Codec, value: torch.Tensor, compiled: bool) -> np.ndarray:
    b = bound(codec, value) + (bound(codec, value, code_step=True) if compiled else 0)
    return b.double().reshape(-1).numpy()


def _check_envelope(rule: Rule, key: str, step: int, got: torch.Tensor, want: torch.Tensor,
                    tol: np.ndarray) -> float:
    """Largest ``|got - want| / tol`` over elements where the float64 value is finite; raises above 1."""
    got, want = got.reshape(-1).numpy(), want.reshape(-1).numpy()
    with np.errstate(all="ignore"):
        dev = np.abs(got - want)
        ratio = np.where(np.isfinite(want), np.where(dev == 0, 0.0, dev / tol), 0.0)
    ratio = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf)
    i = int(np.argmax(ratio))
    assert ratio[i] <= 1, (
        f"step {step} {key} of {rule.name}: stored {got[i]:.9g}, float64 rule {want[i]:.9g}, "
        f"|difference| {dev[i]:.3g} exceeds the envelope {tol[i]:.3g} derived from the codecs' bounds "
        f"and the rule's sensitivity (element {i})"
    )
    return float(ratio[i])


def check_rule(rule: Rule, *, codecs: Any = "flash",
               dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
               steps: int = 5, max_examples: int = 20, compiled: bool = False,
               track_steps: int = 20, hyper: st.SearchStrategy | None = None) -> None:
    """Run the property suite on ``rule`` with ``codecs``; raises on the first violation.

    Args:
        rule: a :func:`flashcompile.rule`.
        codecs: ``"flash"``, ``"fp32"`` or a mapping, as :class:`flashcompile.Optimizer` takes.
        dtypes: param dtypes to draw from.
        steps: steps per drawn case of the stepwise codec-bound check (property 3).
        max_examples: hypothesis examples per property.
        compiled: also compare the compiled kernel against the eager function, and run the step
            properties through it.
        track_steps: steps per drawn case of the float64 tracking (property 4); 0 skips it.
        hyper: the hyperparameters to draw (default :func:`hyperparameters`: each float x0.1 to
            x10 of its default inside its range), for rules whose hyperparameters only work
            together (Newton-Schulz coefficients: a polynomial tuned as one).
    """
    hyper_strategy = hyper if hyper is not None else hyperparameters(rule)
    flag_settings = rule.flag_settings()
    for flags in flag_settings:
        check_facts(trace(rule, flags))

    spec = check_codec_spec(codecs, rule)
    used = {c for dtype in dtypes for flags in flag_settings
            for _, c in resolve_codecs(rule, spec, dtype, trace(rule, flags).live_states())}
    for codec in sorted(used, key=lambda c: c.name):
        check_codec(codec, max_examples)

    drawn_shapes = matrix_lists if rule.needs_matrices else shape_lists

    @settings(max_examples=max_examples, deadline=None)
    @given(hyper=hyper_strategy, shapes_=drawn_shapes, seed=seeds,
           dtype=st.sampled_from(dtypes), grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
    def steps_within_codec_bounds(hyper, shapes_, seed, dtype, grad_scale):
        check_steps(rule, hyper, shapes_, seed, dtype, codecs, steps, grad_scale, compiled)

    steps_within_codec_bounds()
    untracked = _untracked_reason(rule, {k: rule.defaults[k] for k in rule.flags})
    if track_steps and untracked:  # never a silent skip: say which op the envelope lacks
        warnings.warn(f"check_rule({rule.name}): property 4 (tracking float64) does not run: "
                      f"{untracked}", UntrackedRule, stacklevel=2)
    elif track_steps:
        @settings(max_examples=max_examples, deadline=None)
        @given(hyper=hyper_strategy, shapes_=drawn_shapes, seed=seeds,
               dtype=st.sampled_from(dtypes), grad_scale=magnitudes, lanes=special_lanes)
        def tracks_float64_within_envelope(hyper, shapes_, seed, dtype, grad_scale, lanes):
            track_fp64(rule, hyper, shapes_, seed, dtype, codecs, track_steps, grad_scale, lanes,
                       compiled)

        tracks_float64_within_envelope()
    if compiled:
        _check_compiled_plans(rule, spec, dtypes, flag_settings)


class UntrackedRule(UserWarning):
    """:func:`check_rule` could not run property 4: the rule uses an op the error envelope has no
    interval rule for (today ``sum_all``, ``orthogonalize`` and the means in the parameter's shape:
    LAMB, LARS, Muon and Adafactor run properties 1-3 and 5), or the rule has shared numbers
    (Prodigy's d: a sum over every parameter)."""


def _untracked_reason(rule: Rule, flags: Mapping[str, bool]) -> str:
    if rule.shared:
        return (f"shared numbers {list(rule.shared)}: each step's values depend on every "
                "parameter (total), not on one parameter's float64 run")
    key = tuple(sorted(flags.items()))
    return _sensitivity(rule, key, (PARAM, *trace(rule, flags).live_states())).unsupported


def _check_compiled_plans(rule, spec, dtypes, flag_settings) -> None:
    """The compiled kernel of every plan against its eager function (one code step apart at most).
    A rule that runs in each parameter's shape checks that at each compiled step's first call
    (``ShapedPlan``), which the compiled steps above went through."""
    if rule.shaped:
        return
    for dtype, flags in itertools.product(dtypes, flag_settings):
        traced = trace(rule, flags)
        key = PlanKey(rule, tuple(sorted(flags.items())),
                      resolve_codecs(rule, spec, dtype, traced.live_states()), "cpu", True)
        for groups in (1, 5):
            mismatch = get_plan(key).compare_compiled("cpu", groups, seed=groups)
            assert mismatch is None, f"{rule.name} {flags} {dtype}: compiled != eager: {mismatch}"
