"""Hyperparameters as torch.optim users pass them: checked values, and torch's implementation flags.

Values are checked before any parameter is read (torch.optim validates in ``__init__`` before
``super().__init__``), with torch.optim's messages first (``Invalid learning rate: -1``) so code and
tests written against torch.optim see the same errors, then the allowed range and what to do.

torch.optim's implementation flags select a kernel, not the math: ``foreach=`` and ``fused=`` hold by
construction (every plan is one fused kernel over a flat bucket or a tensor), ``capturable=`` is
accepted and a step taken while a CUDA graph captures raises (the step computes its scalars on the
host; flat CUDA buckets already replay a graph of their own), and ``differentiable=True`` is accepted
for steps that would build no autograd graph and raises for one that would
(:mod:`flashcompile.runtime.guards`). They are kept in ``defaults`` and every param group, as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from flashcompile.language.dsl import Rule

IMPLEMENTATION_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}

# torch.optim's messages for the common names; others read "Invalid <name> value: <value>"
_TORCH_WORDING = {"lr": "Invalid learning rate: {value}", "eps": "Invalid epsilon value: {value}"}


def implementation_flags(options: dict[str, Any], owner: str) -> dict[str, Any]:
    """Pop torch's implementation flags from ``options`` and check them as torch.optim does."""
    flags = {k: options.pop(k, default) for k, default in IMPLEMENTATION_FLAGS.items()}
    for k, v in flags.items():
        optional = IMPLEMENTATION_FLAGS[k] is None
        if not (isinstance(v, bool) or (optional and v is None)):
            raise TypeError(f"{owner}: {k} must be a bool{' or None' if optional else ''}, got {v!r}")
    if flags["fused"] and flags["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    if flags["fused"] and flags["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    return flags


def check_tensor_inputs(values: Mapping[str, Any], foreach: bool | None, capturable: bool,
                        refuse_with_foreach: bool) -> None:
    """torch.optim's rules for tensor hyperparameters: one element each, betas all floats or all
    tensors, and (Adam, AdamW) none with ``foreach=True`` unless ``capturable=True``: torch.optim
    refuses that combination, and so does its twin here, so code that runs here runs there."""
    for name, value in values.items():
        entries = value if isinstance(value, (tuple, list)) else (value,)
        kinds = {isinstance(v, torch.Tensor) for v in entries}
        if name == "betas" and len(kinds) > 1:
            raise ValueError("betas must be either both floats or both Tensors")
        for i, v in enumerate(entries):
            if not isinstance(v, torch.Tensor):
                continue
            label = f"{name}[{i}]" if isinstance(value, (tuple, list)) else name
            if refuse_with_foreach and foreach and not capturable:
                raise ValueError(
                    f"{label} as a Tensor is not supported for capturable=False and foreach=True "
                    "(as in torch.optim); pass a float, or foreach=None")
            if v.numel() != 1:
                raise ValueError(f"Tensor {label} must be 1-element, got shape {tuple(v.shape)}")


def values(rule: Rule, group: Mapping[str, Any]) -> dict[str, Any]:
    """The group's hyperparameters as Python values (floats, tuples of floats, bools, declared
    choices), each checked against the rule's range; a message names the hyperparameter, its
    value and the range."""
    out = {}
    for name, default in rule.defaults.items():
        value = group[name]
        if name in rule.choices:
            out[name] = rule.static_value(name, value)
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError(
                    f"{name} must be a bool (it selects a compiled branch), got {value!r}")
            out[name] = value
            continue
        lo, hi = rule.range_of(name)
        if isinstance(default, tuple):
            if not isinstance(value, (tuple, list)) or len(value) != len(default):
                raise ValueError(f"{name} must be a tuple of {len(default)} floats, got {value!r}")
            out[name] = tuple(_number(f"{name}[{i}]", v, lo, hi, _label(name, i))
                              for i, v in enumerate(value))
        else:  # inf is allowed where it is the default (Prodigy's growth_rate: no limit)
            out[name] = _number(name, value, lo, hi, _label(name), default == math.inf)
    return out


def _label(name: str, index: int | None = None) -> str:
    if name == "betas" and index is not None:
        return f"Invalid beta parameter at index {index}: {{value}}"
    if index is not None:
        return f"Invalid {name}[{index}] value: {{value}}"
    return _TORCH_WORDING.get(name, f"Invalid {name} value: {{value}}")


def _number(name: str, value: Any, lo: float, hi: float, label: str,
            inf_allowed: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        number = float(value.item())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:  # a string would convert through float() and a bool would read as 0 or 1: refuse both
        raise TypeError(f"{name} must be a float (or a 1-element tensor), got "
                        f"{type(value).__name__} {value!r}")
    if math.isnan(number) or number < lo or (number >= hi and not (inf_allowed and
                                                                   number == math.inf)):
        allowed = f"be finite and >= {lo}" if hi == math.inf else f"lie in [{lo}, {hi})"
        raise ValueError(f"{label.format(value=value)}; {name} must {allowed}")
    return number
