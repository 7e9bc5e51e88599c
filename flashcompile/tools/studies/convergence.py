"""Convergence parity on real data: each fp32 optimizer against its flashcompile twin.

Tasks (:mod:`flashcompile.tools.studies.tasks`): an MLP on scikit-learn's digits and a small causal
transformer on the characters of Python's help text. Per seed every run starts from the same weights
(the bf16 model is the fp32 one rounded once) and sees the same batches; the learning rate warms up
over the first 5% of steps and follows a cosine to 10%; chars clips the gradient norm at 1 (as GPT-2
recipes do). Hyperparameters (:data:`HYPER`) were set once from the fp32 runs.

* fp32 twins: ``torch.optim.AdamW``, ``torch.optim.SGD`` (momentum 0.9), and flashcompile's Lion,
  Muon and Prodigy with ``codecs="fp32"`` (torch has no Lion nor Prodigy; Muon's fp32 codecs track torch.optim.Muon, and
  its embeddings, head and 1-D params go to an AdamW group, ``fc.muon_groups``). They keep fp32
  weights and fp32 states and compute under bf16 autocast: mixed-precision training, the baseline
  the paper (arXiv 2602.23349) compresses. So a gap measures what flashcompile stores, not bf16
  compute against fp32 compute;
* flash: the same optimizers from flashcompile on a bf16 model with the default codecs (weight split
  master weight, 8-bit states; AdamW under its step guard); AdamW also exactly as FlashOptim
  (softsign_int8 + sqrt_uint8, no guard) and, as the ablation, with linear_int8 for both moments.

Why chars clips (measured on an H200, ``benchmarks/sgd_stability.py``): unclipped SGD at lr 0.2
spikes at the end of warmup and then either escapes the unigram plateau (loss ~2.4) or stalls there,
decided by perturbations as small as rounding the initial weights to bf16 (fp32 SGD from the rounded
start stalled on 1 of 3 seeds). With clipping every seed of every variant escaped.

Reported per task and run: final training loss (mean over the last 10% of steps), held-out loss and
accuracy, mean +- std over seeds, and each flash run's gap to its twin against the seed noise (twice
the standard error of the difference of the means).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.codecs import PARAM, four_bit
from flashcompile.tools.studies import tasks
from flashcompile.tools.studies.report import (
    mean_std,
    pyplot,
    save_figure,
    table,
    write_csv,
    write_summary,
)

PAPER = {"exp_avg": "softsign_int8", "exp_avg_sq": "sqrt_uint8"}
LINEAR = {"exp_avg": "linear_int8", "exp_avg_sq": "linear_int8"}
# Prodigy: lr 1 (it learns the step size), the warmup guarded as its authors advise
PRODIGY = {"lr": 1.0, "weight_decay": 1e-2, "safeguard_warmup": True}
# Adafactor: torch's defaults with eps1 given as the fp32 twin's default (torch's None takes the
# param dtype's epsilon: 2^-7 on the bf16 model, 2^-23 on the fp32 twin: another optimizer). Not
# the paper's 1e-30: torch floors V at eps1^2, which is 0 in fp32, and a zero gradient row is 0/0
ADAFACTOR = {"lr": 1e-2, "eps": (2.0**-23, 1e-3)}
CAME = {"lr": 3e-3, "weight_decay": 1e-2}  # AdamW's step size: CAME's update is Adam-like
# Adan and MARS: AdamW's step size and decay, their own betas (Adan's update is Adam-like;
# MARS-AdamW is AdamW on a variance-reduced gradient)
ADAN = {"lr": 3e-3, "weight_decay": 1e-2}
MARS = {"lr": 3e-3, "weight_decay": 1e-2}
# AdEMAMix: AdamW's step size and decay, the slow EMA (beta3 0.9999) and its weight warmed up over
# the study's length, as its authors advise (arXiv 2409.03137)
ADEMAMIX = {"lr": 3e-3, "weight_decay": 1e-2, "alpha_warmup": 500, "beta3_warmup": 500}
HYPER = {  # per task: each optimizer's hyperparameters (Muon's other params: AdamW's)
    "digits": {"adamw": {"lr": 3e-3, "weight_decay": 1e-2}, "sgd": {"lr": 0.05, "momentum": 0.9},
               "lion": {"lr": 3e-4, "weight_decay": 0.1},
               "muon": {"lr": 0.02, "weight_decay": 1e-2}, "prodigy": PRODIGY,
               "adafactor": ADAFACTOR, "came": CAME, "adan": ADAN, "mars": MARS,
               "ademamix": ADEMAMIX},
    "chars": {"adamw": {"lr": 3e-3, "weight_decay": 1e-2}, "sgd": {"lr": 0.2, "momentum": 0.9},
              "lion": {"lr": 3e-4, "weight_decay": 0.1},
              "muon": {"lr": 0.02, "weight_decay": 1e-2}, "prodigy": PRODIGY,
              "adafactor": ADAFACTOR, "came": CAME, "adan": ADAN, "mars": MARS,
              "ademamix": ADEMAMIX},
}
CLIP = {"digits": None, "chars": 1.0}  # gradient-norm clipping per task, for every run
MIXED = "mixed"  # model "dtype" of the twins: fp32 weights, bf16 autocast compute
FP32_NORMS = "fp32 norms"  # bf16 model with every norm layer in fp32 (cast_model(NORM_LAYERS))


def runs(task: str, compile_: bool) -> dict[str, tuple[str, torch.dtype, Callable]]:
    """Run name -> (twin it is compared to, model dtype or MIXED, optimizer factory)."""
    h = HYPER[task]

    def flash(cls, codecs="flash", **kw):
        return lambda model: cls(model.parameters(), codecs=codecs, compile=compile_, flat=True,
                                 **kw)

    def muon(codecs):  # hidden matrices under Muon, the rest (embeddings, head, 1-D) under AdamW
        return lambda model: fc.Muon(
            fc.muon_groups(model, matrix_options=h["muon"], other_options=h["adamw"])[0],
            codecs=codecs, compile=compile_, flat=True)

    def torch_optimizer(cls, **kw):
        return lambda model: cls(model.parameters(), **kw)

    return {
        "adamw fp32 (torch)": ("", MIXED, torch_optimizer(torch.optim.AdamW, **h["adamw"])),
        "adamw flash": ("adamw fp32 (torch)", torch.bfloat16, flash(fc.AdamW, **h["adamw"])),
        # cast_model's former default: every norm layer fp32 behind casts (LayerNorm on chars)
        "adamw flash (fp32 norms)": ("adamw fp32 (torch)", FP32_NORMS,
                                     flash(fc.AdamW, **h["adamw"])),
        # FlashOptim exactly: the paper's codecs without Adam's step guard
        "adamw flash, paper (no guard)": ("adamw fp32 (torch)", torch.bfloat16,
                                          flash(fc.AdamW, PAPER, step_guard=False, **h["adamw"])),
        # the "relative" preset: 8-bit little floats rounded stochastically, under the guard
        "adamw flash, relative (stochastic)": ("adamw fp32 (torch)", torch.bfloat16,
                                               flash(fc.AdamW, "relative", **h["adamw"])),
        # 4-bit m and v, two codes to a byte (codecs/four_bit.py)
        "adamw flash, 4-bit": ("adamw fp32 (torch)", torch.bfloat16,
                               flash(fc.AdamW, four_bit.ADAM_STATES, **h["adamw"])),
        # the weight as bf16 alone (no residual: 6.13 B/param with a bf16 gradient), rounded to
        # nearest or stochastically (codecs/floats.py)
        "adamw flash, bf16 weight": ("adamw fp32 (torch)", torch.bfloat16,
                                     flash(fc.AdamW, {PARAM: "bf16"}, **h["adamw"])),
        "adamw flash, bf16 weight rounded stochastically": (
            "adamw fp32 (torch)", torch.bfloat16,
            flash(fc.AdamW, {PARAM: "bf16_sr"}, **h["adamw"])),
        "adamw flash, linear_int8 m and v": ("adamw fp32 (torch)", torch.bfloat16,
                                            flash(fc.AdamW, LINEAR, step_guard=False,
                                                  **h["adamw"])),
        "sgd fp32 (torch)": ("", MIXED, torch_optimizer(torch.optim.SGD, **h["sgd"])),
        "sgd flash": ("sgd fp32 (torch)", torch.bfloat16, flash(fc.SGD, **h["sgd"])),
        "lion fp32": ("", MIXED, flash(fc.Lion, "fp32", **h["lion"])),
        "lion flash": ("lion fp32", torch.bfloat16, flash(fc.Lion, **h["lion"])),
        # fp32 codecs: torch.optim.Muon's update (tests/optim/test_muon.py) beside AdamW's
        "muon fp32": ("", MIXED, muon("fp32")),
        "muon flash": ("muon fp32", torch.bfloat16, muon("flash")),
        # fp32 codecs: prodigyopt's update (tests/optim/test_prodigy.py); d learned from sums over
        # every parameter, so a step size of its own per run
        "prodigy fp32": ("", MIXED, flash(fc.Prodigy, "fp32", **h["prodigy"])),
        "prodigy flash": ("prodigy fp32", torch.bfloat16, flash(fc.Prodigy, **h["prodigy"])),
        "prodigy flash, 8-bit s": ("prodigy fp32", torch.bfloat16,
                                   flash(fc.Prodigy, {"s": "softsign_adaptive_sr"},
                                         **h["prodigy"])),
        # factored second moments, each parameter stepped in its own shape
        "adafactor fp32 (torch)": ("", MIXED, torch_optimizer(torch.optim.Adafactor,
                                                              **h["adafactor"])),
        "adafactor flash": ("adafactor fp32 (torch)", torch.bfloat16,
                            flash(fc.Adafactor, **h["adafactor"])),
        # fp32 codecs: came_pytorch's update (tests/optim/test_factored_rules.py)
        "came fp32": ("", MIXED, flash(fc.CAME, "fp32", **h["came"])),
        "came flash": ("came fp32", torch.bfloat16, flash(fc.CAME, **h["came"])),
        # rules that keep the previous gradient (bf16 in the flash preset), fp32 codecs as twins
        "adan fp32": ("", MIXED, flash(fc.Adan, "fp32", **h["adan"])),
        "adan flash": ("adan fp32", torch.bfloat16, flash(fc.Adan, **h["adan"])),
        "adan flash, 8-bit prev_grad": ("adan fp32", torch.bfloat16,
                                        flash(fc.Adan, {"prev_grad": "softsign_adaptive"},
                                              **h["adan"])),
        "mars fp32": ("", MIXED, flash(fc.MARS, "fp32", **h["mars"])),
        "mars flash": ("mars fp32", torch.bfloat16, flash(fc.MARS, **h["mars"])),
        "mars flash, 8-bit last_grad": ("mars fp32", torch.bfloat16,
                                        flash(fc.MARS, {"last_grad": "softsign_adaptive"},
                                              **h["mars"])),
        # a slow EMA (beta3 0.9999), bf16 rounded stochastically in the flash preset
        "ademamix fp32": ("", MIXED, flash(fc.AdEMAMix, "fp32", **h["ademamix"])),
        "ademamix flash": ("ademamix fp32", torch.bfloat16, flash(fc.AdEMAMix, **h["ademamix"])),
        "ademamix flash, 8-bit slow EMA": ("ademamix fp32", torch.bfloat16,
                                           flash(fc.AdEMAMix,
                                                 {"exp_avg_slow": "softsign_adaptive_sr"},
                                                 **h["ademamix"])),
    }


def train(task: tasks.Task, model: torch.nn.Module, opt, steps: int, seed: int,
          log_every: int, clip: float | None = None) -> tuple[list[tuple[int, float]], float]:
    """Train (clipping the gradient norm at ``clip`` if given); returns the logged (step, mean batch
    loss since the last log) and the mean batch loss over the last 10% of steps."""
    warm = max(1, steps // 20)

    def schedule(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    curve, window, tail = [], [], []
    for step in range(1, steps + 1):
        x, y = task.batch(gen)
        loss = task.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        value = loss.item()
        window.append(value)
        if step > steps - max(1, steps // 10):
            tail.append(value)
        if step % log_every == 0 or step == steps:
            curve.append((step, sum(window) / len(window)))
            window = []
    return curve, sum(tail) / len(tail)


def selected(task: str, compile_: bool, only: str = "") -> dict[str, tuple]:
    """The runs whose names contain one of the comma-separated words of ``only`` (all if empty;
    ``=NAME`` matches that name only), plus the twins they are compared to."""
    every = runs(task, compile_)
    words = [w.strip() for w in only.split(",") if w.strip()]
    if not words:
        return every

    def matches(word: str, name: str) -> bool:
        return word[1:] == name if word.startswith("=") else word in name

    unknown = [w for w in words if not any(matches(w, name) for name in every)]
    if unknown:
        raise ValueError(f"--runs {unknown} match no run; runs are {list(every)}")
    keep = {name for name in every if any(matches(w, name) for w in words)}
    keep |= {every[name][0] for name in keep if every[name][0]}
    return {name: v for name, v in every.items() if name in keep}


def prepare(model: torch.nn.Module, dtype, device: str) -> torch.nn.Module:
    """The model a run trains: cast as users cast it (``fc.cast_model``: bf16, BatchNorm kept
    fp32), with every norm layer fp32 for FP32_NORMS, or for MIXED kept in fp32 with its forward
    under bf16 autocast."""
    if dtype == FP32_NORMS:
        return fc.cast_model(model, keep_fp32=fc.NORM_LAYERS)
    if dtype == torch.bfloat16:
        return fc.cast_model(model)
    if dtype != MIXED:
        return model.to(dtype)
    model.forward = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)(model.forward)
    return model


def measure(task_names, steps: dict[str, int], seeds: int, device: str, compile_: bool,
            size: str, only: str = "") -> tuple[list[dict], list[dict]]:
    finals, curves = [], []
    for name in task_names:
        task = tasks.TASKS[name](device, **(tasks.GPU_SIZES[name] if size == "gpu" else {}))
        for seed in range(seeds):
            torch.manual_seed(seed)
            base = task.make_model()
            for run, (_, dtype, make) in selected(name, compile_, only).items():
                model = prepare(copy.deepcopy(base), dtype, device)
                curve, tail = train(task, model, make(model), steps[name], seed,
                                    max(1, steps[name] // 100), CLIP[name])
                test_loss, accuracy = task.evaluate(model)
                finals.append({"task": name, "run": run, "seed": seed, "steps": steps[name],
                               "train_loss": tail, "test_loss": test_loss, "accuracy": accuracy})
                curves += [{"task": name, "run": run, "seed": seed, "step": s, "loss": v}
                           for s, v in curve]
                print(f"{name} seed {seed} {run}: train {tail:.4f} test {test_loss:.4f} "
                      f"acc {accuracy:.2f}%", flush=True)
    return finals, curves


def summarize(finals: list[dict], task_names, curves: list[dict] = ()) -> list[dict]:
    out = []
    for name in task_names:
        for run, (twin, _, _) in runs(name, False).items():
            sel = [r for r in finals if r["task"] == name and r["run"] == run]
            if not sel:
                continue
            row = {"task": name, "run": run, "seeds": len(sel)}
            for key in ("train_loss", "test_loss", "accuracy"):
                m, s = mean_std([r[key] for r in sel])
                row[key] = f"{m:.4f} +- {s:.4f}"
            row["test loss gap to twin"], row["within seed noise"] = "", ""
            if twin:
                mine = [r["test_loss"] for r in sel]
                ref = [r["test_loss"] for r in finals if r["task"] == name and r["run"] == twin]
                (m1, s1), (m0, s0) = mean_std(mine), mean_std(ref)
                noise = 2 * math.sqrt((s1**2 + s0**2) / len(sel))
                finite = all(math.isfinite(v) for v in mine)
                row["test loss gap to twin"] = f"{m1 - m0:+.4f} (noise {noise:.4f})"
                within = finite and abs(m1 - m0) <= noise
                row["within seed noise"] = ("yes" if within else "no") if len(sel) > 1 else "n/a"
                if not finite:
                    bad = [r["step"] for r in curves if r["task"] == name and r["run"] == run
                           and not math.isfinite(r["loss"])]
                    row["test loss gap to twin"] = ("diverged: NaN loss by step "
                                                    f"{min(bad) if bad else '?'}")
            out.append(row)
    return out


def plot(curves: list[dict], path: Path) -> None:
    plt = pyplot()
    task_names = list(dict.fromkeys(r["task"] for r in curves))
    groups = list(dict.fromkeys(r["run"].split()[0] for r in curves))  # one panel per optimizer
    fig, axes = plt.subplots(len(task_names), len(groups),
                             figsize=(5 * len(groups), 3.8 * len(task_names)), squeeze=False)
    for row, name in zip(axes, task_names):
        for ax, group in zip(row, groups):
            for run in dict.fromkeys(r["run"] for r in curves if r["task"] == name):
                if not run.startswith(group):
                    continue
                sel = [r for r in curves if r["task"] == name and r["run"] == run]
                steps = sorted({r["step"] for r in sel})
                at = [[r["loss"] for r in sel if r["step"] == s] for s in steps]
                line, = ax.plot(steps, [mean_std(v)[0] for v in at], label=run, lw=1)
                ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at],
                                color=line.get_color(), alpha=0.2)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {group}")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (mean, min-max over seeds)")
            ax.legend(fontsize=7)
    save_figure(fig, path)


def main(out: str = "docs/results", quick: bool = False, steps: int | None = None,
         seeds: int | None = None, device: str = "cpu", compile: bool = False,
         size: str = "cpu", tasks_: str = "digits,chars", runs_: str = "", **_) -> list[dict]:
    out_dir = Path(out)
    task_names = tasks_.split(",")
    default_steps = {"digits": 20, "chars": 10} if quick else {"digits": 600, "chars": 500}
    if size == "gpu":
        default_steps = {"digits": 1000, "chars": 2000}
    step_counts = {k: steps or v for k, v in default_steps.items()}
    seeds = seeds or (1 if quick else 3)
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
    finals, curves = measure(task_names, step_counts, seeds, device, compile, size,
                             runs_)
    write_csv(out_dir / "convergence.csv", finals)
    write_csv(out_dir / "convergence_curves.csv", curves)
    plot(curves, out_dir / "convergence.png")
    write_summary(
        out_dir / "convergence_summary.md", "Convergence parity on real data",
        f"`python -m flashcompile study convergence`: {seeds} seeds, "
        f"{', '.join(f'{k} {v} steps' for k, v in step_counts.items() if k in task_names)}, "
        f"device {device}, compiled kernels {compile}, model size {size}. Flash runs keep the "
        "model in bf16; twins keep fp32 weights and states under bf16 autocast; chars clips "
        "the gradient norm at 1. Accuracy: digits test set; chars next character on "
        "held-out text.\n\n" + table(summarize(finals, task_names, curves)))
    return finals
