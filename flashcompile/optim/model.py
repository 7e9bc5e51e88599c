"""Models in 16 bits: cast a model's weights, and move its full-precision weights in and out.

With flash codecs a 16-bit weight plus its residual is the master weight, so a model cast to bf16
loses nothing the optimizer needs (FlashOptim, arXiv 2602.23349). :func:`cast_model` casts;
:func:`fp32_state_dict` and :func:`load_fp32_state_dict` convert at the boundary with fp32
checkpoints (pretrained weights in, exported weights out) without dropping the residual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from flashcompile.optim.optimizer import Optimizer

# Layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm): their running variance
# drifts in 16 bits, so they stay fp32. Their op takes a 16-bit input with fp32 weight and statistics
# directly (F.batch_norm on CPU and CUDA: 16-bit output, fp32 weight grad), so they need no casts:
# casting the activations to fp32 and back cost 35 ms per ResNet-50 iteration on an H200, and
# BatchNorm saved the fp32 copy for backward (+1.3 GiB of peak memory).
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,)
# Every normalisation layer: the former default. LayerNorm, GroupNorm and RMSNorm refuse mixed
# dtypes on CUDA (torch 2.11), so kept in fp32 they run behind casts at their inputs and outputs.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    *BATCH_NORMS, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

KeepFp32 = tuple[type[nn.Module], ...] | type[nn.Module] | Callable[[nn.Module], bool] | None


def cast_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
               keep_fp32: KeepFp32 = BATCH_NORMS) -> nn.Module:
    """Cast ``model``'s floating params and buffers to ``dtype`` in place, except in kept modules.

    Args:
        model: the model; call before building its optimizer (the optimizer's state follows the
            params' dtypes).
        dtype: ``torch.bfloat16`` (default) or ``torch.float16``.
        keep_fp32: modules that stay fp32: a module type, a tuple of types, or a predicate on the
            module; ``None`` or ``()`` keeps nothing. Default: :data:`BATCH_NORMS`, the layers with
            running statistics, which take 16-bit inputs as they are. Any other kept module gets
            its floating inputs cast to fp32 and its floating outputs cast back to ``dtype``
            (LayerNorm, for one: :data:`NORM_LAYERS` keeps every normalisation layer that way).
            LayerNorm, GroupNorm and RMSNorm are cast by default: with the weight split their
            master weight stays exact to ULP/508, and their ops normalise in fp32 internally.

    Returns:
        ``model``, for chaining.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    keep = _keep_predicate(keep_fp32)
    kept = [m for m in model.modules() if keep(m)]
    inside_kept = {id(t) for m in kept for t in [*m.parameters(), *m.buffers()]}
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in tensors.items():
                    if t is None or not t.is_floating_point() or id(t) in inside_kept:
                        continue
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(dtype)  # the same Parameter object: hooks, ties survive
                    else:
                        tensors[name] = t.to(dtype)
    for m in kept:
        if isinstance(m, BATCH_NORMS) or getattr(m, "_flashcompile_cast_hooks", None):
            continue
        m._flashcompile_cast_hooks = (
            m.register_forward_pre_hook(_inputs_to(torch.float32), with_kwargs=True),
            m.register_forward_hook(_outputs_to(dtype)),
        )
    return model


def _keep_predicate(keep_fp32: KeepFp32) -> Callable[[nn.Module], bool]:
    if keep_fp32 is None:
        return lambda m: False
    if isinstance(keep_fp32, type):
        keep_fp32 = (keep_fp32,)
    if isinstance(keep_fp32, tuple):
        bad = [t for t in keep_fp32 if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"keep_fp32 must hold nn.Module types, got {bad}")
        return lambda m: isinstance(m, keep_fp32)
    if callable(keep_fp32):
        return keep_fp32
    raise TypeError(
        f"keep_fp32 must be a module type, a tuple of them, a predicate or None; got {keep_fp32!r}"
    )


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, x)


def _inputs_to(dtype: torch.dtype):
    def hook(module, args, kwargs):
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)
    return hook


def _outputs_to(dtype: torch.dtype):
    def hook(module, args, output):
        return _cast_floats(output, dtype)
    return hook


def fp32_state_dict(model: nn.Module, optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every floating entry in fp32; params the optimizer holds come
    back as their master weights (16-bit weight + residual), so the export loses nothing."""
    masters = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in masters:
            out[name] = optimizer.master_weight(t).detach().clone()
        elif t.is_floating_point():
            out[name] = t.detach().float().clone()
        else:
            out[name] = t.detach().clone()
    return out


@torch.no_grad()
def load_fp32_state_dict(model: nn.Module, optimizer: Optimizer,
                         state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load full-precision weights into a 16-bit ``model``: each param the optimizer holds gets its
    16-bit value and its residual from the fp32 value; other entries are cast. Checks every key
    and shape before changing anything.

    Args:
        strict: as ``nn.Module.load_state_dict``: missing or unexpected keys raise. A key whose
            tensor another key of ``state_dict`` also reaches (a tied head) is not missing.

    Returns:
        ``missing_keys`` and ``unexpected_keys``, as ``nn.Module.load_state_dict``.
    """
    own = model.state_dict(keep_vars=True)
    given = {id(own[k]) for k in state_dict if k in own}
    missing = sorted(k for k in set(own) - set(state_dict) if id(own[k]) not in given)
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing}, unexpected "
                       f"{unexpected}; pass strict=False to load the keys that match")
    present = [k for k in own if k in state_dict]
    for name in present:
        if tuple(state_dict[name].shape) != tuple(own[name].shape):
            raise ValueError(
                f"{name}: state dict has shape {tuple(state_dict[name].shape)}, the model "
                f"{tuple(own[name].shape)}"
            )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name in present:
        t = own[name]
        if id(t) in held:
            optimizer.set_master_weight(t, state_dict[name])
        else:
            t.copy_(state_dict[name])
    return nn.modules.module._IncompatibleKeys(missing, unexpected)
