"""Is the chars SGD gap the codecs or the recipe? fp32 and flash SGD on the GPU-sized character
transformer per (lr, clip) config, 3 seeds, plus fp32 SGD started from the bf16-rounded weights (the
flash runs' start). Prints the worst loss logged during warmup (the spike) and the final losses.

Usage: python benchmarks/sgd_stability.py [recipe|parts] [steps]"""

from __future__ import annotations

import sys
import warnings

import torch

import flashcompile as fc
from flashcompile.tools.studies import tasks
from flashcompile.tools.studies.convergence import train

SETS = {  # name -> [(label, lr, clip, model, optimizer)]
    # the recipe: is lr 0.2 itself fragile (fp32 from the bf16-rounded start), does clipping or a
    # smaller lr make fp32 and flash agree?
    "recipe": [
        ("fp32, bf16-rounded init, lr 0.2", 0.2, None, "rounded", "torch"),
        ("fp32, lr 0.2, clip 1", 0.2, 1.0, "fp32", "torch"),
        ("flash, lr 0.2, clip 1", 0.2, 1.0, "bf16", "flash"),
        ("fp32, lr 0.1", 0.1, None, "fp32", "torch"),
        ("flash, lr 0.1", 0.1, None, "bf16", "flash"),
    ],
    # with clipping, which part of flash SGD moves the result: bf16 compute, the bf16 weights, the
    # 8-bit momentum or the compiled flat path?
    "parts": [
        ("torch, bf16 weights, clip 1", 0.2, 1.0, "bf16", "torch"),
        ("torch, fp32 weights, bf16 autocast, clip 1", 0.2, 1.0, "autocast", "torch"),
        ("flashcompile fp32 codecs, fp32 model, clip 1", 0.2, 1.0, "fp32", "fp32 codecs"),
        ("int8 momentum, fp32 model, clip 1", 0.2, 1.0, "fp32", "flash"),
        ("flash, fp32 momentum, clip 1", 0.2, 1.0, "bf16", "fp32 momentum"),
    ],
}


def make_model(base: torch.nn.Module, init: str) -> torch.nn.Module:
    if init == "autocast":
        base.forward = torch.autocast("cuda", dtype=torch.bfloat16)(base.forward)
        return base
    if init == "bf16":
        return base.to(torch.bfloat16)
    if init == "rounded":
        return base.to(torch.bfloat16).float()
    return base  # "fp32" (a dict of all three would cast base in place before picking)


def make_optimizer(params, kind: str, lr: float, on_cuda: bool):
    if kind == "torch":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    codecs = {"flash": "flash", "fp32 codecs": "fp32",
              "fp32 momentum": {"momentum_buffer": "fp32"}}[kind]
    return fc.SGD(params, lr=lr, momentum=0.9, codecs=codecs, compile=on_cuda, flat=True)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "recipe"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = tasks.chars(device, **(tasks.GPU_SIZES["chars"] if device == "cuda" else {}))
    rows = []
    for name, lr, clip, init, kind in SETS[which]:
        for seed in range(3):
            torch.manual_seed(seed)
            model = make_model(task.make_model(), init)
            opt = make_optimizer(model.parameters(), kind, lr, device == "cuda")
            curve, tail = train(task, model, opt, steps, seed, max(1, steps // 100), clip)
            spike = max(v for s, v in curve if s <= steps // 10)
            test, acc = task.evaluate(model)
            rows.append((name, seed, spike, tail, test, acc))
            print(rows[-1], flush=True)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{card}, chars, {steps} steps, momentum 0.9")
    print("| config | seed | worst warmup loss | train loss | test loss | accuracy % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} |")


if __name__ == "__main__":
    main()
