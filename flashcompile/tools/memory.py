"""``flashcompile memory``: train real models a few steps and show where the memory goes.

For each model and optimizer setup it reports the resident bytes per parameter after a step
(params + grads + optimizer state: ``torch.cuda.memory_allocated`` on CUDA, summed tensor storage
elsewhere), the same split by category from the tensors themselves, the paper's accounting
(FlashOptim, arXiv 2602.23349), peak memory, step time (forward + backward + step) and the size of
a checkpoint (model + optimizer state dicts, as ``torch.save`` writes them). It can draw the split as a
stacked bar chart.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.tools.bench_models import CONFIGS, build

CATEGORIES = ("weights", "residual", "gradients", "optimizer states")


@dataclass(frozen=True)
class Setup:
    name: str
    make: Callable  # params -> optimizer
    flash: bool  # 16-bit model from cast_model (else fp32 weights, bf16 autocast)
    release: bool = False
    paper: float = 0.0  # the accounting: bytes per parameter


SETUPS = {s.name: s for s in [
    Setup("torch_adamw_fp32", lambda p: torch.optim.AdamW(p, lr=1e-4, fused=p[0].is_cuda), False,
          paper=16.0),
    Setup("adamw_flash", lambda p: fc.AdamW(p, lr=1e-4), True, paper=2 + 1 + 2 + 2 * 1.0625),
    Setup("adamw_flash_release", lambda p: fc.AdamW(p, lr=1e-4), True, True, 2 + 1 + 2 * 1.0625),
    Setup("sgd_flash", lambda p: fc.SGD(p, lr=1e-2, momentum=0.9), True, paper=2 + 1 + 2 + 1.0625),
    Setup("sgd_flash_release", lambda p: fc.SGD(p, lr=1e-2, momentum=0.9), True, True, 4.0625),
    Setup("lion_flash", lambda p: fc.Lion(p, lr=1e-5), True, paper=2 + 1 + 2 + 1.0625),
    Setup("lion_flash_release", lambda p: fc.Lion(p, lr=1e-5), True, True, 4.0625),
]}


@dataclass
class Row:
    model: str
    setup: str
    params: int
    resident_bytes_per_param: float
    accounted_bytes_per_param: float
    paper_bytes_per_param: float
    peak_gib: float
    step_ms: float
    checkpoint_bytes_per_param: float
    split: dict[str, float] = field(default_factory=dict)


class _ByteCounter(io.RawIOBase):
    """A file that only counts what is written: checkpoint sizes without the disk."""

    def __init__(self):
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.size += len(b)
        return len(b)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def split_by_category(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of each category, from the tensors (shared storage counted once)."""
    params = list(model.parameters())
    residual, states = [], []
    for st in opt.state.values():
        for key, t in st.items():
            (residual if key.startswith("param.") else states).append(t)
    return {
        "weights": _storage_bytes(params),
        "residual": _storage_bytes(residual),
        "gradients": _storage_bytes(p.grad for p in params if p.grad is not None),
        "optimizer states": _storage_bytes(states),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_libraries(device: torch.device) -> None:
    """Let cuBLAS allocate its workspaces (one per thread: forward, and autograd's backward) before
    the baseline reading, so they are not counted as the first setup's training memory."""
    layer = torch.nn.Linear(64, 64, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        layer.to(dtype)(torch.ones(8, 64, device=device, dtype=dtype)).sum().backward()
    del layer
    _sync(device)


def measure(model_name: str, setup: Setup, device: torch.device, batch: int, seq: int,
            steps: int = 5) -> Row:
    cuda = device.type == "cuda"
    _warm_up_libraries(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    model = build(model_name, device)
    if setup.flash:
        fc.cast_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = setup.make(params)
    handle = fc.enable_gradient_release(model, opt) if setup.release else None
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = CONFIGS[model_name].vocab
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not setup.flash)
    times = []
    for i in range(steps):
        if i == steps - 1 and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        tokens = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=gen)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(tokens)
        loss.backward()
        del loss
        opt.step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if i < steps - 1:
            opt.zero_grad()
    n = sum(p.numel() for p in params)
    split = split_by_category(model, opt)
    if cuda:
        resident = torch.cuda.memory_allocated(device) - before
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        resident, peak = sum(split.values()), float("nan")
    counter = _ByteCounter()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, counter)
    row = Row(model_name, setup.name, n, resident / n, sum(split.values()) / n, setup.paper,
              peak / 2**30, statistics.median(times[1:]) if steps > 1 else times[0],
              counter.size / n, {k: v / n for k, v in split.items()})
    if handle is not None:
        handle.remove()
    del model, opt, params, handle
    if cuda:
        torch.cuda.empty_cache()
    return row


HEADER = (f"{'model':<10} {'setup':<20} {'params M':>8} {'resident':>8} {'tensors':>8} "
          f"{'paper':>6} {'diff %':>6} {'peak GiB':>8} {'step ms':>8} {'ckpt B/p':>8}")


def format_row(r: Row) -> str:
    diff = 100 * (r.resident_bytes_per_param / r.paper_bytes_per_param - 1)
    return (f"{r.model:<10} {r.setup:<20} {r.params / 1e6:8.1f} {r.resident_bytes_per_param:8.3f} "
            f"{r.accounted_bytes_per_param:8.3f} {r.paper_bytes_per_param:6.3f} {diff:6.2f} "
            f"{r.peak_gib:8.2f} {r.step_ms:8.1f} {r.checkpoint_bytes_per_param:8.3f}")


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = dict(zip(CATEGORIES, ["tab:blue", "tab:cyan", "tab:orange", "tab:green"]))
    for ax, m in zip(axes[0], models):
        sub = [r for r in rows if r.model == m]
        names = [r.setup for r in sub]
        bottom = [0.0] * len(sub)
        for cat in CATEGORIES:
            values = [r.split.get(cat, 0.0) for r in sub]
            ax.barh(names, values, left=bottom, color=colors[cat], label=cat)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.scatter([r.resident_bytes_per_param for r in sub], names, color="black", marker="|",
                   s=300, zorder=3, label="measured (allocator)")
        n = sub[0].params
        ax.set_title(f"{m} ({n / 1e9:.2f}B params)" if n >= 1e9 else f"{m} ({n / 1e6:.1f}M params)")
        ax.set_xlabel("resident bytes per parameter")
        ax.invert_yaxis()
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> None:
    device = torch.device(args.device)
    setups = args.setups.split(",") if args.setups else list(SETUPS)
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setups {unknown}; known: {sorted(SETUPS)}")
    rows = []
    print(HEADER)
    for model_name in args.models.split(","):
        for s in setups:
            rows.append(measure(model_name, SETUPS[s], device, args.batch, args.seq, args.steps))
            print(format_row(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}; torch {torch.__version__}; batch {args.batch} x {args.seq} tokens\n{HEADER}")
    for r in rows:
        print(format_row(r))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in asdict(rows[0]) if k != "split"]
                                    + list(CATEGORIES))
            writer.writeheader()
            for r in rows:
                d = asdict(r)
                writer.writerow({**{k: v for k, v in d.items() if k != "split"}, **d["split"]})
    if args.json:
        meta = {"device": name, "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
                "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    if args.png:
        plot(rows, args.png)
