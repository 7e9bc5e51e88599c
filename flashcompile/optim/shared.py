"""A rule's shared numbers (``Rule.shared``: Prodigy's d) between steps: held on the device, read
by every kernel of a step, updated once the step has seen every parameter.

Each rule with shared numbers gets one :class:`SharedNumbers`: the float64 values (what the
update computes with, and what every param group of the rule holds under the number's name, so
state dicts carry them exactly), their fp32 copies the kernels read, and the step's float64
totals the kernels add their sums to. The tensors stay the same objects from step to step (bound
launches and CUDA graphs read them); a value set from outside (a loaded state dict, a user) is
copied into them before the next step reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flashcompile.compiler.plan import Plan, Shared
from flashcompile.language.dsl import Rule
from flashcompile.runtime.distributed import is_dtensor


class SharedNumbers:
    """One rule's shared numbers on ``device`` (see the module docstring)."""

    def __init__(self, rule: Rule, device: torch.device):
        self.rule, self.device = rule, device
        self.exact = {k: torch.zeros((), dtype=torch.float64, device=device) for k in rule.shared}
        self.kernel = Shared({k: torch.zeros(1, device=device) for k in rule.shared},
                             torch.zeros(0, dtype=torch.float64, device=device))
        self.plan: Plan | None = None  # the plan whose totals this step accumulated

    def for_step(self, groups: Sequence[dict[str, Any]], plan: Plan, device: torch.device,
                 fresh: Callable[[], bool]) -> Shared:
        """What ``plan``'s kernels read and add to this step (values adopted from ``groups``;
        ``fresh()``: whether no param of the rule has state, as after ``optimizer.state.clear()``,
        which starts the shared numbers again too)."""
        if device != self.device:
            raise NotImplementedError(
                f"{self.rule.name}'s shared numbers {list(self.rule.shared)} live on "
                f"{self.device}; a parameter on {device} cannot read them (keep the optimizer's "
                "params on one device)")
        if self.plan is None:  # the step's first launch of the rule
            self._check_groups_agree(groups, plan)  # before anything moves
            if fresh():
                for group in groups:
                    for name in self.rule.shared:
                        group[name] = self.rule.shared_start(name, group)
            self.adopt(groups)
            self.plan = plan
            count = len(plan.lowered.totals)
            if self.kernel.totals.numel() != count:
                self.kernel.totals = torch.zeros(count, dtype=torch.float64, device=self.device)
                # a size of its own, not a symbol: compiled graphs are then called directly
                torch._dynamo.mark_static(self.kernel.totals, 0)
        elif plan.lowered.totals != self.plan.lowered.totals:
            raise ValueError(
                f"the param groups of {self.rule.name} sum different totals (their bools differ:"
                f" {dict(self.plan.key.flags)} and {dict(plan.key.flags)}); the shared numbers "
                f"{list(self.rule.shared)} need one set: give every group the same flags")
        return self.kernel

    def adopt(self, groups: Sequence[dict[str, Any]]) -> None:
        """Take the values the groups hold (a loaded state dict's, a user's, the start on the
        first step), and make every group hold this object's tensors."""
        first = groups[0]
        for name, held in self.exact.items():
            value = first.get(name)
            if value is not held:
                start = self.rule.shared_start(name, first) if value is None else value
                held.copy_(torch.as_tensor(start, dtype=torch.float64).reshape(()))
                self.kernel.values[name].copy_(held.reshape(1))
            for group in groups:
                group[name] = held

    def finish(self, groups: Sequence[dict[str, Any]], hyper: Mapping[str, Any],
               step: int) -> None:
        """The step has seen every parameter: the shared numbers' new values from its totals
        (summed over the ranks of sharded params first), then the totals start again at 0."""
        plan, self.plan = self.plan, None
        if plan is None:
            return  # nothing stepped
        totals = self.kernel.totals
        sharded = next((p for g in groups for p in g["params"] if is_dtensor(p)), None)
        if sharded is not None:  # each rank summed its shards
            torch.distributed.all_reduce(totals, group=sharded.device_mesh.get_group())
        new = plan.shared_update(totals, *self.exact.values(), float(step),
                                 **{k: hyper[k] for k in plan.traced.hyper})
        for (name, held), value in zip(self.exact.items(), new):
            held.copy_(value)
            self.kernel.values[name].copy_(held.reshape(1))
        totals.zero_()

    def _check_groups_agree(self, groups: Sequence[dict[str, Any]], plan: Plan) -> None:
        reads = set().union(*(o.free_symbols for o in plan.traced.shared_outputs))
        names = [k for k, syms in plan.traced.hyper.items()
                 if reads & set(syms if isinstance(syms, tuple) else (syms,))]
        for name in names:
            values = {repr(g[name]) for g in groups}
            if len(values) > 1:
                raise ValueError(
                    f"{self.rule.name}'s shared numbers {list(self.rule.shared)} are updated "
                    f"with {name}, and its param groups give it different values {sorted(values)};"
                    f" give every group of {self.rule.name} the same {name}")


class SharedByRule:
    """The shared numbers of one optimizer's rules that have them, by rule name: what each
    launch passes, and their update once every param has stepped."""

    def __init__(self):
        self.rules: dict[str, SharedNumbers] = {}

    def for_plan(self, optimizer, plan: Plan, device: torch.device) -> Shared | None:
        """What ``plan``'s kernels read and add their totals to this step (None: its rule has no
        shared numbers). The first launch of a step adopts the values the groups hold."""
        rule = plan.key.rule
        if not rule.shared:
            return None
        held = self.rules.get(rule.name)
        if held is None:
            held = self.rules[rule.name] = SharedNumbers(rule, device)
        groups = groups_of_rule(optimizer, rule.name)
        return held.for_step(groups, plan, device, lambda: not has_stepped(optimizer, groups))

    def finish(self, optimizer) -> None:
        for name, held in self.rules.items():
            groups = groups_of_rule(optimizer, name)
            if held.plan is None or not groups:
                continue
            state = next((optimizer.state[p] for g in groups for p in g["params"]
                          if "step" in optimizer.state.get(p, {})), None)
            step = int(state["step"]) if state is not None else 1
            held.finish(groups, optimizer.hyperparameters_of(groups[0]), step)


def groups_of_rule(optimizer, name: str) -> list[dict[str, Any]]:
    """``optimizer``'s param groups stepped by the rule named ``name``."""
    return [g for g in optimizer.param_groups if optimizer.rule_of(g).name == name]


def has_stepped(optimizer, groups: Sequence[dict[str, Any]]) -> bool:
    """Whether a param of ``groups`` has taken a step (a flat bucket allocates its states, at
    step 0, before it steps; a cleared state has none): shared numbers start again where none
    has."""
    return any(float(optimizer.state.get(p, {}).get("step", 0)) for g in groups
               for p in g["params"])
