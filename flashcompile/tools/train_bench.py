"""``flashcompile train-bench``: whole training iterations of real models, per optimizer setup.

Each (model, setup) trains in a process of its own (memory peaks and compile caches stay apart):
warm-up iterations, then measured ones, each timed with CUDA events around forward, backward,
gradient clipping and the step (``optimizer.step()`` and ``zero_grad()``). Reported per setup: the
median iteration (event to event, so host gaps count), its split, tokens or images per second, the
peak of allocated memory over the measured iterations and what stays allocated between iterations
(weights, optimizer state, gradients kept), and the loss at the end (same data, same seed; the
models are in :mod:`flashcompile.tools.train_models`).

Setups: torch's fused AdamW on fp32 weights under bf16 autocast (the baseline), torch's fused AdamW
on a bf16 model, flashcompile's defaults (``cast_model`` + ``AdamW``), with gradient release, with
every norm layer kept fp32 (the former ``cast_model`` default), and the peers where installed
(FlashOptim, torchao and bitsandbytes 8-bit AdamW; none is a dependency). flashcompile rows clip
with ``opt.clip_grad_norm_`` (``flash_torch_clip``: with torch's, for comparison); gradient release
cannot clip by global norm: those rows skip clipping.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.tools.train_models import MODELS

LR, CLIP = 3e-4, 1.0


@dataclass(frozen=True)
class Setup:
    """``prepare(model) -> (optimizer, release handle or None)`` after the model is cast as
    ``cast`` says: "fp32" (weights fp32, forward under bf16 autocast), "bf16" (``model.to``),
    "flash" (``fc.cast_model``), "flash_norms" (``cast_model(keep_fp32=NORM_LAYERS)``),
    "flashoptim" (its own ``cast_model``)."""
    cast: str
    prepare: Callable
    release: bool = False
    needs: str = ""  # a peer module it imports
    torch_clip: bool = True  # False: the optimizer's own clip_grad_norm_ (flashcompile's)


def _torch_adamw(model, _release):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, fused=params[0].is_cuda), None


def _flash_adamw(model, release):
    opt = fc.AdamW(model.parameters(), lr=LR)
    return opt, fc.enable_gradient_release(model, opt) if release else None


def _flash_adamw_staged(model, release):
    opt = fc.AdamW(model.parameters(), lr=LR)
    opt.grad_views = False
    return opt, fc.enable_gradient_release(model, opt) if release else None


def _flashoptim(model, release):
    import flashoptim

    opt = flashoptim.FlashAdamW(model.parameters(), lr=LR, master_weight_bits=24)
    return opt, flashoptim.enable_gradient_release(model, opt) if release else None


def _torchao(model, _release):
    from torchao.optim import AdamW8bit

    return AdamW8bit(model.parameters(), lr=LR), None


def _bnb(model, _release):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(model.parameters(), lr=LR), None


SETUPS: dict[str, Setup] = {
    "torch_fused_fp32_autocast": Setup("fp32", _torch_adamw),
    "torch_fused_bf16": Setup("bf16", _torch_adamw),
    "flash": Setup("flash", _flash_adamw, torch_clip=False),
    "flash_torch_clip": Setup("flash", _flash_adamw),
    "flash_release": Setup("flash", _flash_adamw, release=True),
    "flash_staged_grads": Setup("flash", _flash_adamw_staged, torch_clip=False),
    "flash_fp32_norms": Setup("flash_norms", _flash_adamw, torch_clip=False),
    "flashoptim": Setup("flashoptim", _flashoptim, needs="flashoptim"),
    "flashoptim_release": Setup("flashoptim", _flashoptim, release=True, needs="flashoptim"),
    "torchao_adamw8bit": Setup("fp32", _torchao, needs="torchao"),
    "bnb_adamw8bit": Setup("fp32", _bnb, needs="bitsandbytes"),
}


@dataclass
class Row:
    model: str
    setup: str
    device: str = ""
    params: int = 0
    batch: int = 0
    iteration_ms: float = float("nan")
    forward_ms: float = float("nan")
    backward_ms: float = float("nan")
    clip_ms: float = float("nan")
    step_ms: float = float("nan")
    throughput: float = float("nan")  # tokens or images per second
    unit: str = ""
    peak_gib: float = float("nan")
    resident_gib: float = float("nan")
    first_iteration_s: float = float("nan")
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    iterations_ms: list[float] = field(default_factory=list)
    rounds_ms: list[float] = field(default_factory=list)  # each round's iteration (--rounds)
    error: str = ""


def _cast(model: torch.nn.Module, cast: str) -> torch.nn.Module:
    if cast == "bf16":
        return model.to(torch.bfloat16)
    if cast == "flash":
        return fc.cast_model(model)
    if cast == "flash_norms":
        return fc.cast_model(model, keep_fp32=fc.NORM_LAYERS)
    if cast == "flashoptim":
        import flashoptim

        flashoptim.cast_model(model)
    return model


def measure(model_name: str, setup_name: str, device: str = "cuda", steps: int = 15,
            warmup: int = 5, batch: int | None = None, seed: int = 0) -> Row:
    """Train ``model_name`` with ``setup_name`` in this process and time it."""
    spec, setup = MODELS[model_name], SETUPS[setup_name]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    batch = batch or spec.default_batch
    row = Row(model_name, setup_name, torch.cuda.get_device_name(dev) if cuda else "cpu",
              batch=batch, unit=spec.unit)
    torch.manual_seed(seed)
    before = torch.cuda.memory_allocated(dev) if cuda else 0
    model = _cast(spec.build().to(dev), setup.cast)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    row.params = sum(p.numel() for p in model.parameters())
    opt, handle = setup.prepare(model, setup.release)
    gen = torch.Generator().manual_seed(seed)
    data = [spec.batch(gen, dev, batch) for _ in range(4)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=setup.cast == "fp32")
    marks, losses = [], []

    def event():
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t_measured = time.perf_counter()
        t0 = time.perf_counter()
        ev = [event()]
        with autocast:
            loss = spec.loss(model, data[i % len(data)])
        ev.append(event())
        loss.backward()
        ev.append(event())
        if handle is None and setup.torch_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        elif handle is None:
            opt.clip_grad_norm_(CLIP)
        ev.append(event())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev.append(event())
        losses.append(loss.detach())
        if i >= warmup:
            marks.append(ev)
        elif i == 0:
            if cuda:
                torch.cuda.synchronize(dev)
            row.first_iteration_s = time.perf_counter() - t0
    end = event()
    if cuda:
        torch.cuda.synchronize(dev)
    wall = (time.perf_counter() - t_measured) / steps * 1e3

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    starts = [m[0] for m in marks] + [end]
    times = [ms(starts[k], starts[k + 1]) for k in range(steps)]
    row.iteration_ms = statistics.median(times) if cuda else wall
    row.iterations_ms = times
    for j, name in enumerate(("forward_ms", "backward_ms", "clip_ms", "step_ms")):
        setattr(row, name, statistics.median(ms(m[j], m[j + 1]) for m in marks))
    if handle is not None:
        row.clip_ms = 0.0  # nothing to clip: the params stepped inside backward
    row.throughput = batch * spec.per_item / (row.iteration_ms / 1e3)
    if cuda:
        row.peak_gib = (torch.cuda.max_memory_allocated(dev) - before) / 2**30
        row.resident_gib = (torch.cuda.memory_allocated(dev) - before) / 2**30
    row.losses = [float(v) for v in losses]
    row.final_loss = statistics.mean(row.losses[-4:])
    return row


def _one(model: str, setup: str, args) -> Row:
    """One (model, setup) in a child process; its last stdout line is the row as JSON."""
    need = SETUPS[setup].needs
    if need:
        import importlib.util

        if importlib.util.find_spec(need) is None:
            return Row(model, setup, error=f"{need} is not installed")
    cmd = [sys.executable, "-m", "flashcompile", "train-bench", "--child", "--models", model,
           "--setups", setup, "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--batch", str(args.batch)] if args.batch else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return Row(model, setup, error=f"exit {done.returncode}: {tail[0][:200]}")
    return Row(**json.loads(lines[-1]))


HEADER = (f"{'model':<9} {'setup':<26} {'iter ms':>8} {'fwd':>6} {'bwd':>6} {'clip':>5} "
          f"{'step':>5} {'vs base':>7} {'per s':>9} {'peak GiB':>8} {'resid GiB':>9} "
          f"{'loss':>7} {'1st s':>6}")


_MEDIANS = ("iteration_ms", "forward_ms", "backward_ms", "clip_ms", "step_ms", "throughput",
            "first_iteration_s")


def merge_rounds(rounds: list[Row]) -> Row:
    """One row for a setup measured in several rounds: the median of each timing over rounds,
    each round's iteration in ``rounds_ms``; the first round's losses; an error if any round
    failed."""
    failed = [r for r in rounds if r.error]
    if failed:
        return failed[0]
    row = Row(**asdict(rounds[0]))
    for name in _MEDIANS:
        setattr(row, name, statistics.median(getattr(r, name) for r in rounds))
    row.peak_gib = max(r.peak_gib for r in rounds)
    row.resident_gib = max(r.resident_gib for r in rounds)
    row.rounds_ms = [r.iteration_ms for r in rounds]
    return row


def ratio_to(r: Row, base: Row | None) -> float:
    """``r``'s iteration over the baseline's: the median of the per-round ratios where both ran
    the same rounds (each round's processes ran close together in time)."""
    if base is None or base.error or r.error:
        return float("nan")
    if len(r.rounds_ms) > 1 and len(r.rounds_ms) == len(base.rounds_ms):
        return statistics.median(a / b for a, b in zip(r.rounds_ms, base.rounds_ms))
    return r.iteration_ms / base.iteration_ms


def format_row(r: Row, base: Row | None) -> str:
    if r.error:
        return f"{r.model:<9} {r.setup:<26} {r.error}"
    ratio = ratio_to(r, base)
    return (f"{r.model:<9} {r.setup:<26} {r.iteration_ms:8.2f} {r.forward_ms:6.1f} "
            f"{r.backward_ms:6.1f} {r.clip_ms:5.2f} {r.step_ms:5.2f} {ratio:7.3f} "
            f"{r.throughput:9.0f} {r.peak_gib:8.2f} {r.resident_gib:9.2f} {r.final_loss:7.3f} "
            f"{r.first_iteration_s:6.1f}")


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    parts = ("forward_ms", "backward_ms", "clip_ms", "step_ms")
    for col, m in enumerate(models):
        sub = [r for r in rows if r.model == m and not r.error]
        names = [r.setup for r in sub]
        left = [0.0] * len(sub)
        for part in parts:
            values = [getattr(r, part) for r in sub]
            axes[0][col].barh(names, values, left=left, label=part.removesuffix("_ms"))
            left = [a + b for a, b in zip(left, values)]
        axes[0][col].set_title(f"{m}: iteration ms (median)")
        axes[1][col].barh(names, [r.peak_gib for r in sub], color="tab:red", label="peak")
        axes[1][col].barh(names, [r.resident_gib for r in sub], color="tab:gray",
                          label="between iterations")
        axes[1][col].set_title(f"{m}: allocated GiB")
        for ax in axes[:, col]:
            ax.invert_yaxis()
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> None:
    models = args.models.split(",")
    setups = args.setups.split(",") if args.setups else list(SETUPS)
    unknown = [m for m in models if m not in MODELS] + [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"train-bench: unknown {unknown}; models: {sorted(MODELS)}, "
                         f"setups: {sorted(SETUPS)}")
    if args.child:
        row = measure(models[0], setups[0], args.device, args.steps, args.warmup, args.batch)
        print(json.dumps(asdict(row)))
        return
    rows = []
    print(HEADER, flush=True)
    rounds = max(1, getattr(args, "rounds", 1))
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "warmup": args.warmup, "rounds": rounds}
    for m in models:
        measured: dict[str, list[Row]] = {s: [] for s in setups}
        for _ in range(rounds):  # setups interleaved: each round sees the host as it is then
            base = None
            for s in setups:
                measured[s].append(_one(m, s, args))
                if s == "torch_fused_fp32_autocast":
                    base = measured[s][-1]
                print(format_row(measured[s][-1], base), flush=True)
                if args.json:  # as it goes: a run cut short keeps its rows
                    done = rows + [merge_rounds(v) for v in measured.values() if v]
                    meta["device"] = next((r.device for r in done if r.device), args.device)
                    Path(args.json).write_text(json.dumps(
                        {"meta": meta, "rows": [asdict(r) for r in done]}, indent=1))
        rows += [merge_rounds(v) for v in measured.values()]
    meta["device"] = next((r.device for r in rows if r.device), args.device)
    print(f"\n{meta['device']}; torch {meta['torch']}; {args.steps} iterations after "
          f"{args.warmup} warm-up" + (f"; median of {rounds} interleaved rounds, ratios paired "
                                      "by round" if rounds > 1 else "") + f"\n{HEADER}")
    for m in models:
        base = next((r for r in rows if r.model == m and r.setup == "torch_fused_fp32_autocast"),
                    None)
        for r in rows:
            if r.model == m:
                print(format_row(r, base))
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            lists = ("losses", "iterations_ms", "rounds_ms")
            writer = csv.DictWriter(f, fieldnames=[k for k in asdict(rows[0]) if k not in lists])
            writer.writeheader()
            writer.writerows({k: v for k, v in asdict(r).items() if k not in lists} for r in rows)
    if args.png:
        plot(rows, args.png)
