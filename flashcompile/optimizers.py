"""Drop-in replacements for torch.optim: thin classes over the built-in rules.

Each takes torch.optim's arguments and defaults plus the options of :class:`flashcompile.Optimizer`
(``codecs=``, ``compile=``, ``flat=``) as keywords.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flashcompile.optimizer import Optimizer
from flashcompile.rules import adam, lion, sgd


class SGD(Optimizer):
    """torch.optim.SGD's update (L2 weight decay) with flash codecs by default."""

    decoupled = False

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, **options: Any):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, sgd, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         decoupled_weight_decay=self.decoupled, **options)


class SGDW(SGD):
    """SGD with decoupled weight decay: ``p <- p * (1 - lr * wd)`` (arXiv 1711.05101)."""

    decoupled = True


class Adam(Optimizer):
    """torch.optim.Adam's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False, **options: Any):
        super().__init__(params, adam, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay, **options)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay, default 1e-2) with flash codecs."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, **options)


class Lion(Optimizer):
    """Lion (arXiv 2302.06675) with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, **options: Any):
        super().__init__(params, lion, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                         maximize=maximize, **options)
