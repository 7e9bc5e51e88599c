"""Reading an optimizer's stored values back as fp32 tensors in each param's shape, and setting
a param's full-precision weight: the part of :class:`flashcompile.Optimizer` that decodes."""

from __future__ import annotations

import torch

from flashcompile.codecs import PARAM, layout
from flashcompile.compiler.plan import state_key
from flashcompile.runtime import distributed
from flashcompile.runtime.distributed import to_local


class StoredValues:
    """Mixin of :class:`flashcompile.Optimizer` (uses its ``state``, ``rule``, ``plan_for``,
    ``flags_of``, ``_group_of`` and ``init_state``)."""

    def _decode(self, p: torch.Tensor, name: str) -> torch.Tensor:
        plan = self.plan_for(p, self.flags_of(self._group_of(p)))
        codec = plan.codecs[name]
        local = to_local(p).detach()
        order = layout.memory_order(local)
        fields = [layout.flat(local, order) if name == PARAM and f.name == "value"
                  else self.state[p][state_key(name, f)] for f in codec.fields]
        if name == PARAM:  # the weight itself is not padded: pad it as the other fields are
            fields[0] = layout.padded(fields[0]).view(-1)
        decoded = layout.decode_flat(codec, fields, local.numel())
        return distributed.like(p, layout.unflat(decoded, local, order))

    def master_weight(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master weight of ``p``, reconstructed from its codec (e.g. bf16 + residual); for
        a DTensor ``p``, a DTensor placed like it."""
        if not self.state.get(p):
            return p.detach().float().clone()
        return self._decode(p, PARAM)

    @torch.no_grad()
    def set_master_weight(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Set ``p``'s full-precision weight: the 16-bit param and its residual both encode
        ``value`` (fp32), so nothing of ``value`` is lost that the codec can hold. For a DTensor
        ``p``, ``value`` is a DTensor or the full tensor; each rank sets its shard."""
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"value has shape {tuple(value.shape)}, the param {tuple(p.shape)}")
        plan = self.plan_for(p, self.flags_of(self._group_of(p)))
        state = self.state[p]
        value, p = distributed.local_part(value.detach(), p), to_local(p)
        self.init_state(p, plan, state)
        order = layout.memory_order(p)
        x = layout.flat(value.to(device=p.device, dtype=torch.float32), order)
        codec = plan.codecs[PARAM]
        for f, t in zip(codec.fields, layout.encode_flat(codec, x)):
            if f.name == "value":
                p.copy_(layout.unflat(t[: p.numel()], p, order))
            else:
                state[state_key(PARAM, f)].copy_(t)

    def state_value(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """State ``name`` of ``p`` decoded to fp32, in the param's shape (a scalar state: 0-d); for
        a DTensor ``p``, a DTensor placed like it."""
        rule = self.rule_of(self._group_of(p))
        if name not in rule.states:
            raise KeyError(f"{rule.name} has no state {name!r}; its states: {list(rule.states)}")
        if not self.state.get(p):
            raise KeyError("param has no state yet: step the optimizer first")
        if name in rule.scalar_states or name in rule.factored_states:  # stored as they are
            if name not in self.state[p]:
                raise KeyError(f"{name!r} holds no values for a param of shape {tuple(p.shape)}")
            return self.state[p][name].clone()
        return self._decode(p, name)
