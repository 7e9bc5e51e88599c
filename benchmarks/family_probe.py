"""Time each family rule's flash plan alone over one flat arena against a copy of the same bytes, for
several ways of compiling it (how many sample groups Inductor first compiles and tunes on, and its
options), and write Inductor's code per rule to $OUT/kernels.

Usage: python benchmarks/family_probe.py [N params, default 2^27] [Rule ...]"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch._inductor.graph import GraphLowering

import flashcompile as fc
from flashcompile.codecs import GROUP
from flashcompile.compiler.explain import count_kernels, fresh_step, plan_of
from flashcompile.compiler.launch import live_autotuners, pin_group_kernels
from flashcompile.compiler.plan import INDUCTOR_TUNED_OPTIONS
from flashcompile.compiler.verify import sample_inputs
from flashcompile.tools.bench import FAMILY

# (label, groups of the first (compiling, tuning) call, Inductor options, pin the launch config)
VARIANTS = [
    ("Inductor-tuned on 2^16 groups (plans before)", 2**16, INDUCTOR_TUNED_OPTIONS, False),
    ("pinned XBLOCK=16, 2 warps (plans now)", 2**16, None, True),  # None: the plan's options
]


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def copy_ms(nbytes: float) -> float:
    """A device copy that reads and writes ``nbytes`` in all (the bandwidth ceiling)."""
    src = torch.empty(int(nbytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def flash_plan(name: str):
    """The plan flashcompile's optimizer ``name`` runs for a bf16 CUDA param (SGD with momentum)."""
    kw = {"momentum": 0.9} if name == "SGD" else {}
    opt = getattr(fc, name)([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16,
                                                            device="cuda"))], **kw)
    return plan_of(opt)


def compiled(plan, sample_groups: int, options: dict, pin: bool, code_path: Path | None):
    codes: list[str] = []
    before = live_autotuners()
    with mock.patch.object(GraphLowering, "save_output_code", codes.append), \
            torch._inductor.config.patch(force_disable_caches=True):
        fn = fresh_step(plan, functools.partial(torch.compile, fullgraph=True, dynamic=True,
                                                options=options or plan.compile_options()))
        with torch.no_grad():
            fn(*sample_inputs(plan, sample_groups, "cuda"))
    if pin:
        print(pin_group_kernels(t for k, t in live_autotuners().items()
                                if k not in before).describe(), flush=True)
    if code_path is not None:
        code_path.write_text("\n".join(codes))
    return fn, "\n".join(codes)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    names = sys.argv[2:] or ["AdamW", "SGD", "Lion", *FAMILY]
    out = Path(os.environ.get("OUT", ".")) / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        plan = flash_plan(name)
        ceiling = copy_ms(plan.bytes_moved_per_param(2.0) * n)
        for i, (label, sample, options, pin) in enumerate(VARIANTS):
            fn, code = compiled(plan, sample, options, pin, out / f"{name}.py" if i == 0 else None)
            args = sample_inputs(plan, n // GROUP, "cuda")
            with torch.no_grad():
                ms = time_ms(lambda: fn(*args))
            rows.append((name, label, count_kernels(code), plan.bytes_moved_per_param(2.0), ms,
                         100 * ceiling / ms))
            print(rows[-1], flush=True)
            del args
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {n} params, flat arena")
    print("| rule | compile | kernels | B/param | ms | % of copy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4g} | {r[4]:.3f} | {r[5]:.1f} |")


if __name__ == "__main__":
    main()
