"""NAdam: Adam with Nesterov momentum and a momentum schedule (torch.optim.NAdam's update).

    g   <- -g if maximize else g
    g   <- g + wd * p                                     (L2; decoupled: p <- p * (1 - lr * wd))
    mu_t <- beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
    M   <- M * mu_t                                       (a scalar state: prod of mu_1 .. mu_t)
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    d   <- sqrt(v / (1 - beta2^t)) + eps
    p   <- p - lr (1 - mu_t) / (1 - M) * g / d - lr mu_{t+1} / (1 - M mu_{t+1}) * m / d

Dozat, ICLR 2016 workshop, "Incorporating Nesterov Momentum into Adam" (no arXiv version); decoupled
decay: Loshchilov & Hutter, arXiv 1711.05101.
"""

from flashcompile.language import rule, sqrt, where


@rule(
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                  decoupled_weight_decay=False, maximize=False),
    states={"mu_product": "scalar", "exp_avg": "signed", "exp_avg_sq": "nonnegative"},
)
def nadam(p, g, mu_product, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay,
          momentum_decay, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = where(step == 1, 1.0, mu_product) * mu  # the product starts at 1
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    denom = sqrt(exp_avg_sq / (1 - beta2**step)) + eps
    step_g, step_m = (1 - mu) / (1 - mu_product), mu_next / (1 - mu_product * mu_next)
    return p - lr * (step_g * g + step_m * exp_avg) / denom, mu_product, exp_avg, exp_avg_sq
