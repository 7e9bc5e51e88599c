"""Adamax: Adam with the infinity norm (torch.optim.Adamax's update).

    g   <- -g if maximize else g
    g   <- g + wd * p
    m   <- beta1 * m + (1 - beta1) * g
    u   <- max(beta2 * u, |g| + eps)
    p   <- p - lr / (1 - beta1^t) * m / u

Kingma & Ba, arXiv 1412.6980, section 7.1.
"""

from flashcompile.language import abs, maximum, rule


@rule(
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    states={"exp_avg": "signed", "exp_inf": "nonnegative"},
)
def adamax(p, g, exp_avg, exp_inf, *, step, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    g = g + weight_decay * p
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_inf = maximum(beta2 * exp_inf, abs(g) + eps)
    return p - lr / (1 - beta1**step) * exp_avg / exp_inf, exp_avg, exp_inf
