"""Rprop: sign-based steps with per-element step sizes (torch.optim.Rprop's update).

    g   <- -g if maximize else g
    s   <- sign(g * prev)
    d   <- clamp((lr if t == 1 else d) * (etaplus if s > 0 else etaminus if s < 0 else 1),
                 step_size_min, step_size_max)
    g   <- 0 where s < 0                                  (a sign flip skips this element once)
    p   <- p - sign(g) * d
    prev <- sign(g)          (torch keeps g; only its sign is read: a "sign" state, 1 exact byte)

Riedmiller & Braun, IEEE ICNN 1993, "A Direct Adaptive Method for Faster Backpropagation
Learning: The RPROP Algorithm" (no arXiv version).
"""

from flashcompile.language import maximum, minimum, rule, sign, where


@rule(
    defaults=dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False),
    states={"prev": "sign", "step_size": "nonnegative"},
)
def rprop(p, g, prev, step_size, *, step, lr, etas, step_sizes, maximize):
    etaminus, etaplus = etas
    step_size_min, step_size_max = step_sizes
    g = -g if maximize else g
    # the signs of g * prev, read by compares on the product itself (sign() then a compare would
    # select twice): its own instructions are most of what this kernel issues
    product = g * prev
    flipped = product < 0
    factor = where(product > 0, etaplus, where(flipped, etaminus, 1.0))
    # states start at zero: torch starts the step sizes at lr
    step_size = where(step == 1, lr, step_size) * factor
    step_size = minimum(maximum(step_size, step_size_min), step_size_max)
    direction = where(flipped, 0.0, sign(g))  # a sign flip skips this element once
    return p - direction * step_size, direction, step_size
