"""Where a flash plan's step time goes: each rule's plan (as the optimizer compiles and pins it) over
one flat arena of N params, its kernels timed by the profiler, with the copy ceiling of its bytes.

Usage: python benchmarks/kernel_profile.py [N params, default 2^27] [Rule ...]

One step of each rule runs inside an NVTX range named ``measure`` (for ``ncu --nvtx-include
measure/``, see ``counters.sh``). With ``KERNEL_DUMP=dir`` set, the Triton cache entries each rule's
compile adds (cubin, PTX, TTGIR) are copied to ``dir/<rule>``: plans compile in-process, so the new
entries are that rule's kernels."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from family_probe import copy_ms, flash_plan, time_ms
from torch.profiler import ProfilerActivity, profile

from flashcompile.codecs import GROUP
from flashcompile.compiler.verify import sample_inputs


def triton_cache_entries() -> set[Path]:
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return set(root.iterdir()) if root.is_dir() else set()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    dump = os.environ.get("KERNEL_DUMP")
    for name in sys.argv[2:] or ["AdamW", "LAMB", "LARS"]:
        plan = flash_plan(name)
        args = sample_inputs(plan, n // GROUP, "cuda")
        before = triton_cache_entries()
        plan.verify(torch.device("cuda"))  # compile and pin as the optimizer does
        if dump:
            for entry in triton_cache_entries() - before:
                shutil.copytree(entry, Path(dump) / name / entry.name)
        ms = time_ms(lambda: plan.fn(*args))
        ceiling = copy_ms(plan.bytes_moved_per_param(2.0) * n)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                plan.fn(*args)
            torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("measure")
        plan.fn(*args)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"\n{name}: {ms:.3f} ms per step, {100 * ceiling / ms:.1f}% of copy "
              f"({plan.bytes_moved_per_param(2.0):.4g} B/param); {plan.launch.describe()}")
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
            print(f"  {e.self_device_time_total / 10 / 1000:7.3f} ms x{e.count // 10}  {e.key[:110]}")
        del args
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
