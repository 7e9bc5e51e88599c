"""Lion: sign of an interpolated momentum, decoupled weight decay (Chen et al., arXiv 2302.06675).

    g   <- -g if maximize else g
    p   <- p * (1 - lr * wd) - lr * sign(beta1 * m + (1 - beta1) * g)
    m   <- beta2 * m + (1 - beta2) * g
"""

from flashcompile.language import rule, sign


@rule(
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    states={"exp_avg": "signed"},
)
def lion(p, g, exp_avg, *, step, lr, betas, weight_decay, maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    update = sign(beta1 * exp_avg + (1 - beta1) * g)
    return p * (1 - lr * weight_decay) - lr * update, beta2 * exp_avg + (1 - beta2) * g
