"""Launch-config landscape of each rule's group kernel, compiled as the optimizer compiles it (fast
math, fused multiply-adds, pinned): time it at DRAM scale for a grid of (XBLOCK, num_warps) and,
on the pinned line, register caps (``maxnreg``: more warps resident per SM at the price of spills).
Uses Inductor internals (CachingAutotuner), so it is a probe, not library code.

Usage: python benchmarks/config_sweep.py [N params, default 2^27] [Rule ...]"""

from __future__ import annotations

import sys

import torch
import triton
from family_probe import copy_ms, flash_plan, time_ms  # this folder: one timing method

from flashcompile.codecs import GROUP
from flashcompile.compiler.launch import _launcher, live_autotuners
from flashcompile.compiler.verify import sample_inputs

# (XBLOCK, warps, maxnreg): lanes per thread 8, 16 and 4; then register caps at 16 and 8 lanes per
# thread, for kernels whose registers limit the warps resident per SM (AdEMAMix: 149 at 16/1, 13
# warps per SM; 128 gives 16, 96 gives 21). Caps that "changed nothing" on an H200 before
# 2026-12-07 never reached Triton: Inductor dropped a Config's maxnreg (launch._launcher adds it).
GRID = [(xb, w, None) for xb, w in ((8, 1), (16, 2), (32, 4), (16, 1), (32, 2), (8, 2), (16, 4))]
GRID += [(16, 1, 128), (16, 1, 96), (32, 2, 128), (32, 2, 96), (8, 1, 80)]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    names = sys.argv[2:] or ["AdamW", "Adan", "AdEMAMix", "Rprop"]
    summary, bests = [], {}
    for name in names:
        plan = flash_plan(name)
        ceiling = copy_ms(plan.bytes_moved_per_param(2.0) * n)
        args = sample_inputs(plan, n // GROUP, "cuda")
        before = live_autotuners()
        plan.verify(torch.device("cuda"))  # compile and pin as the optimizer does
        made = [t for k, t in live_autotuners().items() if k not in before and t.launchers]
        ms = time_ms(lambda a=args: plan.fn(*a))
        summary.append((name, f"as pinned ({plan.launch.describe()})", ms, 100 * ceiling / ms))
        print(summary[-1], flush=True)
        best = None
        for tuner in made[:1]:
            for xb, w, regs in GRID:
                cfg = triton.Config({"XBLOCK": xb}, num_warps=w, num_stages=1)
                cfg.found_by_coordesc = True
                try:
                    tuner.launchers = [_launcher(tuner, cfg, maxnreg=regs)]
                except Exception as e:  # noqa: BLE001 - a config the kernel cannot take
                    print(name, xb, w, regs, "failed", type(e).__name__, e, flush=True)
                    continue
                t = time_ms(lambda a=args: plan.fn(*a))
                used = getattr(tuner.launchers[0], "n_regs", "?")  # the cap reached Triton?
                print(name, xb, w, regs, f"{t:.3f} ms {100 * ceiling / t:.1f}%", f"{used} regs",
                      f"{getattr(tuner.launchers[0], 'n_spills', '?')} spills", flush=True)
                if best is None or t < best[0]:
                    best = (t, xb, w, regs)
                if regs is None and (plan.key.rule.name not in bests
                                     or t < bests[plan.key.rule.name][0]):
                    bests[plan.key.rule.name] = (t, xb, w)
        if best:
            summary.append((name, f"best (XBLOCK={best[1]} warps={best[2]} maxnreg={best[3]})",
                            best[0], 100 * ceiling / best[0]))
        del args
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {n} params")
    print("| rule | config | ms | % of copy |\n|---|---|---|---|")
    for r in summary:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.1f} |")
    # the best config per rule without register caps, as flashcompile.compiler.launch reads it
    print("FLASHCOMPILE_LAUNCH=" + ",".join(f"{k}={xb}/{w}" for k, (_, xb, w) in bests.items()))


if __name__ == "__main__":
    main()
