"""Global-norm gradient clipping over an optimizer's params, reading its flat gradient buffers:
``opt.clip_grad_norm_`` (in place, as torch's) and the optimizer's ``max_grad_norm`` (the factor
its step's kernels multiply the gradients by).

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
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in rest:
        by_kind[(g.device, g.dtype)].append(g)
    total = _total_norm(whole, by_kind.values(), norm_type, params[0].device)
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


def coefficient(optimizer, max_norm: float, scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_grad_norm`` inside the step: the total L2 norm of the gradients of ``optimizer``'s
    params, each multiplied by ``scale`` (1 / GradScaler's scale), and the factor that clips them
    to ``max_norm`` (as ``clip_grad_norm_``: ``min(1, max_norm / (norm + 1e-6))``). Both stay on
    the device (no sync); the step's kernels multiply each gradient by the factor as they read it.
    Sharded (FSDP2) gradients are summed over their ranks."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        one = torch.ones(())
        return torch.zeros(()), one
    if any(map(is_dtensor, params)):
        norms = [torch.linalg.vector_norm(p.grad.full_tensor(), dtype=torch.float32)
                 if is_dtensor(p) else torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                 for p in params]
        total = torch.linalg.vector_norm(torch.stack([n.to(params[0].device) for n in norms]))
    else:
        whole, rest = _flat_and_rest(optimizer, params)
        by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for g in rest:
            by_kind[(g.device, g.dtype)].append(g)
        total = _total_norm(whole, by_kind.values(), 2.0, params[0].device)
    total = total * scale
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def bucket_coefficient(grads: list[torch.Tensor], max_norm: float, share: float) -> torch.Tensor:
    """``max_grad_norm`` under gradient release, where a bucket steps before the others' gradients
    exist: clip the bucket's own gradients to ``max_norm * sqrt(share)`` (``share``: its part of
    all the optimizer's values). When every bucket meets its bound the total norm meets
    ``max_norm``; a bucket under its bound is not scaled up by the others' headroom, so this clips
    more than one global norm would (never less)."""
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    return torch.clamp(max_norm * share**0.5 / (total + 1e-6), max=1.0)


def _total_norm(whole: list[torch.Tensor], lists, norm_type: float,
                device: torch.device) -> torch.Tensor:
    """The ``norm_type`` norm (fp32) of flat gradient buffers and of lists of gradients of one
    device and dtype each (one foreach kernel per list)."""
    norms = [torch.linalg.vector_norm(buf, norm_type, dtype=torch.float32) for buf in whole]
    for grads in lists:
        norms.extend(torch._foreach_norm(grads, norm_type, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _flat_and_rest(optimizer, params: Iterable[torch.Tensor]):
    """The gradient buffers of flat buckets whose params all hold their views into them (padding
    lanes are zero: they add nothing to a norm), and every other gradient."""
    whole, covered = [], set()
    for bucket in optimizer._buckets.values():
        if bucket.holds_grad_views():
            whole.append(bucket.grads)
            covered.update(map(id, bucket.params))
    return whole, [p.grad for p in params if id(p) not in covered]
