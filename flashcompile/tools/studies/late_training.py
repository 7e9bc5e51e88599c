"""Late training: the loss a long decaying schedule reaches, per state codec, on the same bf16 model.

A small MLP regresses a smooth function of two inputs; every run starts from the same weights, sees
the same batches and follows the same OneCycleLR schedule down to a learning rate ~1e4 times below
its peak. Gradients shrink and spread as the loss falls: this is where 8-bit states whose steps are
relative to their group's largest value stop resolving the update, and where fine-tuning and the end
of every schedule live. All runs keep the model in bf16 with the weight split (the default master
weight); only Adam's states differ: fp32 (the reference), the paper's codecs under the step guard
(the earlier default), the codecs of ``codecs/relative.py``, the paper's codecs with stochastic
rounding (``codecs/stochastic.py``), and the adaptive codecs (``codecs/adaptive.py``; the default
rounds v stochastically). Two runs keep the default states and change the weight instead: bf16
alone, no residual, rounded to nearest or stochastically (``bf16_sr``).

Reported per codec pair: the final loss on a fixed evaluation set (mean and spread over seeds) and
its ratio to the fp32-state loss of the same seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import flashcompile as fc
from flashcompile.codecs import four_bit
from flashcompile.tools.studies.report import (
    mean_std,
    pyplot,
    save_figure,
    table,
    write_csv,
    write_summary,
)

# name -> codecs of Adam's states (the master weight is the weight split but in the last two)
RUNS = {
    "fp32 states": {"exp_avg": "fp32", "exp_avg_sq": "fp32"},
    "paper codecs + step guard (earlier default)": {"exp_avg": "softsign_int8",
                                                    "exp_avg_sq": "sqrt_uint8"},
    "v in fp32, m softsign_int8": {"exp_avg_sq": "fp32"},
    "softsign_int8 + sqrt_e4m4": {"exp_avg_sq": "sqrt_e4m4"},
    "e4m3_int8 + sqrt_e4m4": {"exp_avg": "e4m3_int8", "exp_avg_sq": "sqrt_e4m4"},
    "paper codecs, v stochastically rounded": {"exp_avg_sq": "sqrt_uint8_sr"},
    "paper codecs, m and v stochastically rounded": {"exp_avg": "softsign_int8_sr",
                                                     "exp_avg_sq": "sqrt_uint8_sr"},
    "softsign_int8 + sqrt_e4m4_sr": {"exp_avg_sq": "sqrt_e4m4_sr"},
    "e4m3_int8_sr + sqrt_e4m4_sr": {"exp_avg": "e4m3_int8_sr", "exp_avg_sq": "sqrt_e4m4_sr"},
    "adaptive": {"exp_avg": "softsign_adaptive", "exp_avg_sq": "sqrt_adaptive"},
    "default (adaptive, v stochastic)": {},
    "adaptive, m and v stochastic": {"exp_avg": "softsign_adaptive_sr",
                                     "exp_avg_sq": "sqrt_adaptive_sr"},
    # 4-bit states, two codes to a byte (codecs/four_bit.py)
    "4-bit (softsign_int4 + sqrt_uint4)": {"exp_avg": "softsign_int4", "exp_avg_sq": "sqrt_uint4"},
    "4-bit, v stochastic": {"exp_avg": "softsign_int4", "exp_avg_sq": "sqrt_uint4_sr"},
    "4-bit, m and v stochastic": four_bit.ADAM_STATES,
    # the default states with the weight as bf16 alone, no residual (codecs/floats.py)
    "default states, bf16 weight": {"param": "bf16"},
    "default states, bf16 weight rounded stochastically": {"param": "bf16_sr"},
}
REFERENCE = "fp32 states"


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] * x[:, 1:]


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1))


def train(codecs, seed: int, steps: int, lr: float = 3e-3, batch: int = 256) -> list[float]:
    """Losses on the evaluation set every ``steps // 50`` steps (the last one at the end)."""
    torch.manual_seed(seed)
    model = fc.cast_model(mlp())
    opt = fc.AdamW(model.parameters(), lr=lr, weight_decay=0.0, codecs=codecs, compile=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                final_div_factor=1e3)
    gen = torch.Generator().manual_seed(1000 + seed)
    x_eval = torch.rand(4096, 2, generator=torch.Generator().manual_seed(7)) * 2 - 1
    y_eval = target(x_eval)
    curve = []
    for step in range(1, steps + 1):
        x = torch.rand(batch, 2, generator=gen) * 2 - 1
        loss = nn.functional.mse_loss(model(x.bfloat16()).float(), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 50) == 0 or step == steps:
            with torch.no_grad():
                curve.append(nn.functional.mse_loss(model(x_eval.bfloat16()).float(),
                                                    y_eval).item())
    return curve


def selected(words: str) -> dict[str, dict]:
    """RUNS whose names contain one of the comma-separated ``words`` (all when empty), with the
    fp32-state reference every ratio needs."""
    keys = [w for w in words.split(",") if w]
    return {n: c for n, c in RUNS.items()
            if n == REFERENCE or not keys or any(k in n for k in keys)}


def measure(steps: int, seeds: int, runs: dict[str, dict] | None = None
            ) -> tuple[list[dict], dict]:
    rows, curves = [], {}
    for seed in range(seeds):
        for name, codecs in (runs or RUNS).items():
            curve = train(codecs, seed, steps)
            curves[(name, seed)] = curve
            rows.append({"run": name, "seed": seed, "steps": steps, "final_loss": curve[-1]})
            print(f"seed {seed} {name}: final loss {curve[-1]:.5f}", flush=True)
    ref = {r["seed"]: r["final_loss"] for r in rows if r["run"] == REFERENCE}
    for r in rows:
        r["ratio_to_fp32_states"] = r["final_loss"] / ref[r["seed"]]
    return rows, curves


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == name]
        (m, s), (rm, rs) = (mean_std([r["final_loss"] for r in sel]),
                            mean_std([r["ratio_to_fp32_states"] for r in sel]))
        out.append({"run": name, "seeds": len(sel), "final loss": f"{m:.3g} +- {s:.2g}",
                    "loss / fp32-state loss": f"{rm:.3f} +- {rs:.3f}",
                    "worst seed ratio": max(r["ratio_to_fp32_states"] for r in sel)})
    return out


def plot(curves: dict, steps: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(n for n, _ in curves)):
        runs = [c for (n, _), c in curves.items() if n == name]
        xs = [steps * (k + 1) / len(runs[0]) for k in range(len(runs[0]))]
        mean = [math.exp(sum(math.log(c[k]) for c in runs) / len(runs)) for k in range(len(xs))]
        ax.plot(xs, mean, label=name, color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xlabel("step (OneCycleLR)")
    ax.set_ylabel("evaluation MSE (geometric mean over seeds)")
    ax.set_title("late training: bf16 MLP, Adam's states per codec")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(out: str = "docs/results", quick: bool = False, steps: int | None = None,
         seeds: int | None = None, runs_: str = "", **_) -> list[dict]:
    out_dir = Path(out)
    steps = steps or (60 if quick else 10_000)
    seeds = seeds or (1 if quick else 3)
    rows, curves = measure(steps, seeds, selected(runs_))
    write_csv(out_dir / "late_training.csv", rows)
    plot(curves, steps, out_dir / "late_training.png")
    write_summary(out_dir / "late_training_summary.md", "Late training: loss after a long schedule",
                  f"`python -m flashcompile study late-training`: bf16 MLP 2-64-64-1 (weight split "
                  f"master), regression of a smooth target, AdamW lr 3e-3 under OneCycleLR over "
                  f"{steps} steps, batch 256, {seeds} seeds; final MSE on 4096 fixed points.\n\n"
                  + table(summarize(rows)))
    return rows
