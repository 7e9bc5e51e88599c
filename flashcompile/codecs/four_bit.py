"""4-bit group codecs: two codes per byte plus one fp16 scale per group of 32 (0.5625 B/value).

With them AdamW keeps 6.125 B/param between steps (bf16 weight 2 + residual 1 + gradient 2 + two
states of 0.5625), 4.125 with gradient release. arXiv 2309.01507 trains AdamW with 4-bit states
of blocks of 128 (momentum) and rank-1 normalisation (second moment); the second moment there
needs a map without a zero code: a small v stored as 0 makes Adam step by m / eps. Here both
states take the paper's group of 32 and its companding at 4 bits. Rounded stochastically
(``ADAM_STATES``) they train within seed noise of fp32 states and finish a long schedule at 1.04x
their loss, but lose the update's direction in groups that mix scales (outlier features: cosine
0.21 to fp32 Adam's; ``docs/numerics.md``).

* ``softsign_int4`` (signed states): the paper's ``2y / (1 + |y|)`` of ``y = x / scale`` coded
  as ``round(7 z)`` in ``-7 .. 7`` (two's complement nibbles); decoded as ``c s / (14 - |c|)``.
  Magnitudes 0, 1/13, 1/6, 3/11, 2/5, 5/9, 3/4, 1 of the scale: finer near zero than a linear
  code, as FP4's E2M1 is.
* ``sqrt_uint4`` (nonnegative states): ``round(15 sqrt(v) / scale)``, the scale the group's largest
  square root, and a nonzero value never coded 0 (one step, ``scale / 15``, instead): a second
  moment is over-, never under-stated where the code runs out, so a lane moves less than Adam
  would, never more (the role of 2309.01507's zero-free map).

Not yet the lean path on a GPU: a kernel that walks groups as ``(G, 32)`` cannot store a
``(G, 16)`` field, so the step's kernel stores each state's codes a byte each and a kernel of its
own packs them into the state (``packing.pack`` reads them back as int32 words, which makes
Inductor store the bytes: before 2026-12-07 it stored the new fp32 values and the int32 noise the
codes come from, 16 B/param of temporaries in AdamW's step written and read again, and the step
ran at 24% of its bytes' copy time on an H100). Now 2 B/param of temporaries, written and read:
AdamW's step moves 14.25 B/param against the 10.25 it must (the Triton code Inductor generates on
the CPU); on an H100 61% of its bytes' copy time, 1.35x the 8-bit default's step. The fused
design keeps m's and v's codes of the same value in one byte.

``stochastic=True`` (``*_sr``) rounds stochastically (``stochastic.py``). A group is 16 bytes of
codes: value ``2i`` in the low nibble of byte ``i`` (``packing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import FP32_SLACK, Codec, Field, int_to_float, sr_suffix
from flashcompile.codecs.companded import (
    _group_scale,
    softsign_bound,
    softsign_codes,
    softsign_values,
    sqrt_codes,
    sqrt_root_bound,
    sqrt_roots_of,
)
from flashcompile.codecs.packing import pack, unpack

_FIELDS = (Field("codes", torch.uint8, pack=2), Field("scale", torch.float16, per_group=True))


@dataclass(frozen=True)
class SoftsignInt4(Codec):
    """4-bit codes of ``2x / (1 + |x|)`` + fp16 absmax per 32: 0.5625 B/value."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    fields = _FIELDS

    @property
    def name(self) -> str:  # type: ignore[override]
        return "softsign_int4" + sr_suffix(self)

    def encode(self, x, noise=None):
        scale = _group_scale(x.abs())
        return pack(softsign_codes(x, scale, noise, 7), 4), scale  # two's complement nibbles

    def decode(self, codes, scale):
        c = int_to_float((unpack(codes, 4) ^ 8) - 8)  # the nibble's sign
        return softsign_values(c, scale.float(), 7)

    def error_bound(self, x):
        return softsign_bound(x.abs(), _group_scale(x.abs()).float(), self.stochastic, 7)


@dataclass(frozen=True)
class SqrtUint4(Codec):
    """4-bit codes of ``sqrt(v)`` + fp16 max(sqrt(v)) per 32: 0.5625 B/value; a nonzero value
    decodes nonzero."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    domain = "nonnegative"
    fields = _FIELDS

    @property
    def name(self) -> str:  # type: ignore[override]
        return "sqrt_uint4" + sr_suffix(self)

    def encode(self, x, noise=None):
        r = torch.sqrt(x)
        scale = _group_scale(r)
        return pack(sqrt_codes(r, scale, noise, True, 15), 4), scale

    def decode(self, codes, scale):
        r = sqrt_roots_of(int_to_float(unpack(codes, 4)), scale.float(), 15)
        return r * r

    def error_bound(self, x):
        r = torch.sqrt(x)
        dr = sqrt_root_bound(r, _group_scale(r).float(), self.stochastic, True, 15)
        return dr * (2 * r + dr) + x * FP32_SLACK  # |a^2 - b^2| = |a - b| (a + b)


softsign_int4 = SoftsignInt4()
sqrt_uint4 = SqrtUint4()
softsign_int4_sr = SoftsignInt4(stochastic=True)
sqrt_uint4_sr = SqrtUint4(stochastic=True)

# Adam's states in 4 bits as the late-training study picked them: both rounded stochastically
# (the loss after a long schedule at 1.04x fp32 states', against 1.13x with m rounded to nearest
# and 2.3x with neither; docs/numerics.md)
ADAM_STATES = {"exp_avg": "softsign_int4_sr", "exp_avg_sq": "sqrt_uint4_sr"}
