"""Codecs: how each optimizer state (and the master weight) is stored.

Names accepted wherever a codec is: ``fp32``, ``bf16``, ``bf16_sr`` (a bf16 weight rounded
stochastically, no residual), ``weight_split`` (bf16 + int8 residual),
``weight_split_int16``, ``weight_split_fp16`` (fp16 + int8), ``softsign_adaptive`` and
``sqrt_adaptive`` (the flash defaults for states: the paper's code or one relative to each value,
picked per group: ``adaptive.py``), ``softsign_int8`` and ``sqrt_uint8`` (the paper's codecs),
``sqrt_uint8_nonzero``, ``linear_int8``, ``sqrt_e4m4`` and ``e4m3_int8`` (precision relative to
each value: ``relative.py``), ``sign_int8`` (states that are -1, 0 or +1: ``sign.py``), and
stochastically rounded variants ``softsign_int8_sr``, ``sqrt_uint8_sr``, ``sqrt_uint8_nonzero_sr``,
``sqrt_e4m4_sr``, ``e4m3_int8_sr``, ``sqrt_adaptive_sr``, ``softsign_adaptive_sr``
(``stochastic.py``); 4-bit codes two to a byte, ``softsign_int4`` and ``sqrt_uint4`` (and
``_sr``: ``four_bit.py``); or any :class:`Codec` instance. :func:`register` adds a name.
"""

from __future__ import annotations

import torch

from flashcompile.codecs.base import GROUP, Codec, Field

PARAM = "param"  # the master weight's name in codec mappings and state keys
from flashcompile.codecs.adaptive import (
    SoftsignAdaptive,
    SqrtAdaptive,
    softsign_adaptive,
    softsign_adaptive_sr,
    sqrt_adaptive,
    sqrt_adaptive_sr,
)
from flashcompile.codecs.companded import (
    LinearInt8,
    SoftsignInt8,
    SqrtUint8,
    linear_int8,
    softsign_int8,
    softsign_int8_sr,
    sqrt_uint8,
    sqrt_uint8_nonzero,
    sqrt_uint8_nonzero_sr,
    sqrt_uint8_sr,
)
from flashcompile.codecs.floats import Float, Fp32Master, bf16, bf16_sr, fp32
from flashcompile.codecs.four_bit import (
    SoftsignInt4,
    SqrtUint4,
    softsign_int4,
    softsign_int4_sr,
    sqrt_uint4,
    sqrt_uint4_sr,
)
from flashcompile.codecs.relative import (
    E4M3Int8,
    SqrtE4M4,
    e4m3_int8,
    e4m3_int8_sr,
    sqrt_e4m4,
    sqrt_e4m4_sr,
)
from flashcompile.codecs.sign import SignInt8, sign_int8
from flashcompile.codecs.weight_split import WeightSplit

weight_split = WeightSplit(torch.bfloat16, torch.int8)

_REGISTRY: dict[str, Codec] = {
    "fp32": fp32,
    "bf16": bf16,
    "bf16_sr": bf16_sr,
    "weight_split": weight_split,
    "weight_split_int16": WeightSplit(torch.bfloat16, torch.int16),
    "weight_split_fp16": WeightSplit(torch.float16, torch.int8),
    "softsign_int8": softsign_int8,
    "sqrt_uint8": sqrt_uint8,
    "sqrt_uint8_nonzero": sqrt_uint8_nonzero,
    "linear_int8": linear_int8,
    "sqrt_e4m4": sqrt_e4m4,
    "e4m3_int8": e4m3_int8,
    "sign_int8": sign_int8,
    "sqrt_adaptive": sqrt_adaptive,
    "softsign_adaptive": softsign_adaptive,
    # stochastic rounding (codecs/stochastic.py); SoftsignInt8(stochastic=True, seed=n) for others
    "softsign_int8_sr": softsign_int8_sr,
    "sqrt_uint8_sr": sqrt_uint8_sr,
    "sqrt_uint8_nonzero_sr": sqrt_uint8_nonzero_sr,
    "sqrt_e4m4_sr": sqrt_e4m4_sr,
    "e4m3_int8_sr": e4m3_int8_sr,
    "sqrt_adaptive_sr": sqrt_adaptive_sr,
    "softsign_adaptive_sr": softsign_adaptive_sr,
    "softsign_int4": softsign_int4,
    "sqrt_uint4": sqrt_uint4,
    "softsign_int4_sr": softsign_int4_sr,
    "sqrt_uint4_sr": sqrt_uint4_sr,
}


def register(name: str, codec: Codec) -> None:
    """Make ``codec`` available by ``name`` in ``codecs=`` mappings."""
    if not isinstance(codec, Codec):
        raise TypeError(f"register({name!r}, ...) needs a Codec instance, got {type(codec).__name__}")
    _REGISTRY[name] = codec


def get(codec: str | Codec) -> Codec:
    """Look a codec up by name (instances pass through)."""
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str) and codec in _REGISTRY:
        return _REGISTRY[codec]
    raise ValueError(f"unknown codec {codec!r}; known codecs: {sorted(_REGISTRY)} (or pass a Codec)")


def names() -> list[str]:
    return sorted(_REGISTRY)


__all__ = [
    "GROUP", "Codec", "E4M3Int8", "Field", "Float", "Fp32Master", "LinearInt8", "SignInt8",
    "SoftsignAdaptive", "SoftsignInt4", "SoftsignInt8", "SqrtAdaptive", "SqrtE4M4", "SqrtUint4",
    "SqrtUint8", "WeightSplit", "bf16", "bf16_sr", "e4m3_int8", "e4m3_int8_sr", "fp32", "get",
    "linear_int8", "names", "register", "sign_int8", "softsign_adaptive",
    "softsign_adaptive_sr", "softsign_int4", "softsign_int4_sr", "softsign_int8",
    "softsign_int8_sr", "sqrt_adaptive", "sqrt_adaptive_sr", "sqrt_e4m4", "sqrt_e4m4_sr",
    "sqrt_uint4", "sqrt_uint4_sr", "sqrt_uint8", "sqrt_uint8_nonzero", "sqrt_uint8_nonzero_sr",
    "sqrt_uint8_sr", "weight_split",
]
