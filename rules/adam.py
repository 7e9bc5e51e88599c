"""Adam / AdamW (torch.optim.Adam's update, with amsgrad and decoupled weight decay), step-guarded.

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2;  v^ <- max(v^, v) if amsgrad
    Q <- beta1^2 / beta2 Q + (1 - beta1)^2 / (1 - beta2)              (one number per param)
    d <- max(sqrt(v^ / (1 - beta2^t)) + eps, |m| / sqrt(Q (1 - beta2^t)));  p <- p - lr m^ / d

Guard (off: FlashOptim, 2602.23349): Cauchy-Schwarz on m = sum a_k g_k, v = sum c_k g_k^2 gives
|m| <= sqrt(Q v), Q = sum a_k^2 / c_k for any betas: exact Adam never reaches the floor, a v
quantised to 0 is capped at Adam's bound; Q = 0 after step 1 (history unknown): no floor. arXiv:
Adam 1412.6980, AdamW 1711.05101, AMSGrad 1904.09237."""

from flashcompile.language import abs, maximum, rule, sqrt, where


@rule(
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                  maximize=False, decoupled_weight_decay=False, step_guard=True),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "max_exp_avg_sq": "nonnegative",
            "bound_sq": "scalar"},
)
def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, bound_sq, *, step, lr, betas, eps,
         weight_decay, amsgrad, maximize, decoupled_weight_decay, step_guard):
    beta1, beta2 = betas
    g = -g if maximize else g
    g = g if decoupled_weight_decay else g + weight_decay * p  # L2, or decay the weight:
    p = p * (1 - lr * weight_decay) if decoupled_weight_decay else p
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq) if amsgrad else max_exp_avg_sq
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    denom = sqrt((max_exp_avg_sq if amsgrad else exp_avg_sq) / c2) + eps
    if step_guard:
        # beta2 = 0: v forgets, m does not. Plain floats evaluate both branches: maxima keep finite
        known = ((step == 1) | (bound_sq > 0)) & (beta2 > 0)
        bound_sq = where(known, where(step == 1, 0.0, bound_sq) * beta1 * beta1
                         / maximum(beta2, 1e-300) + (1 - beta1) * (1 - beta1) / (1 - beta2), 0.0)
        floor = where(bound_sq > 0, 1 / sqrt(maximum(bound_sq * c2, 1e-300)), 0.0)
        denom = maximum(denom, abs(exp_avg) * floor)
    return p - lr / c1 * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq, bound_sq
