"""``sign_int8``: a state whose every value is -1, 0 or +1, stored exactly in one int8 per value.

Rprop keeps only the sign of the previous gradient. An 8-bit group codec would spend a scale per
group of 32 and a reduction, a division and a rounding per value on it; this code is the value
itself (1 byte, no scale: 1.0 B/value against 1.0625). A rule opts in by declaring the state's
fact ``"sign"``, which the compiler proves (its update must be a ``sign(...)``, a constant in
{-1, 0, 1}, or a choice or product of those), so no other value can reach the codec from the kernel.

``encode`` stores ``sign(x)`` for any input: a torch.optim state imported into it (Rprop's ``prev``
holds the gradient itself) keeps exactly what the rule reads from it. A NaN stores 0; in a rule the
NaN still reaches the weight through the update, as the master-weight codecs keep NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcompile.codecs.base import Codec, Field, int_to_float


@dataclass(frozen=True)
class SignInt8(Codec):
    """int8 of ``sign(x)``: exact for -1, 0 and +1, 1 byte per value."""

    name = "sign_int8"
    domain = "sign"
    fields = (Field("codes", torch.int8),)

    def encode(self, x):
        return ((x > 0).to(torch.int8) - (x < 0).to(torch.int8),)

    def decode(self, codes):
        return int_to_float(codes)

    def error_bound(self, x):
        return (x - torch.sign(x)).abs()  # 0 in the codec's domain


sign_int8 = SignInt8()
