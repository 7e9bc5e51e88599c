"""Host cost of the per-tensor path: ``opt.step()`` over many small params, one launch each.

    python benchmarks/per_tensor_host.py [--device cpu|cuda] [--params 300] [--numel 1000]

Per param and step: torch.optim.AdamW(foreach=False) (the single-tensor baseline) beside
flashcompile's AdamW with ``flat=False``: fp32 codecs on fp32 params (torch's math and storage),
the default flash codecs on bf16 params, and the paper's codecs on bf16 params (``codecs="paper"``,
the default before the adaptive codecs, whose kernel computes two codes per group). Setups alternate round by round (noisy shared machines);
the figure is the median over rounds of the mean step time. On CUDA "host" is the time ``step()``
takes to return (work still queued), "synced" includes waiting for the GPU; flashcompile's steps
replay one CUDA graph of the launches from the third step on (the gradients stay where they are,
as in a training loop; flashcompile.runtime.tensor_graph), "replayed" says how many did.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashcompile as fc


def make(setup: str, device: str, count: int, numel: int):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if setup.startswith(("flash AdamW (bf16", "bf16 ")) else torch.float32
    params = [torch.nn.Parameter(torch.randn(numel, device=device, dtype=dtype))
              for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    if setup == "torch AdamW (foreach=False)":
        return torch.optim.AdamW(params, foreach=False)
    codecs = {"flash AdamW (fp32 codecs)": "fp32",
              "flash AdamW (bf16, paper codecs)": "paper"}.get(setup, "flash")
    if setup.startswith("bf16 "):  # --codecs: a state=codec,... mapping
        codecs = dict(item.split("=") for item in setup[len("bf16 "):].split(","))
    return fc.AdamW(params, codecs=codecs, flat=False)


def round_ms(opt, steps: int, sync: bool) -> float:
    device = opt.param_groups[0]["params"][0].device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if sync and device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=int, default=300)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--codecs", nargs="*", default=[], metavar="STATE=CODEC,...",
                        help="more bf16 setups, each a codec mapping, e.g. "
                             "exp_avg_sq=sqrt_adaptive,exp_avg=softsign_adaptive")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the flash fp32 setup's host time goes (cProfile)")
    args = parser.parse_args()
    setups = ["torch AdamW (foreach=False)", "flash AdamW (fp32 codecs)",
              "flash AdamW (bf16 params)", "flash AdamW (bf16, paper codecs)",
              *(f"bf16 {mapping}" for mapping in args.codecs)]
    opts = {s: make(s, args.device, args.params, args.numel) for s in setups}
    for opt in opts.values():  # compile, verify, warm caches
        round_ms(opt, 3, True)
    cuda = args.device.startswith("cuda")
    host = {s: [] for s in setups}
    synced = {s: [] for s in setups}
    for _ in range(args.rounds):
        for s, opt in opts.items():
            host[s].append(round_ms(opt, args.steps, False))
            if cuda:
                synced[s].append(round_ms(opt, args.steps, True))
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(round_ms, opts[setups[1]], args.steps, False)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
    base = statistics.median(host[setups[0]])
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{where}, torch {torch.__version__}: {args.params} params of {args.numel} elements, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    width = max(30, *(len(s) for s in setups))
    print(f"{'setup':<{width}} {'step ms':>8} {'us/param':>9} {'vs torch':>9}"
          + (f" {'synced us/param':>16}" if cuda else ""))
    for s in setups:
        ms = statistics.median(host[s])
        line = f"{s:<{width}} {ms:8.3f} {ms * 1e3 / args.params:9.1f} {ms / base:9.2f}"
        if cuda:
            line += f" {statistics.median(synced[s]) * 1e3 / args.params:16.1f}"
            graphs = getattr(opts[s], "_tensor_graphs", None)
            line += f"  replayed {graphs.replays}" if graphs is not None else ""
        print(line)


if __name__ == "__main__":
    main()
