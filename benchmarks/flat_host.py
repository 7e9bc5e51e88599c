"""Host cost of a flat step: the checks ``opt.step()`` runs per param before its one launch.

    python benchmarks/flat_host.py [--device cpu|cuda] [--workload odd_sizes] [--numel 64]

Params have the workload's count (987 for ``odd_sizes``) but ``--numel`` values each, so the
kernel is negligible and what is left is host work per param: ``Bucket.intact`` (weights still in
the buffer, states unchanged), the untouched-gradient check of ``zero_grad(set_to_none=True)``
and the gradient-pointer check. Gradients are written in place after ``zero_grad()``, as a
backward does. Prints the median over rounds of each check alone and of the whole ``step()``
(CUDA: the time until it returns, the launch still queued).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashcompile as fc
from flashcompile.tools.bench import load_workload


def per_call_us(fn, calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", default="odd_sizes")
    parser.add_argument("--numel", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    _, shapes = load_workload(args.workload)
    params = [torch.nn.Parameter(torch.randn(args.numel, device=args.device).bfloat16())
              for _ in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fc.AdamW(params, flat=True)
    opt.step()
    opt.zero_grad()
    for p in params:
        p.grad.add_(1.0)  # as a backward accumulates: in place, each version counter moves
    opt.step()
    (bucket,) = opt._buckets.values()
    grads = [p.grad for p in params]
    checks = {
        "intact": bucket.intact,
        "untouched-gradient check": lambda: bucket.drop_untouched_grads(grads),
        "gradient pointers": lambda: bucket._grads_now(grads),
        "whole step()": opt.step,
    }
    results = {name: [] for name in checks}
    for _ in range(args.rounds):
        for name, fn in checks.items():
            results[name].append(per_call_us(fn, args.calls, args.device))
    print(f"{len(params)} params of {args.numel} values, {args.device}, torch {torch.__version__}")
    for name, times in results.items():
        us = statistics.median(times)
        print(f"{name:<26} {us:9.1f} us  ({us / len(params) * 1e3:6.1f} ns per param)")


if __name__ == "__main__":
    main()
