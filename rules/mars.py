"""MARS-AdamW: AdamW on a variance-reduced gradient (Yuan et al., arXiv 2411.10438), as the
authors' approximate form (MARS-AdamW, is_approx: the previous step's gradient stands for the
gradient of the old weights at this step's batch).

    c <- g + gamma beta1 / (1 - beta1) (g - g_prev)     (g_prev = 0 at the first step, as theirs)
    c <- c / ||c|| where ||c|| > 1                       (the L2 norm over the whole param)
    m <- beta1 m + (1 - beta1) c ;  v <- beta2 v + (1 - beta2) c^2
    p <- p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    g_prev <- g
"""

from flashcompile.language import norm, rule, sqrt, where


@rule(
    defaults=dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025,
                  maximize=False),
    states={"exp_avg": "signed", "exp_avg_sq": "nonnegative", "last_grad": "signed"},
    # the last gradient in bf16: a bf16 gradient exactly, so g - g_prev (two close values) is
    # exact too; 8-bit it took 12 more instructions per element in each pass
    flash_codecs={"last_grad": "bf16"},
)
def mars(p, g, exp_avg, exp_avg_sq, last_grad, *, step, lr, betas, eps, weight_decay, gamma,
         maximize):
    beta1, beta2 = betas
    g = -g if maximize else g
    c = g + gamma * beta1 / (1 - beta1) * (g - last_grad)
    size = norm(c)
    c = where(size > 1, c / size, c)
    m = beta1 * exp_avg + (1 - beta1) * c
    v = beta2 * exp_avg_sq + (1 - beta2) * c * c
    direction = m / (1 - beta1**step) / (sqrt(v / (1 - beta2**step)) + eps)
    return p * (1 - lr * weight_decay) - lr * direction, m, v, g
