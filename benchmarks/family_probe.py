"""Time each family rule's flash plan alone over one flat arena against a copy of the same bytes, and
write Inductor's code per rule to $OUT/kernels (kernel count, reduction kind, line count).

Usage: python benchmarks/family_probe.py [N params, default 2^27] [Rule ...]"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from unittest import mock

import torch
from torch._inductor.graph import GraphLowering

import flashcompile as fc
from flashcompile.bench import FAMILY
from flashcompile.codecs import GROUP
from flashcompile.explain import count_kernels, plan_of, sample_inputs


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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    names = sys.argv[2:] or ["AdamW", "SGD", "Lion", *FAMILY]
    out = Path(os.environ.get("OUT", ".")) / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        kw = {"momentum": 0.9} if name == "SGD" else {}
        opt = getattr(fc, name)([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16,
                                                                device="cuda"))], **kw)
        plan = plan_of(opt)
        if plan.reduces:
            continue  # LAMB / LARS: per-tensor reductions, timed by the bench
        codes: list[str] = []
        with mock.patch.object(GraphLowering, "save_output_code", codes.append):
            fn = torch.compile(plan.eager, fullgraph=True, dynamic=True,
                               options=plan.compile_options())
            with torch.no_grad():
                fn(*sample_inputs(plan, 65536, "cuda"))
        code = "\n".join(codes)
        (out / f"{name}.py").write_text(code)
        args = sample_inputs(plan, n // GROUP, "cuda")
        with torch.no_grad():
            ms = time_ms(lambda: fn(*args))
        moved = plan.bytes_moved_per_param(2.0) * n
        src = torch.empty(int(moved // 2), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src))
        kinds = sorted(set(re.findall(r"@triton_heuristics\.(\w+)", code)))
        rows.append((name, count_kernels(code), ",".join(kinds), len(code.splitlines()),
                     plan.bytes_moved_per_param(2.0), ms, 100 * copy_ms / ms))
        del args, src, dst
        torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, {n} params, flat arena")
    print("| rule | kernels | kind | lines | B/param | ms | % of copy |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.4g} | {r[5]:.3f} | {r[6]:.1f} |")


if __name__ == "__main__":
    main()
