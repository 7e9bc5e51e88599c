"""Why ``flashcompile bench`` reads a few points of copy bandwidth under ``kernel_profile.py``: the
same optimizer step as ``bench`` builds it, split into what its time is made of.

For each optimizer on a workload it prints: the step as bench times it (triton's do_bench, L2
flushed between calls), the same step timed back to back with events (no flush, host time of one
call hidden behind the previous), each CUDA kernel of one step (profiler), and the copy ceiling
both ways: bench's (one 2 GiB fp32 copy) and kernel_profile's (a copy of the step's own bytes).

Usage: python benchmarks/bench_split.py [workload, default llama8b_4layers] [optimizer ...]
(optimizer names as ``bench`` takes them: adamw_flash nadam_flash ...)"""

from __future__ import annotations

import sys

import torch
from family_probe import copy_ms, time_ms  # this folder: one timing method
from torch.profiler import ProfilerActivity, profile

from flashcompile.compiler.explain import plan_of
from flashcompile.tools import bench


def main() -> None:
    workload = sys.argv[1] if len(sys.argv) > 1 else "llama8b_4layers"
    names = sys.argv[2:] or ["adamw_flash", "nadam_flash", "rprop_flash"]
    _, shapes = bench.load_workload(workload)
    device = torch.device("cuda")
    specs = {**bench.OPTIMIZERS, **bench.EXTRA}
    bench_copy = bench.copy_gbps(device)
    print("| optimizer | bench ms | back-to-back ms | kernels ms | group kernels ms | B/param | "
          "% of copy: bench | same-bytes copy | kernels vs same-bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        dtype, make, _ = specs[name]
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype))
                  for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype) * 1e-3
        opt = make(params)
        opt.step()
        bench._as_after_backward(params, opt)
        for _ in range(3):
            opt.step()
        ms_bench = bench._median_ms(opt.step, device, 20)
        ms_events = time_ms(opt.step)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                opt.step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        kernels = sum(e.self_device_time_total for e in events) / 5 / 1000
        group = sum(e.self_device_time_total for e in events if "triton_per" in e.key) / 5 / 1000
        moved = plan_of(opt).bytes_moved_per_param(2.0)
        n = sum(p.numel() for p in params)
        same = copy_ms(moved * n)
        pct_bench = 100 * moved * n / ms_bench / 1e6 / bench_copy
        print(f"| {name} | {ms_bench:.3f} | {ms_events:.3f} | {kernels:.3f} | {group:.3f} | "
              f"{moved:.3f} | {pct_bench:.1f} | {100 * same / ms_events:.1f} | "
              f"{100 * same / kernels:.1f} |", flush=True)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:6]:
            print(f"    {e.self_device_time_total / 5 / 1000:7.3f} ms x{e.count // 5}  {e.key[:100]}")
        del opt, params
        torch.cuda.empty_cache()
    print(f"bench's copy ceiling: {bench_copy:.0f} GB/s; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
