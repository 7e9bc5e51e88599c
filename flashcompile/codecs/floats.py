"""Plain float storage: fp32 (exact), bf16 (to nearest, or stochastically: ``bf16_sr``), and an
fp32 master weight beside a 16-bit param."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import Codec, Field, sr_suffix
from flashcompile.codecs.stochastic import carry

HALF_ULP_REL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}
TINY = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 0.0}


@dataclass(frozen=True)
class Float(Codec):
    """One float per value. fp32: 4 bytes, exact. bf16: 2 bytes, round-to-nearest, relative error
    <= 2**-8 (absolute 2**-134 below the normal range).

    ``stochastic=True`` (bf16 only, ``bf16_sr``): the fp32 value rounds to one of its two bf16
    neighbours, up with the probability of its distance from the lower one, so it is right on
    average. As a param's codec it keeps the weight in bf16 alone, no residual (2 B/param where
    the weight split keeps 3): updates below half a bf16 ULP still move the weight on average,
    where rounding to nearest drops them (arXiv 2502.20566 trains bf16 AdamW this way). Error
    within one ULP (relative 2**-7)."""

    noise_bits = 32  # the whole hash: stochastic.carry

    dtype: torch.dtype = torch.float32
    stochastic: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.stochastic and self.dtype != torch.bfloat16:
            raise ValueError(f"stochastic rounding is for bf16 storage, not {self.dtype}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            self.dtype] + sr_suffix(self)

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return (Field("value", self.dtype),)

    def encode(self, x, noise=None):
        if noise is None or not self.stochastic:
            return (x.to(self.dtype),)
        # the bf16 below |x| is x's top 16 bits; adding the noise's top 16 bits (0 .. 2^16 - 1)
        # to the bits below carries into them with the probability of x's distance past it (a
        # carry into the exponent is the next binade's first value, as it should be). A NaN is
        # kept as it is: its bits plus the carry could wrap around to a number.
        bits = x.view(torch.int32) + (carry(noise, 16) + (1 << 15))
        rounded = (bits & -65536).view(torch.float32)
        return (torch.where(x != x, x, rounded).to(self.dtype),)

    def decode(self, value):
        return value.float()

    def error_bound(self, x):
        scale = 2.0 if self.stochastic else 1.0  # a whole ULP either way, not half
        return (x.abs() * HALF_ULP_REL[self.dtype] + TINY[self.dtype]) * scale

    def for_param(self, dtype):
        if dtype == self.dtype:
            return self  # the param itself is the storage
        if self.dtype == torch.float32:
            return Fp32Master(dtype)
        if dtype == torch.float32:
            # a 16-bit weight codec asked of a param kept in fp32 (cast_model's kept layers): the
            # param is its own storage, exact; rounding it would lose what its dtype keeps
            return fp32
        raise ValueError(
            f"codec {self.name} stores the weight as {self.dtype} but the param is {dtype}; cast the "
            "model (flashcompile.cast_model) or pick 'fp32' / 'weight_split' for 'param'"
        )


@dataclass(frozen=True)
class Fp32Master(Codec):
    """A 16-bit param plus an fp32 master copy (6 bytes): the classic mixed-precision layout."""

    dtype: torch.dtype = torch.bfloat16
    name = "fp32"

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return (Field("value", self.dtype), Field("master", torch.float32))

    def encode(self, x):
        return x.to(self.dtype), x

    def decode(self, value, master):
        return master

    def error_bound(self, x):
        return torch.zeros_like(x)

    def for_param(self, dtype):
        return Fp32Master(dtype)


fp32 = Float(torch.float32)
bf16 = Float(torch.bfloat16)
bf16_sr = Float(torch.bfloat16, stochastic=True)
