"""RMSprop, optionally centered and with momentum (torch.optim.RMSprop's update).

    g   <- -g if maximize else g
    g   <- g + wd * p
    v   <- alpha * v + (1 - alpha) * g^2
    m   <- alpha * m + (1 - alpha) * g                    (centered only)
    d   <- g / (sqrt(v - m^2 if centered else v) + eps)
    b   <- momentum * b + d
    p   <- p - lr * b                                     (with momentum == 0: b = d)

Tieleman & Hinton, COURSERA Neural Networks lecture 6.5 (2012); centered: Graves, arXiv 1308.0850.
"""

from flashcompile.language import maximum, rule, sqrt


@rule(
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                  maximize=False),
    states={"square_avg": "nonnegative", "momentum_buffer": "signed", "grad_avg": "signed"},
    # the earlier default's codecs: centered, v - grad_avg^2 can nearly cancel, and the adaptive
    # codes' coarser steps turned it negative (PyTorch's test_param_groups_lr diverged)
    flash_codecs={"square_avg": "sqrt_uint8_nonzero", "grad_avg": "softsign_int8",
                  "momentum_buffer": "softsign_int8"},
    ranges={"alpha": (0.0, 1.0)},
    zero_branches=("momentum",),  # no momentum buffer at momentum 0, as torch.optim.RMSprop
)
def rmsprop(p, g, square_avg, momentum_buffer, grad_avg, *, step, lr, alpha, eps, weight_decay,
            momentum, centered, maximize):
    g = -g if maximize else g
    g = g + weight_decay * p
    square_avg = alpha * square_avg + (1 - alpha) * g * g
    var = square_avg
    if centered:
        grad_avg = alpha * grad_avg + (1 - alpha) * g
        # v - m^2 >= 0 in exact arithmetic; clamp the rounding (or quantization) below zero
        var = maximum(square_avg - grad_avg * grad_avg, 0.0)
    momentum_buffer = momentum * momentum_buffer + g / (sqrt(var) + eps)
    return p - lr * momentum_buffer, square_avg, momentum_buffer, grad_avg
