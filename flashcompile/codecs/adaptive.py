"""8-bit group codecs that pick, per group of 32, the paper's code or a code relative to each value.

The paper's codes (``companded.py``) are finest where a group's values are alike: 255 steps between
0 and the group's absmax. The little floats of ``relative.py`` keep every value's own exponent (15
binades, a 3-6% step everywhere), which is what a group that mixes scales needs (one loud lane, a
quiet feature beside a loud one), and coarser than the paper's code everywhere else. These codecs
store whichever fits the group, decided at each encode from the group itself, in the paper's
layout: one byte per value and an fp16 per group (1.0625 B/value). A positive fp16 is the paper's
scale and the group holds exactly the paper's codes; a negative one, ``-top``, says the group holds
the relative code under the power of two ``2^(top - 127)``. A group also goes relative where an
fp16 scale would fail it: a largest magnitude above 65504 (Inf) or below 2^-17 (a subnormal fp16
whose rounding up costs the codes over 2^-7 of their range). The paper's states read as this
codec's (their scales are positive): checkpoints of the earlier default load unchanged.

* ``sqrt_adaptive`` (nonnegative states, e.g. Adam's v): the paper's ``sqrt_uint8`` of ``sqrt(v)``,
  unless a nonzero lane lies below 1/16 of the group's max ``sqrt``, where the linear code's half
  step (1/510 of the max) exceeds 1/32 of the lane: then ``sqrt_e4m4``, within 1/32 of every lane.
  So no nonzero lane's square root is stored further than about 1/32 of itself (down to 15
  binades under the max) and alike groups keep the paper's precision. A nonzero value never
  decodes to 0 (one code step instead, as ``sqrt_uint8_nonzero``).
* ``softsign_adaptive`` (signed states, e.g. momentum): the paper's ``softsign_int8``, unless at
  most a quarter of the group (8 lanes) reaches 1/16 of its absmax: one or a few loud lanes would
  leave the rest a code step or none, so the group takes sign + ``e4m3`` (each value within 1/16
  of itself). A momentum's lanes alike in scale cross zero often; those near zero are small for
  their lane and the linear code serves them, so the test counts loud lanes instead of looking for
  the quietest one.

``stochastic=True`` (``*_sr``) rounds either code stochastically (``stochastic.py``). A NaN or Inf in
a group makes the whole group decode to NaN, as in the other codecs.
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
    pow2,
    round_to_int,
    round_up_fp16,
    sr_suffix,
)
from flashcompile.codecs.companded import _round
from flashcompile.codecs.relative import (
    _LOWEST_TOP,
    _NAN_TOP,
    _SPAN,
    _bound,
    _decode_magnitude,
    _encode_magnitude,
)

_SWITCH = 16.0  # a lane below 1/16 of its group's max: where the relative code is finer
_LOUD_LANES = 8  # softsign_adaptive: groups with at most this many lanes >= max / 16 go relative
_FP16_LOW, _FP16_HIGH = 2.0**-17, 65504.0  # largest magnitudes an fp16 scale serves


def _groups(mag: torch.Tensor, mixed: torch.Tensor):
    """(relative mode, the relative code's top binade, the paper's fp16 scale) per group of the
    magnitudes ``mag`` (fp32 >= 0 or NaN), given the code's own test for a ``mixed`` group (a
    function of the group max). The max runs on bit patterns (integer order is float order for
    values >= 0, NaN sorts above Inf)."""
    max_bits = mag.view(torch.int32).amax(dim=-1, keepdim=True)
    top_value = max_bits.view(torch.float32)
    out_of_range = (top_value > _FP16_HIGH) | ((top_value < _FP16_LOW) & (top_value > 0))
    relative = mixed(top_value) | out_of_range
    top = torch.clamp(max_bits >> 23, min=_LOWEST_TOP)
    return relative, top, round_up_fp16(top_value)


def _scale(relative: torch.Tensor, top: torch.Tensor, paper_scale: torch.Tensor) -> torch.Tensor:
    """The stored fp16: the paper's scale, ``-top`` for a relative group, NaN for a non-finite one."""
    s = torch.where(relative, -top.float(), paper_scale.float())
    return torch.where(top >= _NAN_TOP, torch.full_like(s, float("nan")), s).to(torch.float16)


def _read_scale(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relative mode, top binade, the paper's scale as fp32) of stored scales; a NaN reads as the
    paper's code, which decodes it to NaN."""
    s = scale.float()
    relative = s < 0
    top = torch.clamp(round_to_int(-s), _LOWEST_TOP, _NAN_TOP - 1)
    return relative, top, s


@dataclass(frozen=True)
class SqrtAdaptive(Codec):
    """uint8 codes of ``sqrt(v)``, the paper's or E4M4 per group (the fp16's sign says which):
    1.0625 B/value. Every nonzero value decodes nonzero."""

    stochastic: bool = False
    seed: int = 0
    domain = "nonnegative"
    fields = (Field("codes", torch.uint8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "sqrt_adaptive" + sr_suffix(self)

    @staticmethod
    def _groups(r: torch.Tensor):
        quietest = torch.where(r > 0, r, torch.full_like(r, float("inf")))
        quietest = quietest.amin(dim=-1, keepdim=True)
        # abs: a NaN whose sign bit is set would sort below every value in the bit max
        return _groups(r.abs(), lambda top: quietest * _SWITCH < top)

    def encode(self, x, noise=None):
        r = torch.sqrt(x)
        relative, top, paper = self._groups(r)
        rel = _encode_magnitude(r, top, 4, noise)
        lin = _round(r * inverse_scale(paper, 255), noise, 255)
        code = torch.maximum(torch.where(relative, rel, lin), (r > 0).to(torch.int32))
        return code.to(torch.uint8), _scale(relative, top, paper)

    def decode(self, codes, scale):
        relative, top, s = _read_scale(scale)
        c = codes.to(torch.int32)
        # c * s exact: code 255 decodes to the scale itself, as sqrt_uint8
        r = torch.where(relative, _decode_magnitude(c, top, 4), int_to_float(c) * s / 255)
        return r * r

    def error_bound(self, x):
        r = torch.sqrt(x)
        relative, top, paper = self._groups(r)
        s = paper.float()
        step = 1 / 255 if self.stochastic else 1 / 510
        # the paper's half step (stochastic: a step), or a value below it stored as one step
        lin = torch.maximum(s * (step + FP32_SLACK), s * (1 / 255 + FP32_SLACK) - r)
        lowest = pow2(torch.clamp(top - _SPAN + 1 - 127 - 4, min=-126))  # relative's first step
        rel = torch.maximum(_bound(r, top, 4, self.stochastic), lowest * (1 + FP32_SLACK) - r)
        dr = torch.where(relative, rel, lin)
        dr = torch.where(top >= _NAN_TOP, torch.full_like(dr, float("inf")), dr)
        return dr * (2 * r + dr) + x * FP32_SLACK  # |a^2 - b^2| = |a - b| (a + b)


@dataclass(frozen=True)
class SoftsignAdaptive(Codec):
    """int8 codes, the paper's softsign or sign + E4M3 per group (the fp16's sign says which):
    1.0625 B/value."""

    stochastic: bool = False
    seed: int = 0
    fields = (Field("codes", torch.int8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "softsign_adaptive" + sr_suffix(self)

    @staticmethod
    def _groups(mag: torch.Tensor):
        def few_loud(top):
            return (mag * _SWITCH >= top).sum(dim=-1, keepdim=True) <= _LOUD_LANES
        return _groups(mag, few_loud)

    def encode(self, x, noise=None):
        mag = x.abs()
        relative, top, paper = self._groups(mag)
        rel = _encode_magnitude(mag, top, 3, noise)
        rel = torch.where(x < 0, -rel, rel)
        # softsign_int8's 254 x / (s + |x|); the floor keeps an all-zero group at 0
        s = torch.clamp_min(paper.float(), 2.0**-126)
        lin = _round(254 * x / (s + mag), noise, 127)
        return torch.where(relative, rel, lin).to(torch.int8), _scale(relative, top, paper)

    def decode(self, codes, scale):
        relative, top, s = _read_scale(scale)
        c = codes.to(torch.int32)
        rel = _decode_magnitude(c.abs(), top, 3)
        rel = torch.where(c < 0, -rel, rel)
        lin = int_to_float(c) * s / (254 - c.abs())
        return torch.where(relative, rel, lin)

    def error_bound(self, x):
        mag = x.abs()
        relative, top, paper = self._groups(mag)
        s = paper.float()
        y = mag / torch.where(s > 0, s, 1)
        dz = 1 / 127 if self.stochastic else 1 / 254
        z_far = torch.clamp(2 * y / (1 + y) + dz, max=1.0)
        lin = s * (2 / (2 - z_far) ** 2 * dz + FP32_SLACK)  # as softsign_int8's
        out = torch.where(relative, _bound(mag, top, 3, self.stochastic), lin)
        return torch.where(top >= _NAN_TOP, torch.full_like(out, float("inf")), out)


sqrt_adaptive = SqrtAdaptive()
softsign_adaptive = SoftsignAdaptive()
sqrt_adaptive_sr = SqrtAdaptive(stochastic=True)
softsign_adaptive_sr = SoftsignAdaptive(stochastic=True)
