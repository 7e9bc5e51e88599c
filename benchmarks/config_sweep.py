"""Launch-config landscape of each rule's one kernel: compile the plan, then time it at DRAM scale
for a grid of (XBLOCK, num_warps), next to the configs Inductor's own tuning picked. Uses Inductor
internals (CachingAutotuner), so it is a probe, not library code.

Usage: python benchmarks/config_sweep.py [N params, default 2^27] [Rule ...]"""

from __future__ import annotations

import functools
import sys

import torch
import triton

from family_probe import copy_ms, flash_plan, time_ms  # this folder: one timing method

from flashcompile.codecs import GROUP
from flashcompile.explain import fresh_step, sample_inputs
from flashcompile.launch import _launcher, live_autotuners
from flashcompile.plan import INDUCTOR_TUNED_OPTIONS

GRID = [(xb, w) for xb in (4, 8, 16, 32, 64, 128) for w in (1, 2, 4, 8)]


def compile_capturing(plan, options, sample):
    """Compile and first-call the plan; return the function and the kernels that appeared."""
    before = live_autotuners()
    with torch._inductor.config.patch(force_disable_caches=True):
        fn = fresh_step(plan, functools.partial(torch.compile, fullgraph=True, dynamic=True,
                                                options=options))
        with torch.no_grad():
            fn(*sample_inputs(plan, sample, "cuda"))
    return fn, [o for k, o in live_autotuners().items() if k not in before]


def describe(cfg) -> str:
    return f"XBLOCK={cfg.kwargs.get('XBLOCK')} warps={cfg.num_warps} stages={cfg.num_stages}"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    names = sys.argv[2:] or ["AdamW", "SGD", "NAdam", "Adadelta", "Adan"]
    summary = []
    for name in names:
        plan = flash_plan(name)
        ceiling = copy_ms(plan.bytes_moved_per_param(2.0) * n)
        args = sample_inputs(plan, n // GROUP, "cuda")
        fn, made = compile_capturing(plan, INDUCTOR_TUNED_OPTIONS, 2**16)
        with torch.no_grad():
            ms = time_ms(lambda: fn(*args))
        picked = describe(made[0].launchers[0].config) if made and made[0].launchers else "?"
        summary.append((name, f"Inductor tuned on 2^16 ({picked})", ms, 100 * ceiling / ms))
        print(summary[-1], flush=True)
        print(name, "autotuners", len(made), flush=True)
        tuner = made[0]  # sweep the same kernel; marked as tuned so it is not tuned again
        best = None
        for xb, w in GRID:
            cfg = triton.Config({"XBLOCK": xb}, num_warps=w, num_stages=1)
            cfg.found_by_coordesc = True
            try:
                launcher = _launcher(tuner, cfg)
            except Exception as e:  # noqa: BLE001 - a config the kernel cannot take
                print(name, xb, w, "failed", type(e).__name__, e, flush=True)
                continue
            tuner.launchers = [launcher]
            with torch.no_grad():
                t = time_ms(lambda: fn(*args))
            print(name, xb, w, f"{t:.3f} ms {100 * ceiling / t:.1f}%", flush=True)
            if best is None or t < best[0]:
                best = (t, xb, w)
        if best:
            summary.append((name, f"best of grid (XBLOCK={best[1]} warps={best[2]})", best[0],
                            100 * ceiling / best[0]))
        del args
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {n} params")
    print("| rule | config | ms | % of copy |\n|---|---|---|---|")
    for r in summary:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.1f} |")


if __name__ == "__main__":
    main()
