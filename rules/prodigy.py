"""Prodigy (Mishchenko and Defazio, arXiv 2306.06101), the authors' Adam form (prodigyopt): Adam
on d g with step dlr = d lr (times sqrt(1 - beta2^t) / (1 - beta1^t) with use_bias_correction),
whose d is learned from sums over every parameter (``total``) and read from the next step on:

    s <- beta3 s + (d / d0) dlr g            r <- beta3 r + (d / d0) dlr <g, p0 - p>
    d_hat = d_coef r / ||s||_1               d_max <- max(d_max, d_hat)
    d <- min(d_max, growth_rate * (max(d, d_hat) while d = d0, else d))

p0 is the weight at the first step. What differs from prodigyopt: docs/behaviour.md.
"""

import math

from flashcompile.language import abs, maximum, minimum, rule, sqrt, total, where


@rule(
    defaults=dict(lr=1.0, betas=(0.9, 0.999), beta3=math.sqrt(0.999), eps=1e-8, weight_decay=0.0,
                  decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6,
                  d_coef=1.0, growth_rate=math.inf),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "s": "signed", "p0": "signed"},
    # s, a slow EMA, as AdEMAMix's (docs/numerics.md); p0 in bf16, a bf16 model's weights exactly
    flash_codecs={"s": "bf16_sr", "p0": "bf16"},
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
