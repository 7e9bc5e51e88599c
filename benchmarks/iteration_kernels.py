"""Which kernels one training iteration launches, and their GPU time (torch.profiler).

    python benchmarks/iteration_kernels.py [--model gpt2] [--setup flash] [--top 25]

Trains the model as ``flashcompile train-bench`` does (same models, setups and data), profiles the
last of a few iterations and prints kernels by total GPU time with their launch counts: where an
iteration's time goes beyond the forward's and backward's matrix products (casts, gradient copies,
clipping, the step).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from flashcompile.tools.train_bench import CLIP, SETUPS, _cast
from flashcompile.tools.train_models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--setup", default="flash")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    spec, setup = MODELS[args.model], SETUPS[args.setup]
    torch.manual_seed(0)
    model = _cast(spec.build().cuda(), setup.cast)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, handle = setup.prepare(model, setup.release)
    data = spec.batch(torch.Generator().manual_seed(0), torch.device("cuda"), spec.default_batch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=setup.cast == "fp32")

    def iteration():
        with autocast:
            loss = spec.loss(model, data)
        loss.backward()
        if handle is None and setup.torch_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        elif handle is None:
            opt.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(4):
        iteration()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        iteration()
    host_done = time.perf_counter()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10 * 1e3
    host = (host_done - t0) / 10 * 1e3  # the host's own pace while the GPU queue had room
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        iteration()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time_total / 1e3
    total = sum(v[1] for v in kernels.values())
    print(f"{args.model} / {args.setup}: {sum(v[0] for v in kernels.values())} kernels, "
          f"{total:.2f} ms GPU time in one iteration; 10 iterations back to back: {wall:.2f} ms "
          f"each, the host done after {host:.2f} ms each (wall well above the GPU time and near "
          f"the host's: host-bound)")
    for name, (count, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{ms:8.3f} ms {count:5d}x  {name}")


if __name__ == "__main__":
    main()
