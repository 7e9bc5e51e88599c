"""8-bit group codecs: one fp16 absmax scale per group of 32, then 8-bit codes.

* ``softsign_int8`` (FlashOptim's momentum codec): ``z = 2x / (1 + |x|)`` of ``x = m / scale``, coded
  as ``round(127 z)``; inverse ``x = z / (2 - |z|)``. Finer steps near zero than linear codes.
* ``sqrt_uint8`` (FlashOptim's second-moment codec): ``round(255 sqrt(v) / scale)`` with
  ``scale = max sqrt(v)``; decoding squares.
* ``sqrt_uint8_nonzero`` (the default for nonnegative states): ``sqrt_uint8`` whose codes never
  round a nonzero value to zero: a value below half a code step is stored as one step. In a group
  that mixes scales (one loud lane, or two rows of different scale) ``sqrt_uint8`` rounds the small
  second moments to 0 while their first moments survive, and Adam then steps by ``m / eps``; here
  the denominator stays at least ``scale / 255``, so such a lane moves less than Adam would, never
  more. Every other value gets exactly ``sqrt_uint8``'s code.
* ``linear_int8``: ``round(127 x / scale)``, the ablation baseline.

``stochastic=True`` (the ``*_sr`` names) rounds codes stochastically instead of to nearest
(``stochastic.py``): bounds of one code step instead of half.

Each costs 1 byte per value plus 2 bytes per 32 (the scale): 1.0625 bytes. Scales are rounded *up*
to fp16 so ``|x / scale| <= 1`` always and codes need no clamp. Bounds (derived below) are relative
to the stored scale ``s``, so they are absolute within a group: small values in a group with a large
one lose relative precision.
A NaN or Inf in a group makes its scale non-finite, and the whole group decodes to NaN: a non-finite
gradient still propagates into its parameter, as with torch.optim. Magnitudes above 65504 (fp16's
largest) also overflow the scale to Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import (
    FP32_SLACK,
    Codec,
    Field,
    int_to_float,
    inverse_scale,
    on_cuda,
    round_to_int,
    round_up_fp16,
    sr_suffix,
)
from flashcompile.codecs.stochastic import round_stochastic

_TINY = 2.0**-126  # smallest normal fp32: the floor of a quotient's denominator


def _group_scale(mag: torch.Tensor) -> torch.Tensor:
    """fp16 scale >= the group's largest magnitude (NaN if the group holds a NaN).

    The max runs on the bit patterns: for values >= 0 integer order is float order, NaN sorts
    above Inf, and an integer max is one instruction where a NaN-propagating float max is three.
    """
    if not on_cuda(mag):  # the same max (NaN included); bit views are slow in C++ kernels
        return round_up_fp16(mag.amax(dim=-1, keepdim=True))
    top = mag.view(torch.int32).amax(dim=-1, keepdim=True).view(torch.float32)
    return round_up_fp16(top)


def _round(y: torch.Tensor, noise: torch.Tensor | None, top: int) -> torch.Tensor:
    """int32 codes: to nearest, or with ``noise`` (``stochastic.uniform_noise``'s bits)
    stochastically: ``floor(y + u)`` (``stochastic.round_stochastic``) is ``y`` on average, and
    needs no conversion instruction. ``|y| <= top`` up to an ULP (CUDA's approximate division can
    land one above): rounding to nearest absorbs that, the stochastic code could step past
    ``top``, so it is clamped."""
    if noise is None:
        return round_to_int(y)
    return torch.clamp(round_stochastic(y, noise), -top, top)



# The paper's two codes under a given scale, shared with the adaptive codecs (``adaptive.py``),
# whose groups of alike values hold exactly these codes, and with the 4-bit ones
# (``four_bit.py``), which take fewer ``levels``.
def softsign_codes(x: torch.Tensor, scale16: torch.Tensor, noise: torch.Tensor | None,
                   levels: int = 127) -> torch.Tensor:
    """int32 codes ``round(levels z)``, ``z = 2y / (1 + |y|)``, ``y = x / scale`` (scale >=
    |x|)."""
    return _round(softsign_unrounded(x, scale16, levels), noise, levels)


def softsign_unrounded(x: torch.Tensor, scale16: torch.Tensor, levels: int = 127
                       ) -> torch.Tensor:
    """``levels z`` before rounding, as :func:`softsign_codes` rounds it."""
    # written as one quotient: 2 levels x / (s + |x|). |.| <= levels since s >= |x| (the scale is
    # rounded up, so no clamp is needed); the floor on s keeps an all-zero group at 0 / tiny = 0.
    s = torch.clamp_min(scale16.float(), _TINY)
    return 2 * levels * x / (s + x.abs())


def softsign_values(c: torch.Tensor, s: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """Decoded values of float codes ``c`` under the fp32 scale ``s``."""
    # z / (2 - |z|) * s with z = c / levels is c s / (2 levels - |c|): one multiply fewer per
    # value, and c s exact, so the largest code decodes to s itself
    return c * s / (2 * levels - c.abs())


def softsign_bound(mag: torch.Tensor, s: torch.Tensor, stochastic: bool, levels: int = 127
                   ) -> torch.Tensor:
    """Bound on the decoded error of magnitudes ``mag`` under the fp32 scale ``s``, for codes
    ``round(levels z)``."""
    y = mag / torch.where(s > 0, s, 1)
    z = 2 * y / (1 + y)
    # |z - z_q| <= 1/254 (stochastic: 1/127) and d/dz [z / (2 - |z|)] = 2 / (2 - |z|)^2 grows
    # with |z|.
    dz = 1 / levels if stochastic else 0.5 / levels
    z_far = torch.clamp(z + dz, max=1.0)
    return s * (2 / (2 - z_far) ** 2 * dz + FP32_SLACK)


def sqrt_codes(r: torch.Tensor, scale16: torch.Tensor, noise: torch.Tensor | None,
               keep_nonzero: bool, levels: int = 255) -> torch.Tensor:
    """int32 codes ``round(levels r / scale)`` of square roots ``r``; ``keep_nonzero``: a nonzero
    ``r`` gets at least code 1."""
    code = _round(sqrt_unrounded(r, scale16, levels), noise, levels)
    if keep_nonzero:
        code = torch.maximum(code, (r > 0).to(torch.int32))  # NaN: its group decodes to NaN
    return code


def sqrt_unrounded(r: torch.Tensor, scale16: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """``levels r / scale`` before rounding, as :func:`sqrt_codes` rounds it."""
    return r * inverse_scale(scale16, levels)


def sqrt_roots(codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The square roots codes stand for under the fp32 scale ``s``."""
    return sqrt_roots_of(int_to_float(codes), s)


def sqrt_roots_of(c: torch.Tensor, s: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """:func:`sqrt_roots` of the codes ``c`` as exact floats."""
    return c * s / levels  # c * s exact: the largest code decodes to s itself


def sqrt_root_bound(r: torch.Tensor, s: torch.Tensor, stochastic: bool, keep_nonzero: bool,
                    levels: int = 255) -> torch.Tensor:
    """Bound on the stored square root's error for roots ``r`` under the fp32 scale ``s``, for
    codes ``round(levels r / s)``."""
    dr = s * ((1 / levels if stochastic else 0.5 / levels) + FP32_SLACK)
    if keep_nonzero:  # a value below half a step decodes to one step
        dr = torch.maximum(dr, s * (1 / levels + FP32_SLACK) - r)
    return dr


@dataclass(frozen=True)
class SoftsignInt8(Codec):
    """int8 codes of ``2x / (1 + |x|)`` + fp16 absmax per 32: 1.0625 bytes per value.

    ``stochastic``: codes rounded stochastically (``codecs/stochastic.py``), within one code step
    instead of half; ``seed`` picks the noise."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    fields = (Field("codes", torch.int8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "softsign_int8" + sr_suffix(self)

    def encode(self, x, noise=None):
        scale = _group_scale(x.abs())
        return softsign_codes(x, scale, noise).to(torch.int8), scale

    def decode(self, codes, scale):
        return softsign_values(int_to_float(codes), scale.float())

    def error_bound(self, x):
        return softsign_bound(x.abs(), _group_scale(x.abs()).float(), self.stochastic)


@dataclass(frozen=True)
class SqrtUint8(Codec):
    """uint8 codes of ``sqrt(v)`` + fp16 max(sqrt(v)) per 32: 1.0625 bytes per value, v >= 0.

    With ``keep_nonzero`` a nonzero value whose code would round to 0 gets code 1 instead.
    Error bound: the stored square root is within ``scale / 510`` of ``sqrt(v)`` (``keep_nonzero``:
    within ``scale / 255 - sqrt(v)`` for values below half a step), and ``|a^2 - b^2| = |a - b| (a + b)``.
    ``stochastic``: the square root's code rounded stochastically (``codecs/stochastic.py``),
    within ``scale / 255`` of ``sqrt(v)``; ``seed`` picks the noise.
    """

    noise_bits = 32  # the whole hash: stochastic.carry

    keep_nonzero: bool = False
    stochastic: bool = False
    seed: int = 0
    domain = "nonnegative"
    fields = (Field("codes", torch.uint8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return ("sqrt_uint8_nonzero" if self.keep_nonzero else "sqrt_uint8") + sr_suffix(self)

    def encode(self, x, noise=None):
        r = torch.sqrt(x)
        scale = _group_scale(r)
        return sqrt_codes(r, scale, noise, self.keep_nonzero).to(torch.uint8), scale

    def decode(self, codes, scale):
        r = sqrt_roots(codes, scale.float())
        return r * r

    def error_bound(self, x):
        r = torch.sqrt(x)
        dr = sqrt_root_bound(r, _group_scale(r).float(), self.stochastic, self.keep_nonzero)
        return dr * (2 * r + dr) + x * FP32_SLACK  # |a^2 - b^2| = |a - b| (a + b)

    def code_step(self, x):
        r = torch.sqrt(x)
        step = _group_scale(r).float() * (1 / 255 + 2 * FP32_SLACK)  # one code, in sqrt units
        return step * (2 * r + 2 * step) + x * FP32_SLACK


@dataclass(frozen=True)
class LinearInt8(Codec):
    """int8 codes of ``x / absmax`` + fp16 absmax per 32: 1.0625 bytes per value."""

    name = "linear_int8"
    fields = (Field("codes", torch.int8), Field("scale", torch.float16, per_group=True))

    def encode(self, x):
        scale = _group_scale(x.abs())
        return round_to_int(x * inverse_scale(scale, 127)).to(torch.int8), scale

    def decode(self, codes, scale):
        return int_to_float(codes) * scale.float() / 127  # exact product: code 127 decodes to s

    def error_bound(self, x):
        s = _group_scale(x.abs()).float()
        return s * (1 / 254 + FP32_SLACK)


softsign_int8 = SoftsignInt8()
sqrt_uint8 = SqrtUint8()
sqrt_uint8_nonzero = SqrtUint8(keep_nonzero=True)
softsign_int8_sr = SoftsignInt8(stochastic=True)
sqrt_uint8_sr = SqrtUint8(stochastic=True)
sqrt_uint8_nonzero_sr = SqrtUint8(keep_nonzero=True, stochastic=True)
linear_int8 = LinearInt8()
