"""Gradient release: step each parameter inside backward, then free its gradient.

A post-accumulate-grad hook on every parameter runs the optimizer's step for that one parameter as
soon as autograd has finished its gradient, and sets ``.grad`` to ``None``. Gradients then never all
exist at once: for AdamW with flash codecs that takes the resident memory from 7 to 5 bytes per
parameter (FlashOptim, arXiv 2602.23349).

The training loop stays as it was: ``optimizer.step()`` no longer updates anything (the parameters
were stepped during backward) but closes the iteration, so LR schedulers keep working and two
backward passes without a step in between (gradient accumulation) are caught.

Setups whose result would silently change raise instead:

* DDP: its hooks all-reduce gradients after they are accumulated, so a release hook would step on
  the local, unreduced gradient. FSDP2 (``fully_shard``) fits: it reduce-scatters inside backward and
  runs the hooks of the sharded parameters on the reduced shard; each FSDP2 unit's shards then step
  together in one launch (:class:`flashcompile.shards.UnitRelease`).
* gradient accumulation over micro-batches: each backward steps; two without ``optimizer.step()``
  in between raise before a parameter moves.
* closures: ``step(closure)`` would run forward and backward (and step) again.
* global-norm clipping: the norm needs every gradient before the first step. While a release is
  active, ``torch.nn.utils.clip_grad_norm_`` raises for released parameters (it would otherwise see
  no gradients and silently clip nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from flashcompile.arena import Bucket
from flashcompile.distributed import is_dtensor
from flashcompile.optimizer import Optimizer
from flashcompile.shards import UnitRelease

_active: list[GradientRelease] = []
_original_clip = torch.nn.utils.clip_grad_norm_
# clip_grad_norm_ and clip_grad_value_ look these up in their module at each call, so patching them
# also guards references imported before the release (from torch.nn.utils import clip_grad_norm_)
_clip_grad = torch.nn.utils.clip_grad
_original_clip_with_norm = _clip_grad._clip_grads_with_norm_
_original_group = _clip_grad._group_tensors_by_device_and_dtype


class GradientRelease:
    """The handle :func:`enable_gradient_release` returns; ``remove()`` restores normal stepping."""

    def __init__(self, model: torch.nn.Module, optimizer: Optimizer):
        self.optimizer = optimizer
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._params = {id(p) for p in model.parameters()} & set(self._group_of)
        self._stepped_params: set[int] = set()
        self._backwards_since_step = 0  # finished backward passes that stepped, since step()
        self._in_backward = False
        optimizer._release_flat_grads()
        self._hooks = []
        sharded = []  # FSDP2 shards: stepped (and their states packed) per FSDP2 unit
        for g in optimizer.param_groups:
            released = [p for p in g["params"] if id(p) in self._params and p.requires_grad]
            sharded += [p for p in released if is_dtensor(p)]
            _pack_states(optimizer, g, [p for p in released if not is_dtensor(p)])
            for p in released:
                p.grad = None
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        self._units = UnitRelease(optimizer, model, sharded, self._group_of) if sharded else None
        optimizer._gradient_release = self
        _active.append(self)
        _patch_clipping()

    @property
    def active(self) -> bool:
        return self.optimizer._gradient_release is self

    def releases(self, p: torch.Tensor) -> bool:
        return id(p) in self._params

    def _hook(self, p: torch.Tensor) -> None:
        if not self._in_backward:
            if self._backwards_since_step:
                raise RuntimeError(
                    "gradient release: a second backward pass ran without optimizer.step() after the "
                    "first. Each backward already stepped the parameters, so gradients cannot be "
                    "accumulated over micro-batches; call optimizer.step() once per backward (it only "
                    "closes the iteration), or call .remove() on the release handle to accumulate"
                )
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        if self._units is not None and self._units.owns(p):
            self._units.ready(p)  # the unit's last shard steps them all, frees their grads
            return
        self.optimizer.step_param(p, self._group_of[id(p)])
        p.grad = None

    def _backward_done(self) -> None:
        if self._units is not None:
            self._units.flush()
        self._in_backward = False
        self._backwards_since_step += 1

    def end_iteration(self, closure: Any) -> None:
        """``optimizer.step()`` while released: the params were stepped in backward; close the
        iteration (and step any optimizer params outside the model that have a grad)."""
        if closure is not None:
            raise RuntimeError(
                "gradient release steps inside backward, so optimizer.step(closure) cannot re-run "
                "the closure's forward and backward; call optimizer.step() without a closure"
            )
        self._backwards_since_step = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._params:
                    self.optimizer.step_param(p, group)

    def remove(self) -> None:
        """Unhook every parameter: ``optimizer.step()`` steps after backward again."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.active:
            self.optimizer._gradient_release = None
        if self in _active:
            _active.remove(self)
        if not _active:
            _unpatch_clipping()


def _pack_states(optimizer: Optimizer, group, params: list[torch.Tensor]) -> None:
    """Allocate the params' states now, packed in one flat buffer per field (a flat bucket whose
    gradient buffer is dropped right away). Allocated one by one inside backward, between freed
    activations, ~5 tensors per param would fragment memory, and round up in the allocator (+3.8%
    resident bytes measured on GPT-2 small)."""
    flags = optimizer._flags(group)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for same in by_kind.values():
        Bucket(same, optimizer._plan(same[0], flags), optimizer.state, optimizer._init_state)


def enable_gradient_release(model: torch.nn.Module, optimizer: Optimizer) -> GradientRelease:
    """Step each of ``model``'s parameters in ``optimizer`` inside backward and free its gradient.

    Bit-identical to stepping after backward. Keep calling ``optimizer.step()`` once per iteration.
    Returns a handle; ``handle.remove()`` restores normal stepping.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"enable_gradient_release needs a flashcompile optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "gradient release cannot run under DistributedDataParallel: DDP all-reduces gradients "
            "after they are accumulated, so each parameter would step on its local gradient. Shard "
            "the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead, which reduces "
            "gradients inside backward before the release hooks run"
        )
    if optimizer._gradient_release is not None:
        raise RuntimeError("this optimizer already has gradient release enabled; .remove() it first")
    return GradientRelease(model, optimizer)


def _refuse_released(params: list[torch.Tensor]) -> None:
    if any(r.releases(p) for r in _active for p in params):
        raise RuntimeError(
            "clip_grad_norm_ on parameters under gradient release: each parameter was stepped and "
            "its gradient freed during backward, so there is no global norm to clip to. Train "
            "without gradient release (handle.remove()) to clip by global norm"
        )


def _clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, *args, **kwargs):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    _refuse_released(params)
    return _original_clip(params, *args, **kwargs)


def _clip_grads_with_norm_(parameters, *args, **kwargs):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    _refuse_released(params)
    return _original_clip_with_norm(params, *args, **kwargs)


def _group_tensors(tensorlistlist, *args, **kwargs):
    # clip_grad_value_ groups [p.grad for p in parameters if p.grad is not None]; released
    # parameters have none (torch then fails with a nested-tensor error)
    if _active and tensorlistlist and not tensorlistlist[0]:
        raise RuntimeError(
            "clip_grad_value_ found no gradients: under gradient release each parameter is stepped "
            "and its gradient freed during backward. Clip each gradient as it arrives instead, "
            "with p.register_hook(lambda g: g.clamp(-clip_value, clip_value)) on every parameter"
        )
    return _original_group(tensorlistlist, *args, **kwargs)


def _patch_clipping() -> None:
    torch.nn.utils.clip_grad_norm_ = _clip_grad_norm_
    _clip_grad.clip_grad_norm_ = _clip_grad_norm_
    _clip_grad._clip_grads_with_norm_ = _clip_grads_with_norm_
    _clip_grad._group_tensors_by_device_and_dtype = _group_tensors


def _unpatch_clipping() -> None:
    torch.nn.utils.clip_grad_norm_ = _original_clip
    _clip_grad.clip_grad_norm_ = _original_clip
    _clip_grad._clip_grads_with_norm_ = _original_clip_with_norm
    _clip_grad._group_tensors_by_device_and_dtype = _original_group
