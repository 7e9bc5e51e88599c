"""What a step reuses between calls: a param group's scalar prologue and its device vectors
(:class:`ScalarCache`, one per group and step), and one param's arguments on the per-tensor path
(:class:`PerTensor`, kept between steps while its state holds the same tensors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flashcompile.codecs import layout
from flashcompile.compiler.plan import Plan


class ScalarCache:
    """A group's scalar prologue, evaluated once per (plan, step, scalar states) rather than once
    per param, and its device vectors. ``states``: the states of the params stepped with these
    values (a bucket's agree on their scalar states); their scalar states advance."""

    def __init__(self, hyper: Mapping[str, Any]):
        self.hyper = hyper
        self.values: dict[tuple, list[float]] = {}
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.deferred: dict[tuple, tuple[Plan, list[dict[str, Any]]]] = {}

    def __call__(self, plan: Plan, step: int, states: Sequence[dict[str, Any]] = (),
                 defer: bool = False, advance: bool = True) -> list[float]:
        """The scalars for ``step``; ``defer``: advance ``states`` at :meth:`advance_deferred`
        (with every other state that shares the values, in one call) instead of now;
        ``advance=False``: only read ``states`` (a flat bucket stores its params' new values)."""
        names = plan.key.rule.scalar_states
        key = (id(plan), step, *(float(states[0][k]) for k in names)) if names and states else (
            id(plan), step)
        if key not in self.values:
            self.values[key] = plan.scalars(step, self.hyper, states[0] if states else None)
        if names and states and advance:
            if defer:
                self.deferred.setdefault(key, (plan, []))[1].extend(states)
            else:
                plan.advance(states, self.values[key])
        return self.values[key]

    def advance_deferred(self) -> None:
        for key, (plan, states) in self.deferred.items():
            plan.advance(states, self.values[key])
        self.deferred.clear()

    def tensor(self, values: list[float], tail: int, device: torch.device) -> torch.Tensor:
        """``[tail, *values]`` on ``device``: uploaded once per step for the params that share
        them (``values`` as this cache returned them)."""
        key = (id(values), tail, device)
        if key not in self.tensors:
            self.tensors[key] = layout.scalar_vector(tail, values, device)
        return self.tensors[key]


class PerTensor:
    """What the per-tensor path reuses between steps of one param: its fields as the plan takes
    them, its memory order and tail. Valid while the param's state holds the same tensors."""

    def __init__(self, p: torch.Tensor, plan: Plan, state: dict[str, Any]):
        self.plan, self.state = plan, state
        # fields by state key, and a shaped plan's factored states (checked by holds() alike)
        self.stored = {k: state[k] for k in (*plan.owned_fields, *plan.factored)}
        count = layout.group_count(p.numel())
        self.fields = plan.field_args(self.stored, 0, count)
        self.order = layout.memory_order(p)
        self.weight = layout.flat(p.detach(), self.order)  # a view of p, or a copy (`copies`)
        self.copies = self.weight.data_ptr() != p.data_ptr()
        self.tail = layout.last_group_lanes(p.numel())
        self.numel, self.ptr, self.device = p.numel(), p.data_ptr(), p.device
        self.shape, self.stride, self.dtype = p.shape, p.stride(), p.dtype
        self.launch = None  # the plan's call_one bound to these arguments, after the first call
        self.device_args: list = []  # what the last launch read after the fields (shared numbers)
        self.matrices = None  # where the param's matrix lies, for a rule with a matrix stage
        # set by the optimizer: what picked the plan (flags, compile), whether p is the param
        # itself (not an FSDP2 shard), and optimizer.state's change count when last checked
        self.key: Any = None
        self.param_is_local = False
        self.changes_seen: int | None = None

    def holds(self, p: torch.Tensor, plan: Plan, state: dict[str, Any]) -> bool:
        if (plan is not self.plan or state is not self.state or p.data_ptr() != self.ptr
                or p.numel() != self.numel or layout.memory_order(p) != self.order
                or not all(state.get(k) is t for k, t in self.stored.items())):
            return False
        if self.copies:  # the copy must hold the param's current values
            self.weight = layout.flat(p.detach(), self.order)
        self.shape, self.stride, self.dtype = p.shape, p.stride(), p.dtype  # for steps_again
        return True

    def steps_again(self, p: torch.Tensor, key: Any, state: dict[str, Any] | None,
                    changes: Any) -> bool:
        """:meth:`holds` for a param this path stepped before, without resolving its plan again:
        the same plan key, dtype, shape, storage and state dict (its entries compared only when
        ``changes``, optimizer.state's counter, moved since they were last found intact), and a
        dense gradient of the param's shape (what ``guards.check_grad`` checks)."""
        grad = p.grad
        if (key != self.key or state is not self.state or not self.param_is_local or grad is None
                or p.dtype is not self.dtype or p.shape != self.shape or p.data_ptr() != self.ptr
                or p.stride() != self.stride or grad.shape != self.shape or grad.is_sparse
                or grad.is_meta):
            return False
        if changes is None or changes.count != self.changes_seen:
            if not all(state.get(k) is t for k, t in self.stored.items()):
                return False
            self.changes_seen = None if changes is None else changes.count
        if self.copies:  # the copy must hold the param's current values
            self.weight = layout.flat(p.detach(), self.order)
        return True
