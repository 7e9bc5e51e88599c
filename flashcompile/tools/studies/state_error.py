"""Quantisation error of Adam's states along real training trajectories.

fp32 ``torch.optim.AdamW`` trains each task (:mod:`flashcompile.tools.studies.tasks`); at evenly spaced
steps every parameter's ``exp_avg`` (m) and ``exp_avg_sq`` (v) is encoded and decoded with each codec,
laid out as the optimizer stores it (flat, zero-padded groups of 32 per parameter). Reported:

* NMSE ``sum (decoded - x)^2 / sum x^2`` over all parameters, for m, v and Adam's direction
  ``u = m_hat / (sqrt(v_hat) + eps)`` (m and v decoded together: linear/linear, the paper's
  softsign/sqrt, the earlier default (the paper's codecs under Adam's step guard,
  ``rules/adam.py``), softsign/sqrt-nonzero, and the default: the adaptive codecs
  (``codecs/adaptive.py``) with v rounded stochastically, under the guard);
* for v, the share of non-zero values stored as exactly 0 (the paper: 18% with linear codes, 0.02%
  with sqrt companding on synthetic data);
* for u, the share of coordinates whose decoded direction exceeds the true one by more than 2x.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flashcompile import codecs
from flashcompile.codecs.layout import padded
from flashcompile.codecs.presets import default_codec
from flashcompile.codecs.stochastic import noise_for, uniform_noise
from flashcompile.rules import adam
from flashcompile.tools.studies import tasks
from flashcompile.tools.studies.report import pyplot, save_figure, table, write_csv, write_summary

ADAM_M = default_codec("signed", "flash").name  # the default's codecs for Adam's m and v
ADAM_V = adam.flash_codecs.get("exp_avg_sq", default_codec("nonnegative", "flash").name)
M_CODECS = {"linear_int8": "linear_int8", "softsign_int8 (paper)": "softsign_int8",
            "e4m3_int8 (relative)": "e4m3_int8",
            "e4m3_int8_sr (relative, stochastic)": "e4m3_int8_sr",
            f"{ADAM_M} (default)": ADAM_M,
            "softsign_adaptive_sr (stochastic)": "softsign_adaptive_sr",
            "softsign_int4 (4-bit)": "softsign_int4"}
V_CODECS = {"linear_int8": "linear_int8", "sqrt_uint8 (paper)": "sqrt_uint8",
            "sqrt_uint8_nonzero (earlier default without a guard)": "sqrt_uint8_nonzero",
            "sqrt_e4m4 (relative)": "sqrt_e4m4",
            "sqrt_e4m4_sr (relative, stochastic)": "sqrt_e4m4_sr",
            "sqrt_adaptive": "sqrt_adaptive",
            f"{ADAM_V} (default)": ADAM_V,
            "sqrt_uint4 (4-bit)": "sqrt_uint4",
            "sqrt_uint4_sr (4-bit, stochastic)": "sqrt_uint4_sr"}
PAIRS = {  # name -> (m codec, v codec, Adam's step guard)
    "linear": ("linear_int8", "linear_int8", False),
    "paper": ("softsign_int8", "sqrt_uint8", False),
    "paper codecs + step guard (earlier default)": ("softsign_int8", "sqrt_uint8", True),
    "sqrt_uint8_nonzero, no guard": ("softsign_int8", "sqrt_uint8_nonzero", False),
    "relative (e4m3_int8 + sqrt_e4m4), guard": ("e4m3_int8", "sqrt_e4m4", True),
    "relative, stochastic (the 'relative' preset)": ("e4m3_int8_sr", "sqrt_e4m4_sr", True),
    "adaptive, guard": ("softsign_adaptive", "sqrt_adaptive", True),
    "default (adaptive, v stochastic, guard)": (ADAM_M, ADAM_V, True),
    "adaptive, m and v stochastic, guard": ("softsign_adaptive_sr", "sqrt_adaptive_sr", True),
    "4-bit (softsign_int4 + sqrt_uint4), guard": ("softsign_int4", "sqrt_uint4", True),
    "4-bit, m and v stochastic, guard": ("softsign_int4_sr", "sqrt_uint4_sr", True),
}
LR, BETAS, EPS = 3e-3, (0.9, 0.999), 1e-8


def quantize(codec, x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``codec`` in the optimizer's layout (a stochastic codec with one draw of its
    noise: one rounding's error, not what rounding does over many steps)."""
    codec = codecs.get(codec)
    x32 = padded(x, torch.float32)
    stochastic = getattr(codec, "stochastic", False)
    noise = ()
    if stochastic:  # the kernel keys its noise on other values of the element, not the rounded one:
        keys = torch.randn(2, *x32.shape, generator=torch.Generator().manual_seed(0))
        noise = (noise_for(codec, uniform_noise(torch.tensor(1.0), 0, *keys)),)  # keys not x
    y = codec.decode(*codec.encode(x32, *noise))
    return y.reshape(-1)[: x.numel()].view_as(x)


def snapshot_rows(task: str, step: int, states: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    def nmse(pairs):
        num = sum(((q - x) ** 2).sum().item() for q, x in pairs)
        return num / max(sum((x**2).sum().item() for _, x in pairs), 1e-300)

    rows = []
    for label, name in M_CODECS.items():
        rows.append({"task": task, "step": step, "quantity": "m", "codec": label,
                     "nmse": nmse([(quantize(name, m), m) for m, _ in states]),
                     "zero_frac": "", "inflated_frac": ""})
    for label, name in V_CODECS.items():
        qs = [(quantize(name, v), v) for _, v in states]
        nonzero = sum((v > 0).sum().item() for _, v in qs)
        dropped = sum(((q == 0) & (v > 0)).sum().item() for q, v in qs)
        rows.append({"task": task, "step": step, "quantity": "v", "codec": label, "nmse": nmse(qs),
                     "zero_frac": dropped / max(nonzero, 1), "inflated_frac": ""})
    (b1, b2), c1, c2 = BETAS, 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
    # the guard's Q after `step` steps of constant betas (rules/adam.py's recurrence, summed)
    q = sum((1 - b1) ** 2 / (1 - b2) * (b1 * b1 / b2) ** j for j in range(step))
    for label, (mc, vc, guard) in PAIRS.items():
        pairs = []
        for m, v in states:
            u = (m / c1) / ((v / c2).sqrt() + EPS)
            mq = quantize(mc, m)
            denom = (quantize(vc, v) / c2).sqrt() + EPS
            if guard:
                denom = torch.maximum(denom, mq.abs() / (q * c2) ** 0.5)
            pairs.append((mq / c1 / denom, u))
        total = sum(u.numel() for _, u in pairs)
        inflated = sum((uq.abs() > 2 * u.abs()).sum().item() for uq, u in pairs) / total
        rows.append({"task": task, "step": step, "quantity": "update", "codec": label,
                     "nmse": nmse(pairs), "zero_frac": "", "inflated_frac": inflated})
    return rows


def trajectory(task_name: str, steps: int, snapshots: int, seed: int = 0) -> list[dict]:
    task = tasks.TASKS[task_name]()
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    at = sorted({1, *(round(steps * (i + 1) / snapshots) for i in range(snapshots))})
    rows = []
    for step in range(1, steps + 1):
        x, y = task.batch(gen)
        loss = task.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in at:
            states = [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
                      for p in model.parameters()]
            rows += snapshot_rows(task_name, step, states)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["task"], r["quantity"], r["codec"]) for r in rows)
    for task, quantity, codec in keys:
        sel = [r for r in rows if (r["task"], r["quantity"], r["codec"]) == (task, quantity, codec)]
        row = {"task": task, "state": quantity, "codec": codec,
               "mean NMSE": sum(r["nmse"] for r in sel) / len(sel),
               "max NMSE": max(r["nmse"] for r in sel), "nonzero v stored as 0": "",
               "update > 2x true": ""}
        if quantity == "v":
            row["nonzero v stored as 0"] = sum(r["zero_frac"] for r in sel) / len(sel)
        if quantity == "update":
            row["update > 2x true"] = sum(r["inflated_frac"] for r in sel) / len(sel)
        out.append(row)
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(len(names), 3, figsize=(14, 3.6 * len(names)), squeeze=False)
    for row, task in zip(axes, names):
        for ax, quantity in zip(row, ("m", "v", "update")):
            sel = [r for r in rows if r["task"] == task and r["quantity"] == quantity]
            for codec in dict.fromkeys(r["codec"] for r in sel):
                pts = [r for r in sel if r["codec"] == codec]
                style = "x--" if "default" in codec else "o-"  # the default often overlaps
                ax.plot([r["step"] for r in pts], [r["nmse"] for r in pts], style, ms=3,
                        label=codec)
            ax.set_yscale("log")
            ax.set_title(f"{task}: {quantity}")
            ax.set_xlabel("training step (fp32 AdamW)")
            ax.set_ylabel("NMSE")
            ax.legend(fontsize=7)
    save_figure(fig, path)


def main(out: str = "docs/results", quick: bool = False, steps: int | None = None, **_) -> list:
    out_dir = Path(out)
    plan = {"digits": steps or (60 if quick else 600), "chars": steps or (30 if quick else 400)}
    rows = []
    for name, n in plan.items():
        rows += trajectory(name, n, 3 if quick else 10)
    write_csv(out_dir / "state_error.csv", rows)
    plot(rows, out_dir / "state_error.png")
    write_summary(out_dir / "state_error_summary.md", "Adam state quantisation error along training",
                  f"`python -m flashcompile study state-error`: fp32 AdamW (lr {LR}, betas {BETAS}) "
                  f"on {', '.join(f'{k} ({v} steps)' for k, v in plan.items())}; NMSE averaged over "
                  f"{3 if quick else 10} snapshots (plus step 1).\n\n{table(summarize(rows))}")
    return rows
