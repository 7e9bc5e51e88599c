"""Adafactor (Shazeer and Stern, arXiv 1804.04235), as torch.optim.Adafactor: a second moment
factored into one number per row and per column of each matrix, relative step sizes and the
update clipped by its RMS. No momentum. For a parameter ``p`` at step t:

    rho = min(lr, 1 / sqrt(t))     alpha = max(eps2, RMS(p)) rho     (RMS before the decay)
    p <- p (1 - lr wd)             w = t^beta2_decay                  (1 - beta2 at step t)
    matrix (2+ dims; leading dims batch matrices):
        R <- lerp(R, row_mean(g^2), w)     C <- lerp(C, col_mean(g^2), w)
        V = R C / max(col_mean(R), eps1)
    vector:  V <- lerp(V, g^2, w)
    U = g / sqrt(max(V, eps1^2))           p <- p - alpha U / max(1, RMS(U) / d)

``eps=(eps1, eps2)``; torch's ``eps1=None`` (the parameter dtype's machine epsilon) is resolved
by ``flashcompile.Adafactor``; this rule's default is fp32's. Each lerp keeps ``1 - w`` from
going below 0 (it never does for t >= 1 and beta2_decay <= 0), which proves V >= 0.
"""

import math

from flashcompile.language import col_mean, maximum, mean_all, minimum, row_mean, rule, sqrt


@rule(
    defaults=dict(lr=1e-2, beta2_decay=-0.8, eps=(2.0**-23, 1e-3), d=1.0, weight_decay=0.0,
                  maximize=False),
    states={"variance": "nonnegative", "row_var": "rows", "col_var": "cols"},
    # beta2_decay <= 0, as torch.optim checks it; d >= 1
    ranges={"beta2_decay": (-math.inf, math.ulp(0.0)), "d": (1.0, math.inf)},
    param_flags=("matrix",),
)
def adafactor(p, g, variance, row_var, col_var, *, step, lr, beta2_decay, eps, d, weight_decay,
              maximize, matrix):
    eps1, eps2 = eps
    g = -g if maximize else g
    alpha = maximum(eps2, sqrt(mean_all(p * p))) * minimum(lr, 1 / sqrt(step))
    w = step**beta2_decay
    keep = maximum(1 - w, 0.0)
    if matrix:
        row_var = keep * row_var + w * row_mean(g * g)
        col_var = keep * col_var + w * col_mean(g * g)
        v = row_var * col_var / maximum(col_mean(row_var), eps1)
    else:
        variance = keep * variance + w * g * g
        v = variance
    u = g / sqrt(maximum(v, eps1 * eps1))
    new_p = p * (1 - lr * weight_decay) - alpha / maximum(1.0, sqrt(mean_all(u * u)) / d) * u
    return new_p, variance, row_var, col_var
