"""ASGD: SGD with Polyak-Ruppert averaging of the iterates (torch.optim.ASGD's update).

    g   <- -g if maximize else g
    g   <- g + wd * p
    p   <- p * (1 - lambd * eta) - eta * g                (eta, mu: scalar states; eta_1 = lr)
    ax  <- p if mu == 1 else ax + mu * (p - ax)
    eta <- lr / (1 + lambd * lr * t)^alpha,   mu <- 1 / max(1, t - t0)    (used at step t + 1)

Polyak & Juditsky, SIAM J. Control Optim. 30(4), 1992 (no arXiv version); the step size schedule
as in Bottou, arXiv 1107.2490 (section 5).
"""

from flashcompile.language import maximum, rule, where


@rule(
    defaults=dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False),
    states={"eta": "scalar", "mu": "scalar", "ax": "signed"},
)
def asgd(p, g, eta, mu, ax, *, step, lr, lambd, alpha, t0, weight_decay, maximize):
    g = -g if maximize else g
    g = g + weight_decay * p
    first = step == 1  # torch starts eta at lr and mu at 1
    eta = where(first, lr, eta)
    p = p * (1 - lambd * eta) - eta * g
    ax = where(first | (mu == 1), p, ax + mu * (p - ax))
    # set from this step's lr, used by the next step (so a scheduler's new lr arrives a step late)
    return p, lr / (1 + lambd * lr * step) ** alpha, 1 / maximum(1.0, step - t0), ax
