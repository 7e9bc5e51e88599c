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
    codes = codes & ((1 << bits) - 1)
    if dtype == torch.uint8 and 4 % per == 0 and codes.shape[-1] % 4 == 0:
        return _pack_bytes_through_words(codes.to(torch.uint8), bits, per)
    parts = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = parts[..., 0]
    for k in range(1, per):
        out = out | (parts[..., k] << (bits * k))
    return out.to(dtype)


def _pack_bytes_through_words(codes: torch.Tensor, bits: int, per: int) -> torch.Tensor:
    """:func:`pack` of byte codes read back four to an int32 word. Compiled, the view of bytes as
    words (a reinterpretation of another width) makes Inductor store the codes as bytes from the
    kernel that computes them and pack them in a kernel of its own, writing the state in place:
    without it Inductor stored what the codes are computed from (the new fp32 values and the int32
    noise, 8 B per value) and computed them again in the packing kernel."""
    # bytes 4i .. 4i + 3, the first in the lowest bits: little-endian, as CPUs and GPUs torch
    # runs on here are (tests/codecs/test_four_bit.py checks the stored format)
    words = codes.view(torch.int32)
    n = codes.shape[-1] // per  # stored bytes
    per_word = 4 // per
    word = words.unsqueeze(-1).expand(*words.shape, per_word)
    word = word.reshape(*words.shape[:-1], n)
    first = torch.arange(n, device=codes.device, dtype=torch.int32) % per_word * (8 * per)
    out = (word >> first) & ((1 << bits) - 1)
    for k in range(1, per):
        out = out | (((word >> (first + 8 * k)) & ((1 << bits) - 1)) << (bits * k))
    return out.to(torch.uint8)


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
