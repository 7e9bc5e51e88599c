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
  together in one launch (:class:`flashcompile.runtime.shards.UnitRelease`).
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

from flashcompile.optim.optimizer import Optimizer
from flashcompile.runtime.arena import Bucket
from flashcompile.runtime.distributed import is_dtensor
from flashcompile.runtime.shards import UnitRelease

_active: list[GradientRelease] = []
_original_clip = torch.nn.utils.clip_grad_norm_
# clip_grad_norm_ and clip_grad_value_ look these up in their module at each call, so patching them
# also guards references imported before the release (from torch.nn.utils import clip_grad_norm_)
_clip_grad = torch.nn.utils.clip_grad
_original_clip_with_norm = _clip_grad._clip_grads_with_norm_
_original_group = _clip_grad._group_tensors_by_device_and_dtype


class GradientRelease:
    """The handle :func:`enable_gradient_release` returns; ``remove()`` restores normal stepping."""

    def __init__(self, model: torch.nn.Module, optimizer: Optimizer, bucket_mb: float = 25.0):
        self.optimizer = optimizer
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._params = {id(p) for p in model.parameters()} & set(self._group_of)
        self._backwards_since_step = 0  # finished backward passes that stepped, since step()
        self._in_backward = False
        self._cap = bucket_mb * 2**20
        self._arrivals: list[torch.Tensor] | None = []  # the first backward's order, then None
        optimizer._release_flat_grads()
        self._hooks = []
        sharded, plain = [], []  # FSDP2 shards: stepped (and their states packed) per FSDP2 unit
        for g in optimizer.param_groups:
            released = [p for p in g["params"] if id(p) in self._params and p.requires_grad]
            sharded += [p for p in released if is_dtensor(p)]
            plain += [p for p in released if not is_dtensor(p)]
            for p in released:
                p.grad = None
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        # gradients arrive roughly in reverse registration order (as DDP assumes): the first
        # buckets fill first; after the first backward they follow the order seen
        self._buckets = _ReleaseBuckets(optimizer, self._group_of, plain[::-1], self._cap)
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
        if self._arrivals is not None:
            self._arrivals.append(p)
        if self._units is not None and self._units.owns(p):
            self._units.ready(p)  # the unit's last shard steps them all, frees their grads
            return
        self._buckets.ready(p)

    def _backward_done(self) -> None:
        if self._units is not None:
            self._units.flush()
        self._buckets.flush()
        if self._arrivals is not None:  # rebuild the buckets in the order gradients came
            self._buckets.reorder(self._arrivals)
            self._arrivals = None
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
        self.optimizer.finish_shared()  # every param has stepped: Prodigy's d for the next

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


class _ReleaseBuckets:
    """Released params stepped in buckets: a bucket (one param group, dtype and device, about
    ``cap`` bytes of weights, params in the order their gradients arrive) steps in one launch once
    its last gradient is in, and frees their gradients (:class:`flashcompile.runtime.arena.Bucket` with
    ``keep_grads=False``). Params no bucket takes (per-tensor optimizers, padding a rule cannot
    keep zero) step one by one as their gradients arrive."""

    def __init__(self, optimizer: Optimizer, group_of, params: list[torch.Tensor], cap: float):
        self.optimizer, self.group_of, self.cap = optimizer, group_of, cap
        self._build([params])

    def _build(self, runs: list[list[torch.Tensor]]) -> None:
        opt = self.optimizer
        self.bucket_of: dict[int, list] = {}  # id(param) -> [group, Bucket, gradients in]
        self.buckets: list[list] = []
        parts, singles = self._partition(runs)
        for members in parts:
            group = self.group_of[id(members[0])]
            plan = opt.plan_for(members[0], opt.flags_of(group))
            entry = [group, Bucket(members, plan, opt.state, opt.init_state, keep_grads=False), 0]
            self.buckets.append(entry)
            self.bucket_of.update((id(q), entry) for q in members)
        if singles:
            _pack_states(opt, singles, self.group_of)

    def _partition(self, runs: list[list[torch.Tensor]]):
        """The buckets' params (a bucket never spans two runs, nor two param groups, dtypes or
        devices), and the params no bucket can take."""
        opt, parts, singles = self.optimizer, [], []
        for params in runs:
            open_: dict[tuple, tuple[list[torch.Tensor], float]] = {}
            for p in params:
                group = self.group_of[id(p)]
                flat = opt.flat if opt.flat is not None else p.device.type == "cuda"
                if not flat or not opt.plan_for(p, opt.flags_of(group)).steps_flat_over([p.numel()]):
                    singles.append(p)
                    continue
                kind = (id(group), p.dtype, p.device)
                members, size = open_.get(kind, ([], 0.0))
                members.append(p)
                open_[kind] = (members, size + p.numel() * p.element_size())
                if open_[kind][1] >= self.cap:
                    parts.append(open_.pop(kind)[0])
            parts += [members for members, _ in open_.values()]
        return parts, singles

    def ready(self, p: torch.Tensor) -> None:
        """``p``'s gradient is complete: step its bucket if it was the last one to wait."""
        entry = self.bucket_of.get(id(p))
        if entry is None:
            self.optimizer.step_param(p, self.group_of[id(p)])
            p.grad = None
            return
        entry[2] += 1
        if entry[2] == len(entry[1].params):
            self._step(entry)

    def flush(self) -> None:
        """At the end of backward: buckets some of whose params got no gradient step the rest."""
        for entry in self.buckets:
            if entry[2]:
                self._step(entry)

    def _step(self, entry: list) -> None:
        group, bucket, _ = entry
        opt = self.optimizer
        if bucket.state is not opt.state or not bucket.intact():  # a loaded or reset state
            plan = opt.plan_for(bucket.params[0], opt.flags_of(group))
            entry[1] = bucket = Bucket(bucket.params, plan, opt.state, opt.init_state,
                                       keep_grads=False)
        opt._step_and_free(bucket, group)
        entry[2] = 0

    def reorder(self, arrivals: list[torch.Tensor]) -> None:
        """Rebuild the buckets in the order gradients arrived, params that got none in buckets of
        their own (a bucket waiting for a gradient that never comes steps param by param)."""
        now = [entry[1].params for entry in self.buckets]
        seen = {id(p) for p in arrivals}
        runs = [[p for p in arrivals if id(p) in self.bucket_of],
                [p for members in now for p in members if id(p) not in seen]]
        if [list(map(id, m)) for m in self._partition(runs)[0]] != [list(map(id, m)) for m in now]:
            self._build(runs)


def _pack_states(optimizer: Optimizer, params: list[torch.Tensor], group_of) -> None:
    """Allocate the params' states now, packed in one flat buffer per field (a flat bucket without
    gradient buffer). Allocated one by one inside backward, between freed activations, ~5 tensors
    per param would fragment memory, and round up in the allocator (+3.8% resident bytes measured
    on GPT-2 small)."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((id(group_of[id(p)]), p.dtype, p.device), []).append(p)
    for same in by_kind.values():
        group = group_of[id(same[0])]
        Bucket(same, optimizer.plan_for(same[0], optimizer.flags_of(group)), optimizer.state,
               optimizer.init_state, keep_grads=False)


def enable_gradient_release(model: torch.nn.Module, optimizer: Optimizer,
                            bucket_mb: float = 25.0) -> GradientRelease:
    """Step each of ``model``'s parameters in ``optimizer`` inside backward and free its gradient.

    Bit-identical to stepping after backward. Keep calling ``optimizer.step()`` once per iteration.
    With flat storage (the CUDA default) params step in buckets of about ``bucket_mb`` MiB of
    weights, one launch each, as soon as a bucket's last gradient is in: at most a bucket's
    gradients wait at a time. Returns a handle; ``handle.remove()`` restores normal stepping.
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
    return GradientRelease(model, optimizer, bucket_mb)


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
