"""Codes narrower than a byte, several to a stored element (``Field.pack``).

A field with ``pack = k`` stores ``k`` codes of ``8 * itemsize / k`` bits in each element, the
group's values in order from the lowest bits up: value ``2i`` of a group in the low nibble of
byte ``i``, value ``2i + 1`` in its high nibble for 4-bit codes. Codecs pack their codes with
:func:`pack` inside ``encode`` and :func:`unpack` them inside ``decode`` (plain torch: shifts and
masks that fuse into the step's kernel); layouts that want a code per value (checkpoints shaped
like the parameter, ``runtime/distributed.py``) use the same two functions.
"""

from __future__ import annotations

import torch


def code_bits(field) -> int:
    """Bits of each code in a packed ``field``."""
    return 8 * torch.empty((), dtype=field.dtype).element_size() // field.pack


def pack(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """int32 codes ``(..., n)``, each in ``[0, 2^bits)``, as ``(..., n * bits / 8 / itemsize)``
    elements of ``dtype``, the first code of each element in its lowest bits."""
    per = 8 * torch.empty((), dtype=dtype).element_size() // bits
    # masked: a code out of range (a NaN's conversion, in a group that decodes to NaN anyway)
    # must not spill into its neighbour's bits
    parts = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per) & ((1 << bits) - 1)
    out = parts[..., 0]
    for k in range(1, per):
        out = out | (parts[..., k] << (bits * k))
    return out.to(dtype)


def unpack(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 codes in ``[0, 2^bits)``, ``(..., n)``."""
    per = 8 * stored.element_size() // bits
    # each code reads its element and shifts by its place in it: index arithmetic on one load,
    # which Inductor fuses into the kernel that uses the codes (a stack of the parts would be
    # written out by a kernel of its own)
    word = stored.to(torch.int32).unsqueeze(-1).expand(*stored.shape, per)
    word = word.reshape(*stored.shape[:-1], stored.shape[-1] * per)  # sizes named: G may be 0
    place = torch.arange(word.shape[-1], device=stored.device, dtype=torch.int32) % per
    return (word >> (place * bits)) & ((1 << bits) - 1)
