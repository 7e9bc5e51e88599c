"""State dicts in torch.optim's format: export for torch.optim, import from it.

torch.optim keeps each state as a tensor shaped like its param (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``, ``step``). Export decodes every stored state to fp32 in that shape; import
encodes such tensors with this optimizer's codecs (the master weight starts from the param itself,
as torch.optim has none). A run can start in torch.optim, continue here, and go back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flashcompile.codecs import PARAM, layout
from flashcompile.compiler.plan import Plan, state_key
from flashcompile.language.dsl import FACTORED_FACTS


def is_torch_format(rule_states: Mapping[str, str], saved: Mapping[str, Any],
                    p: torch.Tensor) -> bool:
    """Whether one param's saved state is torch.optim's: state names as keys (no codec fields) and
    tensors shaped like the param. (A 1-D param whose size is a multiple of 32 matches both formats;
    for fp32 storage they then hold the same values.)"""
    # one number per param, or per row or column (Adafactor's row_var, col_var): their own shapes
    host = {"step", *(k for k, fact in rule_states.items() if fact in ("scalar", *FACTORED_FACTS))}
    return set(saved) <= {"step", *rule_states} and all(
        v is None or tuple(v.shape) == tuple(p.shape) for k, v in saved.items() if k not in host)


def export_state(opt, p: torch.Tensor) -> dict[str, Any]:
    """torch.optim's state for ``p``: step plus every live state decoded to fp32, shaped like p."""
    state = opt.state[p]
    plan = opt.plan_for(p, opt.flags_of(_group_of(opt, p)))
    out: dict[str, Any] = {"step": state["step"].detach().clone().float()}
    out.update({k: state[k].detach().clone().float() for k in plan.key.rule.scalar_states})
    out.update({k: state[k].detach().clone() for k in plan.factored})
    for name in plan.codecs:
        if name != PARAM:
            out[name] = opt.state_value(p, name).clone()
    return out


def import_state(p: torch.Tensor, plan: Plan, saved: Mapping[str, Any], pid) -> dict[str, Any]:
    """Encode a torch.optim state for ``p`` into ``plan``'s fields (checked before use)."""
    values = {PARAM: p.detach().float()}
    for name in plan.codecs:
        if name == PARAM:
            continue
        t = saved.get(name)
        if t is None:  # e.g. torch keeps no momentum buffer before a step with momentum
            t = torch.zeros_like(values[PARAM])
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"state {name!r} of param {pid} has shape {tuple(t.shape)}, the param has "
                f"{tuple(p.shape)}: the state dict belongs to other parameters"
            )
        values[name] = t.detach().to(device=p.device, dtype=torch.float32)
    # torch.optim.SGD keeps no step; a momentum buffer means at least one step was taken, and the
    # rule's "first step" branch must not reset it.
    default_step = 1.0 if any(saved.get(k) is not None for k in saved if k != "step") else 0.0
    step = saved.get("step", default_step)
    out: dict[str, Any] = {"step": torch.as_tensor(step, dtype=torch.float32).detach().clone().cpu()}
    for name in plan.key.rule.scalar_states:  # NAdam's mu_product, ASGD's eta and mu: 0-d tensors
        out[name] = torch.as_tensor(saved.get(name, 0.0), dtype=torch.float32).detach().clone().cpu()
    for name in plan.factored:  # absent: zeros, as a fresh state starts
        if saved.get(name) is not None:
            out[name] = factored_state(p, plan, name, saved[name], pid)
    order = layout.memory_order(p)  # states follow the param's memory order
    for name, codec in plan.codecs.items():
        for f, t in zip(codec.fields, layout.encode_flat(codec, layout.flat(values[name], order))):
            key = state_key(name, f)
            if key in plan.owned_fields:
                out[key] = t
    return out


def factored_state(p: torch.Tensor, plan: Plan, name: str, saved: Any, pid) -> torch.Tensor:
    """A saved factored state (one fp32 number per row or column of ``p``), checked against the
    shape ``plan`` gives it and copied to ``p``'s device as fp32."""
    want = plan.factored_shape(name, p.shape)
    if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != want:
        got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise ValueError(f"state {name!r} of param {pid} has shape {got}; a param of shape "
                         f"{tuple(p.shape)} needs {want}: the state dict belongs to other "
                         "parameters")
    if not saved.is_floating_point():
        raise ValueError(f"state {name!r} of param {pid} is {saved.dtype}; it holds fp32 values")
    return saved.detach().to(device=p.device, dtype=torch.float32, copy=True)


def torch_state_dict(opt) -> dict[str, Any]:
    """``opt.state_dict()`` in torch.optim's format, for the torch optimizer of the same name."""
    sd = opt.state_dict()
    for group in sd["param_groups"]:  # fp32 states: the identity of the encoding does not apply
        group.pop("codecs", None)
    params = [p for g in opt.param_groups for p in g["params"]]
    sd["state"] = {i: export_state(opt, p) for i, p in enumerate(params) if opt.state.get(p)}
    return sd


def _group_of(opt, p: torch.Tensor) -> Mapping[str, Any]:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))
