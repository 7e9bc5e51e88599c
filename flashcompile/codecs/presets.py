"""Which codec stores what by default: the presets ("flash", "paper", "fp32", "relative") and user
mappings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from flashcompile import codecs as _codecs
from flashcompile.codecs import PARAM, Codec

if TYPE_CHECKING:  # rules are read by their states and flash_codecs only
    from flashcompile.language.dsl import Rule

PRESETS = ("flash", "paper", "fp32", "relative")


def default_codec(fact: str, preset: str) -> Codec:
    """The state codec a preset picks for a state's declared fact.

    "flash" (the default): per group of 32 the paper's codes or codes relative to each value
    (``codecs/adaptive.py``): ``softsign_adaptive`` for signed states, ``sqrt_adaptive_sr`` for
    nonnegative ones (rounded stochastically: a second moment's slow EMA keeps moving late in
    training; a nonzero value never decodes to 0). Chosen by the numerics studies
    (``docs/numerics.md``): as close to fp32 Adam's update as the paper's codecs where a group's
    values are alike (the same codes), the update's direction kept where a group mixes scales,
    and the late-training loss of fp32 states. A rule may name its own
    (``rule(flash_codecs=...)``).

    "paper": FlashOptim's codecs (arXiv 2602.23349), ``softsign_int8`` and ``sqrt_uint8``; with
    Adam's ``step_guard=False`` this is FlashOptim's AdamW exactly.

    "relative": 8-bit little floats relative to each value, rounded stochastically
    (``e4m3_int8_sr``, ``sqrt_e4m4_sr``). Same bytes and weight split under every preset but
    fp32; "sign" states take ``sign_int8`` under every preset but fp32.
    """
    if preset == "fp32":
        return _codecs.fp32
    if fact == "sign":  # exact in one byte: -1, 0 and +1 need no scale
        return _codecs.sign_int8
    nonnegative = fact == "nonnegative"
    if preset == "relative":
        return _codecs.sqrt_e4m4_sr if nonnegative else _codecs.e4m3_int8_sr
    if preset == "paper":
        return _codecs.sqrt_uint8 if nonnegative else _codecs.softsign_int8
    return _codecs.sqrt_adaptive_sr if nonnegative else _codecs.softsign_adaptive


def default_param_codec(dtype: torch.dtype, preset: str) -> Codec:
    """The master-weight codec a preset picks for a param dtype."""
    if preset != "fp32" and dtype != torch.float32:
        return _codecs.WeightSplit(dtype, torch.int8)
    return _codecs.fp32.for_param(dtype)


def resolve_codecs(rule: Rule, spec: str | Mapping[str, Codec], dtype: torch.dtype,
                   live: tuple[str, ...]) -> tuple[tuple[str, Codec], ...]:
    """(PARAM, codec), then (state, codec) for each live state: the preset, then the overrides."""
    preset = spec if isinstance(spec, str) else "flash"
    overrides = {} if isinstance(spec, str) else spec
    param = overrides.get(PARAM, default_param_codec(dtype, preset)).for_param(dtype)
    out = [(PARAM, param)]
    for name in live:
        default = default_codec(rule.states[name], preset)
        if preset == "flash" and name in rule.flash_codecs:
            default = _codecs.get(rule.flash_codecs[name])
        codec = overrides.get(name, default)
        out.append((name, codec))
    return tuple(out)


def check_codec_spec(spec: Any, rule: Rule) -> str | dict[str, Codec]:
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"codecs={spec!r} is not a preset; use one of {PRESETS} or a mapping")
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"codecs must be a preset name or a mapping, got {type(spec).__name__}")
    out = {}
    for name, codec in spec.items():
        if name != PARAM and name not in rule.states:
            raise ValueError(
                f"codecs names unknown state {name!r}; {rule.name} has states "
                f"{list(rule.states)} (and 'param' for the master weight)"
            )
        if name in rule.scalar_states:
            raise ValueError(
                f"state {name!r} of {rule.name} is a scalar state (one number per param, kept as a "
                "0-d fp32 tensor): it takes no codec; remove it from codecs"
            )
        c = _codecs.get(codec)
        if name != PARAM and c.domain == "nonnegative" and rule.states[name] != "nonnegative":
            raise ValueError(
                f"codec {c.name} stores only nonnegative values, but state {name!r} of {rule.name} "
                "is signed; pick a signed codec such as softsign_int8"
            )
        if name != PARAM and c.domain == "sign" and rule.states[name] != "sign":
            raise ValueError(
                f"codec {c.name} stores only -1, 0 and +1, but state {name!r} of {rule.name} is "
                f"declared {rule.states[name]!r}; pick a codec for real values (softsign_int8)"
            )
        out[name] = c
    return out
