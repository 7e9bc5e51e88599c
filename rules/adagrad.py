"""Adagrad (torch.optim.Adagrad's update, with lr_decay and initial_accumulator_value).

    g   <- -g if maximize else g
    g   <- g + wd * p
    s   <- (s0 if t == 1 else s) + g^2                    (s0 = initial_accumulator_value)
    p   <- p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)

Duchi, Hazan & Singer, JMLR 12 (2011), "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization" (no arXiv version).
"""

from flashcompile.language import rule, sqrt, where


@rule(
    defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                  eps=1e-10, maximize=False),
    states={"sum": "nonnegative"},
)
def adagrad(p, g, sum, *, step, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
            maximize):
    g = -g if maximize else g
    g = g + weight_decay * p
    # states start at zero: the accumulator's initial value enters at the first step
    sum = where(step == 1, initial_accumulator_value, sum) + g * g
    return p - lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum) + eps), sum
