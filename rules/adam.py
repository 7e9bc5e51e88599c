"""Adam / AdamW (torch.optim.Adam's update, with amsgrad and decoupled weight decay).

    g   <- -g if maximize else g
    g   <- g + wd * p                                     (L2; decoupled: p <- p * (1 - lr * wd))
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    v^  <- max(v^, v) if amsgrad else v
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v^ / (1 - beta2^t)) + eps)

Adam: Kingma & Ba, arXiv 1412.6980. AdamW: Loshchilov & Hutter, arXiv 1711.05101. AMSGrad: Reddi et
al., arXiv 1904.09237.
"""

from flashcompile.dsl import maximum, rule, sqrt


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                  maximize=False, decoupled_weight_decay=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "max_exp_avg_sq": "nonnegative"},
)
def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, betas, eps, weight_decay,
         amsgrad, maximize, decoupled_weight_decay):
    beta1, beta2 = betas
    g = -g if maximize else g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    if amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
    v = max_exp_avg_sq if amsgrad else exp_avg_sq
    denom = sqrt(v / (1 - beta2**step)) + eps
    return p - lr / (1 - beta1**step) * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq
