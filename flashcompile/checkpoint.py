"""Checkpoints of a flashcompile optimizer: compact state dicts, and torch.optim's format.

``state_dict()`` holds the stored fields as they are (int8 codes, fp16 scales, the int8 residual;
DTensor params' state in :mod:`flashcompile.distributed`'s layout, which DCP reshards).
``load_state_dict`` accepts that, or a torch.optim state dict of the same optimizer (encoded with
this optimizer's codecs), and checks every tensor before anything changes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from flashcompile import distributed, interop
from flashcompile.codecs import GROUP
from flashcompile.distributed import is_dtensor
from flashcompile.plan import Plan


class Checkpoints:
    """``state_dict``, ``load_state_dict`` and ``torch_state_dict`` for
    :class:`flashcompile.Optimizer` (a mixin: it uses the optimizer's plans, flags and state)."""

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's. A DTensor param's state is in the checkpoint layout of
        :mod:`flashcompile.distributed` (DTensors that DCP reshards); others stay flat."""
        sd = super().state_dict()
        pid = 0  # torch.optim numbers params in group order
        for group in self.param_groups:
            for p in group["params"]:
                if pid in sd["state"] and is_dtensor(p):
                    plan = self._plan(p, self._flags(group))
                    sd["state"][pid] = distributed.export_state(p, plan, self.state[p])
                pid += 1
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or a torch.optim one of the same optimizer (its fp32
        states are encoded with this optimizer's codecs).

        Stored fields keep their own dtypes (int8 codes, fp16 scales); nothing is cast to the param's
        dtype. A state dict that does not fit raises before anything changes.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        id_map, new_groups = {}, []
        for i, (g, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {i}: state dict has {len(saved['params'])} params, optimizer "
                    f"has {len(g['params'])}"
                )
            # torch.optim's groups lack flags it does not have (SGD's decoupled_weight_decay):
            # keep ours. A missing float hyperparameter means another optimizer's state dict.
            flags = {k: g[k] for k in self.rule.flags if k not in saved}
            saved = {**flags, **saved}
            missing = sorted(set(self.rule.defaults) - set(saved))
            if missing:
                raise ValueError(
                    f"param group {i} of the state dict lacks {self.rule.name}'s hyperparameters "
                    f"{missing}: it was saved by a different optimizer"
                )
            new = {**saved, "params": g["params"]}
            self._hyperparameters(new)
            new_groups.append(new)
            id_map.update(zip(saved["params"], g["params"]))
        new_state: dict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state dict has state for param id {pid}, which no group lists")
            p = id_map[pid]
            group = new_groups[next(i for i, g in enumerate(self.param_groups)
                                    if any(q is p for q in g["params"]))]
            new_state[p] = self._check_saved_state(p, self._plan(p, self._flags(group)), saved, pid)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._buckets.clear()  # rebuilt from the loaded tensors at the next step
        self._buckets_of_group.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state in torch.optim's format (fp32 states shaped like their params),
        loadable by the torch.optim optimizer of the same name."""
        return interop.torch_state_dict(self)

    def _check_saved_state(self, p, plan: Plan, saved: Mapping[str, Any], pid) -> dict[str, Any]:
        expected = dict(plan.owned_fields)
        if is_dtensor(p):
            return distributed.import_state(p, plan, saved, pid, self.rule.states)
        if interop.is_torch_format(self.rule.states, saved, p):
            return interop.import_state(p, plan, saved, pid)
        if distributed.is_checkpoint_layout(p, plan, saved):  # e.g. a converted DCP checkpoint
            return distributed.import_state(p, plan, saved, pid, self.rule.states)
        host = {"step", *self.rule.scalar_states}
        # A scalar state may be missing (saved before the rule had it, as Adam's bound_sq): it
        # loads as 0, which such a state must read as "history unknown" after step 1.
        required = set(expected) | {"step"}
        if not required <= set(saved) <= required | host:
            raise ValueError(
                f"state of param {pid} ({tuple(p.shape)}) has keys {sorted(saved)}, but "
                f"{self.rule.name} with these codecs stores {sorted(set(expected) | host)}: it was "
                "saved by a different optimizer or with different codecs"
            )
        groups = -(-p.numel() // GROUP)
        out = {k: torch.as_tensor(saved[k], dtype=torch.float32).detach().clone().cpu()
               for k in host if k in saved}
        for key, f in expected.items():
            t = saved[key]
            numel = groups * (1 if f.per_group else GROUP)
            if t.dtype != f.dtype or t.numel() != numel:
                raise ValueError(
                    f"state {key!r} of param {pid} is {t.dtype} x {t.numel()}, expected {f.dtype} x "
                    f"{numel} for a param of shape {tuple(p.shape)}: wrong optimizer, codecs or shapes"
                )
            out[key] = t.detach().to(device=p.device, copy=True).reshape(-1)
        return out
