"""LAMB: Adam's direction, rescaled per parameter by a trust ratio (You et al., arXiv 1904.00962).

    g   <- -g if maximize else g
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    u   <- m^ / (sqrt(v^) + eps) + wd * p      (m^, v^: bias-corrected m, v if bias_correction)
    r   <- ||p|| / ||u|| if ||p|| > 0 and ||u|| > 0, else 1      (L2 norms over the whole param)
    p   <- p - lr * r * u

The paper's phi (a clip of ||p||) is the identity here, as in its experiments.
"""

from flashcompile.language import norm, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                  maximize=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative"},
)
def lamb(p, g, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay, bias_correction,
         maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    c1, c2 = (1 - beta1**step, 1 - beta2**step) if bias_correction else (1, 1)
    update = exp_avg / c1 / (sqrt(exp_avg_sq / c2) + eps) + weight_decay * p
    w, u = norm(p), norm(update)
    trust = where((w > 0) & (u > 0), w / u, 1.0)
    return p - lr * trust * update, exp_avg, exp_avg_sq
