"""Plain float storage: fp32 (exact), bf16, and an fp32 master weight beside a 16-bit param."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import Codec, Field

HALF_ULP_REL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}
TINY = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 0.0}


@dataclass(frozen=True)
class Float(Codec):
    """One float per value. fp32: 4 bytes, exact. bf16: 2 bytes, round-to-nearest, relative error
    <= 2**-8 (absolute 2**-134 below the normal range)."""

    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:  # type: ignore[override]
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return (Field("value", self.dtype),)

    def encode(self, x):
        return (x.to(self.dtype),)

    def decode(self, value):
        return value.float()

    def error_bound(self, x):
        return x.abs() * HALF_ULP_REL[self.dtype] + TINY[self.dtype]

    def for_param(self, dtype):
        if dtype == self.dtype:
            return self  # the param itself is the storage
        if self.dtype == torch.float32:
            return Fp32Master(dtype)
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
