"""AdEMAMix: Adam plus a slow gradient EMA in the numerator (Pagliardini et al., arXiv 2409.03137).

    g   <- -g if maximize else g
    m1  <- beta1 * m1 + (1 - beta1) * g                       (fast EMA)
    m2  <- beta3_t * m2 + (1 - beta3_t) * g                   (slow EMA)
    v   <- beta2 * v + (1 - beta2) * g^2
    u   <- (m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(v / (1 - beta2^t)) + eps)
    p   <- p * (1 - lr * wd) - lr * u

with the paper's warmups over T_alpha = ``alpha_warmup`` and T_beta3 = ``beta3_warmup`` steps (a
warmup below 1 step, such as the default 0, is off: alpha_t = alpha, beta3_t = beta3):

    alpha_t = min(t * alpha / T_alpha, alpha)
    beta3_t = min(exp(ln b1 ln b3 / ((1 - a) ln b3 + a ln b1)), b3),  a = min(t / T_beta3, 1)
"""

from flashcompile.language import exp, log, maximum, minimum, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, eps=1e-8, weight_decay=0.0,
                  alpha_warmup=0.0, beta3_warmup=0.0, maximize=False),
    states={"exp_avg_fast": "signed", "exp_avg_slow": "signed", "exp_avg_sq": "nonnegative"},
    # the slow EMA stalls rounded to nearest; bf16 stochastic beat 8-bit (docs/numerics.md)
    flash_codecs={"exp_avg_slow": "bf16_sr"},
)
def ademamix(p, g, exp_avg_fast, exp_avg_slow, exp_avg_sq, *, step, lr, betas, alpha, eps,
             weight_decay, alpha_warmup, beta3_warmup, maximize):
    beta1, beta2, beta3 = betas
    g = -g if maximize else g
    alpha_t = alpha * minimum(step / maximum(alpha_warmup, 1), 1)
    a = minimum(step / maximum(beta3_warmup, 1), 1)
    # the same schedule in 1 / ln(beta), which is 0 at beta = 0 (where ln is not finite)
    q1, q3 = (where(b > 0, 1 / log(maximum(b, 1e-300)), 0.0) for b in (beta1, beta3))
    beta3_t = minimum(exp(1 / minimum((1 - a) * q1 + a * q3, -1e-300)), beta3)
    exp_avg_fast = beta1 * exp_avg_fast + (1 - beta1) * g
    exp_avg_slow = beta3_t * exp_avg_slow + (1 - beta3_t) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    numer = exp_avg_fast / (1 - beta1**step) + alpha_t * exp_avg_slow
    update = numer / (sqrt(exp_avg_sq / (1 - beta2**step)) + eps)
    return p * (1 - lr * weight_decay) - lr * update, exp_avg_fast, exp_avg_slow, exp_avg_sq
