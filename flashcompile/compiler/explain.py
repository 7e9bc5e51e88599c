"""Show what an optimizer compiles to: the rule's math, its codecs, the generated torch function,
the hoisted scalar prologue and, on request, the kernel source Inductor generates for it."""

from __future__ import annotations

import re
from unittest import mock

import torch

from flashcompile.compiler import fast_math
from flashcompile.compiler.codegen import assemble, source_namespace
from flashcompile.compiler.plan import Plan
from flashcompile.compiler.verify import sample_inputs
from flashcompile.language.trace import math_text


def plan_of(optimizer, param: torch.Tensor | None = None) -> Plan:
    """The plan ``optimizer`` runs for ``param`` (default: its first parameter)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if param is None or p is param:
                return optimizer.plan_for(p, optimizer.flags_of(group))
    raise ValueError("param is not in this optimizer")


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
    if plan.shaped:  # no generated source: the rule's own torch code, in the param's shape
        factored = "".join(f"\n  {name:<16} fp32, one per {plan.key.rule.states[name][:-1]}"
                           for name in plan.factored)
        return "\n".join([
            f"# rule {plan.key.rule.name}, flags {dict(plan.key.flags)}",
            math_text(plan.traced),
            f"\n# codecs ({plan.bytes_per_param:.4g} bytes per parameter, gradient excluded)",
            codecs + factored,
            "\n# stepped in each parameter's own shape (flashcompile.compiler.shaped): fields "
            "decoded, the rule's torch code run on them, fields encoded back; torch.compile("
            "fullgraph=True, dynamic=True), one graph per rank and memory layout"])
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
