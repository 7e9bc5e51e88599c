"""Flash codecs against the fp32 math, step by step, within the codecs' declared bounds.

Each step, the reference runs the same rule with fp32 codecs from the flash optimizer's own decoded
master weight and states. Both run the same generated math on the same fp32 inputs, so the only
difference left is the encoding: the flash optimizer's decoded results must lie within each codec's
error bound of the reference (for fp32 storage: exactly equal). A wrong codec, layout, padding or
tail shows up at the step it happens instead of hiding in accumulated drift.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashcompile as fc
from flashcompile.codecs import GROUP
from flashcompile.optimizer import resolve_codecs
from flashcompile.plan import PARAM, PlanKey, get_plan, state_key
from strategies import seeds, shape_lists

STEPS = 6

OPTIMIZERS = {
    "sgd": lambda p: fc.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, compile=False),
    "adamw": lambda p: fc.AdamW(p, lr=1e-2, compile=False),
    "adam_amsgrad": lambda p: fc.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.01, compile=False),
    "lion": lambda p: fc.Lion(p, lr=1e-3, weight_decay=0.1, compile=False),
}


def _padded(x: torch.Tensor) -> torch.Tensor:
    groups = -(-x.numel() // GROUP)
    out = torch.zeros(groups * GROUP, device=x.device)
    out[: x.numel()] = x.reshape(-1)
    return out


def _fp32_step(opt, p):
    """One step of the rule with fp32 codecs from ``opt``'s decoded state: new master and states."""
    group = opt.param_groups[0]
    flags = opt._flags(group)
    flash = opt._plan(p, flags)
    live = tuple(k for k in flash.codecs if k != PARAM)
    plan = get_plan(PlanKey(opt.rule, flags, resolve_codecs(opt.rule, "fp32", torch.float32, live),
                            p.device.type, False))
    master = opt.master_weight(p).clone()
    old = {PARAM: master.clone(), **{k: opt.state_value(p, k) if opt.state.get(p) else
                                     torch.zeros_like(master) for k in live}}
    stored = {state_key(k, c.fields[0]): _padded(opt.state_value(p, k)) if opt.state.get(p)
              else torch.zeros_like(_padded(p)) for k, c in plan.codecs.items() if k != PARAM}
    step = int(opt.state[p]["step"].item()) + 1 if opt.state.get(p) else 1
    plan.run(master, p.grad, stored, plan.scalars(step, opt._hyperparameters(group)))
    new = {k: stored[k][: p.numel()].view_as(p) for k in stored}
    return flash, {PARAM: master, **new}, old


def _bound(codec, ref: torch.Tensor) -> torch.Tensor:
    """The codec's bound for ``ref`` laid out in zero-padded groups, as the optimizer stores it."""
    x = _padded(ref)
    return codec.error_bound(x.view(-1, GROUP)).reshape(-1)[: ref.numel()].view_as(ref)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(shapes=shape_lists, seed=seeds, grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
def test_flash_step_is_within_codec_bounds_of_fp32_step(name, dtype, shapes, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = OPTIMIZERS[name](params)
    for step in range(1, STEPS + 1):
        refs = []
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * grad_scale).to(dtype)
            refs.append(_fp32_step(opt, p))
        opt.step()
        assert_within_bounds(opt, params, refs, step)


def assert_within_bounds(opt, params, refs, step, code_steps=1, fp32_ulps=0.0):
    """Each decoded value within ``code_steps`` x its codec bound of the fp32 step's value.

    Compiled runs pass ``code_steps=2`` (a tie may round one code apart) and a few ulps for fused
    fp32 math that rounds differently from eager, relative to the magnitudes entering the update."""
    for p, (plan, ref, old) in zip(params, refs):
        scale = old[PARAM].abs() + p.grad.float().abs()
        for key, codec in plan.codecs.items():
            got = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
            terms = scale + old[key].abs() + ref[key].abs()
            tol = code_steps * _bound(codec, ref[key]) + fp32_ulps * 2.0**-24 * terms
            excess = (got - ref[key]).abs() - tol
            assert excess.max() <= 0, (
                f"step {step} {key} ({codec.name}): |flash - fp32| exceeds the codec bound by "
                f"{excess.max().item():.3g}"
            )
