"""CAME (Luo et al., arXiv 2307.02047): Adafactor's factored second moment, momentum on the
normalized update, and a factored confidence that scales each step down where the update keeps
disagreeing with its momentum. As the authors' implementation (came_pytorch), for a matrix (2+
dims; leading dims batch matrices):

    R <- b2 R + (1 - b2) row_mean(g^2 + eps1)     C <- b2 C + (1 - b2) col_mean(g^2 + eps1)
    u = g / sqrt(R C / col_mean(R));   u <- u / max(1, RMS(u) / clip_threshold)
    m <- b1 m + (1 - b1) u
    Rr <- b3 Rr + (1 - b3) row_mean((u - m)^2 + eps2)    Cr likewise with col_mean
    p <- p (1 - lr wd) - lr m / sqrt(Rr Cr / col_mean(Rr))

A vector keeps a full second moment (u = g / sqrt(v)) and steps by lr m. No bias correction.
"""

from flashcompile.language import col_mean, maximum, mean_all, row_mean, rule, sqrt


@rule(
    defaults=dict(lr=2e-4, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999),
                  weight_decay=0.0),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "exp_avg_sq_row": "rows",
            "exp_avg_sq_col": "cols", "exp_avg_res_row": "rows", "exp_avg_res_col": "cols"},
    ranges={"clip_threshold": (1e-6, float("inf"))},
    param_flags=("matrix",),
)
def came(p, g, exp_avg, exp_avg_sq, exp_avg_sq_row, exp_avg_sq_col, exp_avg_res_row,
         exp_avg_res_col, *, step, lr, eps, clip_threshold, betas, weight_decay, matrix):
    eps1, eps2 = eps
    beta1, beta2, beta3 = betas
    g2 = g * g + eps1
    if matrix:
        exp_avg_sq_row = beta2 * exp_avg_sq_row + (1 - beta2) * row_mean(g2)
        exp_avg_sq_col = beta2 * exp_avg_sq_col + (1 - beta2) * col_mean(g2)
        u = g / sqrt(exp_avg_sq_row * exp_avg_sq_col / col_mean(exp_avg_sq_row))
    else:
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g2
        u = g / sqrt(exp_avg_sq)
    u = u / maximum(sqrt(mean_all(u * u)) / clip_threshold, 1.0)
    m = beta1 * exp_avg + (1 - beta1) * u
    update = m
    if matrix:
        res = (u - m) * (u - m) + eps2
        exp_avg_res_row = beta3 * exp_avg_res_row + (1 - beta3) * row_mean(res)
        exp_avg_res_col = beta3 * exp_avg_res_col + (1 - beta3) * col_mean(res)
        update = m / sqrt(exp_avg_res_row * exp_avg_res_col / col_mean(exp_avg_res_row))
    new_p = p * (1 - weight_decay * lr) - lr * update
    return new_p, m, exp_avg_sq, exp_avg_sq_row, exp_avg_sq_col, exp_avg_res_row, exp_avg_res_col
