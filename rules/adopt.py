"""ADOPT: Adam that normalizes the gradient by the second moment of the steps before it (Taniguchi
et al., arXiv 2411.02853), as the authors' implementation (iShohei220/adopt).

    g <- g + wd p                                   (decouple: p <- p (1 - lr wd) instead)
    step 1:  v <- g^2                               (no update)
    later:   n <- clip(g / max(sqrt(v), eps), (t - 1)^(1/4))
             m <- m + (1 - beta1) (n - m)           (torch: m.lerp_(n, 1 - beta1))
             p <- p - lr m
             v <- beta2 v + (1 - beta2) g^2

v is updated after it normalizes g, so g and its normalizer are independent: ADOPT converges
with any beta2 where Adam needs beta2 tuned to the problem. The clip (``clip=False`` leaves it
off) bounds the early steps.
"""

from flashcompile.language import maximum, minimum, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decouple=False,
                  clip=True, maximize=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative"},
)
def adopt(p, g, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay, decouple, clip,
          maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    if decouple:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    first = step == 1
    normed = g / maximum(sqrt(exp_avg_sq), eps)
    if clip:
        bound = (step - 1) ** 0.25
        normed = minimum(maximum(normed, -bound), bound)
    m = where(first, exp_avg, exp_avg + (1 - beta1) * (normed - exp_avg))
    v = where(first, exp_avg_sq + g * g, beta2 * exp_avg_sq + (1 - beta2) * g * g)
    return where(first, p, p - lr * m), m, v
