"""Memory an optimizer step takes beyond what stays allocated: the first step (which builds the
state) and a later one, in bytes per parameter, next to the state it keeps, for one large
parameter and for a model-like list. torch's fused AdamW (fp32 states) is the baseline.

A transient of T B/param means a parameter of N elements needs N x T bytes free for a moment: on a
2^32-element parameter (PyTorch's large-tensor tests) 10 B/param is 40 GiB.

Usage (CUDA): python benchmarks/step_memory.py [N params, default 2^28]"""

from __future__ import annotations

import sys

import torch

import flashcompile as fc

SETUPS = [
    ("torch AdamW fused, fp32 states", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ("flashcompile AdamW flash, flat", lambda ps: fc.AdamW(ps)),
    ("flashcompile AdamW flash, per-tensor", lambda ps: fc.AdamW(ps, flat=False)),
    ("flashcompile AdamW fp32 codecs, flat", lambda ps: fc.AdamW(ps, codecs="fp32")),
    ("flashcompile AdamW fp32 codecs, per-tensor",
     lambda ps: fc.AdamW(ps, codecs="fp32", flat=False)),
]
LISTS = {"one param": lambda n: [n], "64 params": lambda n: [n // 64 + 7] * 64}


def measure(make, sizes: list[int]) -> tuple[float, float, float]:
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16, device="cuda"))
              for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(sizes)
    opt = make(params)
    torch.cuda.synchronize()
    transients = []
    for _ in range(3):  # the first step builds the state; the third is a steady one
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        transients.append((torch.cuda.max_memory_allocated() - before) / n)
    kept = (torch.cuda.memory_allocated() - 4 * n) / n  # less the bf16 weights and grads
    del opt, params
    torch.cuda.empty_cache()
    return transients[0], transients[2], kept


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**28
    # compile each setup on a small param first: compile-time allocations are not the step's
    for _, make in SETUPS:
        measure(make, [4096, 1000])
    print(f"{torch.cuda.get_device_name()}, bf16 params, {n} elements in all")
    print("| setup | list | first step B/param | later step B/param | kept B/param |")
    print("|---|---|---|---|---|")
    for label, make in SETUPS:
        for kind, sizes in LISTS.items():
            first, later, kept = measure(make, sizes(n))
            print(f"| {label} | {kind} | {first:.2f} | {later:.2f} | {kept:.2f} |", flush=True)


if __name__ == "__main__":
    main()
