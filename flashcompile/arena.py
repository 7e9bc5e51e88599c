"""Flat storage: one launch per (param group, dtype, device) instead of one per tensor.

A :class:`Bucket` owns one flat buffer per stored field, plus one for the weights and one for the
gradients. Each parameter's ``.data`` and ``.grad`` become views into those buffers, and each state
entry a view into its field's buffer, every parameter starting at a group boundary (so a group of 32
never straddles two parameters; the padding lanes hold zeros that the rule provably keeps zero, and
that add nothing to a rule's sums over each parameter).
Gradients then accumulate in place and one compiled call steps the whole bucket.

On CUDA the bucket's launch is captured in a CUDA graph after its first step: later steps upload the
scalars (through pinned memory) and replay it, so ``step()`` costs the host a few checks instead of
the compiled function's guards and launcher.

Whatever moves a parameter or gradient out of the buffers (``model.to()``, ``zero_grad`` with
``set_to_none`` from outside, ``load_state_dict``) is detected at the next step: gradients are copied
back in; anything else rebuilds the bucket from the current tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flashcompile import guards
from flashcompile.codecs import GROUP
from flashcompile.plan import Plan, groups, scalar_tensor, segment_ends


class Bucket:
    """Flat buffers for ``params`` (same group, dtype and device) stepped by ``plan``."""

    def __init__(self, params: Sequence[torch.Tensor], plan: Plan,
                 state: Mapping[torch.Tensor, dict[str, Any]],
                 init_state: Callable[[torch.Tensor, Plan, dict[str, Any]], None]):
        self.params = list(params)
        self.plan = plan
        self.steps_flat = plan.steps_flat_over(p.numel() for p in self.params)
        self.state = state
        first = params[0]
        counts = [-(-p.numel() // GROUP) for p in params]
        self.offsets = [0, *itertools.accumulate(counts)][:-1]
        self.groups = sum(counts)
        total = self.groups * GROUP
        self.weights = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.fields = {
            key: torch.zeros(self.groups * (1 if f.per_group else GROUP), dtype=f.dtype,
                             device=first.device)
            for key, f in plan.owned_fields.items()
        }
        self.steps = torch.zeros(len(params))  # state['step'] of each param is a view into this
        with torch.no_grad():
            for i, p in enumerate(self.params):
                st = state[p]
                init_state(p, plan, st)
                self.steps[i] = st["step"]
                st["step"] = self.steps[i]
                for key, f in plan.owned_fields.items():
                    view = self._slice(self.fields[key], i, f.per_group)
                    view.copy_(st[key])
                    st[key] = view
                self.weights[self._range(i)].copy_(p.detach().reshape(-1))
                p.data = self.weights[self._range(i)].view_as(p)
                if p.grad is not None:
                    self.grads[self._range(i)].copy_(p.grad.reshape(-1))
                p.grad = self.grads[self._range(i)].view_as(p)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._scalars: _ScalarUpload | None = None
        # None: not yet checked (loaded or per-tensor steps may differ between params)
        self.uniform_steps: bool | None = None
        self._weight_ptrs = [p.data_ptr() for p in self.params]
        # each param's state dict and its step view: a state reset (opt.state.clear(), del
        # opt.state[p], opt.state[p].clear()) replaces or empties them, and must start fresh state
        self._states = [(state[p], state[p]["step"]) for p in self.params]
        self._grad_ptrs = [self.grads[self._range(i)].data_ptr() for i in range(len(params))]
        self._args = (
            groups(self.grads, False, 0, self.groups),
            groups(self.weights, False, 0, self.groups),
            {k: groups(v, plan.owned_fields[k].per_group, 0, self.groups)
             for k, v in self.fields.items()},
            # where each param's groups end, for rules that reduce over each param (LAMB's norms)
            segment_ends(counts, first.device) if plan.reduces else None,
        )

    def _range(self, i: int) -> slice:
        start = self.offsets[i] * GROUP
        return slice(start, start + self.params[i].numel())

    def _slice(self, buffer: torch.Tensor, i: int, per_group: bool) -> torch.Tensor:
        width = 1 if per_group else GROUP
        count = -(-self.params[i].numel() // GROUP)
        return buffer[self.offsets[i] * width:(self.offsets[i] + count) * width]

    def intact(self) -> bool:
        """Params still live in the buffer and their states are the bucket's (else the bucket must
        be rebuilt). State the optimizer replaces (load_state_dict) drops the bucket there."""
        return (all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._weight_ptrs))
                and all(self.state.get(p) is st and st.get("step") is step
                        for p, (st, step) in zip(self.params, self._states)))

    @torch.no_grad()
    def try_step(self, scalars: Callable[[int], list[float]]) -> bool:
        """Step every param in one launch. Returns False (and does nothing) when that would differ
        from stepping each param: some grad is None, or the params' step counts (or scalar states)
        differ."""
        if not self.steps_flat:  # pads would need masks: the buffers still hold the states,
            return False  # but each param steps alone
        fresh = []
        for i, (p, ptr) in enumerate(zip(self.params, self._grad_ptrs)):
            grad = p.grad
            if grad is None:
                return False
            if grad.data_ptr() != ptr:
                fresh.append(i)
        if self.uniform_steps is None:  # one launch, one set of scalars: steps and scalar states
            self.uniform_steps = steps_agree(self.steps, self.params, self.state, self.plan)
        if not self.uniform_steps:
            return False
        for i in fresh:  # a new gradient tensor (e.g. after set_to_none): accumulate into ours again
            p = self.params[i]
            if p.grad.shape != p.shape:  # copied flat, it would apply element-wise regardless
                raise guards.wrong_grad_shape(f"the param of shape {tuple(p.shape)}", p.grad)
            self.grads[self._range(i)].copy_(p.grad.reshape(-1))
            p.grad = self.grads[self._range(i)].view_as(p)
        self.steps += 1
        values = [GROUP, *scalars(int(self.steps[0].item()))]
        grads, weights, fields, ends = self._args
        if not self.weights.is_cuda:
            self.plan.call(scalar_tensor(values, self.weights.device), grads, weights, fields, ends)
            return True
        if self._scalars is None:
            self._scalars = _ScalarUpload(len(values), self.weights.device)
        s = self._scalars.upload(values)
        if self._graph is not None:
            self._graph.replay()
            return True
        self.plan.call(s, grads, weights, fields, ends)  # compiles and tunes on first use
        if self.plan.key.compiled:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # records the launch; runs nothing now
                self.plan.call(s, grads, weights, fields, ends)
        return True

    def zero_grad(self) -> None:
        self.grads.zero_()
        for i, p in enumerate(self.params):
            if p.grad is None or p.grad.data_ptr() != self._grad_ptrs[i]:
                p.grad = self.grads[self._range(i)].view_as(p)


def steps_agree(steps: torch.Tensor, params: Sequence[torch.Tensor],
                state: Mapping[torch.Tensor, dict[str, Any]], plan: Plan) -> bool:
    """Whether ``params`` share their step count and scalar states, so one launch with one set of
    scalars steps them all as stepping each would."""
    held = [[float(state[p][k]) for k in plan.key.rule.scalar_states] for p in params]
    return bool((steps == steps[0]).all()) and all(h == held[0] for h in held)


class _ScalarUpload:
    """A fixed device vector for the kernel's scalars, refilled each step without blocking the
    host: values go through one of two pinned buffers, reused only once its copy has run."""

    def __init__(self, size: int, device: torch.device):
        self.device_values = torch.zeros(size, dtype=torch.float32, device=device)
        self.host = [torch.zeros(size, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.done = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0

    def upload(self, values: list[float]) -> torch.Tensor:
        i = self.turn = 1 - self.turn
        self.done[i].synchronize()  # the copy that last read this buffer has finished
        self.host[i].copy_(torch.tensor(values, dtype=torch.float64))  # beyond fp32: inf, no warning
        self.device_values.copy_(self.host[i], non_blocking=True)
        self.done[i].record()
        return self.device_values
