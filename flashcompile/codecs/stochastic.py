"""Noise for stochastic rounding, made inside the kernel from the element's position and the step.

Round to nearest drops any change smaller than half a code step, so an 8-bit EMA with beta >=
0.999 (Adam's v, AdEMAMix's slow momentum) stops moving once its increments fall below that.
Rounding ``y`` to ``floor(y + u)`` with ``u`` uniform in [0, 1) is right on average, so small
increments accumulate (arXiv 2502.20566 trains bf16 AdamW this way).

``u`` comes from a 32-bit integer hash (two multiply-xorshift rounds with constants from Chris
Wellons' hash-prospector, both below 2^31 so every product stays int32) of the element's index in
the call, the step and a per-state salt: no RNG state, no extra memory traffic, the same noise for
the same step, layout and seed (a resumed run repeats it), and fused into the one kernel. The index
restarts in every call: params stepped one per call (the per-tensor path) share a step's noise
pattern, those in one flat bucket do not. The
int32 products wrap (two's complement) in eager torch and in Inductor's Triton and C++ code alike.
"""

from __future__ import annotations

import torch

from flashcompile.codecs.base import GROUP

_STEP_MIX = 0x2545F491  # decorrelates successive steps before the hash


def salt(seed: int, state_index: int) -> int:
    """A constant below 2^31 per (seed, noise stream of a plan): streams draw different noise."""
    return (seed * 0x9E3779B1 + state_index * 0x632BE5AB + 0x5851F42D) % (2**31 - 1)


def uniform_noise(step: torch.Tensor, state_salt: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform values in [0, 1) on 2^-23 steps, one per element of ``like`` (``(G, GROUP)``)."""
    return _unit_interval(_hash(step, state_salt, like) >> 9)


def uniform_noise_pair(step: torch.Tensor, pair_salt: int, like: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noises from one hash (its high and low 16 bits, on 2^-16 steps): two
    stochastic states of a plan share the hash's instructions. 2^-16 of a code step is far below
    what an 8-bit code resolves."""
    h = _hash(step, pair_salt, like)
    return _unit_interval((h >> 16) << 7), _unit_interval(h << 7)


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """``bits``' low 23 bits as a value in [0, 1): the float ``1.bits`` minus 1, exact, and no
    int-to-float conversion (a quarter-rate instruction on Hopper; see ``base.round_to_int``).
    ``1 + u`` is exact too: codecs read random integers back from its mantissa."""
    return ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32) - 1.0


def _hash(step: torch.Tensor, state_salt: int, like: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(like.shape[0], device=like.device, dtype=torch.int32)[:, None]
    lanes = torch.arange(GROUP, device=like.device, dtype=torch.int32)
    h = (rows * GROUP + lanes) ^ (step.to(torch.int32) * _STEP_MIX + state_salt)
    h = h ^ ((h >> 16) & 0xFFFF)  # logical shifts: mask what the arithmetic shift smeared
    h = h * 0x21F0AAAD
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * 0x735A2D97
    return h ^ ((h >> 15) & 0x1FFFF)
