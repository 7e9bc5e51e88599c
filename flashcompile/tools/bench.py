"""``flashcompile bench``: step time, bandwidth and resident memory per workload and optimizer.

Workloads are JSON shape lists (``flashcompile/tools/workloads/*.json`` or any path). For each optimizer it
reports resident bytes per parameter (params + grads + optimizer state), the median step time, the
effective bandwidth (bytes the step must move / time; LAMB and LARS read the inputs of their norms
twice, see ``Plan.bytes_moved_per_param``), that bandwidth as a share of a device copy
measured in the same run, the speed against torch's fused AdamW, the first step's time (compile
included) and the host time of ``step()``.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.codecs import four_bit
from flashcompile.compiler.explain import plan_of
from flashcompile.language.dsl import Rule
from flashcompile.optim.optimizers import OPTIMIZERS as OPTIMIZERS_BY_NAME

WORKLOADS = Path(__file__).parent / "workloads"


@dataclass
class Row:
    workload: str
    optimizer: str
    params: int
    tensors: int
    resident_bytes_per_param: float
    step_ms: float
    bytes_moved_per_param: float
    effective_gbps: float
    pct_of_copy: float
    vs_torch_fused: float
    first_step_s: float
    host_ms: float


def _flash(cls, **kw):
    return lambda params: cls(params, **kw)


# name -> (param dtype, factory, bytes moved per param or None to ask the plan)
OPTIMIZERS: dict[str, tuple[torch.dtype, Callable, float | None]] = {
    "torch_adamw_fused": (torch.float32, lambda p: torch.optim.AdamW(
        p, fused=p[0].is_cuda, foreach=not p[0].is_cuda or None), 28.0),
    "adamw_flash": (torch.bfloat16, _flash(fc.AdamW), None),
    "adamw_fp32": (torch.float32, _flash(fc.AdamW, codecs="fp32"), None),
    # the paper's codecs without the guard (FlashOptim's AdamW) and the relative preset, beside
    # the default's adaptive codecs (adamw_flash)
    "adamw_paper": (torch.bfloat16, _flash(fc.AdamW, codecs="paper", step_guard=False), None),
    "adamw_relative": (torch.bfloat16, _flash(fc.AdamW, codecs="relative"), None),
    "adamw_4bit": (torch.bfloat16, _flash(fc.AdamW, codecs=four_bit.ADAM_STATES), None),
    # the weight as bf16 alone, rounded stochastically (6.13 B/param resident, 10.25 moved)
    "adamw_bf16_sr": (torch.bfloat16, _flash(fc.AdamW, codecs={"param": "bf16_sr"}), None),
    "sgd_flash": (torch.bfloat16, _flash(fc.SGD, lr=1e-2, momentum=0.9), None),
    "sgd_fp32": (torch.float32, _flash(fc.SGD, lr=1e-2, momentum=0.9, codecs="fp32"), None),
    "lion_flash": (torch.bfloat16, _flash(fc.Lion), None),
    "lion_fp32": (torch.float32, _flash(fc.Lion, codecs="fp32"), None),
}
# The rest of the shipped optimizers with flash codecs and their defaults: `--optimizers all` (or
# name them). SGDW and Adam step as SGD and AdamW do.
def _rule(cls) -> Rule:
    """The rule behind a drop-in class (built on one throwaway matrix, eagerly)."""
    return cls([torch.nn.Parameter(torch.zeros(1, 1))], compile=False).rule


# the element-wise family ("all"): not Muon (2-D params only) nor the rules stepped in each
# param's own shape (Adafactor, CAME: never one launch per group; benchmarks/twin_step.py)
FAMILY = tuple(cls.__name__ for key, cls in OPTIMIZERS_BY_NAME.items()
               if f"{key}_flash" not in OPTIMIZERS and key not in ("sgdw", "adam")
               and not _rule(cls).needs_matrices and not _rule(cls).shaped)
EXTRA: dict[str, tuple[torch.dtype, Callable, float | None]] = {
    f"{name.lower()}_flash": (torch.bfloat16, _flash(getattr(fc, name)), None) for name in FAMILY
}


def _peers() -> dict[str, tuple[torch.dtype, Callable, float | None]]:
    """Peers that are installed; none is a dependency."""
    out = {}
    try:
        import flashoptim  # type: ignore[import-not-found]

        out["flashoptim_adamw"] = (torch.bfloat16, lambda p: flashoptim.FlashAdamW(p), 12.25)
    except Exception:  # noqa: BLE001 - absent or broken peers are skipped
        pass
    try:
        from torchao.optim import AdamW8bit  # type: ignore[import-not-found]

        out["torchao_adamw8bit"] = (torch.float32, lambda p: AdamW8bit(p), None)
    except Exception:  # noqa: BLE001
        pass
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        out["bnb_adamw8bit"] = (torch.float32, lambda p: bnb.optim.AdamW8bit(p), None)
    except Exception:  # noqa: BLE001
        pass
    return out


def load_workload(name_or_path: str) -> tuple[str, list[tuple[int, ...]]]:
    path = Path(name_or_path)
    if not path.exists():
        path = WORKLOADS / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in WORKLOADS.glob("*.json"))
        raise FileNotFoundError(f"no workload {name_or_path!r}; shipped workloads: {known}")
    data = json.loads(path.read_text())
    return data.get("name", path.stem), [tuple(s) for s in data["shapes"]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median ms per call: triton's do_bench on CUDA (events, L2 flushed between calls, as the
    baselines in shared/MEASUREMENTS.md were taken), a wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5 * reps, rep=20 * reps, return_mode="median")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device: torch.device, numel: int = 2**28) -> float:
    """Device-to-device copy bandwidth, bytes read + written."""
    x = torch.empty(numel, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    ms = _median_ms(lambda: y.copy_(x), device, 20)
    return 2 * x.numel() * 4 / ms / 1e6


def _resident(params, opt, device, baseline: int) -> float:
    if device.type == "cuda":
        return (torch.cuda.memory_allocated(device) - baseline) / sum(p.numel() for p in params)
    seen, total = set(), 0
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    tensors += [t for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor) and t.device == device]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / sum(p.numel() for p in params)


def _as_after_backward(params, opt) -> None:
    """Put the gradients where a training loop's backward would: ``opt.zero_grad()``, then the
    same values accumulated into whatever ``.grad`` it left (its gradients in a flat buffer for
    flashcompile, None for torch and the peers). Assigned gradients are not the optimizer's own:
    a flat step copies those into a staging buffer first, which no training loop pays."""
    grads = [p.grad for p in params]
    opt.zero_grad()
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def bench_one(workload: str, shapes, name: str, spec, device: torch.device, reps: int,
              cold: bool = False) -> Row:
    dtype, make, moved = spec
    _sync(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen).to(dtype))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen).to(dtype) * 1e-3
    opt = make(params)
    _sync(device)
    t0 = time.perf_counter()
    with torch._inductor.config.patch(force_disable_caches=cold):
        opt.step()
    _sync(device)
    first = time.perf_counter() - t0
    _as_after_backward(params, opt)
    resident = _resident(params, opt, device, baseline)
    opt.step()
    ms = _median_ms(opt.step, device, reps)
    host = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        host.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    if moved is None:
        plan = plan_of(opt)
        moved = plan.bytes_moved_per_param(torch.empty((), dtype=dtype).element_size())
    n = sum(p.numel() for p in params)
    row = Row(workload, name, n, len(shapes), resident, ms, moved, moved * n / ms / 1e6,
              0.0, 0.0, first, statistics.median(host))
    del opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(workloads: list[str], optimizers: list[str], device: torch.device, reps: int = 20,
        cold: bool = False, on_row: Callable[[list[Row], float], None] | None = None
        ) -> tuple[list[Row], float]:
    """Every optimizer on every workload; ``on_row(rows, copy)`` after each row (a long run cut
    short keeps what it measured)."""
    specs = {**OPTIMIZERS, **EXTRA, **_peers()}
    unknown = [o for o in optimizers if o not in specs]
    if unknown:
        raise ValueError(f"unknown or not installed optimizers {unknown}; available: {sorted(specs)}")
    copy = copy_gbps(device)
    rows = []
    for w in workloads:
        name, shapes = load_workload(w)
        baseline = None
        for o in optimizers:
            if cold:  # first-step times then include compiling from scratch, no cache on disk
                torch._dynamo.reset()
                fc.compiler.plan.get_plan.cache_clear()
            row = bench_one(name, shapes, o, specs[o], device, reps, cold)
            row.pct_of_copy = 100 * row.effective_gbps / copy
            if o == "torch_adamw_fused":
                baseline = row.step_ms
            if baseline:
                row.vs_torch_fused = row.step_ms / baseline
            rows.append(row)
            print(_format(row), flush=True)
            if on_row is not None:
                on_row(rows, copy)
        for row in rows:
            if row.workload == name and baseline:
                row.vs_torch_fused = row.step_ms / baseline
    return rows, copy


HEADER = (f"{'workload':<16} {'optimizer':<18} {'B/param':>7} {'step ms':>8} {'moved B':>7} "
          f"{'GB/s':>6} {'%copy':>6} {'x torch':>7} {'first s':>7} {'host ms':>7}")


def _format(r: Row) -> str:
    return (f"{r.workload:<16} {r.optimizer:<18} {r.resident_bytes_per_param:7.2f} {r.step_ms:8.3f} "
            f"{r.bytes_moved_per_param:7.2f} {r.effective_gbps:6.0f} {r.pct_of_copy:6.1f} "
            f"{r.vs_torch_fused:7.2f} {r.first_step_s:7.1f} {r.host_ms:7.2f}")


def save(rows: list[Row], copy: float, csv_path: str | None, json_path: str | None,
         png_path: str | None, device: torch.device) -> None:
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if json_path:
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "copy_gbps": copy,
                "date": time.strftime("%Y-%m-%d")}
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    if png_path:
        _plot(rows, png_path)


def _plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        sub = [r for r in rows if r.workload == w]
        ax.barh([r.optimizer for r in sub], [r.step_ms for r in sub], color="tab:blue")
        ax.set_title(w)
        ax.set_xlabel("step ms (median)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> None:
    device = torch.device(args.device)
    family = ["torch_adamw_fused", "adamw_flash", "sgd_flash", "lion_flash", *EXTRA]
    named = args.optimizers.split(",") if args.optimizers else [*OPTIMIZERS, *_peers()]
    optimizers = [o for name in named for o in (family if name == "all" else [name])]
    print(HEADER)
    rows, copy = run(args.workloads.split(","), optimizers, device, args.reps, args.cold,
                     lambda rows, copy: save(rows, copy, args.csv, args.json, None, device))
    print(f"\ncopy bandwidth {copy:.0f} GB/s on {device}; torch {torch.__version__}")
    print(HEADER)
    for r in rows:
        print(_format(r))
    save(rows, copy, args.csv, args.json, args.png, device)
