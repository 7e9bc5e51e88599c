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

* ``sqrt_adaptive`` (nonnegative states, e.g. Adam's v, a denominator: each lane's relative error
  is what counts): the paper's ``sqrt_uint8`` of ``sqrt(v)``, unless a nonzero lane lies 32x or
  more below the group's max square root, where the linear code's half step (1/510 of the max)
  is over 6% of the lane; then 8-bit little floats of ``sqrt(v)`` (4 exponent, 4 mantissa bits:
  within about 1/32 of every lane down to 13 binades under the max). A nonzero value never
  decodes to 0 (one code step instead, as ``sqrt_uint8_nonzero``).
* ``softsign_adaptive`` (signed states, e.g. momentum): the paper's ``softsign_int8``, unless at
  most a quarter of the group (8 lanes) reaches 1/16 of its absmax: one or a few loud lanes would
  leave the rest a code step or none, so the group takes sign + a little float of 4 exponent and
  3 mantissa bits (each value within about 1/16 of itself). A momentum's lanes alike in scale
  cross zero often; those near zero are small for their lane and the linear code serves them, so
  the test counts loud lanes instead of looking for the quietest one.

``stochastic=True`` (``*_sr``) rounds either code stochastically (``stochastic.py``). A NaN or Inf
in a group makes the whole group decode to NaN, as in the other codecs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import (
    FP32_SLACK,
    Codec,
    Field,
    inverse_scale,
    on_cuda,
    pow2,
    round_to_int,
    round_up_fp16,
    sr_suffix,
)
from flashcompile.codecs.companded import _TINY, softsign_bound, sqrt_root_bound
from flashcompile.codecs.relative import _LOWEST_TOP, _NAN_TOP
from flashcompile.codecs.stochastic import FRACTION_BITS, carry

_SPAN = 15  # binades of the relative code under its group's top
# The thresholds are literals where they are used (a float global would become an input of the
# compiled graph): sqrt_adaptive goes relative where a nonzero lane lies 32x below the max sqrt;
# softsign_adaptive where at most 8 lanes reach 1/16 of the absmax; both where the max is outside
# what an fp16 scale serves, above 65504 or below 2^-17 (7.62939453125e-06).


# The relative code is an offset float: a magnitude ``x`` is stored as the top bits of the fp32
# ``y = x + F0``, ``F0 = 2^(base - 127)`` the bottom of the code's 15 binades (``base = top - 15``):
# exponent ``base + f`` in 4 bits and ``mant`` mantissa bits, decoded as ``y - F0``. Above ``F0``
# each value keeps ``mant`` bits of its own precision; below it the steps are uniform
# (``2^(base - 127 - mant)``), down to an exact 0. One float add, an integer add and a shift each
# way: no branch between normal and subnormal codes (the kernel is instruction-bound).
#
# The paper's code rounds by the same three steps: ``t + 1.5 * 2^23`` holds ``round(t)`` in its low
# bits (``base.round_to_int_by_bits``), so it is the offset code with ``F0 = 1.5 * 2^23`` and no
# bits dropped. Each group's mode picks the three constants, and every lane computes one code
# instead of both: the kernel's instruction count, not its bytes, bounds the step.
def _code_constants(relative: torch.Tensor, top: torch.Tensor, mant: int, fraction: int = 0):
    """Per group: (``F0``, the bits of ``F0``'s binade floor, the bits dropped). The paper's code
    keeps ``fraction`` bits below its integer (``F0 = 1.5 * 2^(23 - fraction)``): stochastic
    rounding's carry replaces them."""
    base = top - _SPAN
    f0 = torch.where(relative, pow2(base - 127), 1.5 * 2.0 ** (23 - fraction))
    floor = torch.where(relative, base << 23, 0x4B400000 - (fraction << 23))
    # int32, as torch.where's would not be
    return f0, floor, relative.to(torch.int32) * (23 - mant - fraction) + fraction




def _encode(t: torch.Tensor, relative: torch.Tensor, top: torch.Tensor, mant: int,
            noise: torch.Tensor | None) -> torch.Tensor:
    """int32 codes of ``t``: in a relative group the offset code of the magnitude ``t``, else
    ``round(t)`` exactly as ``companded._round`` rounds the paper's code (``t`` signed, unclamped
    when stochastic). Stochastically (``noise``: ``stochastic.uniform_noise``) both
    codes drop low bits of ``t + F0`` and add the noise's top bits as the carry: the paper's
    keeps 8 bits below its integer for that, as ``stochastic.round_stochastic`` (``t`` rounded to
    2^-8 first: a bias of at most 2^-9 of a code step), so neither makes float noise or selects
    between two roundings."""
    if noise is None:
        f0, floor, drop = _code_constants(relative, top, mant)
        # relative: half of the dropped bits; the paper's: the add's own rounding
        half = relative.to(torch.int32) << (22 - mant)
        return ((t + f0).view(torch.int32) - (floor - half)) >> drop
    f0, floor, drop = _code_constants(relative, top, mant, FRACTION_BITS)
    # the noise's top `drop` bits, centred by half their range (stochastic.carry)
    return ((t + f0).view(torch.int32) - (floor - (1 << (drop - 1))) + carry(noise, drop)) >> drop


def _decode(code: torch.Tensor, relative: torch.Tensor, top: torch.Tensor, mant: int
            ) -> torch.Tensor:
    """The magnitude a relative group's ``code`` stands for, else the code as a float (exact)."""
    f0, floor, drop = _code_constants(relative, top, mant)
    return ((code << drop) + floor).view(torch.float32) - f0


def _offset_bound(mag: torch.Tensor, top: torch.Tensor, mant: int, stochastic: bool
                  ) -> torch.Tensor:
    """Half a step at ``y = mag + F0`` (stochastically: a step), plus the fp32 slack of the add
    and subtract; infinite for a non-finite group."""
    f0 = pow2(top - _SPAN - 127)
    y = mag + f0
    step = pow2(torch.clamp((y.view(torch.int32) >> 23) - 127 - mant, min=-126))
    # a value within half a step of 2^(top + 1 - 127) rounds up out of the code and is clamped to
    # the largest code, one step below that power of two
    largest = pow2(top + 1 - 127) - pow2(top - 127 - mant) - f0
    out = torch.maximum(step * (1.0 if stochastic else 0.5), mag - largest) + y * FP32_SLACK
    return torch.where(top >= _NAN_TOP, torch.full_like(out, float("inf")), out)


def _groups(mag: torch.Tensor, mixed):
    """(relative mode, the relative code's top binade, the paper's fp16 scale) per group of the
    magnitudes ``mag`` (fp32 >= 0 or NaN), given the code's own test for a ``mixed`` group (a
    function of the group max). On CUDA the max runs on bit patterns (integer order is float order
    for values >= 0, NaN sorts above Inf: one instruction where a NaN-propagating float max is
    three); on the CPU on floats (the same max: Inductor's C++ kernel moves bit views lane by lane,
    and the bit max and min cost the per-tensor step 0.3x torch's)."""
    if on_cuda(mag):
        max_bits = mag.view(torch.int32).amax(dim=-1, keepdim=True)
        top_value = max_bits.view(torch.float32)
    else:  # the same max (NaN included) as floats: bit views are slow in C++ kernels
        top_value = mag.amax(dim=-1, keepdim=True)
        max_bits = top_value.view(torch.int32)
    out_of_range = (top_value > 65504.0) | ((top_value < 7.62939453125e-06) & (top_value > 0))
    relative = mixed(top_value) | out_of_range
    top = torch.clamp(max_bits >> 23, min=_LOWEST_TOP)
    return relative, top, round_up_fp16(top_value)


def _scale(relative: torch.Tensor, top: torch.Tensor, paper_scale: torch.Tensor) -> torch.Tensor:
    """The stored fp16: the paper's scale, ``-top`` for a relative group, NaN for a non-finite
    one."""
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

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    domain = "nonnegative"
    fields = (Field("codes", torch.uint8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "sqrt_adaptive" + sr_suffix(self)

    @staticmethod
    def _groups(r: torch.Tensor):
        # abs: a NaN whose sign bit is set would sort below every value in the bit max
        mag = r.abs()
        # the quietest nonzero lane (a group of zeros reads 0, which no test below passes)
        if on_cuda(r):
            # by bit patterns, moved by 2^31 - 1 (wrapping): zero sorts last, every other
            # magnitude below it in its own order, so one add and a min per lane
            wrap = 0x7FFFFFFF
            quietest = (mag.view(torch.int32) + wrap).amin(dim=-1, keepdim=True) - wrap
            quietest = quietest.view(torch.float32)
        else:  # as floats, the same test (a NaN lane is left to the max)
            quietest = torch.where(mag > 0, mag, float("inf")).amin(dim=-1, keepdim=True)
        return _groups(mag, lambda top: quietest * 32.0 < top)

    def encode(self, x, noise=None):
        r = torch.sqrt(x)
        relative, top, paper = self._groups(r)
        # the paper's t = r 255 / scale: one multiply per value by a per-group factor, 1 in a
        # relative group (exact), instead of a select per value
        code = _encode(r * torch.where(relative, 1.0, inverse_scale(paper, 255)), relative, top,
                       4, noise)
        # a carry out of the relative code's top binade; the paper's stochastic clamp
        code = torch.clamp(code, max=255)
        # nonzero in either code: min(bits, 1) is 1 for every r > 0 (and <= 0 for -0.0), one
        # instruction where a compare and a select are two
        nonzero = (torch.clamp(r.view(torch.int32), max=1) if on_cuda(r)
                   else (r > 0).to(torch.int32))
        code = torch.maximum(code, nonzero)
        return code.to(torch.uint8), _scale(relative, top, paper)

    def decode(self, codes, scale):
        relative, top, s = _read_scale(scale)
        c = codes.to(torch.int32)
        t = _decode(c, relative, top, 4)
        # the paper's t s / 255 (code 255 decodes to s itself: decoded groups re-encode to the
        # same codes and scale), t in a relative group, by per-group factors: no select per value
        r = t * torch.where(relative, 1.0, s) / torch.where(relative, 1.0, 255.0)
        return r * r

    def error_bound(self, x):
        r = torch.sqrt(x)
        relative, top, paper = self._groups(r)
        lin = sqrt_root_bound(r, paper.float(), self.stochastic, keep_nonzero=True)
        first = pow2(top - _SPAN - 127 - 4)  # the relative code's first step
        rel = torch.maximum(_offset_bound(r, top, 4, self.stochastic),
                            first * (1 + FP32_SLACK) - r)
        dr = torch.where(relative, rel, lin)
        dr = torch.where(top >= _NAN_TOP, torch.full_like(dr, float("inf")), dr)
        return dr * (2 * r + dr) + x * FP32_SLACK  # |a^2 - b^2| = |a - b| (a + b)


@dataclass(frozen=True)
class SoftsignAdaptive(Codec):
    """int8 codes, the paper's softsign or sign + E4M3 per group (the fp16's sign says which):
    1.0625 B/value."""

    noise_bits = 32  # the whole hash: stochastic.carry

    stochastic: bool = False
    seed: int = 0
    fields = (Field("codes", torch.int8), Field("scale", torch.float16, per_group=True))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "softsign_adaptive" + sr_suffix(self)

    @staticmethod
    def _groups(mag: torch.Tensor):
        def few_loud(top):  # a float count: an integer sum of bools would run in int64
            # top / 16 once per group, not mag * 16 per lane: the same test (powers of two scale
            # exactly; a top whose sixteenth is subnormal is out of the fp16 range anyway)
            loud = (mag >= top * 0.0625).to(torch.float32)
            return loud.sum(dim=-1, keepdim=True) <= 8.0
        return _groups(mag, few_loud)

    def encode(self, x, noise=None):
        mag = x.abs()
        relative, top, paper = self._groups(mag)
        # the paper's 254 x / (s + |x|), or a relative group's |x| (its sign taken after), as
        # y a / (b + c |x|) with per-group a, b, c (1, 1, 0 there: exact), not a select per value
        s = torch.clamp_min(paper.float(), _TINY)
        a, b = torch.where(relative, 1.0, 254.0), torch.where(relative, 1.0, s)
        c = torch.where(relative, 0.0, 1.0)
        if noise is None:
            # rounding the paper's magnitude to nearest (ties to even) and negating is its
            # rounding of the signed value: both codes take the sign after, and are clamped
            # before it (a magnitude's code is >= 0: one bound instead of two)
            code = torch.clamp(_encode(mag * a / (b + c * mag), relative, top, 3, None), max=127)
            return torch.where(x < 0, -code, code).to(torch.int8), _scale(relative, top, paper)
        # the paper's floor(t + u) of the signed t, as softsign_int8_sr draws it
        code = _encode(torch.where(relative, mag, x) * a / (b + c * mag), relative, top, 3, noise)
        code = torch.where(relative & (x < 0), -code, code)
        return torch.clamp(code, -127, 127).to(torch.int8), _scale(relative, top, paper)

    def decode(self, codes, scale):
        relative, top, s = _read_scale(scale)
        c = codes.to(torch.int32)
        t = _decode(c.abs(), relative, top, 3)
        # the paper's value of a negative code is minus that of its magnitude, exactly: t s /
        # (254 - t) for t >= 0, and t in a relative group (t 1 / (1 - 0): exact), with per-group
        # factors instead of a select per value
        mag = t * torch.where(relative, 1.0, s) / (torch.where(relative, 1.0, 254.0)
                                                   - torch.where(relative, 0.0, 1.0) * t)
        return (mag.view(torch.int32) | (c & -2147483648)).view(torch.float32)  # c's sign

    def error_bound(self, x):
        mag = x.abs()
        relative, top, paper = self._groups(mag)
        lin = softsign_bound(mag, paper.float(), self.stochastic)
        out = torch.where(relative, _offset_bound(mag, top, 3, self.stochastic), lin)
        return torch.where(top >= _NAN_TOP, torch.full_like(out, float("inf")), out)


sqrt_adaptive = SqrtAdaptive()
softsign_adaptive = SoftsignAdaptive()
sqrt_adaptive_sr = SqrtAdaptive(stochastic=True)
softsign_adaptive_sr = SoftsignAdaptive(stochastic=True)
