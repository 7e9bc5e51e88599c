"""LARS: momentum SGD with a per-parameter trust ratio (You, Gitman & Ginsburg, arXiv 1708.03888).

    g   <- -g if maximize else g
    r   <- eta * ||p|| / (||g|| + wd * ||p|| + eps) if ||p|| > 0 and ||g|| > 0, else 1
    buf <- momentum * buf + lr * r * (g + wd * p)
    p   <- p - buf

As in the paper's Algorithm 1, the global rate lr enters the momentum buffer (torch.optim.SGD
applies it after); the two agree for a constant lr. eta is ``trust_coefficient``; the L2 norms
span the whole param.
"""

from flashcompile.language import norm, rule, where


@rule(
    defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8,
                  maximize=False),
    states={"momentum_buffer": "signed"},
)
def lars(p, g, momentum_buffer, *, step, lr, momentum, weight_decay, trust_coefficient, eps,
         maximize):
    g = -g if maximize else g
    w, n = norm(p), norm(g)
    trust = where((w > 0) & (n > 0), trust_coefficient * w / (n + weight_decay * w + eps), 1.0)
    momentum_buffer = momentum * momentum_buffer + lr * trust * (g + weight_decay * p)
    return p - momentum_buffer, momentum_buffer
