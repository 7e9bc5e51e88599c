"""Schedule-free AdamW (Defazio et al., arXiv 2405.15682), as the authors' AdamWScheduleFree: no
learning-rate schedule; the weights the gradient is taken at (y) interpolate between a base
sequence z and its weighted average x, which is what to evaluate (``optimizer.eval()``).

    c    <- min(1, t / warmup_steps) ;  lr_t <- lr c ;  lr_max <- max(lr_max, lr_t)
    w    <- t^r lr_max^weight_lr_power ;  W <- W + w ;  k <- w / W      (W, lr_max: per param group)
    v    <- beta2 v + (1 - beta2) g^2
    n    <- g / (sqrt(v / (1 - beta2^t)) + eps) + wd y
    y    <- y + k (z - y) + lr_t (beta1 (1 - k) - 1) n      (the param holds y while training)
    z    <- z - lr_t n                                      (z starts at the param)

z is a weight, not a moment: stored as the weight is (bf16 + int8 residual) under the flash codecs.
"""

from flashcompile.language import maximum, rule, sqrt, where


@rule(
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0.0,
                  r=0.0, weight_lr_power=2.0),
    states={"z": "signed", "exp_avg_sq": "nonnegative", "lr_max": "scalar",
            "weight_sum": "scalar"},
    flash_codecs={"z": "weight_split"},
)
def adamw_schedule_free(p, g, z, exp_avg_sq, lr_max, weight_sum, *, step, lr, betas, eps,
                        weight_decay, warmup_steps, r, weight_lr_power):
    beta1, beta2 = betas
    z = where(step == 1, p, z)
    warm = where(step < warmup_steps, step / maximum(warmup_steps, 1.0), 1.0)
    lr_t = lr * warm
    lr_max = maximum(where(step == 1, 0.0, lr_max), lr_t)
    weight = step**r * lr_max**weight_lr_power
    weight_sum = where(step == 1, 0.0, weight_sum) + weight
    k = where(weight_sum > 0, weight / weight_sum, 0.0)
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    n = g / (sqrt(v / (1 - beta2**step)) + eps) + weight_decay * p
    y = p + k * (z - p) + lr_t * (beta1 * (1 - k) - 1) * n
    return y, z - lr_t * n, v, lr_max, weight_sum
