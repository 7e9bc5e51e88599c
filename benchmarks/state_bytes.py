"""Resident bytes per parameter of every shipped optimizer: default codecs on a bf16 model against
its fp32 twin (``codecs="fp32"`` on fp32 weights, torch.optim's storage).

    python benchmarks/state_bytes.py [--markdown]

Counted from the tensors each optimizer holds after one step on a 256 x 4096 matrix (CPU, eager
plans): weight + gradient + every state (the weight split's int8 residual included; scalars such
as ``step`` left out). "release" drops the gradient: gradient release frees each one inside
backward. Device-independent: the same tensors are allocated on CUDA.
"""

from __future__ import annotations

import argparse

import torch

import flashcompile as fc

# (name as listed, class, its arguments); the others at their defaults
SETUPS = [("SGD (momentum 0.9)", "SGD", {"momentum": 0.9}), ("SGD (momentum 0)", "SGD", {}),
          ("RMSprop (momentum 0.9)", "RMSprop", {"momentum": 0.9})]
OPTIMIZERS = ["SGDW", "AdamW", "Adam", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam",
              "RAdam", "ASGD", "Rprop", "Lion", "LAMB", "LARS", "AdEMAMix", "Adan", "ADOPT",
              "CautiousAdamW", "MARS", "AdamWScheduleFree", "Muon", "Prodigy", "Adafactor", "CAME"]


def state_bytes(name: str, kwargs: dict, dtype: torch.dtype, codecs: str
                ) -> tuple[float, list[str]]:
    """(state bytes per param, the state tensors' keys) after one step."""
    p = torch.nn.Parameter(torch.randn(256, 4096).to(dtype))
    opt = getattr(fc, name)([p], compile=False, codecs=codecs, **kwargs)
    p.grad = torch.randn_like(p)
    opt.step()
    held = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.numel() > 1}
    return sum(v.numel() * v.element_size() for v in held.values()) / p.numel(), list(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a markdown table")
    args = parser.parse_args()
    rows = []
    setups = SETUPS + [("SGDW (momentum 0.9)", "SGDW", {"momentum": 0.9})]
    setups += [(name, name, {}) for name in OPTIMIZERS if name != "SGDW"]
    for label, name, kwargs in setups:
        flash, keys = state_bytes(name, kwargs, torch.bfloat16, "flash")
        fp32, _ = state_bytes(name, kwargs, torch.float32, "fp32")
        states = sorted({k.split(".")[0] for k in keys} - {"param"})
        rows.append((label, ", ".join(states) or "none", 2 + flash + 2, 2 + flash, 4 + fp32 + 4))
    if args.markdown:
        print("| optimizer | states | B/param | with gradient release | fp32 twin |")
        print("|---|---|---|---|---|")
        for name, states, total, release, twin in rows:
            print(f"| `{name}` | {states} | {total:g} | {release:g} | {twin:g} |")
        return
    print(f"{'optimizer':<24} {'B/param':>8} {'release':>8} {'fp32 twin':>10}  states")
    for name, states, total, release, twin in rows:
        print(f"{name:<24} {total:8g} {release:8g} {twin:10g}  {states}")


if __name__ == "__main__":
    main()
