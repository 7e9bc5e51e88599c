"""Device probe: copy bandwidth, torch fused AdamW, and the flash AdamW plan over one flat arena.

Usage (on a CUDA machine): python benchmarks/probe_kernel.py [--out DIR]
Prints a table; writes the Inductor Triton source of the plan to DIR/adamw_flash_triton.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.codecs import GROUP
from flashcompile.explain import count_kernels, inductor_source, plan_of

WORKLOADS = Path(fc.__file__).parent / "workloads"


def cuda_time(fn, reps=50, warmup=5) -> float:
    """Median ms of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e9  # TB/s, read + write


def shapes_of(name):
    return [tuple(s) for s in json.loads((WORKLOADS / f"{name}.json").read_text())["shapes"]]


def torch_fused(shapes):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, fused=True)
    ms = cuda_time(opt.step)
    del opt, params
    return ms


def flash_arena(n, rows):
    """The AdamW flash plan over one flat arena of n params (n a multiple of 32)."""
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))])
    plan = plan_of(opt)
    g = n // GROUP
    s = torch.tensor([GROUP, *plan.scalars(3, {k: opt.defaults[k] for k in plan.traced.hyper})],
                     device="cuda")
    args = [s, torch.randn(g, GROUP, device="cuda").bfloat16()]
    for name, codec in plan.codecs.items():
        x = torch.randn(g, GROUP, device="cuda")
        x = x.abs() if codec.domain == "nonnegative" or name == "exp_avg_sq" else x
        args += [t.contiguous() for t in codec.encode(x)]
    t0 = time.perf_counter()
    plan.fn(*args)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = cuda_time(lambda: plan.fn(*args))
    rows.append((f"flash arena {n / 1e6:.0f}M", ms, 12.25 * n / ms / 1e9, first))
    return plan


def flash_per_tensor(shapes, rows, label):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16()) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fc.AdamW(params)
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = cuda_time(opt.step, reps=10, warmup=2)
    n = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    for _ in range(5):
        opt.step()
    host = (time.perf_counter() - t0) / 5 * 1e3
    rows.append((f"flash per-tensor {label}", ms, 12.25 * n / ms / 1e9, first))
    rows.append((f"  (host ms/step, no sync) {label}", host, 0.0, 0.0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    bw = copy_bandwidth()
    rows.append(("copy bandwidth TB/s", 0.0, bw * 1e3, 0.0))
    for w in ("single_268m", "gpt2_124m"):
        shapes = shapes_of(w)
        n = sum(torch.Size(s).numel() for s in shapes)
        rows.append((f"torch fused AdamW {w}", torch_fused(shapes), 28 * n / torch_fused(shapes) / 1e9, 0.0))
    plan = flash_arena(268435456, rows)
    flash_arena(124439808 // 32 * 32, rows)
    flash_per_tensor(shapes_of("gpt2_124m"), rows, "gpt2")
    code = "\n".join(inductor_source(plan, "cuda", groups=2**16))
    Path(args.out, "adamw_flash_triton.py").write_text(code)
    print(f"kernels in flash AdamW plan: {count_kernels(code)}")
    print(f"{'what':<40} {'ms':>8} {'GB/s':>8} {'first s':>8}")
    for name, ms, gbs, first in rows:
        print(f"{name:<40} {ms:8.3f} {gbs:8.0f} {first:8.2f}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
