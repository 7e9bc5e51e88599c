"""Weight split (FlashOptim, arXiv 2602.23349): a 16-bit weight plus an integer residual.

Storage per value: the 16-bit weight ``hi = round_to_nearest(w)`` and a residual ``r`` in
``[-N, N]`` (N = 127 for int8, 32767 for int16) that stores ``w - hi`` in units of half a ULP / N,
so decoding is within ``ULP / (4N)`` of ``w`` (ULP/508 for int8).

bf16 weights are the top half of an fp32 word, so the split is done on bit patterns: ``d = bits(w) -
bits(hi) << 16`` counts fp32 ULPs between ``w`` and ``hi`` (|d| <= 2**15, half a bf16 ULP), and
``r = round(d * N / 2**15)``. Decoding adds ``round(r * 2**15 / N)`` back to the bits: integer
arithmetic, no frexp/ldexp, exact at zero (signs kept) and subnormals, and within 2**15 / (2N) + 1
fp32 ULPs of ``w`` (the +1 from rounding ``r * 2**15 / N`` in fp32).

A decoded value stays strictly inside ``hi``'s rounding interval (``r = +-N`` decodes one fp32 ULP
short of the midpoint between two 16-bit values), so encoding it gives back the same ``(hi, r)``: an
fp32 export of the master weight imports as the pair it came from, and a residual saved with the
optimizer still belongs to the weight saved with the model.

fp16 weights are not a prefix of fp32, so their ULP comes from ``hi``'s exponent bits and the scaling
by ``2**-h`` is split into two power-of-two factors, each inside fp32's exponent range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import Codec, Field, int_to_float, pow2, round_to_int

_CODE_MAX = {torch.int8: 127, torch.int16: 32767}
_FP16_MANT, _FP16_BIAS = 10, 15


@dataclass(frozen=True)
class WeightSplit(Codec):
    """16-bit weight + int8/int16 residual in units of half a ULP: 3 or 4 bytes per value."""

    weight_dtype: torch.dtype = torch.bfloat16
    residual_dtype: torch.dtype = torch.int8

    def __post_init__(self):
        if self.weight_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"weight_split weight_dtype={self.weight_dtype}; use bfloat16 or float16")
        if self.residual_dtype not in _CODE_MAX:
            raise ValueError(f"weight_split residual_dtype={self.residual_dtype}; use int8 or int16")

    @property
    def name(self) -> str:  # type: ignore[override]
        w = "bf16" if self.weight_dtype == torch.bfloat16 else "fp16"
        r = "int8" if self.residual_dtype == torch.int8 else "int16"
        return f"weight_split({w}+{r})"

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return (Field("value", self.weight_dtype), Field("residual", self.residual_dtype))

    def encode(self, x):
        n = _CODE_MAX[self.residual_dtype]
        hi = x.to(self.weight_dtype)
        if self.weight_dtype == torch.bfloat16:
            d = x.view(torch.int32) - _bf16_bits(hi)
            code = (d * n + (1 << 14)) >> 15  # round(d * n / 2**15), half up
            return hi, code.to(self.residual_dtype)
        # exact: hi is x rounded to fewer mantissa bits. Read hi back through its bits: some Inductor
        # backends (CPU, torch 2.11) fold x.to(fp16).float() into x, which would zero every residual.
        err = x - hi.view(torch.int16).view(torch.float16).float()
        neg_h = -self._fp16_half_ulp_exponent(hi)
        a = neg_h >> 1  # floor(neg_h / 2): two factors keep each power of two in range
        code = torch.round(err * pow2(a) * pow2(neg_h - a) * n)  # err / half_ulp in [-1, 1]
        code = torch.where(torch.isfinite(code), code, torch.zeros_like(code))
        # Below a power of two the ULP halves: a residual toward zero past N/2 would decode into
        # the lower neighbour's rounding interval (and re-encode as another pair).
        bits = hi.view(torch.int16).to(torch.int32)
        halved = ((bits & 0x3FF) == 0) & (((bits >> _FP16_MANT) & 0x1F) > 1)
        toward_zero = (code < 0) != (bits < 0)
        code = torch.where(halved & toward_zero & (code != 0), code.clamp(-(n // 2), n // 2), code)
        return hi, code.to(self.residual_dtype)

    def decode(self, hi, residual):
        n = _CODE_MAX[self.residual_dtype]
        if self.weight_dtype == torch.bfloat16:
            # through floats, not an integer multiply-shift (one SASS per value fewer, yet 2.4%
            # slower on an H100: AdamW 97.1 vs 99.4% of copy, runs interleaved, 2026-12-07)
            d = round_to_int(int_to_float(residual) * (2.0**15 / n))
            d = torch.clamp(d, -(2**15 - 1), 2**15 - 1)  # the midpoint would round to hi's neighbour
            return (_bf16_bits(hi) + d).view(torch.float32)
        h = self._fp16_half_ulp_exponent(hi)
        a = h >> 1
        low = hi.float()
        w = low + residual.float() / n * pow2(a) * pow2(h - a)
        # |r| = N lands on the midpoint to hi's neighbour, and below a power of two (where the ULP
        # halves) past it: keep w one fp32 ULP inside hi's rounding interval. Bits, not floats, are
        # compared: some Inductor backends fold w.to(fp16).float() into w.
        near = w.to(torch.float16).view(torch.int16)
        edge = (low + near.view(torch.float16).float()) * 0.5  # exact in fp32
        w = torch.where(near == hi.view(torch.int16), w, torch.nextafter(edge, low))
        # where(): adding a zero correction would turn -0.0 into +0.0
        return torch.where(residual == 0, low, w)

    def _fp16_half_ulp_exponent(self, hi: torch.Tensor) -> torch.Tensor:
        e = (hi.view(torch.int16).to(torch.int32) >> _FP16_MANT) & 0x1F
        return torch.clamp_min(e, 1) - (_FP16_BIAS + _FP16_MANT + 1)  # zero/subnormal: smallest

    def error_bound(self, x):
        n = _CODE_MAX[self.residual_dtype]
        hi = x.to(self.weight_dtype)
        if self.weight_dtype == torch.bfloat16:
            # (2**15 / 2N + 1) fp32 ULPs of the binade of x (its truncation to bf16).
            ulp32 = torch.exp2(_exponent(x).clamp_min(-126).double() - 23).float()
            return ulp32 * (2.0**15 / (2 * n) + 1)
        half_ulp = torch.exp2(self._fp16_half_ulp_exponent(hi).double()).float()
        # quantisation (h / 2N) + the fp32 rounding of the sum and of r * h / N.
        return half_ulp / (2 * n) + x.abs() * 2.0**-24 + half_ulp * 2.0**-23

    def for_param(self, dtype):
        if dtype != self.weight_dtype:
            raise ValueError(
                f"{self.name} keeps a {self.weight_dtype} weight but the param is {dtype}; cast the "
                "model to 16 bits (flashcompile.cast_model) or use codecs={'param': 'fp32'}"
            )
        return self


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """Unbiased binary exponent of fp32 values (subnormals: -127)."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def _bf16_bits(hi: torch.Tensor) -> torch.Tensor:
    """The fp32 bit pattern of bf16 values (their bits shifted to the top half), as int32.

    Through the exact widening to fp32, not an int16 view: Inductor's C++ backend leaves a kernel
    that touches int16 unvectorized (int16 is not among its vector dtypes).
    """
    return hi.float().view(torch.int32)
