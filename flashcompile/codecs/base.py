"""What a codec is: storage fields plus encode/decode in plain torch, and an error bound.

Every tensor a codec sees is laid out in groups of :data:`GROUP` values: per-element fields are
``(G, GROUP)``, per-group fields are ``(G, 1)``, and values to encode are fp32 ``(G, GROUP)``. Codecs
are written in plain torch (bit views, rounding, per-group reductions) so that Inductor fuses them into
the rule's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32

# Relative rounding slack of the fp32 arithmetic inside encode/decode (a handful of roundings of
# 2**-24 each); added to every quantisation bound so the bound covers the arithmetic, not just the codes.
FP32_SLACK = 8 * 2.0**-24


@dataclass(frozen=True)
class Field:
    """One stored tensor of a codec: per element (``(G, GROUP)``), per group (``(G, 1)``), or
    ``pack`` values per stored element (``(G, GROUP // pack)``: two 4-bit codes in a byte).

    In the master-weight role the field named ``value`` is the user's parameter itself.
    """

    name: str
    dtype: torch.dtype
    per_group: bool = False
    pack: int = 1

    def __post_init__(self):
        if self.pack != 1 and (self.pack not in (2, 4, 8) or self.per_group
                               or self.dtype != torch.uint8):
            raise ValueError(f"field {self.name!r}: pack={self.pack} packs 2, 4 or 8 codes into "
                             "the bytes of a per-element uint8 field (codecs/packing.py)")

    @property
    def width(self) -> int:
        """Stored elements per group of :data:`GROUP` values."""
        return 1 if self.per_group else GROUP // self.pack

    @property
    def per_value(self) -> bool:
        """Whether the field stores one element per value (a param-shaped layout is its own)."""
        return self.width == GROUP

    @property
    def bytes_per_value(self) -> float:
        size = torch.empty((), dtype=self.dtype).element_size()
        return size * self.width / GROUP


class Codec:
    """Storage for one optimizer state (or the master weight).

    Subclasses are frozen dataclasses (hashable: they key the compiled-plan cache) and define:

    * ``fields``: the stored tensors;
    * ``encode(x)``: fp32 ``(G, GROUP)`` -> one tensor per field;
    * ``decode(*stored)``: the fields -> fp32 ``(G, GROUP)``;
    * ``error_bound(x)``: per-element bound on ``|decode(encode(x)) - x|`` for finite ``x``.

    ``domain`` is ``"real"``, ``"nonnegative"`` or ``"sign"`` (-1, 0, +1; values outside it are
    not representable).

    A codec with ``stochastic = True`` is called as ``encode(x, noise)``. With ``noise_bits = 23``
    (the default) ``noise`` is 23 random bits per element, int32 in [0, 2^23); a codec that sets
    ``noise_bits = 32`` gets the whole 32-bit hash, whose top ``k`` bits
    :func:`flashcompile.codecs.stochastic.carry` takes with one shift (the built-in codecs do).
    """

    name = "codec"
    domain = "real"
    fields: tuple[Field, ...] = ()
    noise_bits = 23

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def decode(self, *stored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def code_step(self, x: torch.Tensor) -> torch.Tensor:
        """Bound on how far decoded values move when the code of ``x`` is one step off (a rounding
        tie resolved the other way by a different but valid arithmetic order)."""
        return 2 * self.error_bound(x)

    def for_param(self, dtype: torch.dtype) -> Codec:
        """The variant of this codec that stores a master weight for a param of ``dtype``.

        Its ``value`` field must have that dtype: it is the param itself. Codecs that cannot hold a
        weight raise.
        """
        raise ValueError(
            f"codec {self.name} cannot hold the master weight; use fp32, bf16 or weight_split "
            "for 'param'"
        )

    @property
    def bytes_per_value(self) -> float:
        return sum(f.bytes_per_value for f in self.fields)

    def __str__(self) -> str:
        return self.name


def sr_suffix(codec) -> str:
    """The name suffix of a stochastically rounded codec: ``_sr``, or ``_sr<seed>``."""
    if not getattr(codec, "stochastic", False):
        return ""
    return "_sr" if codec.seed == 0 else f"_sr{codec.seed}"


def round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s, for s >= 0: a stored scale never makes |x / scale| exceed 1."""
    s16 = s.to(torch.float16)
    low = s16.float()
    # the next fp16 up: low plus 3/4 of its ULP (2**-10 of low in the normal range, 2**-24 below
    # it) rounds to it; exact sums, so no int16 view (Inductor's C++ backend does not vectorize
    # kernels that touch int16). Inf and NaN stay as they are.
    bumped = (low + torch.clamp_min(low * 0.000732421875, 4.470348358154297e-08)).to(torch.float16)
    return torch.where(low < s, bumped, s16)


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as fp32 for integer k in [-126, 127], built from exponent bits (no ldexp)."""
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


def round_to_int(y: torch.Tensor) -> torch.Tensor:
    """``round(y)`` (half to even, as ``torch.round``) as int32, for fp32 ``|y| < 2**22``: on CUDA
    through bit patterns (:func:`round_to_int_by_bits`), elsewhere by the native conversion (the
    same values)."""
    return round_to_int_by_bits(y) if on_cuda(y) else torch.round(y).to(torch.int32)


def int_to_float(c: torch.Tensor) -> torch.Tensor:
    """An integer tensor (8 or 16 bits, or int32 below 2**22 in magnitude) as exact fp32 values: on
    CUDA through bit patterns (:func:`int_to_float_by_bits`), elsewhere by the native conversion."""
    return int_to_float_by_bits(c) if on_cuda(c) else c.float()


def round_to_int_by_bits(y: torch.Tensor) -> torch.Tensor:
    """:func:`round_to_int` by one float add and a bit view instead of the conversion instructions
    (FRND, F2I): on Hopper those issue to the same quarter-rate unit as division and square root,
    and the rules with three or four 8-bit states queued on it (``benchmarks/NOTES.md``,
    "Conversions off the special-function unit"). 1.5 * 2**23 = 12582912 (bits 0x4B400000): adding
    it leaves ``round(y)`` (the add's own rounding, half to even) in the low mantissa bits.
    Literals, not module constants: dynamo would make a float global an input of the graph.
    """
    return (y + 12582912.0).view(torch.int32) - 0x4B400000


def int_to_float_by_bits(c: torch.Tensor) -> torch.Tensor:
    """:func:`int_to_float` by the bit pattern of :func:`round_to_int_by_bits`: an integer add and
    a float subtract."""
    return (c.to(torch.int32) + 0x4B400000).view(torch.float32) - 12582912.0


def on_cuda(t: torch.Tensor) -> bool:
    """Whether a codec computes on ``t`` in the forms made for the GPU kernel (bit patterns instead
    of conversion instructions) or in the native ones: Inductor's C++ backend moves bit views lane
    by lane through memory, which cost the CPU kernel more than the conversions (1000-value AdamW
    step: 40 -> 15 us, with the group scale's max also native). Both forms give the same values;
    read at trace time, so a compiled plan holds one. CPU tensors compiled by Inductor's Triton
    backend (``benchmarks/sass_offline.py``) take the GPU forms."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and torch._inductor.config.cpu_backend == "triton"


def inverse_scale(scale16: torch.Tensor, codes: float = 1.0) -> torch.Tensor:
    """``codes / scale`` per group (0 for all-zero groups, which then encode to zero codes).

    One division per group instead of one per value, and the code range folded in with it: the
    kernel is instruction-bound otherwise.
    """
    s = scale16.float()
    return torch.where(s > 0, codes / s, torch.zeros_like(s))
