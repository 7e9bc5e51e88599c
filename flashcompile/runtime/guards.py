"""Checks on what an optimizer is given: params, gradients, and the circumstances of a step.

Each error names the parameter (its name if the optimizer was given named parameters, its group,
index and shape), the value that does not fit, and what to do instead. The checks that run every
step cost a few attribute reads per parameter; the descriptions are built only on the error path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def describe(opt, p: torch.Tensor) -> str:
    """``param 'fc.weight' (group 0, index 2, shape (3, 4))``, or without the name if none."""
    for g, group in enumerate(opt.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                names = group.get("param_names")
                name = f" {names[i]!r}" if names else ""
                return f"param{name} (group {g}, index {i}, shape {tuple(p.shape)})"
    return f"param of shape {tuple(p.shape)}"


def check_param(p: torch.Tensor, where: str) -> None:
    """A parameter the optimizer can hold: dense, real, float32/bfloat16/float16."""
    if p.is_sparse:
        raise ValueError(f"{where} is sparse; flashcompile optimizes dense parameters (use a "
                         "dense tensor, or torch.optim.SparseAdam for sparse embeddings)")
    if p.is_complex():
        raise ValueError(f"{where} is complex ({p.dtype}); complex parameters are not supported: "
                         "optimize torch.view_as_real(p) as a real tensor")
    if p.dtype in SUPPORTED_DTYPES:
        return
    if not p.is_floating_point():
        advice = "integer and bool tensors take no gradient: leave them out of the optimizer"
    elif p.dtype == torch.float64:
        advice = ("float64 would silently lose precision in the fp32 kernel: cast it to float32 "
                  "or keep it in a torch.optim optimizer")
    else:  # float8 and other small floats
        advice = ("train a float32 or 16-bit weight (flashcompile.cast_model) and cast it to "
                  f"{p.dtype} where you use it")
    raise ValueError(f"{where} has dtype {p.dtype}, which is not supported (float32, bfloat16 or "
                     f"float16); {advice}")


def check_grad(opt, p: torch.Tensor, grad: torch.Tensor) -> None:
    """A gradient the step can apply to ``p``: dense, on a device with data, shaped like ``p``."""
    if grad.is_sparse:
        raise RuntimeError(
            f"{type(opt).__name__} does not support sparse gradients: {describe(opt, p)} has one. "
            "Use dense gradients (nn.Embedding(..., sparse=False)), or torch.optim.SparseAdam for "
            "the sparse parameters")
    if p.device.type == "meta" or grad.device.type == "meta":
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of supported "
            f"devices (flashcompile's step is always fused): {describe(opt, p)} is on "
            f"{p.device.type} with its grad on {grad.device.type}; materialise the model first "
            "(model.to_empty(device=...))")
    if grad.shape != p.shape:
        raise wrong_grad_shape(describe(opt, p), grad)


def wrong_grad_shape(where: str, grad: torch.Tensor) -> RuntimeError:
    return RuntimeError(
        f"{where} has a gradient of shape {tuple(grad.shape)}; a gradient must have its "
        "parameter's shape (one set through .grad.data bypasses torch's check)")


def check_step(opt) -> None:
    """What a step cannot serve: CUDA graph capture, and differentiating through the step."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{type(opt).__name__}.step() cannot be captured in a CUDA graph: it computes its "
            "scalars (bias corrections, lr) on the host each step, which a replay would freeze. "
            "Call it outside the capture; flat CUDA buckets replay a graph of their own")
    for group in opt.param_groups:
        if group.get("differentiable"):
            _check_no_graph_needed(opt, group)


def _check_no_graph_needed(opt, group: Mapping[str, Any]) -> None:
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if g.requires_grad or (p.requires_grad and not p.is_leaf):
            why = "its gradient requires grad" if g.requires_grad else "it is a non-leaf tensor"
            raise RuntimeError(
                f"differentiable=True: stepping {describe(opt, p)} would need an autograd graph "
                f"({why}), but flashcompile steps in a compiled kernel under no_grad and "
                "quantises its states in place, which autograd cannot differentiate. Use "
                f"torch.optim.{type(opt).__name__}(differentiable=True) for steps you "
                "differentiate through")


def check_matrix(rule, traced, p: torch.Tensor) -> None:
    """A rule with a matrix stage (``orthogonalize``: Muon) steps 2-D parameters only, as
    torch.optim.Muon; others belong in a param group of another rule."""
    from flashcompile.language.dsl import Orthogonalize

    if p.dim() != 2 and any(out.has(Orthogonalize) for out in traced.outputs):
        raise ValueError(
            f"{rule.name.capitalize()} only supports 2D parameters whereas we found a parameter "
            f"with size: {p.size()}. Optimize vectors, embeddings' tables if you wish, and "
            "convolution kernels with an element-wise rule (e.g. AdamW) in an optimizer of their own")
