"""Global-norm gradient clipping over an optimizer's params, reading its flat gradient buffers.

``torch.nn.utils.clip_grad_norm_`` launches one foreach kernel per (device, dtype) when every
group's gradients share the dtype of the norm; a model with two gradient dtypes (bf16 weights and
the fp32 BatchNorm params ``cast_model`` keeps) gets an fp32 clip coefficient, which sends the bf16
gradients down torch's per-tensor path: two kernels (and their host dispatch) per param. Here a
flat bucket's gradients are one tensor: one norm and one multiply per bucket, the multiply in fp32
as torch's per-tensor path does it. The norm is accumulated in fp32 over each bucket, where torch
rounds each tensor's norm to its gradient's dtype first (bf16: within 2^-9 of the fp32 norm), so the
two clip by coefficients that differ in that rounding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from flashcompile.runtime.distributed import is_dtensor


def clip_grad_norm_(optimizer, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of ``optimizer``'s params to a total ``norm_type`` norm of at most
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``; returns the
    total norm (fp32)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if any(map(is_dtensor, params)) or optimizer._gradient_release is not None:
        # sharded norms need a sum over ranks, and released params have no gradients: torch's
        # clip (guarded under release) knows both
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    whole, rest = _flat_and_rest(optimizer, params)
    norms = [torch.linalg.vector_norm(buf, norm_type, dtype=torch.float32) for buf in whole]
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in rest:
        by_kind[(g.device, g.dtype)].append(g)
    for grads in by_kind.values():
        norms.extend(torch._foreach_norm(grads, norm_type, dtype=torch.float32))
    device = params[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be "
            "clipped; pass error_if_nonfinite=False to clip anyway")
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for buf in whole:
        buf.mul_(coefficient.to(buf.device))  # fp32 math, rounded once to the gradient's dtype
    for (dev, _), grads in by_kind.items():
        torch._foreach_mul_(grads, coefficient.to(dev))
    return total


def _flat_and_rest(optimizer, params: Iterable[torch.Tensor]):
    """The gradient buffers of flat buckets whose params all hold their views into them (padding
    lanes are zero: they add nothing to a norm), and every other gradient."""
    whole, covered = [], set()
    for bucket in optimizer._buckets.values():
        if bucket.holds_grad_views():
            whole.append(bucket.grads)
            covered.update(map(id, bucket.params))
    return whole, [p.grad for p in params if id(p) not in covered]
