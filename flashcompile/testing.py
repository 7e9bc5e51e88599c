"""Property checks for any rule x codecs, usable from a user's pytest (needs ``hypothesis``).

``check_rule(rule)`` runs, under hypothesis-drawn shapes (odd sizes, 1-element, multi-dim), seeds,
gradient magnitudes, flags and hyperparameters inside the rule's declared ranges:

1. the nonnegativity proof of every state declared ``nonnegative``, for every flag setting;
2. step by step, the rule with the requested codecs against the same rule with fp32 codecs run from
   the same decoded state: both execute the same generated fp32 math, so each decoded value must be
   within its codec's declared error bound of the fp32 value (fp32 storage: exactly equal);
3. optionally, the compiled plan against the eager one (one code step at rounding ties).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcompile.codecs import GROUP
from flashcompile.dsl import Rule
from flashcompile.optimizer import Optimizer
from flashcompile.plan import PARAM, PlanKey, get_plan, state_key
from flashcompile.presets import resolve_codecs
from flashcompile.trace import check_facts, trace

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)
shape_lists = st.lists(shapes, min_size=1, max_size=3)
seeds = st.integers(0, 2**31 - 1)


def hyperparameters(rule: Rule) -> st.SearchStrategy[dict[str, Any]]:
    """Hyperparameters near the rule's defaults (x0.1 .. x10) inside its declared ranges; flags free."""
    def near(name: str, default: float) -> st.SearchStrategy[float]:
        lo, hi = rule.range_of(name)
        if hi <= 1.0:  # interval-like (betas): anywhere in [lo, hi), not too close to hi
            return st.floats(lo, lo + 0.999 * (hi - lo))
        if default == 0:
            return st.sampled_from([0.0, 1e-3, 0.1])
        return st.floats(max(lo, default / 10), min(hi, default * 10) if hi != float("inf") else default * 10)

    fields = {}
    for name, default in rule.defaults.items():
        if isinstance(default, bool):
            fields[name] = st.booleans()
        elif isinstance(default, tuple):
            fields[name] = st.tuples(*(near(name, d) for d in default))
        else:
            fields[name] = near(name, float(default))
    return st.fixed_dictionaries(fields)


def padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` flat, zero-padded to whole groups of 32 (the optimizer's storage layout)."""
    out = torch.zeros(-(-x.numel() // GROUP) * GROUP, device=x.device)
    out[: x.numel()] = x.reshape(-1)
    return out


def bound(codec, ref: torch.Tensor, code_step: bool = False) -> torch.Tensor:
    """The codec's error bound (or, with ``code_step``, one code step) for ``ref`` laid out in
    zero-padded groups, as the optimizer stores it."""
    fn = codec.code_step if code_step else codec.error_bound
    return fn(padded(ref).view(-1, GROUP)).reshape(-1)[: ref.numel()].view_as(ref)


def fp32_step(opt: Optimizer, p: torch.Tensor):
    """One step of ``opt``'s rule with fp32 codecs from ``opt``'s decoded state for ``p``.

    Returns the plan ``opt`` runs, the fp32 step's new values (master weight and states) and the
    decoded values before the step.
    """
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    flags = opt._flags(group)
    flash = opt._plan(p, flags)
    live = tuple(k for k in flash.codecs if k != PARAM)
    plan = get_plan(PlanKey(opt.rule, flags, resolve_codecs(opt.rule, "fp32", torch.float32, live),
                            p.device.type, False))
    master = opt.master_weight(p).clone()
    started = bool(opt.state.get(p))
    old = {PARAM: master.clone(),
           **{k: opt.state_value(p, k) if started else torch.zeros_like(master) for k in live}}
    stored = {state_key(k, c.fields[0]): padded(old[k]) for k, c in plan.codecs.items() if k != PARAM}
    step = int(opt.state[p]["step"].item()) + 1 if started else 1
    # scalar states (NAdam's mu_product) are read from opt's state, not advanced
    values = plan.scalars(step, opt._hyperparameters(group), opt.state.get(p))
    plan.run(master, p.grad, stored, values)
    new = {PARAM: master, **{k: stored[k][: p.numel()].view_as(p) for k in stored}}
    return flash, new, old


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
            excess = (got - ref[key]).abs() - tol
            assert excess.max() <= 0, (
                f"step {step} {key} ({codec.name}): |flash - fp32| exceeds the codec bound by "
                f"{excess.max().item():.3g}"
            )


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


def check_rule(rule: Rule, *, codecs: Any = "flash",
               dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
               steps: int = 5, max_examples: int = 20, compiled: bool = False) -> None:
    """Run the property suite on ``rule`` with ``codecs``; raises on the first violation."""
    for values in itertools.product([False, True], repeat=len(rule.flags)):
        check_facts(trace(rule, dict(zip(rule.flags, values))))

    @settings(max_examples=max_examples, deadline=None)
    @given(hyper=hyperparameters(rule), shapes_=shape_lists, seed=seeds,
           dtype=st.sampled_from(dtypes), grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
    def steps_within_codec_bounds(hyper, shapes_, seed, dtype, grad_scale):
        check_steps(rule, hyper, shapes_, seed, dtype, codecs, steps, grad_scale, compiled)

    steps_within_codec_bounds()
