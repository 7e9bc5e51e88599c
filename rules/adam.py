"""Adam / AdamW (torch.optim.Adam's update, with amsgrad and decoupled weight decay), step-guarded.

    g   <- -g if maximize else g
    g   <- g + wd * p                                     (L2; decoupled: p <- p * (1 - lr * wd))
    m   <- beta1 * m + (1 - beta1) * g
    v   <- beta2 * v + (1 - beta2) * g^2
    v^  <- max(v^, v) if amsgrad else v
    d   <- sqrt(v^ / (1 - beta2^t)) + eps
    Q   <- beta1^2 / beta2 * Q + (1 - beta1)^2 / (1 - beta2)        (one number per param)
    d   <- max(d, |m| / sqrt(Q (1 - beta2^t)))                       (if step_guard)
    p   <- p - lr / (1 - beta1^t) * m / d

The guard: m and v are sums a_k g_k and c_k g_k^2 over past gradients, so by Cauchy-Schwarz
|m| <= sqrt(Q v) with Q = sum a_k^2 / c_k, which follows the recurrence above for any beta
schedule: the step m^ / d never exceeds sqrt(Q (1 - beta2^t)) / (1 - beta1^t), and the floor on d
clips it there. Exact Adam never reaches the floor, so with exact states it changes nothing; a
second moment quantised to 0 next to a louder lane of its group of 32 can no longer turn the step
into m / eps (``python -m flashcompile study collapse``). Q = 0 after step 1 means the history is
unknown (state from torch.optim): no clip. ``step_guard=False`` with the flash codecs is FlashOptim.

Adam: Kingma & Ba, arXiv 1412.6980. AdamW: Loshchilov & Hutter, arXiv 1711.05101. AMSGrad: Reddi et
al., arXiv 1904.09237. FlashOptim: arXiv 2602.23349.
"""

from flashcompile.dsl import abs, maximum, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                  maximize=False, decoupled_weight_decay=False, step_guard=True),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "max_exp_avg_sq": "nonnegative",
            "bound_sq": "scalar"},
    flash_codecs={"exp_avg_sq": "sqrt_uint8", "max_exp_avg_sq": "sqrt_uint8"},
)
def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, bound_sq, *, step, lr, betas, eps,
         weight_decay, amsgrad, maximize, decoupled_weight_decay, step_guard):
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
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    denom = sqrt(v / c2) + eps
    if step_guard:
        known = ((step == 1) | (bound_sq > 0)) & (beta2 > 0)  # beta2 = 0: v forgets, m does not
        bound_sq = where(known, where(step == 1, 0.0, bound_sq) * beta1 * beta1 / beta2
                         + (1 - beta1) * (1 - beta1) / (1 - beta2), 0.0)
        # |u| <= sqrt(Q c2) / c1 as a floor on the denominator: one division, unchanged below it
        denom = maximum(denom, abs(exp_avg) * where(bound_sq > 0, 1 / sqrt(bound_sq * c2), 0.0))
    return p - lr / c1 * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq, bound_sq
