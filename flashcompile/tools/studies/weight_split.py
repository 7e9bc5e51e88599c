"""Weight split reconstruction error across exponents (the FlashOptim paper's figure).

For each binade ``[2**e, 2**(e+1))`` it draws fp32 weights with uniformly random mantissas and signs,
stores each as a 16-bit weight (bf16 or fp16, round to nearest) plus a residual, reconstructs, and
reports the mean and max relative error and the share of weights rebuilt bit-exactly. Residuals:

* ``none``: the 16-bit weight alone;
* ``float16``: ``w - hi`` stored in the weight's own 16-bit float format (bf16 + bf16, fp16 + fp16);
* ``int8``: the ``weight_split`` codec, ``w - hi`` in units of half a ULP / 127;
* ``int16``: the same with int16 codes (units of half a ULP / 32767).

Expected (paper): bf16 + int8 max relative error <= 1.54e-5; bf16 + int16 >= 99.9% bit-exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flashcompile.codecs import WeightSplit
from flashcompile.tools.studies.report import pyplot, save_figure, table, write_csv, write_summary

RESIDUALS = ("none", "float16", "int8", "int16")
WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 holds 2**-24 .. 65504: its last whole binade is 14 (2**15 .. 65504 would partly overflow), and
# below 2**-14 its weights are subnormal.
EXPONENTS = {"bf16": range(-40, 41), "fp16": range(-24, 15)}


def sample(e: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` fp32 values in ``[2**e, 2**(e+1))`` with uniform random 23-bit mantissas and signs."""
    mantissa = torch.randint(0, 2**23, (n,), generator=gen, dtype=torch.int32)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32) << 31
    return (sign | ((e + 127) << 23) | mantissa).view(torch.float32)


def reconstruct(w: torch.Tensor, weight: str, residual: str) -> torch.Tensor:
    dtype = WEIGHTS[weight]
    hi = w.to(dtype)
    if residual == "none":
        return hi.float()
    if residual == "float16":
        # read hi back through its bits: a float round trip may be folded away by a compiler
        low = (w - hi.float()).to(dtype)
        return hi.float() + low.float()
    codec = WeightSplit(dtype, torch.int8 if residual == "int8" else torch.int16)
    return codec.decode(*codec.encode(w.view(-1, 32))).view(-1)


def measure(samples: int = 8192, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for weight, exponents in EXPONENTS.items():
        for e in exponents:
            w = sample(e, samples, gen)
            for residual in RESIDUALS:
                got = reconstruct(w, weight, residual)
                rel = ((got.double() - w.double()).abs() / w.double().abs())
                rows.append({"weight": weight, "residual": residual, "exponent": e,
                             "mean_rel_err": rel.mean().item(), "max_rel_err": rel.max().item(),
                             "bit_exact": (got.view(torch.int32) == w.view(torch.int32))
                             .float().mean().item()})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (weight, residual), over bf16's exponents -40..40 and fp16's normal range -14..14."""
    out = []
    for weight in WEIGHTS:
        lo = -14 if weight == "fp16" else -40
        for residual in RESIDUALS:
            sel = [r for r in rows if r["weight"] == weight and r["residual"] == residual
                   and r["exponent"] >= lo]
            out.append({"weight": weight, "residual": residual,
                        "exponents": f"{sel[0]['exponent']}..{sel[-1]['exponent']}",
                        "mean rel err": sum(r["mean_rel_err"] for r in sel) / len(sel),
                        "max rel err": max(r["max_rel_err"] for r in sel),
                        "bit-exact": sum(r["bit_exact"] for r in sel) / len(sel)})
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, weight in zip(axes, WEIGHTS):
        for residual in RESIDUALS:
            sel = [r for r in rows if r["weight"] == weight and r["residual"] == residual]
            x = [r["exponent"] for r in sel]
            line, = ax.plot(x, [max(r["max_rel_err"], 1e-12) for r in sel], label=f"{residual} max")
            ax.plot(x, [max(r["mean_rel_err"], 1e-12) for r in sel], "--", color=line.get_color(),
                    label=f"{residual} mean")
        ax.axhline(1.54e-5, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"{weight} weight + residual")
        ax.set_xlabel("binary exponent of the fp32 weight")
    axes[0].set_ylabel("relative reconstruction error (floored at 1e-12)")
    axes[1].legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main(out: str = "docs/results", quick: bool = False, **_) -> list[dict]:
    out_dir = Path(out)
    rows = measure(samples=1024 if quick else 8192)
    write_csv(out_dir / "weight_split.csv", rows)
    plot(rows, out_dir / "weight_split.png")
    summary = summarize(rows)
    bf16 = {r["residual"]: r for r in summary if r["weight"] == "bf16"}
    checks = (f"- bf16 + int8 max relative error {bf16['int8']['max rel err']:.3g} "
              f"(paper: <= 1.54e-5): {'met' if bf16['int8']['max rel err'] <= 1.54e-5 else 'NOT met'}\n"
              f"- bf16 + int16 bit-exact {bf16['int16']['bit-exact']:.4%} (paper: >= 99.9%): "
              f"{'met' if bf16['int16']['bit-exact'] >= 0.999 else 'NOT met'}")
    write_summary(out_dir / "weight_split_summary.md", "Weight split reconstruction error",
                  f"`python -m flashcompile study weight-split`: {len(EXPONENTS['bf16'])} bf16 and "
                  f"{len(EXPONENTS['fp16'])} fp16 binades (fp16 from -24: subnormal weights plotted, "
                  f"summarised over its normal range), {1024 if quick else 8192} random weights each."
                  "\n\n"
                  f"{table(summary)}\n\n{checks}")
    return rows
