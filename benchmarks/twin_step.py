"""A step of flashcompile's twin of a torch.optim optimizer that is not element-wise (Muon,
Adafactor) against torch's own, on a workload's tensors (default GPT-2 124M; Muon takes its 2-D
ones only).

    python benchmarks/twin_step.py {muon,adafactor} [workload] [--steps 20] [--device cpu]

Per setup: step ms (median of CUDA-timed steps after warm-up, gradients fixed), bytes per
parameter the optimizer keeps (weight, its master copy and states; gradient excluded), and, for
flashcompile with fp32 codecs, the largest difference to torch.optim's weights after the same
steps; how many of flashcompile's timed steps replayed as one CUDA graph (per-tensor steps);
"held MiB": what the caching allocator holds after the timed steps beyond the params and gradients
(states, cached temporaries, a CUDA graph's private pool); "step MiB": the most the timed steps
allocated beyond what was allocated before them (their temporaries outside a graph); and "first
s": the first step's wall time (flashcompile compiles and checks its kernels there).
Setups: torch.optim's optimizer on fp32 params (its usual setting), on bf16 params; flashcompile's
with its defaults on bf16 params (weight split, 8-bit states), and with fp32 codecs on fp32
params. ``--device cpu``: wall-clock step times (the memory columns and graphs are CUDA's). There
the weights' difference is torch's: on the CPU its ``Tensor.norm`` of a 50257 x 768 fp32 matrix
(the RMS Adafactor scales by) was 0.27% off an fp64 one (torch 2.13), and torch.optim.Adafactor's
step 1.5e-4 off an fp64 run of it, flashcompile's 2.5e-7.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashcompile as fc
from flashcompile.tools.bench import load_workload


# name -> (torch.optim class, flashcompile class, arguments, matrices only)
TWINS = {"muon": (torch.optim.Muon, fc.Muon, {"lr": 0.02}, True),
         "adafactor": (torch.optim.Adafactor, fc.Adafactor, {"lr": 1e-2}, False)}


def make(name: str, setup: str, shapes, seed: int = 0, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if "bf16" in setup else torch.float32
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype))
              for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, device=device, generator=gen) * 1e-2).to(dtype)
    theirs, ours, options, _ = TWINS[name]
    if setup.startswith("torch"):
        return theirs(params, **options), params
    codecs = "fp32" if "fp32 codecs" in setup else "flash"
    return ours(params, codecs=codecs, **options), params


def kept_bytes(opt, params) -> float:
    seen = {p.data_ptr() for p in params}
    total = sum(p.numel() * p.element_size() for p in params)
    device = params[0].device
    for state in opt.state.values():
        for v in state.values():  # not the step counts (0-d, on the CPU beside CUDA params)
            if isinstance(v, torch.Tensor) and v.dim() and v.device == device and (
                    v.data_ptr() not in seen):
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    if getattr(opt, "_buckets", None):  # flat buffers hold the weights and states of the views
        total = sum(p.numel() * p.element_size() for p in params)
        for b in opt._buckets.values():
            total += sum(t.numel() * t.element_size() for t in b.fields.values())
    return total / sum(p.numel() for p in params)


def step_ms(opt, steps: int) -> float:
    times = []
    if not opt.param_groups[0]["params"][0].is_cuda:  # wall clock
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizer", choices=sorted(TWINS))
    parser.add_argument("workload", nargs="?", default="gpt2_124m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    name, matrices_only = args.optimizer, TWINS[args.optimizer][3]
    shapes = [tuple(s) for s in load_workload(args.workload)[1]
              if len(s) == 2 or not matrices_only]
    n = sum(torch.Size(s).numel() for s in shapes)
    card = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{card}, torch {torch.__version__}: {args.workload}'s "
          f"{len(shapes)} {'matrices' if matrices_only else 'tensors'}, {n / 1e6:.1f}M params")
    label = TWINS[name][1].__name__
    setups = [f"torch {label}, fp32 params", f"torch {label}, bf16 params",
              f"flashcompile {label}, bf16 params", f"flashcompile {label}, fp32 codecs"]
    rows = {}
    for setup in setups:
        if cuda:
            torch.cuda.empty_cache()
        opt, params = make(name, setup, shapes, device=args.device)
        if cuda:  # beyond the params and gradients
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        first = time.perf_counter()
        opt.step()  # compiles and verifies (flashcompile); the next two warm caches
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - first
        for _ in range(2):
            opt.step()
        graphs = getattr(opt, "_tensor_graphs", None)  # per-tensor steps replayed as a graph
        before = graphs.replays if graphs else 0
        if cuda:
            # the first steps compile and verify (a reference step beside the kernel); what a
            # training run keeps paying is the timed steps' peak over what is allocated after
            torch.cuda.synchronize()
            settled = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = step_ms(opt, args.steps)
        replayed = f"{graphs.replays - before}/{args.steps}" if graphs and cuda else "-"
        held = steady = float("nan")
        if cuda:
            steady = (torch.cuda.max_memory_allocated() - settled) / 2**20
            held = (torch.cuda.memory_reserved() - start) / 2**20
        rows[setup] = (ms, kept_bytes(opt, params), replayed, held, steady, first)
        del opt, params
    # tracking: the same steps from the same start, fp32 codecs against torch
    (ours, p1), (theirs, p2) = (make(name, setups[3], shapes, device=args.device),
                                make(name, setups[0], shapes, device=args.device))
    for _ in range(5):
        ours.step()
        theirs.step()
    diff = max((a - b).abs().max().item() for a, b in zip(p1, p2))
    base = rows[setups[0]][0]
    print(f"{'setup':<34} {'step ms':>8} {'vs torch fp32':>13} {'B/param kept':>12} "
          f"{'graph replays':>13} {'held MiB':>8} {'step MiB':>8} {'first s':>7}")
    for setup, (ms, kept, replayed, held, steady, first) in rows.items():
        print(f"{setup:<34} {ms:8.3f} {ms / base:13.2f} {kept:12.2f} {replayed:>13} {held:8.0f} "
              f"{steady:8.0f} {first:7.1f}")
    print(f"fp32 codecs vs torch.optim.{label} after 5 steps ({TWINS[name][2]}): max |diff| "
          f"{diff:.3g}")


if __name__ == "__main__":
    main()
