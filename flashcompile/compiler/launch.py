"""Pin the launch configuration of a plan's group kernel on CUDA.

A flash plan compiles to one Triton persistent reduction over rows of 32 lanes (one group each). Its
speed depends almost only on rows per thread: measured on an H200 over 134M params
(``benchmarks/config_sweep.py``), every (XBLOCK, num_warps) with XBLOCK = 8 x num_warps (a warp
covers 8 rows, 8 lanes per thread) sits within a few percent of the best, and configs off that line
lose up to 30x. Inductor's own tuning times candidates on the sample the plan first compiles on,
which fits in L2, and picked XBLOCK=32/1 warp for AdamW (39% of copy bandwidth against 82%),
XBLOCK=1/2 warps for Adan (13% against 61%), XBLOCK=4/1 warp for SGD (51% against 101%), and
different configs from run to run. So the plan compiles without coordinate-descent tuning and then
pins one config on that line: :data:`CONFIGS` per rule where a sweep of the whole family found one
better than the default, :data:`XBLOCK` / :data:`NUM_WARPS` otherwise. On another card, set
``FLASHCOMPILE_LAUNCH="adam=8/1,rprop=32/2"`` (rule name = XBLOCK/num_warps) before the first step.

This reaches into Inductor's runtime (``CachingAutotuner``): where that API differs, nothing is
pinned and Inductor's choice stands (:attr:`Pin.pinned` says which).
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from dataclasses import dataclass

from flashcompile.compiler import fast_math

XBLOCK, NUM_WARPS = 16, 2  # on the XBLOCK = 8 x num_warps line; best or within 5% for all rules
GROUP_LANES = 32
# rule name -> (XBLOCK, num_warps) where it beat the default on an H200 (benchmarks/config_sweep.py
# over 134M params, 2026-12-04; % of copy bandwidth, default -> this), ADOPT's on an H100 with the
# adaptive codecs (2026-12-06, docs/results/config_sweep_adaptive_h100.txt). Not named here: SGD,
# Lion, Adagrad, ASGD and LARS (not swept with today's kernels). LAMB, CautiousAdamW and MARS ran
# at the same speed at every config on that H100; they take AdamW's sixteen lanes per thread for
# its instruction count: both passes' group kernels, SASS per element, 8 -> 16 lanes (offline,
# benchmarks/sass_offline.py --rules): LAMB 180 -> 154, CautiousAdamW 160 -> 135, MARS 144 -> 124
CONFIGS: dict[str, tuple[int, int]] = {
    "adam": (32, 2),  # AdamW 95.4 -> 99.1
    "nadam": (16, 1),  # 95.1 -> 98.9
    "rprop": (32, 2),  # 84.9 -> 86.8
    "adan": (8, 1),  # 83.5 -> 91.0
    "ademamix": (8, 1),  # H100, slow EMA in bf16 (2026-12-07, 2^27 params): 91.7 at 16/1 -> 98.7
    "adamax": (16, 1),  # 94.6 -> 97.9
    "rmsprop": (16, 1),  # 92.4 -> 97.3
    "radam": (16, 1),  # 93.7 -> 96.1
    "adadelta": (16, 1),  # 94.9 -> 100.0
    "adopt": (32, 2),  # H100: 83.8 -> 93.2
    "lamb": (32, 2),
    "cautious_adamw": (32, 2),
    "mars": (32, 2),
}
ENVIRONMENT = "FLASHCOMPILE_LAUNCH"


def config_for(rule: str) -> tuple[int, int]:
    """(XBLOCK, num_warps) for ``rule``'s group kernel: :envvar:`FLASHCOMPILE_LAUNCH`, then
    :data:`CONFIGS`, then the default."""
    return _overrides().get(rule, CONFIGS.get(rule, (XBLOCK, NUM_WARPS)))


def _overrides() -> dict[str, tuple[int, int]]:
    text = os.environ.get(ENVIRONMENT, "").strip()
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            name, config = item.split("=")
            xblock, warps = (int(v) for v in config.split("/"))
        except ValueError:
            raise ValueError(f"{ENVIRONMENT}: {item!r} is not rule=XBLOCK/num_warps "
                             "(e.g. adam=8/1)") from None
        if xblock < 1 or warps < 1 or xblock & (xblock - 1) or warps & (warps - 1):
            raise ValueError(f"{ENVIRONMENT}: {item!r}: XBLOCK and num_warps are powers of two")
        out[name.strip()] = (xblock, warps)
    for name in out:
        _warn_if_unknown(name)
    return out


@functools.cache  # once per name and process
def _warn_if_unknown(name: str) -> None:
    """Keys are rule names (``adam``), not optimizer names (``AdamW``): a key no shipped rule has
    may be a typo, or a rule of the user's own, which it still reaches."""
    from flashcompile.rules import RULES  # the shipped rules (imports the DSL: not at load)

    shipped = sorted(rule.name for rule in RULES.values())
    if name not in shipped:
        warnings.warn(f"{ENVIRONMENT}: no shipped rule is called {name!r} (keys are rule names: "
                      f"{', '.join(shipped)}); only a rule of your own by that name takes it",
                      RuntimeWarning, stacklevel=4)


@dataclass
class Pin:
    pinned: int = 0  # group kernels that now launch with ``config``
    skipped: str = ""  # why a kernel kept Inductor's config
    config: tuple[int, int] = (XBLOCK, NUM_WARPS)

    def describe(self) -> str:
        if self.pinned:
            fma = ", fused multiply-adds" if fast_math.enabled() else ""
            xblock, warps = self.config
            return f"XBLOCK={xblock}, num_warps={warps}{fma} pinned on {self.pinned} kernel(s)"
        return f"Inductor's launch config ({self.skipped or 'no group kernel found'})"


def _autotuner_type():
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return None
    return CachingAutotuner


def live_autotuners() -> dict[int, object]:
    """Inductor kernel objects alive now, by id. Found through gc because kernels compiled in worker
    processes arrive unpickled; ``type()`` because gc also holds dead weak proxies."""
    cls = _autotuner_type()
    if cls is None:
        return {}
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), cls)}


def _is_group_kernel(tuner) -> bool:
    hints = getattr(tuner, "size_hints", None) or {}
    name = (getattr(tuner, "inductor_meta", None) or {}).get("kernel_name", "")
    lanes = hints.get("r0_", hints.get("r"))
    return name.startswith("triton_per_") and lanes == GROUP_LANES and "y" not in hints


def _launcher(tuner, config, maxnreg: int | None = None):
    """A launcher for ``config`` on ``tuner``'s kernel; ``maxnreg`` caps its registers per thread
    (more warps resident per SM, perhaps at the price of spills)."""
    if getattr(tuner, "fn", None) is None:
        raise RuntimeError("the kernel was compiled in a worker process (no Triton function here)")
    # Fused multiply-adds: Inductor turns them off with emulate_precision_casts, which the codecs
    # need for their rounding casts; contraction rounds once where a mul and an add rounded twice.
    # AdamW's kernel: 116 -> 109 SASS instructions per element (flashcompile.compiler.fast_math).
    tuner.triton_meta = {**tuner.triton_meta, "enable_fp_fusion": fast_math.enabled()}
    if maxnreg is None:
        result = tuner._precompile_config(config)
    else:
        # Inductor passes triton.compile a fixed set of options and drops a Config's maxnreg, so
        # this tuner's options gain it for this one compile
        options = getattr(tuner, "_create_compile_options", None)
        if options is None:
            raise RuntimeError("this Inductor builds no compile options to add maxnreg to")
        tuner._create_compile_options = lambda cfg, meta: {**options(cfg, meta), "maxnreg": maxnreg}
        try:
            result = tuner._precompile_config(config)
        finally:
            del tuner._create_compile_options
    if hasattr(tuner, "_make_launcher"):  # torch >= 2.12
        launcher, exc = tuner._make_launcher(result)
        if launcher is None:
            raise RuntimeError(exc)
        return launcher
    return result.make_launcher()  # torch 2.11


def pin_group_kernels(tuners, rule: str = "") -> Pin:
    """Make every group kernel among ``tuners`` launch with ``rule``'s config (:func:`config_for`)."""
    import triton

    pin = Pin(config=config_for(rule))
    xblock, warps = pin.config
    for tuner in tuners:
        if not _is_group_kernel(tuner):
            continue
        config = triton.Config({"XBLOCK": xblock}, num_warps=warps, num_stages=1)
        config.found_by_coordesc = True  # so a coordinate-descent run never retunes it
        try:
            launcher = _launcher(tuner, config)
        except Exception as e:  # noqa: BLE001 - another Inductor version: keep its choice
            pin.skipped = f"pinning failed: {type(e).__name__}: {e}"
            continue
        tuner.launchers = [launcher]
        pin.pinned += 1
    return pin
