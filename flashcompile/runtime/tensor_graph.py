"""The per-tensor path on CUDA as one graph replay: a step's launches, one per param, recorded in
a CUDA graph and replayed while the same params step with gradients at the same addresses.

Launched one by one from Python, each param costs the host about 80-100 us per step on an H200
(the call protocol, Inductor's launcher, Triton's), as torch's single-tensor AdamW does. Training
loops free and reallocate gradients every iteration, but the caching allocator hands back the
same blocks, so from the second step on a step's launches usually read and write the same memory
as the last one's. When two consecutive eager steps of the same params saw the same gradients,
weights and state tensors, their launches are captured once; later steps that see them again
upload every launch's scalars in one copy (through pinned memory) and replay the graph. Anything
else (a gradient moved, a state replaced, flags changed) steps eagerly as before.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch

from flashcompile.codecs import layout
from flashcompile.runtime import amp
from flashcompile.runtime.stepping import PerTensor, ScalarCache

_MAX_CAPTURES = 8  # per list of params: gradients that keep moving are not worth recapturing
_ALIGN = 4  # fp32 values per row multiple: each launch's scalar vector starts 16-byte aligned

_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")


def _where(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple:
    """Where a step's launches read and write: weights, gradients and the gradients' layout."""
    return (list(map(_data_ptr, params)), list(map(_data_ptr, grads)),
            list(map(torch.Tensor.stride, grads)), list(map(operator.attrgetter("dtype"), grads)))


class _Recorded:
    """One list of params' launches in a CUDA graph, and what they read (see module)."""

    def __init__(self, params, ready: list[PerTensor], flags, where: tuple, lengths: list[int]):
        self.params, self.ready, self.flags, self.where = list(params), ready, flags, where
        self.states = [r.state for r in ready]
        # every stored state tensor, as (its state dict, key) and the tensor itself
        pairs = [(r.state, k, t) for r in ready for k, t in r.stored.items()]
        self.field_states, self.field_keys, self.fields = (list(x) for x in zip(*pairs)) if pairs \
            else ([], [], [])
        self.width = -(-max(lengths) // _ALIGN) * _ALIGN
        device = params[0].device
        self.rows = torch.zeros(len(params), self.width, device=device)
        self.host = [torch.zeros(len(params), self.width, pin_memory=True) for _ in range(2)]
        self.done = [torch.cuda.Event() for _ in range(2)]
        self.turn = 0
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the launches; runs nothing now
            for i, (p, r, n) in enumerate(zip(params, ready, lengths)):
                if r.plan.shaped:  # the param in its own shape (ShapedPlan.bind_shaped)
                    r.launch(self.rows[i, :n], p.grad)
                    continue
                grad = layout.flat(p.grad.detach(), r.order)
                r.launch(self.rows[i, :n], grad, r.weight, *r.fields, *r.device_args)

    def holds(self, params: Sequence[torch.Tensor], flags, state: Mapping) -> bool:
        try:
            where = _where(params, list(map(_grad, params)))
        except (TypeError, RuntimeError):  # a None or sparse gradient
            return False
        return (flags == self.flags and where == self.where
                and all(map(operator.is_, map(state.get, params), self.states))
                and all(map(operator.is_, map(dict.get, self.field_states, self.field_keys),
                            self.fields)))

    def replay(self, rows: list[list[float]]) -> None:
        i = self.turn = 1 - self.turn
        self.done[i].synchronize()  # the copy that last read this buffer has finished
        # float64 first: values beyond fp32's range become inf without a warning
        self.host[i].copy_(torch.tensor(rows, dtype=torch.float64))
        self.rows.copy_(self.host[i], non_blocking=True)
        self.done[i].record()
        self.graph.replay()


class TensorGraphs:
    """The optimizer's recorded per-tensor steps, by the list of params they step."""

    def __init__(self):
        self.recorded: dict[tuple, _Recorded] = {}
        self.last_eager: dict[tuple, tuple] = {}  # what the last eager step of each list saw
        self.captures: dict[tuple, int] = {}
        self.enabled = True  # False: every per-tensor step launches each param (tests compare)
        self.replays = 0

    def replay(self, params: Sequence[torch.Tensor], flags, state: Mapping,
               scalars: ScalarCache) -> bool:
        """Step ``params`` by replaying their recorded launches; False (nothing done) if none
        were recorded for them or what the launches read has changed."""
        recorded = self.recorded.get(tuple(map(id, params)))
        if recorded is None or not recorded.holds(params, flags, state):
            return False
        steps = [r.state["step"] for r in recorded.ready]
        torch._foreach_add_(steps, 1.0)
        rows, cache = [], {}
        for r, step in zip(recorded.ready, torch.stack(steps).tolist()):
            values = scalars(r.plan, int(step), (r.state,), defer=True)
            key = (id(values), r.tail)
            if key not in cache:
                cache[key] = [r.tail, *values] + [0.0] * (recorded.width - 1 - len(values))
            rows.append(cache[key])
        recorded.replay(rows)
        self.replays += 1
        scalars.advance_deferred()
        return True

    def after_eager(self, params: Sequence[torch.Tensor], ready: list[PerTensor], flags,
                    values: Sequence[list[float]]) -> None:
        """Called after an eager per-tensor step of ``params``: records their launches when this
        step saw what the last one did. ``values``: each launch's scalars."""
        if (not self.enabled or not params or not params[0].is_cuda
                or (flags and flags[-1] == amp.UNSCALE)):
            return  # amp unscaling reads a host value per step
        ids = tuple(map(id, params))
        if self.captures.get(ids, 0) >= _MAX_CAPTURES or not all(
                r.launch is not None and not r.copies and (r.plan.shaped or not r.plan.reduces)
                for r in ready):
            return
        where = _where(params, [p.grad for p in params])
        if self.last_eager.get(ids) != where:
            self.last_eager[ids] = where
            self.recorded.pop(ids, None)
            return
        self.captures[ids] = self.captures.get(ids, 0) + 1
        lengths = [1 + len(v) for v in values]  # the last group's valid lanes, then the values
        self.recorded[ids] = _Recorded(params, ready, flags, where, lengths)
