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

import functools
import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flashcompile.codecs import GROUP, layout
from flashcompile.codecs.layout import groups, lane_counts, scalar_vector, segment_ends
from flashcompile.compiler.codegen import StageCall
from flashcompile.compiler.plan import Plan


class Bucket:
    """Flat buffers for ``params`` (same group, dtype and device) stepped by ``plan``.

    ``keep_grads=False``: no gradient buffer; the params keep the gradients autograd makes, and
    each step copies them into a buffer that lives for that step only (gradient release: so that
    gradients never all exist at once; otherwise: see ``Optimizer.grad_views``).
    """

    # each scalar state (Adam's bound_sq, NAdam's mu_product) of the params is a view into one
    # vector per state: a step stores the new value in one call (one copy per param cost about
    # 1 us of host time each)
    stores_scalar_states = True

    def __init__(self, params: Sequence[torch.Tensor], plan: Plan,
                 state: Mapping[torch.Tensor, dict[str, Any]],
                 init_state: Callable[..., None],  # Optimizer.init_state
                 keep_grads: bool = True):
        self.params = list(params)
        self.plan = plan
        self.steps_flat = plan.steps_flat_over(p.numel() for p in self.params)
        self.state = state
        self.keep_grads = keep_grads
        first = params[0]
        self.device = first.device
        counts = [layout.group_count(p.numel()) for p in params]
        self.offsets = [0, *itertools.accumulate(counts)][:-1]
        self.groups = sum(counts)
        self.orders = [layout.memory_order(p) for p in params]  # channels_last stays so
        total = self.groups * GROUP
        self.weights = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros(total if keep_grads else 0, dtype=first.dtype,
                                 device=first.device)
        self.fields = {
            key: torch.zeros(self.groups * f.width, dtype=f.dtype,
                             device=first.device)
            for key, f in plan.owned_fields.items()
        }
        self.steps = torch.zeros(len(params))  # state['step'] of each param is a view into this
        names = plan.key.rule.scalar_states
        self.scalar_vectors = {name: torch.zeros(len(params)) for name in names}
        with torch.no_grad():
            for i, p in enumerate(self.params):
                st = state[p]
                init_state(p, plan, st, {key: self._slice(self.fields[key], i, f.width)
                                         for key, f in plan.owned_fields.items()})
                self.steps[i] = st["step"]
                st["step"] = self.steps[i]
                for name, vector in self.scalar_vectors.items():
                    vector[i] = st.get(name, 0.0)  # absent reads as zero (Plan.scalars)
                    st[name] = vector[i]
                self.weights[self._range(i)].copy_(layout.flat(p.detach(), self.orders[i]))
                p.data = self._as_param(self.weights, i)
        # the zero lanes that pad each param's gradient to whole groups, when it is staged
        self._pads = [None if n == c * GROUP else self.weights.new_zeros(c * GROUP - n)
                      for n, c in zip((p.numel() for p in self.params), counts)]
        self._graph: torch.cuda.CUDAGraph | None = None
        self._scalars: _ScalarUpload | None = None
        # None: not yet checked (loaded or per-tensor steps may differ between params)
        self.uniform_steps: bool | None = None
        self._weight_ptrs = [p.data_ptr() for p in self.params]
        self._indices = list(range(len(self.params)))
        # each param's state dict and its step view: a state reset (opt.state.clear(), del
        # opt.state[p], opt.state[p].clear()) replaces or empties them, and must start fresh state
        self._state_dicts = [state[p] for p in self.params]
        self._step_views = [st["step"] for st in self._state_dicts]
        self._scalar_views = {name: [st[name] for st in self._state_dicts] for name in names}
        changes = getattr(state, "changes", None)  # flashcompile.runtime.state: as of now, intact
        self._changes_seen = changes.count if changes is not None else None
        self._grad_ptrs = ([self.grads[self._range(i)].data_ptr() for i in range(len(params))]
                           if keep_grads else [])
        self._zeroed_grads: list[torch.Tensor] = []  # see zero_grad
        self._zeroed_versions: list[int] | None = None
        self._args = (
            groups(self.grads, GROUP, 0, self.groups) if keep_grads else None,
            groups(self.weights, GROUP, 0, self.groups),
            {k: groups(v, plan.owned_fields[k].width, 0, self.groups)
             for k, v in self.fields.items()},
            # where each param's groups end, for rules that reduce over each param (LAMB's norms)
            segment_ends(counts, first.device) if plan.reduces else None,
            # each group's valid lanes, where the plan masks the padding lanes of its states
            lane_counts([p.numel() for p in params], first.device) if plan.masks_lanes else None,
        )
        # where each param's matrix lies, for a rule with a matrix stage (Muon)
        self.matrices = plan.matrices(self.params, first.device) if plan.stages else None
        # a scaling plan's gradient factor: the bucket's own tensor, so a recorded CUDA graph
        # reads each step's value (copied in on the device, see try_step)
        self.factor = torch.ones(1, device=first.device) if plan.traced.device else None

    def _range(self, i: int) -> slice:
        start = self.offsets[i] * GROUP
        return slice(start, start + self.params[i].numel())

    def _slice(self, buffer: torch.Tensor, i: int, width: int) -> torch.Tensor:
        count = layout.group_count(self.params[i].numel())
        return buffer[self.offsets[i] * width:(self.offsets[i] + count) * width]

    def _as_param(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Param ``i``'s values in ``buffer``, shaped (and strided) like the param."""
        return layout.unflat(buffer[self._range(i)], self.params[i], self.orders[i])


    def intact(self) -> bool:
        """Params still live in the buffer and their states are the bucket's (else the bucket must
        be rebuilt). State the optimizer replaces (load_state_dict) drops the bucket there.
        Checked every step: the weights' pointers in one C call where torch has it, the states
        only when ``optimizer.state`` counted a change since they were last found intact
        (:mod:`flashcompile.runtime.state`; a Python loop over 1000 params cost about 1 ms)."""
        if not _same_ptrs(self.params, self._weight_ptrs, self._indices):
            return False
        changes = getattr(self.state, "changes", None)
        if changes is not None and getattr(self.state, "tracked", False):
            if changes.count == self._changes_seen:
                return True
        if not self._states_intact():
            return False
        self._changes_seen = changes.count if changes is not None else None
        return True

    def _states_intact(self) -> bool:
        states = list(map(self.state.get, self.params))
        if not all(map(operator.is_, states, self._state_dicts)):
            return False
        try:
            return (all(map(operator.is_, map(_step, states), self._step_views))
                    and all(all(map(operator.is_, map(operator.itemgetter(name), states), views))
                            for name, views in self._scalar_views.items()))
        except KeyError:  # opt.state[p].clear()
            return False

    def _grads_now(self, grads: list | None = None) -> tuple[bool, bool]:
        """(every param has a gradient, every gradient is its view into the gradient buffer);
        ``grads``: the params' ``.grad``, if at hand."""
        grads = list(map(_grad, self.params)) if grads is None else grads
        if self._grad_ptrs:
            try:
                if _same_ptrs(grads, self._grad_ptrs, self._indices):
                    return True, True
            except (TypeError, RuntimeError):  # a None gradient
                pass
        return not any(map(_is_none, grads)), False

    def holds_grad_views(self) -> bool:
        """Every param's ``.grad`` is its view into the gradient buffer; never so without one
        (``keep_grads=False``)."""
        return self._grads_now()[1]

    def ready(self, have_grads: bool | None = None) -> bool:
        """Every param has a gradient (``have_grads``, if known), and one launch with one set of
        scalars steps them as stepping each would (step counts, scalar states agree)."""
        if not self.steps_flat:
            return False
        if not (self._grads_now()[0] if have_grads is None else have_grads):
            return False
        if self.uniform_steps is None:
            self.uniform_steps = steps_agree(self.steps, self.params, self.state, self.plan)
        return self.uniform_steps

    @torch.no_grad()
    def try_step(self, scalars: Callable[[int], list[float]],
                 factor: torch.Tensor | None = None, shared=None) -> bool:
        """Step every param in one launch. Returns False (and does nothing) when that would differ
        from stepping each param (see :meth:`ready`). ``factor``: a scaling plan's gradient
        factor this step (a 1-element tensor on the device; copied into the bucket's own)."""
        grads = list(map(_grad, self.params))
        if self.drop_untouched_grads(grads):
            grads = list(map(_grad, self.params))
        have_grads, views = self._grads_now(grads)
        if not self.ready(have_grads):
            return False
        grads, weights, fields, ends, lanes = self._args
        # gradients that are not (all) our views: autograd's own (the first backward, a
        # set_to_none from outside) or assigned. A step never replaces or writes a param's .grad
        # (torch.optim's contract): they are copied into a buffer for this step only, and
        # zero_grad() points .grad back into the gradient buffer
        staged = not views
        if staged:
            grads = groups(self._staged_grads(), GROUP, 0, self.groups)
        self.steps += 1
        values = [GROUP, *scalars(int(self.steps[0].item()))]
        for name, value in self.plan.new_scalar_states(values):
            self.scalar_vectors[name].fill_(value)
        stage = StageCall(self.matrices, values) if self.matrices is not None else None
        if self.factor is not None and factor is not None:
            self.factor.copy_(factor)
        if not self.weights.is_cuda:
            self.plan.call(scalar_vector(values[0], values[1:], self.weights.device), grads,
                           weights, fields, ends, lanes=lanes, stage=stage, factor=self.factor,
                           shared=shared)
            return True
        if self._scalars is None:
            self._scalars = _ScalarUpload(len(values), self.weights.device)
        s = self._scalars.upload(values)
        if self._graph is not None and not staged:
            self._graph.replay()
            return True
        # compiles, tunes on first use
        self.plan.call(s, grads, weights, fields, ends, lanes=lanes, stage=stage,
                       factor=self.factor, shared=shared)
        # staged gradients move; a matrix stage's host loop reads this step's scalars
        if self.plan.key.compiled and not staged and stage is None and self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # records the launch; runs nothing now
                self.plan.call(s, grads, weights, fields, ends, lanes=lanes, factor=self.factor,
                               shared=shared)
        return True

    def _staged_grads(self) -> torch.Tensor:
        """The params' gradients laid out as the weights are (zero padding lanes), in one fresh
        buffer: one concatenation (a few batched copy kernels), where views kept in the buffer
        would cost autograd one accumulation kernel per param per backward."""
        pieces = []
        for p, order, pad in zip(self.params, self.orders, self._pads):
            pieces.append(layout.flat_view(p.grad, order))
            if pad is not None:
                pieces.append(pad)
        return torch.cat(pieces)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer and point every ``.grad`` into it. ``set_to_none`` (torch's
        default): a param that no backward reaches before the next step is skipped by it, as
        torch.optim skips a None gradient (:meth:`drop_untouched_grads`)."""
        if not self.keep_grads:
            return
        self.grads.zero_()
        if not self.holds_grad_views():  # else (the common case) nothing to re-point
            for i, p in enumerate(self.params):  # as set_to_none, then a zero alias to add to
                if p.grad is None or p.grad.data_ptr() != self._grad_ptrs[i]:
                    p.grad = self._grad_alias(i)
        self._zeroed_grads = list(map(_grad, self.params)) if set_to_none else []
        self._zeroed_versions = list(map(_version, self._zeroed_grads)) if set_to_none else None

    def _grad_alias(self, i: int) -> torch.Tensor:
        """Param ``i``'s gradient in the buffer: a tensor of its own over the buffer's storage,
        not a view, so that it has its own version counter, which autograd's in-place
        accumulation bumps (a view shares the buffer's: every param would look reached)."""
        view = self._as_param(self.grads, i)
        alias = view.new_empty(0)
        alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
        return alias

    def drop_untouched_grads(self, grads: list) -> bool:
        """After ``zero_grad(set_to_none=True)``: set ``.grad`` to None where no backward has
        accumulated into it since (a frozen layer, a branch the forward skipped, no backward at
        all), so the step skips those params as torch.optim does. ``grads``: the params'
        ``.grad``. One version read per param; returns whether any was dropped."""
        zeroed = self._zeroed_versions
        if zeroed is None:
            return False
        try:
            versions = list(map(_version, grads))
        except AttributeError:  # a None gradient
            versions = [None if g is None else g._version for g in grads]
        if all(map(operator.ne, versions, zeroed)):
            return False
        dropped = False
        for p, g, v, z, ours in zip(self.params, grads, versions, zeroed, self._zeroed_grads):
            if g is ours and v == z:  # the zeroed alias itself, never accumulated into
                p.grad = None
                dropped = True
        return dropped


_data_ptr = torch.Tensor.data_ptr
_grad = operator.attrgetter("grad")
_version = operator.attrgetter("_version")
_step = operator.itemgetter("step")
_is_none = functools.partial(operator.is_, None)
# CUDA builds of torch: compares tensors' data pointers in one C++ loop (CUDA graph trees' check)
_ptrs_equal_in_c = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def _same_ptrs(tensors: list[torch.Tensor], ptrs: list[int], indices: list[int]) -> bool:
    """Whether ``tensors`` have the data pointers ``ptrs`` (``indices``: ``range(len(ptrs))``)."""
    if _ptrs_equal_in_c is not None:
        return _ptrs_equal_in_c(tensors, ptrs, indices)
    return list(map(_data_ptr, tensors)) == ptrs


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
