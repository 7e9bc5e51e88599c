"""Adadelta (torch.optim.Adadelta's update).

    g   <- -g if maximize else g
    g   <- g + wd * p
    v   <- rho * v + (1 - rho) * g^2
    d   <- sqrt(u + eps) / sqrt(v + eps) * g
    u   <- rho * u + (1 - rho) * d^2
    p   <- p - lr * d

Zeiler, arXiv 1212.5701.
"""

from flashcompile.language import rule, sqrt


@rule(
    defaults=dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    states={"square_avg": "nonnegative", "acc_delta": "nonnegative"},
    ranges={"rho": (0.0, 1.0)},
)
def adadelta(p, g, square_avg, acc_delta, *, step, lr, rho, eps, weight_decay, maximize):
    g = -g if maximize else g
    g = g + weight_decay * p
    square_avg = rho * square_avg + (1 - rho) * g * g
    delta = sqrt((acc_delta + eps) / (square_avg + eps)) * g  # one root: fewer instructions/byte
    acc_delta = rho * acc_delta + (1 - rho) * delta * delta
    return p - lr * delta, square_avg, acc_delta
