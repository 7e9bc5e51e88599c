"""Define a new optimizer in a few lines: AdaBelief as a flashcompile rule.

The rule below is the whole optimizer. flashcompile traces it, proves the declared facts (here that
``exp_avg_var`` stays nonnegative, so it may use an unsigned 8-bit codec), generates one fused step
function per codec choice and runs it as a ``torch.optim.Optimizer``. The script then prints the
generated code, trains a small MLP on scikit-learn's digits with the rule in bf16 with 8-bit states,
and again with ``codecs="fp32"`` on fp32 params as the full-precision reference.

Run::

    python examples/custom_rule.py
    python examples/custom_rule.py --no-compile   # eager kernels: no compile wait
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

import flashcompile

# Inductor's C++ backend notes that a kernel mixes bf16 (weights) and fp16 (codec scales); that is
# by design here.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")


# AdaBelief (Zhuang et al., arXiv 2010.07468): Adam whose second moment tracks the variance of the
# gradient around its running mean (the "belief"), not its raw square.
# eps is Adam's 1e-8 rather than the paper's 1e-16: it is also added to exp_avg_var every step,
# so the denominator never falls below sqrt(eps), even where the 8-bit codec stored a 0.
@flashcompile.rule(
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    states={"exp_avg": "signed", "exp_avg_var": "nonnegative"},
)
def adabelief(p, g, exp_avg, exp_avg_var, *, step, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    p = p * (1 - lr * weight_decay)  # decoupled, as in AdamW
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_var = beta2 * exp_avg_var + (1 - beta2) * (g - exp_avg) ** 2 + eps
    denom = flashcompile.sqrt(exp_avg_var / (1 - beta2**step)) + eps
    return p - lr / (1 - beta1**step) * exp_avg / denom, exp_avg, exp_avg_var


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true",
                        help="run the rule's step eagerly (skips the torch.compile wait)")
    return parser.parse_args(argv)


def load_data(seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Digits as standardised fp32 tensors: x_train, y_train, x_test, y_test (scaler fit on train)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    features = [torch.as_tensor(a, dtype=torch.float32, device=device) for a in (x_train, x_test)]
    labels = [torch.as_tensor(a, dtype=torch.long, device=device) for a in (y_train, y_test)]
    return features[0], labels[0], features[1], labels[1]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32 whatever the model's dtype: bf16 logits would round the loss itself."""
    dtype = next(model.parameters()).dtype
    return F.cross_entropy(model(x.to(dtype)).float(), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).argmax(dim=1) == y).float().mean().item() * 100


def train(runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]], data: tuple[torch.Tensor, ...],
          steps: int, batch_size: int, seed: int) -> None:
    """Step every run on the same batches; print each one's mean loss every 50 steps."""
    x_train, y_train = data[0], data[1]
    gen = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(runs, 0.0)
    print(f"{'step':>6}" + "".join(f"{name:>24}" for name in runs))
    for step in range(1, steps + 1):
        # Random batches (with replacement across steps), drawn once and shared by every run.
        idx = torch.randint(len(x_train), (batch_size,), generator=gen).to(x_train.device)
        for name, (model, opt) in runs.items():
            loss = loss_of(model, x_train[idx], y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            totals[name] += loss.item()
        if step % 50 == 0 or step == steps:
            span = 50 if step % 50 == 0 else step % 50
            print(f"{step:>6}" + "".join(f"{totals[n] / span:>24.4f}" for n in runs))
            totals = dict.fromkeys(runs, 0.0)


def run_check_rule() -> None:
    """The property suite users get for free: proofs, and each flash step within its codecs'
    error bounds of the fp32 step, under hypothesis-drawn shapes and hyperparameters."""
    from flashcompile.testing import check_rule

    check_rule(adabelief, max_examples=10)
    print("\nflashcompile.testing.check_rule(adabelief): passed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = load_data(args.seed, args.device)

    # One initialisation: the fp32 reference and a bf16 copy of the same weights.
    ref = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).to(args.device)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    hyper = {"lr": args.lr, "weight_decay": args.weight_decay, "compile": not args.no_compile}
    runs = {
        "bf16, 8-bit states": (low, flashcompile.Optimizer(low.parameters(), adabelief, **hyper)),
        "fp32 (codecs='fp32')": (
            ref, flashcompile.Optimizer(ref.parameters(), adabelief, codecs="fp32", **hyper)
        ),
    }

    print(flashcompile.compiler.explain(runs["bf16, 8-bit states"][1]))
    print(f"\ntraining a 64-64-10 MLP on digits for {args.steps} steps (mean loss per 50 steps)")
    train(runs, data, args.steps, args.batch_size, args.seed)
    x_test, y_test = data[2], data[3]
    for name, (model, _) in runs.items():
        print(f"test accuracy, {name}: {accuracy(model, x_test, y_test):.2f}%")

    run_check_rule()
    return 0


if __name__ == "__main__":
    sys.exit(main())
