"""8-bit group codecs whose precision is relative to each value: little floats under a group scale.

The paper's codes (``companded.py``) place each group of 32 on a linear (or square-root) scale of
its absmax: a value 300x below its group's loudest gets one code step or none. Here each value
keeps its own exponent. The group stores only where its top binade lies, as a power of two in a
bf16 (exact, and bf16's exponent range: no overflow at 65504 nor underflow of tiny states as an
fp16 scale has); each value is a small float relative to it:

* ``sqrt_e4m4`` (nonnegative states, e.g. Adam's v): ``sqrt(v)`` as 4 exponent and 4 mantissa
  bits, uint8. 15 binades of ``sqrt(v)`` below the group's top (30 of ``v``) with 16 steps each,
  and steps of the lowest binade's size below them down to 0 (gradual underflow). The stored
  square root is within 1/32 of itself (3.1%), 1/16 of ``v`` to first order.
* ``e4m3_int8`` (signed states, e.g. momentum): sign and magnitude in an int8, the magnitude as 4
  exponent and 3 mantissa bits: 15 binades, within 1/16 (6.25%) of the value.

Codes are integer arithmetic on fp32 bit patterns (no log, exp or division), round to nearest, and
never overflow (the top binade is the group's). 1 byte per value plus the bf16 scale per 32:
1.0625 bytes, as the paper's codecs. A NaN or Inf in a group makes it decode to NaN (the bit-max
of a NaN is NaN), as the other codecs do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import (
    FP32_SLACK,
    Codec,
    Field,
    int_to_float,
    pow2,
    round_to_int,
    sr_suffix,
)
from flashcompile.codecs.stochastic import carry, round_stochastic

_SPAN = 15  # binades of normal codes under the group's top; a subnormal step below them
# the group's top exponent field never goes below this (2^-107): the lowest normal code stays a
# normal fp32 and every power of two the codes scale by stays in pow2's range
_LOWEST_TOP = _SPAN + 5
_NAN_TOP = 255


def _top_exponent(mag: torch.Tensor) -> torch.Tensor:
    """The fp32 exponent field of each group's largest magnitude (int32, ``(G, 1)``), at least
    :data:`_LOWEST_TOP`; 255 where the group holds a NaN or Inf. Bit max: for values >= 0 integer
    order is float order, and NaN sorts above Inf."""
    top = mag.view(torch.int32).amax(dim=-1, keepdim=True) >> 23
    return torch.clamp(top, min=_LOWEST_TOP)


def _scale_of(top: torch.Tensor) -> torch.Tensor:
    """The stored scale: 2^(top - 127) as a bf16 (its bits are the fp32's top half); NaN for a
    non-finite group."""
    bits = torch.where(top >= _NAN_TOP, 0x7FC0, top << 7).to(torch.int16)
    return bits.view(torch.bfloat16)


def _top_of(scale: torch.Tensor) -> torch.Tensor:
    return (scale.view(torch.int16).to(torch.int32) >> 7) & 0xFF


def _encode_magnitude(mag: torch.Tensor, top: torch.Tensor, mant: int,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """Codes ``0 .. 2^(4 + mant) - 1`` of ``mag >= 0`` (fp32) under each group's ``top``: exponent
    field ``f`` (1..15: binade ``top - 15 + f``) above ``mant`` mantissa bits; ``f = 0`` holds
    multiples of the lowest binade's step (as IEEE subnormals), rounding up into it seamlessly.
    With ``noise`` (``stochastic.uniform_noise``) rounded stochastically: a uniform
    integer below the dropped bits' weight is added before truncating, unbiased within a binade
    (codes are linear there)."""
    base = top - _SPAN  # fp32 exponent field of code exponent 0
    drop = 23 - mant
    # normal codes: rebase the exponent and round the mantissa on the bit pattern (a carry moves
    # into the exponent, as it should)
    # to nearest: half the dropped bits; stochastic: the noise's top `drop` bits, centred by the
    # same half (stochastic.carry)
    lowest = (base << 23) - (1 << (drop - 1))
    bits = mag.view(torch.int32) - lowest
    normal = (bits if noise is None else bits + carry(noise, drop)) >> drop
    # below the lowest normal binade: multiples of its step 2^(base + 1 - 127 - mant)
    low = mag * pow2(126 + mant - base)
    low = round_to_int(low) if noise is None else round_stochastic(low, noise)
    code = torch.where(mag >= pow2(base + 1 - 127), normal, low)
    return torch.clamp(code, max=(1 << (4 + mant)) - 1)


def _decode_magnitude(code: torch.Tensor, top: torch.Tensor, mant: int) -> torch.Tensor:
    base = top - _SPAN
    f = code >> mant
    normal = (((f + base) << 23) | ((code & ((1 << mant) - 1)) << (23 - mant))).view(torch.float32)
    low = int_to_float(code) * pow2(base + 1 - 127 - mant)
    return torch.where(f > 0, normal, low)


def _bound(mag: torch.Tensor, top: torch.Tensor, mant: int, stochastic: bool = False
           ) -> torch.Tensor:
    """Half a code step at ``mag`` (relative 2^-(mant + 1) in normal codes, half the lowest
    binade's step below them; stochastic rounding: a whole step), plus fp32 slack; infinite for a
    non-finite group."""
    base = top - _SPAN
    floor_step = pow2(torch.clamp(base + 1 - 127 - mant, min=-126)).float()
    steps = 1.0 if stochastic else 0.5
    rel = mag * 2.0 ** -mant * steps
    out = torch.maximum(rel, floor_step * steps) + mag * FP32_SLACK
    return torch.where(top >= _NAN_TOP, torch.full_like(out, float("inf")), out)


@dataclass(frozen=True)
class SqrtE4M4(Codec):
    """uint8 E4M4 codes of ``sqrt(v)`` under a power-of-two bf16 scale per 32: 1.0625 B/value.
    ``stochastic``: rounded stochastically (``stochastic.py``), ``seed`` picks the noise."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    domain = "nonnegative"
    fields = (Field("codes", torch.uint8), Field("scale", torch.bfloat16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "sqrt_e4m4" + sr_suffix(self)

    def encode(self, x, noise=None):
        r = torch.sqrt(x)
        top = _top_exponent(r)
        return _encode_magnitude(r, top, 4, noise).to(torch.uint8), _scale_of(top)

    def decode(self, codes, scale):
        top = _top_of(scale)
        r = _decode_magnitude(codes.to(torch.int32), top, 4)
        r = torch.where(top >= _NAN_TOP, torch.full_like(r, float("nan")), r)
        return r * r

    def error_bound(self, x):
        r = torch.sqrt(x)
        dr = _bound(r, _top_exponent(r), 4, self.stochastic)
        return dr * (2 * r + dr) + x * FP32_SLACK  # |a^2 - b^2| = |a - b| (a + b)


@dataclass(frozen=True)
class E4M3Int8(Codec):
    """int8 sign and E4M3 magnitude under a power-of-two bf16 scale per 32: 1.0625 B/value.
    ``stochastic``: the magnitude rounded stochastically (``stochastic.py``)."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    fields = (Field("codes", torch.int8), Field("scale", torch.bfloat16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "e4m3_int8" + sr_suffix(self)

    def encode(self, x, noise=None):
        mag = x.abs()
        top = _top_exponent(mag)
        code = _encode_magnitude(mag, top, 3, noise)
        return torch.where(x < 0, -code, code).to(torch.int8), _scale_of(top)

    def decode(self, codes, scale):
        top = _top_of(scale)
        c = codes.to(torch.int32)
        mag = _decode_magnitude(c.abs(), top, 3)
        mag = torch.where(top >= _NAN_TOP, torch.full_like(mag, float("nan")), mag)
        return torch.where(c < 0, -mag, mag)

    def error_bound(self, x):
        mag = x.abs()
        return _bound(mag, _top_exponent(mag), 3, self.stochastic)


sqrt_e4m4 = SqrtE4M4()
e4m3_int8 = E4M3Int8()
sqrt_e4m4_sr = SqrtE4M4(stochastic=True)
e4m3_int8_sr = E4M3Int8(stochastic=True)
