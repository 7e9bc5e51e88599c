"""Inputs for a plan's kernel and the comparison of its compiled and eager forms: what
``Plan.verify`` checks before first use, and what benchmarks and ``explain`` feed a plan. Each
function takes a :class:`flashcompile.compiler.plan.Plan` (read through its attributes: this
module sits below the plan it serves)."""

from __future__ import annotations

import torch

from flashcompile.codecs import GROUP, PARAM
from flashcompile.codecs.layout import (
    lane_counts,
    last_group_lanes,
    padded,
    scalar_vector,
    segment_ends,
)
from flashcompile.compiler.codegen import Shared, StageCall


def sample_inputs(plan, groups: int, device: torch.device | str,
                  seed: int = 0) -> list[torch.Tensor]:
    """Inputs for ``plan.fn`` at step 4: scalars, a random gradient, then every field holding the
    state the rule itself reaches from a random weight and zero states in three eager steps on
    random gradients. Reached states lie in the rule's domain, as independent random states need
    not (centered RMSprop's ``v >= m**2``: outside it ``g / eps`` overflows the 8-bit codecs' scales
    to NaN, and the compiled-vs-eager check compares NaN with NaN). Drawn from a generator of their
    own: the global RNG (dropout masks, data order) is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def randn() -> torch.Tensor:
        return torch.randn(groups, GROUP, generator=gen).to(device)

    hyper = {k: plan.key.rule.defaults[k] for k in plan.traced.hyper}
    param_dtype = plan.codecs[PARAM].fields[0].dtype
    args = [torch.zeros(0), torch.zeros(0)]  # the scalars and the gradient, set per step below
    for name, codec in plan.codecs.items():
        x = randn() if name == PARAM else torch.zeros(groups, GROUP, device=device)
        args += [t.contiguous() for t in codec.encode(x)]
    # the gradient factor of a scaling plan (amp.unscaling), the rule's shared numbers at their
    # start and the totals accumulator
    rule = plan.key.rule
    shared = Shared({k: torch.full((1,), rule.shared_start(k, rule.defaults), device=device)
                      for k in rule.shared},
                     torch.zeros(len(plan.lowered.totals), dtype=torch.float64, device=device))
    torch._dynamo.mark_static(shared.totals, 0)
    args += plan.device_args(torch.full((1,), 0.75, device=device), device, shared)
    halves = [n for n in (groups // 2, groups - groups // 2) if n]
    if plan.reduces:  # two parameters laid end to end, so the sums must keep them apart
        args.append(segment_ends(halves, device))
    if plan.masks_lanes:  # two parameters laid end to end, each with padding lanes to mask
        args.append(lane_counts([n * GROUP - 3 - 2 * i for i, n in enumerate(halves)], device))
    stage = None
    if plan.stages:  # two matrices laid end to end, (rows, 32) each
        stage = StageCall(plan.matrices([torch.empty(n, GROUP, device="meta") for n in halves],
                                        device), [])
        args.append(stage)
    held: dict[str, torch.Tensor] = {}  # scalar states, as a parameter's state holds them
    for step in range(1, 5):
        values = plan.scalars(step, hyper, held)
        args[0] = scalar_vector(GROUP, values, device)
        args[1] = randn().to(param_dtype)
        if stage is not None:
            stage.values = [GROUP, *values]
        if step < 4:
            with torch.no_grad():
                plan.eager(*args)
            plan.advance([held], values)
    for a in args[1:]:
        if isinstance(a, torch.Tensor) and a.dim() == 2:  # the group size: a kernel constant
            torch._dynamo.mark_static(a, 1)
    return args


def decode_inputs(plan, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decode every codec's fields from a ``plan.fn`` argument list (as ``sample_inputs`` builds)."""
    out, i = {}, 2
    for name, codec in plan.codecs.items():
        out[name] = codec.decode(*args[i:i + len(codec.fields)])
        i += len(codec.fields)
    return out


def describe_mismatch(plan, key: str, want_args, got_args, want, got, tol) -> str:
    """The worst element of a compiled-vs-eager mismatch: values, tolerance and both encodings."""
    excess = (got - want).abs() - tol
    flat = int(excess.reshape(-1).argmax())
    row, lane = divmod(flat, GROUP)
    i = 2 + sum(len(c.fields) for k, c in plan.codecs.items() if list(plan.codecs).index(k)
                < list(plan.codecs).index(key))
    fields = {f.name: (want_args[i + j].reshape(-1, f.width)[row].tolist(),
                       got_args[i + j].reshape(-1, f.width)[row].tolist())
              for j, f in enumerate(plan.codecs[key].fields)}
    return (f"{key}: group {row} lane {lane}: eager {want.reshape(-1)[flat].item():.9g} compiled "
            f"{got.reshape(-1)[flat].item():.9g} tol {tol.reshape(-1)[flat].item():.3g}; "
            f"fields (eager, compiled): {fields}")


def compare_compiled(plan, device: torch.device | str, groups: int = 4, seed: int = 0,
                     variant: str = "groups") -> str | None:
    """:meth:`Plan.compare_compiled`: the worst value compiled and eager disagree on beyond one
    code step, described, or None."""
    if not plan._verified[variant]:  # compile (and pin the launch config) at size first
        plan.verify(device, variant)
    args = sample_inputs(plan, groups, device, seed)  # its own generator: RNG state untouched
    n = max(2, groups * GROUP - 5)
    run_eager, run_compiled = (plan.eager, plan.fn) if variant == "groups" else (
        plan.eager_one, plan.fn_one)
    eager, compiled = [a.clone() for a in args], [a.clone() for a in args]
    for a in compiled[1:]:  # a clone drops mark_static: without it the group size compiles
        if isinstance(a, torch.Tensor) and a.dim() == 2:  # symbolic, into a looped two-pass
            # reduction (5x slower)
            torch._dynamo.mark_static(a, 1)
        elif isinstance(a, torch.Tensor) and a.dtype == torch.float64:  # the totals' count
            torch._dynamo.mark_static(a, 0)
    if variant == "one":  # the weight and gradient as one parameter's flat storage: n values
        args = as_one(plan, args, n)
        eager, compiled = as_one(plan, eager, n), as_one(plan, compiled, n)
    with torch.no_grad():
        run_eager(*eager)
    run_compiled(*compiled)
    if variant == "one":
        args, eager, compiled = (as_groups(plan, a) for a in (args, eager, compiled))
    want, got = decode_inputs(plan, eager), decode_inputs(plan, compiled)
    before = decode_inputs(plan, args)
    if variant == "one":  # the weight's padding lanes are never stored back: not compared
        for d in (want, got, before):
            d[PARAM] = d[PARAM].reshape(-1)[:n]
    for name, codec in plan.codecs.items():
        scale = want[name].abs() + before[name].abs()
        tol = codec.code_step(want[name]) + 1e-6 * scale
        if not torch.all((got[name] - want[name]).abs() <= tol):
            return describe_mismatch(plan, name, eager, compiled, want[name], got[name], tol)
    if not torch.equal(compiled[0], eager[0]):
        return "the scalar vector was written to"
    if plan.lowered.totals:  # the accumulator: fp32 terms a few roundings apart (fused
        # multiply-adds), summed in float64 in another order
        i = _totals_index(plan)
        want_t, got_t = eager[i], compiled[i]
        if not torch.all((got_t - want_t).abs() <= 1e-4 * (want_t.abs() + got_t.abs()) + 1e-30):
            return f"totals: eager {want_t.tolist()} compiled {got_t.tolist()}"
    return None


def _totals_index(plan) -> int:
    """Where the totals accumulator is in a ``plan.fn`` argument list: after the fields and the
    device scalars (the lane counts, where taken, come last)."""
    return -2 if plan.masks_lanes else -1


def as_one(plan, args: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Arguments of :attr:`Plan.fn` (whole groups) as :attr:`Plan.fn_one` takes them for one
    parameter of ``n`` values: weight and gradient flat, the valid lanes of the last group in
    ``s[0]``, and the weight's padding lanes zero in every field (as a padded parameter's are)."""
    s = args[0].clone()
    s[0] = last_group_lanes(n)
    codec = plan.codecs[PARAM]
    k = len(codec.fields)
    x = codec.decode(*args[2:2 + k]).reshape(-1)
    x[n:] = 0
    weight, *rest = [t.contiguous() for t in codec.encode(x.view(-1, GROUP))]
    for t in rest:
        torch._dynamo.mark_static(t, 1)
    fields = args[2 + k:-1] if plan.masks_lanes else args[2 + k:]  # step_one has no lanes
    return [s, args[1].reshape(-1)[:n].clone(), weight.reshape(-1)[:n].clone(), *rest, *fields]


def as_groups(plan, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`as_one`: weight and gradient zero-padded to whole groups."""
    return [args[0], padded(args[1]), padded(args[2]), *args[3:]]

