"""Show what an optimizer compiles to: the rule's math, its codecs, the generated torch function,
the hoisted scalar prologue and, on request, the kernel source Inductor generates for it."""

from __future__ import annotations

import re
from unittest import mock

import torch

from flashcompile.compiler import fast_math
from flashcompile.codecs import GROUP
from flashcompile.compiler.codegen import assemble, source_namespace
from flashcompile.codecs.layout import lane_counts, segment_ends
from flashcompile.compiler.plan import PARAM, Plan
from flashcompile.language.trace import math_text


def plan_of(optimizer, param: torch.Tensor | None = None) -> Plan:
    """The plan ``optimizer`` runs for ``param`` (default: its first parameter)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if param is None or p is param:
                return optimizer._plan(p, optimizer._flags(group))
    raise ValueError("param is not in this optimizer")


def sample_inputs(plan: Plan, groups: int, device: torch.device | str,
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
    halves = [n for n in (groups // 2, groups - groups // 2) if n]
    if plan.reduces:  # two parameters laid end to end, so the sums must keep them apart
        args.append(segment_ends(halves, device))
    if plan.masks_lanes:  # two parameters laid end to end, each with padding lanes to mask
        args.append(lane_counts([n * GROUP - 3 - 2 * i for i, n in enumerate(halves)], device))
    held: dict[str, torch.Tensor] = {}  # scalar states, as a parameter's state holds them
    for step in range(1, 5):
        values = plan.scalars(step, hyper, held)
        args[0] = torch.tensor([GROUP, *values], dtype=torch.float32, device=device)
        args[1] = randn().to(param_dtype)
        if step < 4:
            with torch.no_grad():
                plan.eager(*args)
            plan.advance([held], values)
    for a in args[1:]:
        if a.dim() == 2:  # the group size is a constant of the kernel
            torch._dynamo.mark_static(a, 1)
    return args


def decode_inputs(plan: Plan, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decode every codec's fields from a ``plan.fn`` argument list (as ``sample_inputs`` builds)."""
    out, i = {}, 2
    for name, codec in plan.codecs.items():
        out[name] = codec.decode(*args[i:i + len(codec.fields)])
        i += len(codec.fields)
    return out


def describe_mismatch(plan: Plan, key: str, want_args, got_args, want, got, tol) -> str:
    """The worst element of a compiled-vs-eager mismatch: values, tolerance and both encodings."""
    excess = (got - want).abs() - tol
    flat = int(excess.reshape(-1).argmax())
    row, lane = divmod(flat, GROUP)
    i = 2 + sum(len(c.fields) for k, c in plan.codecs.items() if list(plan.codecs).index(k)
                < list(plan.codecs).index(key))
    fields = {f.name: (want_args[i + j].reshape(-1, 1 if f.per_group else GROUP)[row].tolist(),
                       got_args[i + j].reshape(-1, 1 if f.per_group else GROUP)[row].tolist())
              for j, f in enumerate(plan.codecs[key].fields)}
    return (f"{key}: group {row} lane {lane}: eager {want.reshape(-1)[flat].item():.9g} compiled "
            f"{got.reshape(-1)[flat].item():.9g} tol {tol.reshape(-1)[flat].item():.3g}; "
            f"fields (eager, compiled): {fields}")


def fresh_step(plan: Plan, wrap=lambda fn: fn):
    """The plan's step function from new code objects, each generated function passed through
    ``wrap`` (``torch.compile``): dynamo caches compiled graphs per code object, and the plan's own
    ones may already be compiled (which would skip code generation)."""
    namespace = source_namespace(plan.codecs)
    exec(compile(plan.source, "<flashcompile explain>", "exec"), namespace)
    return assemble(namespace, wrap)


def inductor_source(plan: Plan, device: torch.device | str = "cpu", groups: int = 256) -> list[str]:
    """Compile a fresh copy of the plan's function and return the output code Inductor wrote."""
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append), \
            torch._inductor.config.patch(force_disable_caches=True):
        compiled = fresh_step(plan, plan.compiler())
        with torch.no_grad():
            compiled(*sample_inputs(plan, groups, device))
    return codes


def count_kernels(code: str) -> int:
    """Kernels in Inductor output code: Triton kernels on CUDA, C++ kernels on CPU."""
    return len(re.findall(r"async_compile\.(?:triton|cpp_pybinding|cpp)\(", code))


def explain(optimizer, param: torch.Tensor | None = None, *, kernels: bool = False) -> str:
    """A readable account of what ``optimizer`` runs for ``param`` (default: its first one)."""
    plan = plan_of(optimizer, param)
    codecs = "\n".join(f"  {name:<16} {c.name:<24} {c.bytes_per_value:.4g} B/value"
                       for name, c in plan.codecs.items())
    parts = [
        f"# rule {plan.key.rule.name}, flags {dict(plan.key.flags)}",
        math_text(plan.traced),
        f"\n# codecs ({plan.bytes_per_param:.4g} bytes per parameter, gradient excluded)",
        codecs,
        "\n# generated torch function (torch.compile(fullgraph=True, dynamic=True, options="
        f"{plan.compile_options()})" + (
            "; CUDA: hardware division and square root, see flashcompile.compiler.fast_math"
            if plan.key.device_type == "cuda" and fast_math.enabled() else "") + ")" + (
            "; each reduction phase (_sums) and the update compile apart, the update reading the "
            "per-parameter sums" if plan.reduces else ""),
        plan.source,
        *([f"# CUDA launch: {plan.launch.describe()}"] if plan.launch is not None else []),
        "# scalar prologue: host, float64, once per step; its values are _s[1:]",
        plan.lowered.prologue_source,
    ]
    if kernels:
        device = next(p.device for g in optimizer.param_groups for p in g["params"])
        code = "\n".join(inductor_source(plan, device))
        parts += [f"# Inductor output code: {count_kernels(code)} kernel(s)", code]
    return "\n".join(parts)
