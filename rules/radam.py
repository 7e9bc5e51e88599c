"""RAdam: Adam with the variance of its adaptive step rectified (torch.optim.RAdam's update).

    g   <- -g if maximize else g
    g   <- g + wd * p                                     (L2; decoupled: p <- p * (1 - lr * wd))
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    rho_inf <- 2 / (1 - beta2) - 1,   rho_t <- rho_inf - 2 t beta2^t / (1 - beta2^t)
    r   <- sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    p   <- p - lr / (1 - beta1^t) * m * (r sqrt(1 - beta2^t) / (sqrt(v) + eps) if rho_t > 5 else 1)

Liu et al., arXiv 1908.03265.
"""

from flashcompile.language import maximum, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative"},
)
def radam(p, g, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay,
          decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    bias2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias2
    # where rho_t > 5 (so rho_inf > 5 too) the clamps change nothing; elsewhere they keep r finite
    rho, rho_max = maximum(rho_t, 5.0), maximum(rho_inf, maximum(rho_t, 5.0))
    r = sqrt((rho - 4) * (rho - 2) * rho_max / ((rho_max - 4) * (rho_max - 2) * rho))
    adaptive = where(rho_t > 5, r * sqrt(bias2) / (sqrt(exp_avg_sq) + eps), 1.0)
    return p - lr / (1 - beta1**step) * exp_avg * adaptive, exp_avg, exp_avg_sq
