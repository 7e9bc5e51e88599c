"""Muon: momentum orthogonalized by Newton-Schulz (Keller Jordan, 2024; at scale: Moonlight,
arXiv 2502.16982), as torch.optim.Muon.

    B <- mu B + (1 - mu) g                            (torch: buf.lerp_(g, 1 - mu))
    U <- (1 - mu) g + mu B if nesterov else B         (torch: g.lerp(B, mu))
    O <- NS_k^(a,b,c)(U; eps) * ratio(rows, cols)     (bf16 Newton-Schulz on the matrix)
    p <- p (1 - lr wd) - lr O

ratio: torch's adjust_lr_fn, None or "original" sqrt(max(1, rows / cols)), "match_rms_adamw"
0.2 sqrt(max(rows, cols)). Each lerp is written as torch evaluates it. Parameters must be 2-D.
"""

from flashcompile.language import orthogonalize, rule


@rule(
    defaults=dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                  ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
                  adjust_lr_fn=None),
    states={"momentum_buffer": "signed"},
    ranges={"ns_coefficients": (-1e3, 1e3), "ns_steps": (0.0, 100.0)},
    choices={"adjust_lr_fn": (None, "original", "match_rms_adamw")},
)
def muon(p, g, momentum_buffer, *, step, lr, weight_decay, momentum, nesterov, ns_coefficients,
         eps, ns_steps, adjust_lr_fn):
    buf = momentum_buffer + (1 - momentum) * (g - momentum_buffer)
    update = buf - (buf - g) * (1 - momentum) if nesterov else buf
    o = orthogonalize(update, ns_steps, ns_coefficients, eps, lr_ratio=adjust_lr_fn or "original")
    return p * (1 - lr * weight_decay) - lr * o, buf
