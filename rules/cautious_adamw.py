"""Cautious AdamW: AdamW whose update skips the coordinates where the momentum and the gradient
disagree in sign (Liang et al., arXiv 2411.16085), as the authors' C-AdamW.

    m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
    k <- 1 where m g > 0, else 0
    k <- k * n / (sum(k) + 1)                     (n: the param's size; keeps the update's scale)
    p <- p (1 - lr wd) - lr (m / (1 - beta1^t)) k / (sqrt(v / (1 - beta2^t)) + eps)

The mask's sum spans the whole parameter: a reduction, so the kernel reads its inputs twice.
"""

from flashcompile.language import rule, sqrt, sum_all, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative"},
)
def cautious_adamw(p, g, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    mask = where(m * g > 0, 1.0, 0.0)
    size = sum_all(0 * mask + 1)  # the param's size (sum_all of a plain number is that number)
    mask = mask * size / (sum_all(mask) + 1)
    direction = m / (1 - beta1**step) * mask / (sqrt(v / (1 - beta2**step)) + eps)
    return p * (1 - lr * weight_decay) - lr * direction, m, v
