"""Weight split (FlashOptim, arXiv 2602.23349): a 16-bit weight plus an integer residual.

Storage per value: the 16-bit weight ``hi = round_to_nearest(w)`` and ``r = round(N * (w - hi) / h)``
where ``h`` is half a ULP of ``hi`` and ``N`` the residual's largest code (127 for int8, 32767 for
int16). Since ``|w - hi| <= h``, ``r`` fits in ``[-N, N]``; decoding ``hi + r * h / N`` is within
``h / (2N) = ULP / (4N)`` of ``w`` (ULP/508 for int8), plus the final fp32 rounding.

The ULP comes from the exponent bits of ``hi`` (no frexp/ldexp), so zeros and subnormals are exact
cases of the same formula. Scaling by ``2**-h`` is split into two power-of-two factors so each stays
inside fp32's exponent range (bf16 half-ULPs span 2**-134 .. 2**119).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import Codec, Field, pow2

# dtype -> (mantissa bits, exponent bias, exponent mask)
_FORMAT = {torch.bfloat16: (7, 127, 0xFF), torch.float16: (10, 15, 0x1F)}
_CODE_MAX = {torch.int8: 127, torch.int16: 32767}


@dataclass(frozen=True)
class WeightSplit(Codec):
    """16-bit weight + int8/int16 residual in units of half a ULP: 3 or 4 bytes per value."""

    weight_dtype: torch.dtype = torch.bfloat16
    residual_dtype: torch.dtype = torch.int8

    def __post_init__(self):
        if self.weight_dtype not in _FORMAT:
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

    def _half_ulp_exponent(self, hi: torch.Tensor) -> torch.Tensor:
        mant, bias, mask = _FORMAT[self.weight_dtype]
        e = (hi.view(torch.int16).to(torch.int32) >> mant) & mask
        return torch.clamp_min(e, 1) - (bias + mant + 1)  # zero/subnormal: the smallest exponent

    def encode(self, x):
        n = _CODE_MAX[self.residual_dtype]
        hi = x.to(self.weight_dtype)
        err = x - hi.float()  # exact: hi is x rounded to fewer mantissa bits
        neg_h = -self._half_ulp_exponent(hi)
        a = neg_h >> 1  # floor(neg_h / 2): a shift, not a signed division
        scaled = err * pow2(a) * pow2(neg_h - a)  # err / half_ulp, in [-1, 1]
        code = torch.clamp(torch.round(scaled * n), -n, n)
        code = torch.where(torch.isfinite(scaled), code, torch.zeros_like(code))
        return hi, code.to(self.residual_dtype)

    def decode(self, hi, residual):
        n = _CODE_MAX[self.residual_dtype]
        h = self._half_ulp_exponent(hi)
        a = h >> 1
        low = hi.float()
        # where(): adding a zero correction would turn -0.0 into +0.0
        return torch.where(residual == 0, low, low + residual.float() / n * pow2(a) * pow2(h - a))

    def error_bound(self, x):
        n = _CODE_MAX[self.residual_dtype]
        hi = x.to(self.weight_dtype)
        half_ulp = torch.exp2(self._half_ulp_exponent(hi).double()).float()
        # quantisation (h / 2N) + the fp32 rounding of the sum and of r * h / N.
        return half_ulp / (2 * n) + x.abs() * 2.0**-24 + half_ulp * 2.0**-23

    def for_param(self, dtype):
        if dtype != self.weight_dtype:
            raise ValueError(
                f"{self.name} keeps a {self.weight_dtype} weight but the param is {dtype}; cast the "
                "model to 16 bits (flashcompile.cast_model) or use codecs={'param': 'fp32'}"
            )
        return self
