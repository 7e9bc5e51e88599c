"""Flat storage and gradient release for FSDP2 shards (DTensor parameters).

FSDP2 keeps each parameter's shard in its own storage and all-gathers from it, so the shards cannot
become views into one flat buffer as :class:`flashcompile.runtime.arena.Bucket` makes plain parameters.
:class:`ShardBucket` keeps the gradients and states flat instead and stages the weight shards
through a buffer for the length of one step: one launch per param group, dtype and device.
:class:`UnitRelease` runs gradient release one FSDP2 unit at a time. See
:mod:`flashcompile.runtime.distributed` for the layout and the checkpoints.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flashcompile.codecs import GROUP
from flashcompile.codecs.layout import group_count, groups, lane_counts, scalar_vector, segment_ends
from flashcompile.compiler.plan import Plan
from flashcompile.runtime.arena import steps_agree
from flashcompile.runtime.distributed import like, shard_sums


class ShardBucket:
    """Flat storage for FSDP2 shards of one param group, dtype and device: one launch per step.

    States live in one flat buffer per field, each shard from a group boundary. Gradients
    (``keep_grads``, the optimizer's flat mode) live in one flat buffer too: each ``p.grad`` is a
    DTensor over its view, which FSDP2 accumulates into in place after its reduce-scatter, and
    ``zero_grad`` zeroes the buffer and keeps the views. Without ``keep_grads`` (gradient release)
    each step copies the gradients into a buffer freed after the step. The weight shards stay in
    FSDP2's storage: each step copies them into one zero-padded buffer, steps it, and copies them
    back. The interface of :class:`flashcompile.runtime.arena.Bucket`.
    """

    stores_scalar_states = False  # each param's scalar states advance on their own

    def __init__(self, params: list[torch.Tensor], plan: Plan,
                 state: Mapping[torch.Tensor, dict[str, Any]],
                 init_state: Callable[..., None],  # Optimizer.init_state
                 keep_grads: bool = True):
        self.params, self.plan, self.state = list(params), plan, state
        self.keep_grads = keep_grads
        shards = [p.to_local() for p in self.params]
        counts = [group_count(t.numel()) for t in shards]
        offsets = [0, *itertools.accumulate(counts)][:-1]
        self.groups = sum(counts)
        self.ranges = [slice(o * GROUP, o * GROUP + t.numel()) for o, t in zip(offsets, shards)]
        self.dtype, self.device = shards[0].dtype, shards[0].device
        self.grads = torch.zeros(self.groups * GROUP if keep_grads else 0, dtype=self.dtype,
                                 device=self.device)
        self.fields = {key: torch.zeros(self.groups * f.width, dtype=f.dtype,
                                        device=self.device)
                       for key, f in plan.owned_fields.items()}
        self.steps = torch.zeros(len(self.params))  # state['step'] of each param is a view into this
        with torch.no_grad():
            for i, (p, shard, count) in enumerate(zip(self.params, shards, counts)):
                st = state[p]
                views = {key: self.fields[key][offsets[i] * f.width:(offsets[i] + count) * f.width]
                         for key, f in plan.owned_fields.items()}
                init_state(shard, plan, st, views)  # the fields end up in the views
                self.steps[i] = st["step"]
                st["step"] = self.steps[i]
                if keep_grads:
                    self._adopt_grad(i, shard)
        self._states = [(state[p], state[p]["step"]) for p in self.params]
        self._grad_ptrs = [self.grads[r].data_ptr() for r in self.ranges] if keep_grads else []
        self.uniform_steps: bool | None = None
        self._fields = {k: groups(v, plan.owned_fields[k].width, 0, self.groups)
                        for k, v in self.fields.items()}
        # a reducing rule (LAMB's norms): each shard's sums, all-reduced over the sharding ranks;
        # one launch needs one such group for every param here
        self._ends = segment_ends(counts, self.device) if plan.reduces else None
        self._lanes = (lane_counts([t.numel() for t in shards], self.device) if plan.masks_lanes
                       else None)
        meshes = {(id(p.device_mesh), tuple(pl.is_shard() for pl in p.placements))
                  for p in self.params}
        self._combine = shard_sums(self.params[0]) if len(meshes) == 1 else False

    def _adopt_grad(self, i: int, shard: torch.Tensor) -> None:
        p, view = self.params[i], self.grads[self.ranges[i]].view(shard.shape)
        if p.grad is not None:
            view.copy_(p.grad.to_local())
        p.grad = like(p, view)

    def intact(self) -> bool:
        """The params' states are still the ones packed here (weights are read at each step); a
        state reset replaces or empties them."""
        return all(self.state.get(p) is st and st.get("step") is step
                   for p, (st, step) in zip(self.params, self._states))

    def _staged(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``tensors`` (one per shard) copied into one zero-padded flat buffer, and its views."""
        flat = torch.zeros(self.groups * GROUP, dtype=self.dtype, device=self.device)
        views = [flat[r].view(t.shape) for r, t in zip(self.ranges, tensors)]
        _copy(views, tensors)
        return flat, views

    @torch.no_grad()
    def try_step(self, scalars: Callable[[int], list[float]],
                 factor: torch.Tensor | None = None, shared=None) -> bool:
        """Step every shard in one launch; False (nothing done) where that would differ from
        stepping each: a grad is None, or step counts (or scalar states) differ. ``factor``: the
        gradient factor of a scaling plan, ``shared`` the rule's shared numbers (``Plan.call``)."""
        if not self.plan.steps_flat or (self.plan.reduces and self._combine is False):
            return False
        if any(p.grad is None for p in self.params):
            return False
        if self.uniform_steps is None:
            self.uniform_steps = steps_agree(self.steps, self.params, self.state, self.plan)
        if not self.uniform_steps:
            return False
        shards = [p.to_local() for p in self.params]
        if self._grad_ptrs:
            for i, (p, ptr) in enumerate(zip(self.params, self._grad_ptrs)):
                if p.grad.to_local().data_ptr() != ptr:  # a new tensor: accumulate into ours again
                    self._adopt_grad(i, shards[i])
            grads = self.grads
        else:
            grads, _ = self._staged([p.grad.to_local() for p in self.params])
        self.steps += 1
        values = [GROUP, *scalars(int(self.steps[0].item()))]
        if not self.groups:  # every shard here is empty: the steps still count
            if self.plan.reduces and self._combine is not None:
                self.plan.combine_nothing(self._combine, self.device, len(self.params))
            return True
        weights, staged = self._staged(shards)
        self.plan.call(scalar_vector(values[0], values[1:], self.device),
                       groups(grads, GROUP, 0, self.groups),
                       groups(weights, GROUP, 0, self.groups), self._fields, self._ends,
                       self._combine if self.plan.reduces else None, self._lanes, factor=factor,
                       shared=shared)
        _copy(shards, staged)
        return True

    def holds_grad_views(self, ptrs=None) -> bool:
        """False: shard gradients are DTensors, which only torch's clip sums over ranks."""
        return False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer, keeping the DTensor views (``set_to_none`` is not honoured
        here: FSDP2 reduce-scatters into every shard's gradient each backward)."""
        if not self.keep_grads:
            return
        self.grads.zero_()
        for i, p in enumerate(self.params):
            if p.grad is None or p.grad.to_local().data_ptr() != self._grad_ptrs[i]:
                self._adopt_grad(i, p.to_local())


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """One foreach copy (a launch or two) of every non-empty pair."""
    pairs = [(t, s) for t, s in zip(targets, sources) if t.numel()]
    if pairs:
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])


def fsdp_units(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """The params of each FSDP2 unit (``fully_shard``-ed module), less those of units inside it."""
    from torch.distributed.fsdp import FSDPModule

    units, seen = [], set()
    for module in reversed(list(model.modules())):  # units inside a module come before it
        if isinstance(module, FSDPModule):
            own = [p for p in module.parameters() if id(p) not in seen]
            seen.update(map(id, own))
            units.append(own)
    return units


class UnitRelease:
    """Gradient release for FSDP2 shards, one launch per FSDP2 unit.

    FSDP2 reduce-scatters a unit's gradients together, then runs its shards' post-accumulate-grad
    hooks one after another. :meth:`ready` waits for the unit's last shard, steps them all in one
    launch (a :class:`ShardBucket` that stages their gradients) and frees their gradients; the
    states are packed per unit up front. Shards still waiting when backward ends (a param that got
    no gradient leaves its unit incomplete) step one by one in :meth:`flush`.
    """

    def __init__(self, optimizer, model: torch.nn.Module, params: list[torch.Tensor],
                 group_of: Mapping[int, Mapping[str, Any]]):
        self.optimizer, self.group_of = optimizer, group_of
        released = {id(p) for p in params}
        units = [[p for p in own if id(p) in released] for own in fsdp_units(model)]
        units = [u for u in units if u]
        claimed = {id(p) for u in units for p in u}
        units += [[p] for p in params if id(p) not in claimed]  # DTensors outside FSDP2 units
        self.unit_of = {id(p): i for i, u in enumerate(units) for p in u}
        self.sizes = [len(u) for u in units]
        self.pending = [0] * len(units)
        self.buckets = [self._pack(u) for u in units]

    def _pack(self, unit: list[torch.Tensor]) -> list[tuple[Mapping[str, Any], ShardBucket]]:
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in unit:
            kinds.setdefault((id(self.group_of[id(p)]), p.dtype, p.device), []).append(p)
        out = []
        for same in kinds.values():
            group = self.group_of[id(same[0])]
            plan = self.optimizer.plan_for(same[0].to_local(), self.optimizer.flags_of(group))
            out.append((group, ShardBucket(same, plan, self.optimizer.state,
                                           self.optimizer.init_state, keep_grads=False)))
        return out

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self.unit_of

    def ready(self, p: torch.Tensor) -> None:
        """``p``'s gradient is reduced: step its unit if it was the last shard to wait."""
        i = self.unit_of[id(p)]
        self.pending[i] += 1
        if self.pending[i] == self.sizes[i]:
            self._step(i)

    def flush(self) -> None:
        for i, waiting in enumerate(self.pending):
            if waiting:
                self._step(i)

    def _step(self, i: int) -> None:
        opt = self.optimizer
        if not all(b.state is opt.state and b.intact() for _, b in self.buckets[i]):
            self.buckets[i] = self._pack([p for _, b in self.buckets[i] for p in b.params])
        for group, bucket in self.buckets[i]:
            opt._step_and_free(bucket, group)
        self.pending[i] = 0
