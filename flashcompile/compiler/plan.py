"""A plan: one rule x one codec per state x static flags, as one generated torch function.

The function decodes every state, runs the rule's fp32 math, encodes every state and writes the
results in place. It is compiled with ``torch.compile(fullgraph=True, dynamic=True)``, so Inductor
fuses decode, math, the per-group reductions of the encoders and the stores into one kernel (Triton
on CUDA, C++ on CPU). Plans are cached process-wide and shared by every optimizer that needs them.

Layout: every tensor is seen in groups of 32, per-element fields as ``(G, 32)`` and per-group fields as
``(G, 1)``; dim 1 is marked static so Inductor emits one persistent reduction over exactly 32 lanes. A parameter whose size is not a multiple of 32 runs in two calls: its whole groups in
place, then its tail copied into one zero-padded group with ``_s[0]`` lanes valid.

A rule with a reduction over the parameter (``sum_all``, ``norm``) sees every element of a parameter
in one call: alone (a tail is padded by copying the weight and gradient into whole groups; ``_s[0]``
lanes of the last group are valid), or laid end to end with others in a flat buffer, where the
reduction sums each parameter's own groups (``_ends``: the group index after each parameter's last)
and the padding lanes between parameters provably add nothing (:attr:`Plan.steps_flat`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flashcompile.codecs import GROUP, PARAM, Codec, Field
from flashcompile.codecs.layout import (
    group_count,
    groups,
    lane_counts,
    last_group_lanes,
    padded,
    scalar_vector,
    segment_ends,
)
from flashcompile.compiler import fast_math
from flashcompile.compiler.cpu_loads import whole_vector_loads
from flashcompile.compiler.codegen import (
    Shared,
    StageCall,
    assemble,
    generate,
    source_namespace,
)
from flashcompile.compiler.direct import DirectFunction, inductor
from flashcompile.compiler.lowering import Lowered, lower
from flashcompile.compiler.shared_update import shared_source
from flashcompile.compiler.verify import as_one, compare_compiled, sample_inputs
from flashcompile.language.dsl import Rule, SumAll
from flashcompile.language.trace import Traced, check_facts, keeps_zero, keeps_zero_expr, trace
from flashcompile.runtime.amp import FACTOR

FP32_MAX = torch.finfo(torch.float32).max

# Codecs round on purpose (x.to(bf16) is the weight split's high half). By default Inductor may keep
# such intermediate casts in fp32, which silently zeroes the residual; make it round as eager does.
# No size asserts in the generated code (one C call per tensor input: 4 us of a per-tensor step's
# 35 on CPU): dynamo's guards, or compiler.direct's, check sizes and strides before every call.
COMPILE_OPTIONS = {"emulate_precision_casts": True, "size_asserts": False}
# Inductor's coordinate-descent tuning of the group kernel, which plans no longer use: it tunes on
# an L2-resident sample and lands on slow configs (flashcompile/compiler/launch.py pins one instead).
INDUCTOR_TUNED_OPTIONS = {**COMPILE_OPTIONS, "coordinate_descent_tuning": True}


def state_key(state: str, field: Field) -> str:
    """Key of a stored field in ``optimizer.state[p]``: ``exp_avg`` or ``exp_avg.codes``."""
    return state if field.name == "value" else f"{state}.{field.name}"


@dataclass(frozen=True)
class PlanKey:
    rule: Rule
    flags: tuple[tuple[str, bool], ...]
    codecs: tuple[tuple[str, Codec], ...]  # (PARAM, codec), then each live state in rule order
    device_type: str
    compiled: bool


class Plan:
    """The generated step function for one :class:`PlanKey` and how to call it on one parameter."""

    shaped = False  # whole parameters in their own shape (flashcompile.compiler.shaped)
    factored: tuple[str, ...] = ()  # a shaped plan's factored states, stored as they are

    def __init__(self, key: PlanKey):
        self.key = key
        self.traced: Traced = trace(key.rule, dict(key.flags))
        check_facts(self.traced)
        self.lowered: Lowered = lower(self.traced)
        self.codecs: dict[str, Codec] = dict(key.codecs)
        self.source = generate(self.traced, self.lowered, self.codecs,
                               lanes=self.reduces and self.masks_lanes)
        namespace = source_namespace(self.codecs)
        exec(compile(self.source, f"<flashcompile plan {key.rule.name}>", "exec"), namespace)
        exec(compile(self.lowered.prologue_source, "<flashcompile prologue>", "exec"), namespace)
        self.prologue = namespace["prologue"]
        # the rule's shared numbers' update, once per step (None: the rule has none)
        self.shared_source = shared_source(self.traced)
        if self.shared_source:
            exec(compile(self.shared_source, "<flashcompile shared>", "exec"), namespace)
        self.shared_update = namespace.get("shared_update")
        self.widths = {k: f.width for k, f in self.owned_fields.items()}
        slots = self.lowered.stage.slots if self.lowered.stage is not None else ()
        self.eager = fn = assemble(namespace, slots=slots)
        # one whole parameter per call, its weight and gradient unpadded (element-wise rules)
        self.eager_one = one = namespace.get("step_one")
        if key.compiled:
            wrap = self.compiler()
            fn = assemble(namespace, wrap, slots)
            one = one and wrap(one)
        # Always under no_grad: grad mode is part of dynamo's guards, so a call with grad enabled
        # would compile a second copy of the same kernel (DirectFunction sees to it itself).
        self.fn = fn if isinstance(fn, DirectFunction) else torch.no_grad()(fn)
        self.fn_one = one if one is None or isinstance(one, DirectFunction) else torch.no_grad()(one)
        self._verified = {"groups": not key.compiled, "one": not key.compiled}
        self.launch = None  # on CUDA, after verify(): the launch config (flashcompile.compiler.launch.Pin)

    def compare_compiled(self, device: torch.device | str, groups: int = 4, seed: int = 0,
                         variant: str = "groups") -> str | None:
        """Run the compiled and the eager function on the same random inputs; describe the worst
        value further apart than one code step (plus a few fp32 ulps of the values the update
        combined: where a step nearly cancels a weight, fp32 rounding in the two evaluation orders
        differs by ulps of the old weight, not of the small result), or return None.

        ``variant``: ``"groups"`` (:attr:`fn`, whole groups) or ``"one"`` (:attr:`fn_one`, one
        parameter of ``groups * 32 - 5`` values). The inputs come from a generator of their own:
        the global (and CUDA) RNG states are as they were."""
        return compare_compiled(self, device, groups, seed, variant)

    def verify(self, device: torch.device, variant: str = "groups") -> None:
        """Before first use, check the compiled kernel against the eager function on random data.

        A backend that drops a rounding the codecs rely on would otherwise lose precision silently
        (seen: Inductor's CPU backend in torch 2.11 folds fp32 -> fp16 -> fp32, zeroing the fp16
        weight split's residual). On disagreement beyond one code step, warn and run eagerly.
        """
        self._verified[variant] = True
        if _is_cuda(device):
            # Inductor derives launch configs (and the reduction strategy) from the sizes of the
            # first call it compiles for: after a 4-group first call every later launch ran with
            # configs for 4 rows, 5x slower. Compile on a realistic size first (output discarded);
            # the check below then runs the same kernel.
            from flashcompile.compiler.launch import live_autotuners, pin_group_kernels

            before = live_autotuners()
            args = sample_inputs(self, 65536, device)
            if variant == "groups":
                self.fn(*args)
            else:
                self.fn_one(*as_one(self, args, 65536 * GROUP - 5))
            pin = pin_group_kernels((t for key, t in live_autotuners().items() if key not in before),
                                    self.key.rule.name)
            if self.launch is None or variant == "groups":
                self.launch = pin
        mismatch = self.compare_compiled(device, variant=variant)
        if mismatch is not None:
            warnings.warn(
                f"flashcompile: the compiled {self.key.rule.name} plan ({variant}) disagrees with "
                f"its eager function on torch {torch.__version__} ({torch.device(device).type}); "
                f"running it eagerly. {mismatch}", RuntimeWarning, stacklevel=3)
            if variant == "groups":
                self.fn = torch.no_grad()(self.eager)
            else:
                self.fn_one = torch.no_grad()(self.eager_one)

    def compiler(self):
        """How this plan compiles each generated function: ``torch.compile`` through Inductor
        (CUDA: with hardware division and square root, flashcompile.compiler.fast_math; CPU: whole
        16-bit vectors loaded unmasked, flashcompile.compiler.cpu_loads), called directly where a
        compiled graph fits (flashcompile.compiler.direct)."""
        options = self.compile_options()
        if self.key.device_type == "cuda" and fast_math.enabled():
            inner = fast_math.inductor_backend(options)
        else:
            def inner(gm, example_inputs):
                with whole_vector_loads():
                    return inductor(gm, example_inputs, options)

        def compile_with(fn, backend):
            return torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)

        return lambda fn: DirectFunction(fn, compile_with, inner)

    def compile_options(self) -> dict:
        if self.key.device_type == "cuda":
            # Compile the kernel here and now: one built in a worker process, or loaded from
            # Inductor's on-disk graph cache, arrives without a usable Triton function, so
            # flashcompile.compiler.launch could not build the pinned config for it.
            return {**COMPILE_OPTIONS, "compile_threads": 1, "fx_graph_cache": False}
        return COMPILE_OPTIONS

    @property
    def owned_fields(self) -> dict[str, Field]:
        """Fields the optimizer allocates, by state key (the param's ``value`` is the param)."""
        return {
            state_key(name, f): f
            for name, codec in self.codecs.items()
            for f in codec.fields
            if not (name == PARAM and f.name == "value")
        }

    @functools.cached_property
    def pads_stay_zero(self) -> bool:
        """Whether zero padding lanes provably stay zero (then flat storage needs no lane masks)."""
        return all(keeps_zero(self.traced, i) for i in range(len(self.traced.outputs)))

    @functools.cached_property
    def reduces(self) -> bool:
        """Whether the rule reduces over the whole parameter (``sum_all``, ``norm``)."""
        return any(out.has(SumAll) for out in self.traced.outputs)

    @property
    def stages(self) -> bool:
        """Whether the rule has a matrix stage (``orthogonalize``): its step then takes a
        :class:`~flashcompile.compiler.codegen.StageCall` last (:meth:`matrices` builds one's
        layout), and its parameters must be matrices."""
        return self.lowered.stage is not None

    def matrices(self, params: Sequence[torch.Tensor], device: torch.device):
        """Where the matrices of ``params``, laid end to end from group 0, lie for the stage."""
        from flashcompile.compiler.matrices import Matrices

        return Matrices(params, self.lowered.stage.ratio, device)

    @functools.cached_property
    def reductions_skip_pads(self) -> bool:
        """Whether every reduced expression is provably 0 on zero lanes, so padding lanes between
        parameters in a flat buffer add nothing to any parameter's sums (LAMB's ``||u||``)."""
        args = [r.args[0] for out in self.traced.outputs for r in out.atoms(SumAll)]
        return all(keeps_zero_expr(self.traced, a) for a in args)

    @functools.cached_property
    def masks_lanes(self) -> bool:
        """Whether :attr:`fn` takes ``lanes`` (:func:`~flashcompile.codecs.layout.lane_counts`): a
        rule whose states' padding lanes might not stay zero (Adagrad's initial accumulator,
        Adamax's eps, Rprop's step sizes) masks them to zero, group by group (the states codegen
        masks, ``_valid``); a reducing rule also where a reduction would count padding lanes
        (cautious AdamW's count of the param's elements)."""
        states = range(1, len(self.traced.outputs))
        if not all(keeps_zero(self.traced, i) for i in states):
            return True
        if not self.lowered.totals_skip_pads:  # a total's term might count padding lanes
            return True
        return self.reduces and not self.reductions_skip_pads

    @property
    def steps_flat(self) -> bool:
        """Whether one call may step several parameters laid end to end in one flat buffer: the
        padding lanes between them provably stay zero (the states' or masked, :attr:`masks_lanes`;
        the weight's in any case) and add nothing to any reduction (each reduction sums its own
        parameter's groups: provably, or masked)."""
        pads_zero = self.pads_stay_zero or (self.masks_lanes and keeps_zero(self.traced, 0))
        return pads_zero and (self.reductions_skip_pads or self.masks_lanes)

    def steps_flat_over(self, numels) -> bool:
        """Whether one call may step params of these sizes laid end to end: as :attr:`steps_flat`,
        or, for a reducing rule whose padding lanes might not stay zero, where every param fills
        whole groups, so the flat buffer has no padding lanes at all."""
        return self.steps_flat or all(n % GROUP == 0 for n in numels)

    def bytes_moved_per_param(self, grad_bytes: float) -> float:
        """Bytes one step must read and write per parameter: every field read, written fields
        written back, and the gradient read. A reducing rule reads the inputs of its sums once
        more per phase: LAMB's norm of the update must be complete before any weight moves, so
        the update cannot be applied in the pass that sums it (short of storing it, 4 B/param).
        A matrix stage's bf16 buffer adds 4 B/param (its products' own traffic is not counted)."""
        moved = grad_bytes + (1 / GROUP if self.masks_lanes else 0.0)  # a lane count per group
        names = [PARAM, *self.key.rule.states]
        for name, codec in self.codecs.items():
            written = self.lowered.outputs[names.index(name)] is not None
            moved += codec.bytes_per_value * (2 if written else 1)
        if self.stages:  # the matrix stage's bf16 argument: written before it, read after it
            moved += 4.0
        variables = {self.traced.param.name: PARAM, **{s: s for s in self.key.rule.states}}
        for reads in self.lowered.phase_reads:
            moved += grad_bytes if self.traced.grad.name in reads else 0.0
            moved += sum(self.codecs[variables[v]].bytes_per_value for v in reads
                         if v in variables and variables[v] in self.codecs)
        return moved

    @property
    def bytes_per_param(self) -> float:
        """Optimizer-owned bytes per parameter value, the 16/32-bit param itself included."""
        return sum(c.bytes_per_value for c in self.codecs.values())

    def scalars(self, step: int, hyper: Mapping[str, object],
                state: Mapping[str, object] | None = None) -> list[float]:
        """The kernel's scalars ``_s[1:]`` for ``step``. Scalar states are read from ``state`` (a
        param's optimizer state; zero where absent) and their new values follow, unread by the
        kernel: :meth:`advance` stores them."""
        old = {k: float(state[k]) if state is not None and k in state else 0.0
               for k in self.key.rule.scalar_states}
        return self.prologue(step, **{k: hyper[k] for k in self.traced.hyper}, **old)

    def advance(self, states: Sequence[dict[str, object]], scalars: list[float]) -> None:
        """Store the scalar states' new values (the tail of :meth:`scalars`) in each of ``states``
        (params stepped together share them), as 0-d fp32 CPU tensors like torch.optim's."""
        for name, value in self.new_scalar_states(scalars):
            held = [state[name] for state in states if name in state]
            if len(held) == 1:
                held[0].fill_(value)
            elif held:  # one call for a bucket's params (148 fill_ calls took 0.1 ms of host time)
                torch._foreach_copy_(held, [torch.tensor(value)] * len(held))
            for state in states:
                if name not in state:
                    state[name] = torch.tensor(value)

    def new_scalar_states(self, scalars: list[float]) -> list[tuple[str, float]]:
        """The scalar states' new values (the tail of :meth:`scalars`) as fp32 stores them: inf
        beyond its range (Adam's bound_sq where beta1^2 > beta2; fill_ would raise), NaN kept."""
        names = self.key.rule.scalar_states
        tail = scalars[len(scalars) - len(names):] if names else []
        return [(name, math.copysign(math.inf, v) if abs(v) > FP32_MAX else v)
                for name, v in zip(names, tail)]

    def field_args(self, stored: Mapping[str, torch.Tensor], first: int,
                   count: int) -> list[torch.Tensor]:
        """Groups [first, first + count) of ``stored`` (flat fields by state key), in the order of
        the step function's arguments after the weight."""
        return [groups(stored[state_key(name, f)], f.width, first, count)
                for name, codec in self.codecs.items() for f in codec.fields
                if not (name == PARAM and f.name == "value")]

    def run(self, p: torch.Tensor, grad: torch.Tensor, stored: Mapping[str, torch.Tensor],
            scalars: list[float], combine=None, matrices=None,
            factor: torch.Tensor | None = None, shared: Shared | None = None) -> None:
        """Update ``p`` and its stored fields in place. ``p`` and ``grad``: the parameter's values
        and gradient, flat (1-D) or in its shape, both contiguous. ``combine``: see :meth:`call`
        (an empty ``p`` still takes part in it). ``matrices``: for a rule with a matrix stage,
        the parameter's (:meth:`matrices`). ``factor``, ``shared``: see :meth:`call`."""
        n = p.numel()
        if not n:
            if combine is not None and self.reduces:
                self.combine_nothing(combine, p.device)
            return
        count = group_count(n)
        # detach: a Parameter's requires_grad would be one more guard, and a recompile for tails
        flat_p, flat_g = p.detach().view(-1), grad.detach().view(-1)
        s = scalar_vector(last_group_lanes(n), scalars, p.device)
        if not self.reduces and not self.stages:
            self.call_one(s, flat_g, flat_p, self.field_args(stored, 0, count), factor, shared)
            return
        # a reducing or staged rule sees the whole parameter in one call: pad weight and gradient
        pad_p, pad_g = padded(flat_p), padded(flat_g)
        fields = {k: groups(v, self.widths[k], 0, count) for k, v in stored.items()}
        stage = None
        if self.stages:
            if matrices is None:
                raise ValueError("a rule with a matrix stage needs the parameter's matrices")
            stage = StageCall(matrices, [float(last_group_lanes(n)), *scalars])
        lanes = lane_counts([n], p.device) if self.reduces and self.masks_lanes else None
        self.call(s, groups(pad_g, GROUP, 0, count), groups(pad_p, GROUP, 0, count), fields,
                  combine=combine, lanes=lanes, stage=stage, factor=factor, shared=shared)
        flat_p.copy_(pad_p.view(-1)[:n])

    def call_one(self, s: torch.Tensor, grad: torch.Tensor, value: torch.Tensor,
                 fields: Sequence[torch.Tensor], factor: torch.Tensor | None = None,
                 shared: Shared | None = None) -> None:
        """One launch over one whole parameter (non-reducing rules): ``grad`` and ``value`` flat
        and contiguous (``n`` values), ``fields`` as :meth:`field_args` gives them, ``s[0]`` the
        valid lanes of the last group; ``factor``, ``shared``: see :meth:`call`."""
        if not self._verified["one"]:
            self.verify(grad.device, "one")
        self.fn_one(s, grad, value, *fields, *self.device_args(factor, grad.device, shared))

    def bind_one(self, s: torch.Tensor, grad: torch.Tensor, value: torch.Tensor,
                 fields: Sequence[torch.Tensor], factor: torch.Tensor | None = None,
                 shared: Shared | None = None):
        """:meth:`call_one` for later calls with the same ``value`` and ``fields`` and a scalar
        vector and gradient of these sizes (flashcompile.compiler.direct.Bound, taking ``(s,
        grad, value, *fields)``); None where not compiled or not yet called with them."""
        if self._verified["one"] and isinstance(self.fn_one, DirectFunction):
            return self.fn_one.bound(s, grad, value, *fields,
                                     *self.device_args(factor, grad.device, shared),
                                     fresh=(0, 1))
        return None

    def device_args(self, factor: torch.Tensor | None, device: torch.device,
                    shared: Shared | None = None) -> list:
        """The device tensors a call passes after the fields: the gradient ``factor`` (a
        1-element fp32 tensor on the device; 1 where None) for a plan whose rule scales its
        gradients (:func:`flashcompile.runtime.amp.unscaling`), then the rule's shared numbers
        and the step's totals accumulator (``shared``, for a rule with shared numbers)."""
        if not self.traced.device:
            return []
        out = []
        if FACTOR in self.traced.device:
            out.append(factor if factor is not None else torch.ones(1, device=device))
        if self.key.rule.shared:
            if shared is None:
                raise ValueError(f"{self.key.rule.name} reads shared numbers "
                                 f"{list(self.key.rule.shared)}: pass them (shared=)")
            out += [shared.values[k] for k in self.key.rule.shared]
            if self.lowered.totals:
                out.append(shared.totals)
        return out

    def call(self, s: torch.Tensor, grad: torch.Tensor, value: torch.Tensor,
             stored: Mapping[str, torch.Tensor], ends: torch.Tensor | None = None,
             combine=None, lanes: torch.Tensor | None = None, stage=None,
             factor: torch.Tensor | None = None, shared: Shared | None = None) -> None:
        """One launch over whole groups: grad and value ``(G, 32)``, fields as :func:`groups` views
        them. For a reducing rule, ``ends`` (int64) lists the group index after each parameter's
        last group (None: the call holds one parameter), and ``combine(totals)``, if given,
        completes each phase's per-parameter sums in place before they are used: an all-reduce
        where each rank holds a shard of every parameter (FSDP2). Where :attr:`masks_lanes`,
        ``lanes`` gives each group's valid lanes (None: ``s[0]`` in every group). For a rule with
        a matrix stage, ``stage`` (a :class:`~flashcompile.compiler.codegen.StageCall`) says where
        each parameter's matrix lies. ``factor``: what every gradient is multiplied by first, a
        1-element fp32 tensor on the device, for a plan whose rule scales its gradients.
        ``shared``: the rule's shared numbers and the step's totals (:class:`Shared`), which the
        call adds its sums to, for a rule with shared numbers."""
        if not self._verified["groups"]:
            self.verify(grad.device)
        args = []
        for name, codec in self.codecs.items():
            for f in codec.fields:
                args.append(value if name == PARAM and f.name == "value" else stored[state_key(name, f)])
        args += self.device_args(factor, grad.device, shared)
        if self.stages:
            self.fn(s, grad, *args, stage)
            return
        if not self.reduces:
            if self.masks_lanes:
                args.append(lanes if lanes is not None else groups(
                    s[:1].to(torch.uint8).expand(grad.shape[0]).contiguous(), 1, 0,
                    grad.shape[0]))
            self.fn(s, grad, *args)
            return
        args.append(ends if ends is not None else segment_ends([grad.shape[0]], grad.device))
        if self.masks_lanes:
            if lanes is None:
                raise ValueError(f"{self.key.rule.name}'s sums mask each parameter's padding "
                                 "lanes: pass lanes (layout.lane_counts)")
            args.append(lanes)
        self.fn(s, grad, *args, combine=combine)

    def combine_nothing(self, combine, device: torch.device, params: int = 1) -> None:
        """Take part in ``combine`` with zero sums for ``params`` parameters and nothing to step
        (an empty shard: the other ranks' all-reduces wait for this one)."""
        for _, sums in self.lowered.phases:
            combine(torch.zeros(len(sums), params + 1, device=device))


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


@functools.lru_cache(maxsize=None)
def get_plan(key: PlanKey) -> Plan:
    """The plan for ``key``, built once per process and shared: a rule that runs in each
    parameter's shape (``row_mean``, factored states) gets a
    :class:`~flashcompile.compiler.shaped.ShapedPlan`."""
    if key.rule.shaped:
        from flashcompile.compiler.shaped import ShapedPlan

        return ShapedPlan(key)
    return Plan(key)
