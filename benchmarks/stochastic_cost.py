"""What stochastic rounding costs in the step: AdamW's kernel over one flat arena with the flash
codecs, with v rounded stochastically, and under the "relative" preset (m and v), each checked
compiled-vs-eager first (``plan.verify`` warns on a mismatch) and timed against a copy of its bytes.
The flash row runs first and last: the spread between them is the run's noise.

Usage (CUDA): python benchmarks/stochastic_cost.py [N params, default 2^27]"""

from __future__ import annotations

import sys
import warnings

import torch
from family_probe import copy_ms, time_ms  # this folder: one timing method

import flashcompile as fc
from flashcompile.codecs import GROUP
from flashcompile.compiler.explain import plan_of
from flashcompile.compiler.verify import sample_inputs

SETUPS = [("flash", "flash"), ("flash, v sqrt_uint8_sr", {"exp_avg_sq": "sqrt_uint8_sr"}),
          ("relative (m and v stochastic)", "relative"), ("flash again", "flash")]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**27
    print(f"{torch.cuda.get_device_name()}, AdamW, {n} params")
    for label, codecs in SETUPS:
        p = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))
        plan = plan_of(fc.AdamW([p], codecs=codecs))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan.verify(torch.device("cuda"))
        bad = [str(w.message) for w in caught if "disagrees" in str(w.message)]
        args = sample_inputs(plan, n // GROUP, "cuda")
        ms = time_ms(lambda a=args: plan.fn(*a))
        ceiling = copy_ms(plan.bytes_moved_per_param(2.0) * n)
        check = f"verify FAILED: {bad[0][:200]}" if bad else "compiled == eager"
        print(f"{label}: {ms:.3f} ms, {100 * ceiling / ms:.1f}% of copy; {check}", flush=True)
        del args
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
