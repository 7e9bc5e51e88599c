"""Source of a plan's torch function(s): decode every stored field, the rule's fp32 math, encode
and store every output in place; and the step function assembled from that source once executed
(:class:`flashcompile.compiler.plan.Plan` compiles and calls it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flashcompile.codecs import GROUP, PARAM, Codec, stochastic
from flashcompile.runtime.amp import FACTOR
from flashcompile.compiler.lowering import Lowered
from flashcompile.compiler.segments import grand_total, segment_totals
from flashcompile.language.trace import Traced, keeps_zero


def generate(traced: Traced, lowered: Lowered, codecs: Mapping[str, Codec],
             lanes: bool = False) -> str:
    """Source of ``step(_s, _grad, *fields[, _ends | _lanes])`` over whole groups; for a reducing
    rule, of one function per reduction phase (``_sums1``, ...) and ``_update``, which
    :class:`Plan` chains into ``step``. A non-reducing rule also gets ``step_one``
    (:func:`_padded`); where its states' padding lanes must be masked, its ``step`` takes
    ``_lanes`` (``(G, 1)``: the valid lanes of each group, so params of any size lie end to end);
    so do a reducing rule's functions with ``lanes`` (their sums and stores then mask each
    parameter's padding lanes)."""
    args, decode = _arguments(traced, codecs)
    doc = f'    """{traced.rule.name} {dict(traced.flags)}: ' + ", ".join(
        f"{k}={c.name}" for k, c in codecs.items()) + '"""'
    if lowered.stage is not None:
        return _staged(traced, lowered, codecs, args, decode, doc)
    reduces = bool(lowered.phases)
    if not reduces:
        update = _update_lines(traced, lowered.statements, lowered.outputs, codecs,
                               lowered.step_slot)
        if lowered.totals:  # before the stores: a decoded fp32 input is its own storage
            update.insert(len(update) - sum(".copy_(_new_" in line for line in update),
                          _accumulate_totals(lowered))
            args = [*args, TOTALS]
        masked = any("_valid" in line for line in update)
        return "\n".join([_function("step", args + ["_lanes"] * masked, doc, decode, update, False),
                          _padded(args, doc, decode, update)])
    args.append("_ends")
    if lanes:
        args.append("_lanes")
    sources, known = [], 0
    for k, (statements, sums) in enumerate(lowered.phases, 1):
        body = _read_sums(known) + [f"    {t} = {e}" for t, e in statements]
        terms = ", ".join(_segment_sum(e, lanes and free)
                          for e, free in zip(sums, lowered.lane_free_sums[k - 1]))
        new = f"torch.stack([{terms}])"
        body.append(f"    return torch.cat([_totals, {new}])" if known else f"    return {new}")
        sources.append(_function(f"_sums{k}", args + (["_totals"] if known else []), doc, decode,
                                 body, True))
        known += len(sums)
    update = _read_sums(known) + _update_lines(traced, lowered.statements, lowered.outputs,
                                              codecs, lowered.step_slot)
    sources.append(_function("_update", [*args, "_totals"], doc, decode, update, True))
    return "\n".join(sources)


TOTALS = "_totals_acc"  # the step's accumulator of a rule's totals: float64, one per total


def _segment_sum(expr: str, counted: bool) -> str:
    """Each parameter's sum of ``expr`` over its valid lanes. ``counted``: ``expr`` is the same on
    every lane, so each group adds it times its valid lanes (``_lanes``, ``(G, 1)``): no masked
    value per lane (cautious AdamW's count of elements: 3 SASS per element in its summing pass)."""
    if counted:
        return f"_segment_totals(_lanes.to(torch.float32) * ({expr}), _ends)"
    return f"_segment_totals(torch.where(_valid, {expr}, 0.0), _ends)"


def _accumulate_totals(lowered: Lowered) -> str:
    """The line adding this call's sum of each ``total`` term to :data:`TOTALS` (padding lanes
    masked unless the terms are provably 0 there). Each fp32 term is summed in float64: the sum
    then hardly depends on its order (one bucket or many, per tensor, inside backward), so the
    shared numbers it sets, rounded to fp32 for the kernels, come out the same in every layout
    (gradient release stays bit-identical to stepping after backward); on the GPU per group first,
    inside the update's kernel (:func:`~flashcompile.compiler.segments.grand_total`)."""
    terms = (lowered.totals if lowered.totals_skip_pads
             else [f"torch.where(_valid, {t}, 0.0)" for t in lowered.totals])
    sums = ", ".join(f"_grand_total({t})" for t in terms)
    return f"    {TOTALS}.copy_({TOTALS} + torch.stack([{sums}]))"


def _staged(traced: Traced, lowered: Lowered, codecs: Mapping[str, Codec], args: list[str],
            decode: list[str], doc: str) -> str:
    """``_pre(..., _stage)`` and ``_update(..., _stage, _ratios, _ends)`` around a matrix stage:
    the first stores the outputs that do not need the stage's result and the stage's argument
    (bf16, into ``_stage``, ``(G, 32)``); the stage turns ``_stage`` into its result in place
    (:mod:`flashcompile.compiler.matrices`); the second reads it, times each parameter's shape
    ratio (``_ratios``, one per parameter ending at ``_ends``), and stores the other outputs."""
    stage = lowered.stage
    pre = _update_lines(traced, stage.statements, stage.outputs, codecs, lowered.step_slot)
    pre.insert(-sum(1 for line in pre if ".copy_(_new_" in line) or len(pre),
               f"    _new_stage = ({stage.argument}).to(torch.bfloat16)")
    pre.append("    _stage.copy_(_new_stage)")
    owner = ["    _owner = torch.bucketize(torch.arange(_grad.shape[0], device=_grad.device), "
             "_ends, right=True)",
             "    _stage0 = _stage.float() * _ratios[_owner][:, None]"]
    post = owner + _update_lines(traced, lowered.statements, lowered.outputs, codecs,
                                 lowered.step_slot)
    return "\n".join([_function("_pre", [*args, "_stage"], doc, decode, pre, True),
                      _function("_update", [*args, "_stage", "_ratios", "_ends"], doc, decode,
                                post, True)])


def _arguments(traced: Traced, codecs: Mapping[str, Codec]) -> tuple[list[str], list[str]]:
    """The step function's arguments (scalars, gradient, every stored field, the rule's device
    scalars) and the lines that decode them."""
    names = [traced.param.name, *traced.rule.states]
    args, decode = ["_s", "_grad"], [f"    {traced.grad.name} = _grad.float()"]
    for name, codec in codecs.items():
        var = names[0] if name == PARAM else name
        fields = [f"{name}__{f.name}" for f in codec.fields]
        args += fields
        decode.append(f"    {var} = _codec_{name}.decode({', '.join(fields)})")
    # device scalars (1-element fp32 tensors) follow the fields, under their own names
    return args + list(traced.device), decode


def _padded(args: list[str], doc: str, decode: list[str], update: list[str]) -> str:
    """``step_one``: one parameter in one call, its gradient and weight given flat (``n`` values,
    contiguous: the parameter's own storage) and its other fields padded to whole groups (``G``
    rows). Both are padded to ``(G, 32)`` inside the graph, so Inductor reads them with a mask
    instead of the caller copying a tail group in and out (the per-tensor path's host cost)."""
    value = f"{PARAM}__value"
    flat = {"_grad": "_grad_flat", value: f"{value}_flat"}
    rows = next((a for a in args[2:] if a != value and "__" in a), None)  # a field, not a scalar
    pad = f"{rows}.shape[0] * {GROUP} - _n" if rows else f"-_n % {GROUP}"
    lines = ["    _n = _grad_flat.shape[0]", f"    _pad = {pad}"]
    lines += [f"    {name} = torch.nn.functional.pad({flat[name]}, (0, _pad)).view(-1, {GROUP})"
              for name in ("_grad", value)]
    signature = [flat.get(a, a) for a in args]
    return _function("step_one", signature, doc, decode,
                     update + [f"    {value}_flat.copy_({value}.view(-1)[:_n])"], True, lines)


def _read_sums(count: int) -> list[str]:
    """Lines giving each group its parameter's sums ``_sum0 .. _sum{count-1}`` (``(G, 1)``) from
    ``_totals`` (one row per sum, one column per parameter)."""
    if not count:
        return []
    groups = "torch.arange(_grad.shape[0], device=_grad.device)"
    lines = [f"    _owner = torch.bucketize({groups}, _ends, right=True)"]
    lines += [f"    _sum{i} = _totals[{i}][_owner][:, None]" for i in range(count)]
    return lines


def _update_lines(traced: Traced, statements, outputs, codecs: Mapping[str, Codec],
                  step_slot: int) -> list[str]:
    """The rule's math (``statements``), then every output (``outputs``: an expression per
    output, None where it is not written) encoded and stored in place."""
    names = [traced.param.name, *traced.rule.states]
    lines = ["    # the rule's math, fp32; _s holds the hoisted scalars (see prologue)"]
    lines += [f"    {target} = {expr}" for target, expr in statements]
    # Encode every output before storing any: a decoded input may alias its storage (fp32), and a
    # later output may still read it (ASGD's average reads the param it was computed from).
    stores = []
    written = {n: c for n, c in codecs.items()
               if outputs[0 if n == PARAM else names.index(n)] is not None}
    keys = _noise_keys(traced, outputs, written)
    if any(getattr(c, "stochastic", False) for c in written.values()) and keys[0] == "_key_param":
        # computed once: eager plans run the source as written
        lines.append(f"    _key_param = {outputs[0]}")
        outputs = ["_key_param", *outputs[1:]]
    noises = _noise_lines(step_slot, written, keys)
    for name, codec in codecs.items():
        out = outputs[0 if name == PARAM else names.index(name)]
        if out is None:
            continue  # passthrough: decoded for reading, never re-encoded
        index = 0 if name == PARAM else names.index(name)
        if out in names:  # an input passed on as it is: copy it before its storage is written
            out = f"{out}.clone()"
        if name != PARAM and not keeps_zero(traced, index):
            # padding lanes must stay zero so they never enlarge a group's scale
            out = f"torch.where(_valid, {out}, 0.0)"
        if name in noises:  # noise from the element's values, step and state, in the kernel
            lines += noises.pop(name)
            # a user's codec takes 23 random bits, ours the whole hash (decided while tracing)
            out = f"{out}, _noise_for(_codec_{name}, _u_{name})"
        lines.append(f"    _new_{name} = _codec_{name}.encode({out})")
        for j, f in enumerate(codec.fields):
            # straight into the input (G, 32): the store fuses into the reduction kernel
            stores.append(f"    {name}__{f.name}.copy_(_new_{name}[{j}])")
    return lines + stores


def _noise_keys(traced: Traced, outputs, written: Mapping[str, Codec]) -> tuple[str, str]:
    """The two fp32 values per element the stochastic rounding noise is hashed from: the new
    weight and the first state rounded to nearest, as computed before encoding (both from the
    unscaled gradient: GradScaler's scale must not change the noise). Values the kernel has just
    computed, where the gradient and the decoded weight would be read again: Inductor's C++ kernel
    reloads its padded inputs through lane masks in every loop that reads them, which cost the
    per-tensor CPU step a third of torch's. Without such a state (every written state stochastic):
    the unscaled gradient and the weight."""
    names = [traced.param.name, *traced.rule.states]
    state = next((n for n in traced.rule.states if n in written
                  and not getattr(written[n], "stochastic", False)), None)
    if outputs[0] is not None and state is not None:
        return "_key_param", outputs[names.index(state)]
    grad = traced.grad.name
    if FACTOR in traced.rule.device_scalars:
        grad = f"{grad} * {FACTOR}"
    return grad, traced.param.name


def _noise_lines(step_slot: int, codecs: Mapping[str, Codec], keys: Sequence[str]
                 ) -> dict[str, list[str]]:
    """Per stochastically rounded state among ``codecs`` (those written back), the lines that make
    its noise (``_u_<name>``), emitted before the first of a pair is encoded: states taken two by
    two share one hash (its two 16-bit halves), salted by both seeds; ``_s[step_slot]`` is the
    step, ``keys`` the two fp32 values of each element the hash reads (:func:`_noise_keys`: the
    same noise for an element in any layout)."""
    key_args = ", ".join(keys)
    names = [n for n, c in codecs.items() if getattr(c, "stochastic", False)]
    step = f"_s[{step_slot}]"
    out: dict[str, list[str]] = {}
    for k in range(0, len(names), 2):
        pair = names[k:k + 2]
        salt = stochastic.salt(sum(codecs[n].seed << (16 * j) for j, n in enumerate(pair)), k)
        if len(pair) == 2:
            out[pair[0]] = [f"    _u_{pair[0]}, _u_{pair[1]} = _uniform_noise_pair({step}, {salt}, "
                            f"{key_args})"]
            out[pair[1]] = []
        else:
            out[pair[0]] = [f"    _u_{pair[0]} = _uniform_noise({step}, {salt}, {key_args})"]
    return out


def _function(name: str, args: list[str], doc: str, decode: list[str], body: list[str],
              whole_param: bool, prelude: Sequence[str] = ()) -> str:
    """One generated function: ``prelude``, the lane mask where the body uses it, ``decode`` and
    ``body``. ``whole_param``: the call holds one whole parameter, so only its last group may be
    partial (else each call is whole groups, or one tail group)."""
    lines = decode + body
    if any("_valid" in line for line in lines):
        # the first _s[0] lanes of the last group are valid; earlier groups are whole
        valid = f"torch.arange({GROUP}, device=_grad.device) < _s[0]"
        if "_lanes" in args:  # each group's own count
            valid = f"torch.arange({GROUP}, device=_grad.device) < _lanes"
        elif whole_param:
            rows = "torch.arange(_grad.shape[0], device=_grad.device)[:, None] < _grad.shape[0] - 1"
            valid = f"({rows}) | ({valid})"
        lines.insert(0, f"    _valid = {valid}")
    return "\n".join([f"def {name}({', '.join(args)}):", doc, *prelude, *lines]) + "\n"


def source_namespace(codecs: Mapping[str, Codec]) -> dict[str, object]:
    """The globals a plan's generated source runs in."""
    namespace = {"torch": torch, "math": math, "_segment_totals": segment_totals,
                 "_grand_total": grand_total,
                 "_uniform_noise": stochastic.uniform_noise,
                 "_uniform_noise_pair": stochastic.uniform_noise_pair,
                 "_noise_for": stochastic.noise_for}
    namespace.update({f"_codec_{name}": c for name, c in codecs.items()})
    return namespace


@dataclass
class Shared:
    """What a call of a rule with shared numbers passes after the fields: the numbers as its
    kernels read them (``values``: name -> 1-element fp32 tensor on the device) and the step's
    totals it adds to (``totals``: float64, one per ``Traced.totals`` entry), both held by the
    optimizer from step to step (``Plan.device_args`` orders them)."""

    values: dict[str, torch.Tensor]
    totals: torch.Tensor


class StageCall:
    """What a matrix stage needs beyond the kernels' tensors, passed last to a staged plan's step:
    where each parameter's matrix lies (:class:`flashcompile.compiler.matrices.Matrices`) and the
    step's scalar vector as host floats (``values[i]`` is ``_s[i]``)."""

    def __init__(self, matrices, values: Sequence[float]):
        self.matrices, self.values = matrices, list(values)

    def clone(self) -> StageCall:  # argument lists are cloned tensor by tensor
        return self


def assemble(namespace: Mapping[str, object], wrap=lambda fn: fn, slots: Sequence[int] = ()):
    """The step function of an executed plan source, each generated function passed through
    ``wrap`` (``torch.compile``): ``step`` itself, or a reducing rule's phases chained with its
    update. Each compiles to a graph of its own: in one graph Inductor stored LAMB's update
    (4 B/param) between the sums and the step; apart, the update is one fused kernel like any
    rule's and the sums only read their inputs."""
    if "step" in namespace:
        return wrap(namespace["step"])
    if "_pre" in namespace:
        return _staged_chain(wrap(namespace["_pre"]), wrap(namespace["_update"]), slots)
    phases, k = [], 1
    while f"_sums{k}" in namespace:
        phases.append(wrap(namespace[f"_sums{k}"]))
        k += 1
    return _chain(phases, wrap(namespace["_update"]))


def _chain(phases, update):
    """``step(*args, combine=None)`` for a reducing rule: every phase's sums, then the update that
    reads them. ``combine`` (in place) completes each phase's new sums, e.g. an all-reduce over the
    ranks that each hold a shard of the parameters."""

    def step(*args, combine=None):
        totals = phases[0](*args)
        if combine is not None:
            combine(totals)
        for phase in phases[1:]:
            known = totals.shape[0]
            totals = phase(*args, totals)
            if combine is not None:
                combine(totals[known:])  # rows in place; the earlier rows are already complete
        update(*args, totals)

    return step


def _staged_chain(pre, update, slots: Sequence[int]):
    """``step(*args, stage)`` for a rule with a matrix stage: the phase before it (its argument
    into a fresh bf16 buffer shaped like the gradient), the stage in place on that buffer, then
    the phase after it. ``stage``: a :class:`StageCall`; ``slots``: where in the scalars the
    stage's own (steps, a, b, c, eps) are."""
    from flashcompile.compiler.matrices import orthogonalize

    def step(*args):
        *args, stage = args
        buffer = torch.empty_like(args[1], dtype=torch.bfloat16)
        pre(*args, buffer)
        orthogonalize(buffer, stage.matrices, stage.values, slots)
        update(*args, buffer, stage.matrices.ratios, stage.matrices.ends)

    return step
