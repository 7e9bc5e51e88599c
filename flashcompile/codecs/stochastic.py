"""Noise for stochastic rounding, made inside the kernel from each element's values and the step.

Round to nearest drops any change smaller than half a code step, so an 8-bit EMA with beta >=
0.999 (Adam's v, AdEMAMix's slow momentum) stops moving once its increments fall below that.
Rounding ``y`` to ``floor(y + u)`` with ``u`` uniform in [0, 1) is right on average, so small
increments accumulate (arXiv 2502.20566 trains bf16 AdamW this way).

The noise is a 32-bit integer hash (a multiply round with a constant from Chris Wellons'
hash-prospector, below 2^31 so every product stays int32; codecs take its high bits) of two fp32
values of the element (their top 16 bits), with the step and a per-state salt. A code that
drops low bits of an fp32 pattern (the offset codes of ``adaptive.py``, ``relative.py``) adds the
top bits of the noise as the carry: ``floor(y + u)`` in integers, no float noise made at all.
The kernel passes the new weight and the first state it rounds to nearest (Adam's momentum), as
computed before encoding (``codegen._noise_keys``; without such a state, the gradient and the
weight): values of the element, not of the value being rounded. No RNG state, no extra memory
traffic, fused into the one kernel, and the same noise for the same element whatever the layout:
a flat bucket, one param per call, gradient release's buckets, an FSDP shard or a checkpoint
resharded onto other ranks all round alike (bit-identical steps), and a resumed run repeats it.
Elements whose keys agree in those bits share a step's noise; over steps each element's noise is
still uniform (the step is hashed in), which is what unbiased rounding needs. The int32 products
wrap (two's complement) in eager torch and in Inductor's Triton and C++ code alike.
"""

from __future__ import annotations

import torch


_STEP_MIX = 0x2545F491  # decorrelates successive steps before the hash
_KEY_MIX = 0x2C1B3C6D  # odd, below 2^31: a second key's bits spread before they are mixed in


def salt(seed: int, state_index: int) -> int:
    """A constant below 2^31 per (seed, noise stream of a plan): streams draw different noise."""
    return (seed * 0x9E3779B1 + state_index * 0x632BE5AB + 0x5851F42D) % (2**31 - 1)


def uniform_noise(step: torch.Tensor, state_salt: int, *keys: torch.Tensor) -> torch.Tensor:
    """Random int32 bits per element of the fp32 ``keys`` (two values of the element, ``(G,
    GROUP)`` each), hashed with the step: the product's high bits are what depend on every input
    bit, so codecs take the top ``k`` (:func:`carry`)."""
    return _hash(step, state_salt, keys)


def uniform_noise_pair(step: torch.Tensor, pair_salt: int, *keys: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noises from one hash: its high and low 16 bits, each as the top of an int32 with zeros
    below. Two stochastic states of a plan share the hash's instructions; 2^-16 of a code step is
    far below what an 8-bit code resolves."""
    h = _hash(step, pair_salt, keys, fold=True)  # the low half needs the high bits folded in
    return h & -65536, h << 16


def noise_for(codec, noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (the hash, or one of a pair) as ``codec`` takes it: whole where it sets
    ``noise_bits = 32`` (the built-in codecs), else :func:`as_23_bits` (the contract of a user's
    codec, :class:`~flashcompile.codecs.base.Codec`)."""
    return noise if codec.noise_bits == 32 else as_23_bits(noise)


def as_23_bits(noise: torch.Tensor) -> torch.Tensor:
    """The noise's top 23 bits as int32 in [0, 2^23): what codecs took before they took the whole
    hash (2026-12-07), and what a user's codec still gets."""
    return (noise >> 9) & 0x7FFFFF


def carry(noise: torch.Tensor, k) -> torch.Tensor:
    """The noise's top ``k`` bits as a signed integer, uniform in ``[-2^(k-1), 2^(k-1))``: one
    arithmetic shift. A code adds ``2^(k-1)`` with its own constants (the carry of
    ``floor(y + u)``, ``u`` uniform in ``[0, 2^k)``), not here: one instruction per element fewer
    than masking a logical shift. ``k`` may be a per-group tensor."""
    return noise >> (32 - k)


# bits below an integer that stochastic rounding keeps before its carry: y to 2^-8
FRACTION_BITS = 8


def round_stochastic(y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """int32 ``floor(y + u)`` for ``|y| < 2^14``: ``y`` on average. ``y + 1.5 * 2^15`` holds ``y``
    to 2^-8 (:data:`FRACTION_BITS`) in its low bits (a bias of at most 2^-9), the noise's top 8
    bits are the carry, and the shift floors: integer instructions, no float noise (as the offset
    codes round; ``adaptive._encode`` is this with per-group constants)."""
    offset = 1.5 * 2.0 ** (23 - FRACTION_BITS)
    # offset's fp32 bits, less the half range that centres the signed carry
    floor = 0x4B400000 - (FRACTION_BITS << 23) - (1 << (FRACTION_BITS - 1))
    return ((y + offset).view(torch.int32) - floor + carry(noise, FRACTION_BITS)) >> FRACTION_BITS


def _hash(step: torch.Tensor, state_salt: int, keys, fold: bool = False) -> torch.Tensor:
    # each key's top 16 bits (sign, exponent, 7 mantissa bits: its bf16 truncation): two runs
    # whose values differ in their last bits (a tensor lr against a float one, another summation
    # order) draw the same noise, instead of a fresh one at every element
    h = keys[0].view(torch.int32) >> 16
    for key in keys[1:]:  # multiplied first: equal values in two keys must not cancel
        h = h ^ ((key.view(torch.int32) >> 16) * _KEY_MIX)
    h = h ^ (step.to(torch.int32) * _STEP_MIX + state_salt)
    # one multiply round: each bit of the product depends on every input bit below it, so its
    # high bits on all of them; they are what a single stream uses. A pair also uses the low
    # half, so the shift folds the high bits into it (a logical shift: mask what the arithmetic
    # one smeared). A second round (3 instructions per element of an instruction-bound kernel)
    # narrowed the spread of test_stochastic_rounding_unsticks_a_slow_ema's walks by about a
    # tenth, and both were unbiased there
    h = h * 0x21F0AAAD
    return h ^ ((h >> 15) & 0x1FFFF) if fold else h
