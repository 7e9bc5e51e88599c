"""SGD with momentum, dampening, Nesterov, L2 or decoupled weight decay (torch.optim.SGD's update).

    g   <- -g if maximize else g
    g   <- g + wd * p                                     (L2; decoupled: p <- p * (1 - lr * wd))
    b   <- g                           if step == 1 or momentum == 0
           momentum * b + (1 - dampening) * g              otherwise
    d   <- g + momentum * b if nesterov else b
    p   <- p - lr * d

Nesterov momentum: Sutskever et al., ICML 2013. Decoupled decay (SGDW): Loshchilov & Hutter,
arXiv 1711.05101.
"""

from flashcompile.language import rule, where


@rule(
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, decoupled_weight_decay=False),
    states={"momentum_buffer": "signed"},
    zero_branches=("momentum",),  # no momentum buffer at momentum 0, as torch.optim.SGD
)
def sgd(p, g, momentum_buffer, *, step, lr, momentum, dampening, weight_decay, nesterov, maximize,
        decoupled_weight_decay):
    g = -g if maximize else g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    first = (step == 1) | (momentum == 0)
    buf = where(first, g, momentum * momentum_buffer + (1 - dampening) * g)
    d = g + momentum * buf if nesterov else buf
    return p - lr * d, buf
