"""Prodigy: Adam whose step size d learns itself from how far the weights moved (Mishchenko and
Defazio, arXiv 2306.06101), as the authors' Adam form (prodigyopt), with lr = 1 as the default.

    g   <- g + wd p                                 (decouple=False; else decay below)
    m   <- beta1 m + d (1 - beta1) g
    v   <- beta2 v + d^2 (1 - beta2) g^2
    s   <- beta3 s + (d / d0) dlr g                 (safeguard_warmup: d instead of dlr)
    p   <- p (1 - wd dlr) - dlr m / (sqrt(v) + d eps),   dlr = d lr bias
    r   <- beta3 r + (d / d0) dlr <g, p0 - p>       (sums over every parameter: total)
    d_hat = d_coef r / ||s||_1;   d <- max(d, d_hat) while d = d0;   d_max <- max(d_max, d_hat)
    d   <- min(d_max, d growth_rate)

p0 is the weight at the first step; bias = sqrt(1 - beta2^t) / (1 - beta1^t) if
use_bias_correction, else 1. d, d_max and r are shared by every parameter (``param_groups[i]["d"]``):
this step's sums give the d of the next step, as the paper's algorithm reads d_k in step k, so one
pass over the parameters does everything (gradient release included). prodigyopt adds the new d
to eps in the update; here the update's eps term reads this step's d (one step behind, on eps
only: docs/behaviour.md says when that shows). A group with lr 0 contributes to the sums like any
other (prodigyopt skips it).
"""

import math

from flashcompile.language import abs, maximum, minimum, rule, sqrt, total, where


@rule(
    defaults=dict(lr=1.0, betas=(0.9, 0.999), beta3=math.sqrt(0.999), eps=1e-8, weight_decay=0.0,
                  decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
                  d_coef=1.0, growth_rate=math.inf),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "s": "signed", "p0": "signed"},
    # s is a slow EMA (beta3 = sqrt(beta2)): rounded stochastically, as AdEMAMix's slow momentum;
    # p0 - p must resolve the first steps' moves: p0 in bf16, exact for a bf16 model's weights
    flash_codecs={"s": "softsign_adaptive_sr", "p0": "bf16"},
    starts={"p0": "param"},  # read, never written: no store per step
    ranges={"beta3": (0.0, 1.0), "d0": (1e-30, math.inf), "growth_rate": (1.0, math.inf)},
    shared={"d": "d0", "d_max": "d0", "d_numerator": 0.0},
)
def prodigy(p, g, exp_avg, exp_avg_sq, s, p0, *, step, lr, betas, beta3, eps, weight_decay,
            decouple, use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate, d, d_max,
            d_numerator):
    beta1, beta2 = betas
    bias = sqrt(1 - beta2**step) / (1 - beta1**step) if use_bias_correction else 1.0
    dlr = d * lr * bias
    if not decouple:
        g = g + weight_decay * p
    m = beta1 * exp_avg + d * (1 - beta1) * g
    v = beta2 * exp_avg_sq + d * d * (1 - beta2) * g * g
    s = beta3 * s + (d / d0) * (d if safeguard_warmup else dlr) * g
    new_p = p - dlr * m / (sqrt(v) + d * eps)
    if decouple:
        new_p = new_p - weight_decay * dlr * p
    numerator = beta3 * d_numerator + total((d / d0) * dlr * g * (p0 - p))
    denominator = total(abs(s))
    d_hat = where(denominator > 0, d_coef * numerator / denominator, 0.0)
    new_d_max = maximum(d_max, d_hat)
    new_d = minimum(new_d_max, where(d == d0, maximum(d, d_hat), d) * growth_rate)
    return new_p, m, v, s, p0, new_d, new_d_max, numerator
