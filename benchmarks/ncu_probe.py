"""Run the flash AdamW plan over one flat arena a few times (for ncu), optionally with Inductor
options given as JSON. Usage: python benchmarks/ncu_probe.py [N] ['{"coordinate_descent_tuning": true}']"""

from __future__ import annotations

import json
import sys
import time

import torch

import flashcompile as fc
from flashcompile.codecs import GROUP
from flashcompile.compiler.explain import plan_of
from flashcompile.compiler.plan import COMPILE_OPTIONS
from flashcompile.compiler.verify import sample_inputs


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**28
    options = {**COMPILE_OPTIONS, **(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})}
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))])
    plan = plan_of(opt)
    fn = torch.compile(plan.eager, fullgraph=True, dynamic=True, options=options)
    args = sample_inputs(plan, n // GROUP, "cuda")
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(3):
        fn(*args)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        fn(*args)
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / 20
    print(f"options {json.dumps(options)}: {ms:.3f} ms, {12.25 * n / ms / 1e9:.0f} GB/s, first {first:.1f} s")


if __name__ == "__main__":
    main()
