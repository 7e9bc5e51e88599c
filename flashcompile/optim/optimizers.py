"""Drop-in replacements for torch.optim: thin classes over the built-in rules.

Each takes torch.optim's arguments and defaults plus the options of :class:`flashcompile.Optimizer`
(``codecs=``, ``compile=``, ``flat=``) as keywords.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from flashcompile.language.dsl import Rule
from flashcompile.optim.optimizer import Optimizer
from flashcompile.rules import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw_schedule_free,
    adan,
    ademamix,
    adopt,
    asgd,
    came,
    cautious_adamw,
    lamb,
    lars,
    lion,
    mars,
    muon,
    nadam,
    prodigy,
    radam,
    rmsprop,
    rprop,
    sgd,
)


def optimizer_class(rule: Rule, name: str, doc: str) -> type[Optimizer]:
    """A drop-in class for ``rule``: ``Name(params, <hyperparameters in the rule's order>, *,
    maximize=False, **options)`` with the rule's defaults; tuples (``betas``) are taken from any
    sequence. A rule without a torch.optim twin needs no more than this (its checks are the
    rule's ``ranges``); twins keep hand-written classes for torch's signatures and messages."""
    names = [k for k in rule.defaults if k != "maximize"]
    kind = inspect.Parameter
    signature = inspect.Signature(
        [kind("self", kind.POSITIONAL_OR_KEYWORD), kind("params", kind.POSITIONAL_OR_KEYWORD)]
        + [kind(k, kind.POSITIONAL_OR_KEYWORD, default=rule.defaults[k]) for k in names]
        + ([kind("maximize", kind.KEYWORD_ONLY, default=False)] if "maximize" in rule.defaults
           else [])
        + [kind("options", kind.VAR_KEYWORD)])

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any):
        bound = signature.bind(self, params, *args, **kwargs)
        bound.apply_defaults()
        hyper = {k: v for k, v in bound.arguments.items() if k not in ("self", "params", "options")}
        for k, v in hyper.items():
            if isinstance(rule.defaults[k], tuple) and not isinstance(v, tuple):
                hyper[k] = tuple(v)
        Optimizer.__init__(self, params, rule, **hyper, **bound.arguments["options"])

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{name}.__init__"
    return type(name, (Optimizer,), {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                                     "__qualname__": name})


class SGD(Optimizer):
    """torch.optim.SGD's update (L2 weight decay) with flash codecs by default."""

    decoupled = False
    # a loaded SGDW state dict stays SGD
    fixed_hyperparameters: ClassVar[Mapping[str, Any]] = {"decoupled_weight_decay": False}

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
    fixed_hyperparameters: ClassVar[Mapping[str, Any]] = {"decoupled_weight_decay": True}


class Adam(Optimizer):
    """torch.optim.Adam's update with flash codecs by default."""

    _refuses_tensor_hyperparameters_with_foreach = True  # as torch.optim.Adam (see hyperparameters)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False, **options: Any):
        super().__init__(params, adam, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay, **options)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay, default 1e-2) with flash codecs."""

    # as torch.optim.AdamW.__setstate__ forces it
    fixed_hyperparameters: ClassVar[Mapping[str, Any]] = {"decoupled_weight_decay": True}

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, **options)


class AdEMAMix(Optimizer):
    """AdEMAMix (arXiv 2409.03137): Adam plus ``alpha`` times a slow EMA (``betas[2]``) of the
    gradient. ``alpha_warmup`` / ``beta3_warmup``: the paper's warmup lengths in steps (None or 0:
    off).

    The slow EMA's step per update, ``(1 - beta3) * (g - m2)``, is far below an 8-bit (or bf16)
    code step at beta3 = 0.9999, so round-to-nearest storage stalls (measured on gradients of a
    fixed mean plus unit noise: 18% relative error after 1k steps, 40% to 190% after 2k to 10k).
    The flash codecs keep it in bf16 rounded stochastically, right on average (9.13 B/param with
    the gradient); ``codecs={"exp_avg_slow": "fp32"}`` keeps it exact (+2 bytes per parameter).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 2.0,
                 eps: float = 1e-8, weight_decay: float = 0.0, alpha_warmup: float | None = None,
                 beta3_warmup: float | None = None, *, maximize: bool = False, **options: Any):
        super().__init__(params, ademamix, lr=lr, betas=tuple(betas), alpha=alpha, eps=eps,
                         weight_decay=weight_decay, alpha_warmup=alpha_warmup or 0.0,
                         beta3_warmup=beta3_warmup or 0.0, maximize=maximize, **options)


class Adagrad(Optimizer):
    """torch.optim.Adagrad's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False, **options: Any):
        super().__init__(params, adagrad, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize, **options)


class RMSprop(Optimizer):
    """torch.optim.RMSprop's update with flash codecs by default. The momentum buffer is kept even
    at ``momentum=0`` (then it equals the step), so a scheduler may raise momentum later."""

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False, **options: Any):
        super().__init__(params, rmsprop, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, maximize=maximize, **options)


class Adadelta(Optimizer):
    """torch.optim.Adadelta's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False, **options: Any):
        super().__init__(params, adadelta, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                         maximize=maximize, **options)


class Adamax(Optimizer):
    """torch.optim.Adamax's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False,
                 **options: Any):
        super().__init__(params, adamax, lr=lr, betas=tuple(betas), eps=eps,
                         weight_decay=weight_decay, maximize=maximize, **options)


class NAdam(Optimizer):
    """torch.optim.NAdam's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False, **options: Any):
        super().__init__(params, nadam, lr=lr, betas=tuple(betas), eps=eps,
                         weight_decay=weight_decay, momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                         **options)


class RAdam(Optimizer):
    """torch.optim.RAdam's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False, **options: Any):
        super().__init__(params, radam, lr=lr, betas=tuple(betas), eps=eps,
                         weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize, **options)


class ASGD(Optimizer):
    """torch.optim.ASGD's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0.0, *, maximize: bool = False,
                 **options: Any):
        super().__init__(params, asgd, lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                         weight_decay=weight_decay, maximize=maximize, **options)


class Rprop(Optimizer):
    """torch.optim.Rprop's update with flash codecs by default."""

    def __init__(self, params: Iterable, lr: float = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50.0), *, maximize: bool = False,
                 **options: Any):
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}; Rprop needs "
                             "0 < etaminus < 1 < etaplus (shrink on a sign flip, grow otherwise)")
        super().__init__(params, rprop, lr=lr, etas=tuple(etas), step_sizes=tuple(step_sizes),
                         maximize=maximize, **options)


class Muon(Optimizer):
    """torch.optim.Muon's update (momentum orthogonalized by Newton-Schulz; arXiv 2502.16982) with
    flash codecs by default: the weight split and 8-bit momentum (6.06 bytes per parameter with
    its gradient, on a bf16 model). 2-D parameters only, as torch's: give embeddings, the output
    head and 1-D parameters to another rule."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 **options: Any):
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps >= 100:
            raise ValueError("Number of steps must be an int less than 100 for computational "
                             f"efficiency, got {ns_steps!r}")
        super().__init__(params, muon, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), eps=eps,
                         ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, **options)


class Adafactor(Optimizer):
    """torch.optim.Adafactor (arXiv 1804.04235): the second moment of each matrix factored into
    its row and column means (``row_var``, ``col_var``: fp32, 4 bytes per row and column), a full
    one for vectors (``variance``), relative step sizes and the update clipped by its RMS; no
    momentum. With the flash codecs a bf16 matrix keeps 3 bytes per parameter plus its factors
    (5 with its gradient), a vector's variance in 8 bits. ``eps=(None, eps2)``, the default,
    takes each parameter dtype's machine epsilon for eps1 (torch takes the first parameter's
    dtype for all: the same for a model of one dtype). Steps each parameter in its own shape,
    one launch each (``flashcompile.compiler.shaped``)."""

    def __init__(self, params: Iterable, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, maximize: bool = False, **options: Any):
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
        # torch.optim.Adafactor's checks and messages first (code written against it matches
        # them), then the rule's ranges
        for ok, message in ((not isinstance(lr, (int, float)) or lr >= 0,
                             f"Learning rate should be >= 0 but is: {lr}"),
                            (beta2_decay <= 0, f"beta2_decay should be <= 0 but is: {beta2_decay}"),
                            (eps[0] is None or eps[0] >= 0,
                             f"epsilon1 should be >= 0 but is: {eps[0]}"),
                            (eps[1] >= 0, f"epsilon2 should be >= 0 but is: {eps[1]}"),
                            (d >= 1, f"Clipping threshold d should be >= 1 but is: {d}"),
                            (weight_decay >= 0,
                             f"weight_decay should be >= 0 but is: {weight_decay}")):
            if not ok:
                raise ValueError(message)
        super().__init__(params, adafactor, lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                         weight_decay=weight_decay, maximize=maximize, **options)

    def _checked_hyperparameters(self, rule: Rule, group: Mapping[str, Any]) -> dict[str, Any]:
        eps = group.get("eps")
        if rule is not adafactor or not isinstance(eps, (tuple, list)) or eps[0] is not None:
            return super()._checked_hyperparameters(rule, group)
        # None reaches the plan, which reads it as its parameter dtype's epsilon
        out = super()._checked_hyperparameters(rule, {**group, "eps": (0.0, *eps[1:])})
        out["eps"] = (None, out["eps"][1])
        return out


# Rules without a torch.optim twin: one line each.
Lion = optimizer_class(lion, "Lion", """Lion (arXiv 2302.06675) with flash codecs by default.""")
LAMB = optimizer_class(lamb, "LAMB", """LAMB (arXiv 1904.00962): Adam's direction scaled per param
    by ||p|| / ||update||; its norms span the whole param, summed per param inside flat buckets.""")
LARS = optimizer_class(lars, "LARS", """LARS (arXiv 1708.03888): momentum SGD with the layer-wise
    trust ratio ``trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)``, its norms
    summed per param inside flat buckets.""")
Adan = optimizer_class(adan, "Adan", """Adan (arXiv 2208.06677), as the authors' implementation:
    betas weigh the old values, and ``no_prox`` picks decoupled decay over the proximal
    ``p / (1 + lr * weight_decay)``. Keeps the previous gradient in bf16, a bf16 gradient exactly
    (10.19 B/param with the flash codecs).""")

ADOPT = optimizer_class(adopt, "ADOPT", """ADOPT (arXiv 2411.02853): the gradient normalized by
    the second moment of the steps before it, then momentum; converges for any beta2. As the
    authors' implementation: the first step only fills v, ``clip`` bounds the normalized gradient
    by ``(step - 1) ** 0.25``, ``decouple`` picks decoupled weight decay.""")

CautiousAdamW = optimizer_class(cautious_adamw, "CautiousAdamW", """Cautious AdamW (arXiv
    2411.16085): AdamW's update only where the momentum and the gradient agree in sign, rescaled
    by the param's size over the agreeing count; the count spans the param (a reduction).""")
MARS = optimizer_class(mars, "MARS", """MARS-AdamW (arXiv 2411.10438), the authors' approximate
    form: AdamW on ``g + gamma * beta1 / (1 - beta1) * (g - g_prev)``, its norm clipped to 1 per
    param; keeps the previous gradient in bf16, a bf16 gradient exactly (9.13 B/param with the
    flash codecs).""")

CAME = optimizer_class(came, "CAME", """CAME (arXiv 2307.02047), as the authors' came_pytorch:
    Adafactor's factored second moment, momentum on the normalized update, and a factored
    confidence (the EMA of (update - momentum)^2 by rows and columns) that scales the step down
    where they disagree. With the flash codecs a bf16 matrix keeps its weight split and 8-bit
    momentum, its factors in fp32 (6.06 B/param with the gradient). ``lr`` has no default in the
    authors' class; 2e-4 here (the paper's BERT setting). Steps each parameter in its own shape.""")

class Prodigy(optimizer_class(prodigy, "Prodigy", "")):
    """Prodigy (arXiv 2306.06101), as the authors' ``prodigyopt.Prodigy`` (Adam form): Adam whose
    step size ``d`` grows from ``d0`` as it learns how far the weights are from where they
    started; ``lr`` (default 1) scales it. ``beta3=None`` is ``sqrt(betas[1])``, resolved when the
    group is added. ``d``, ``d_max`` and ``d_numerator`` are shared by every param group
    (``optimizer.param_groups[0]["d"]``, a float64 tensor on the device) and saved in state
    dicts; each step's sums over every parameter set the next step's ``d`` inside the kernels
    (no host sync, gradient release included). Its groups must agree on the hyperparameters
    ``d`` is updated with (``beta3``, ``d0``, ``d_coef``, ``growth_rate``). With the flash codecs
    it keeps the initial weight in bf16 and ``s``, a slow EMA, in bf16 rounded stochastically
    (11.13 B/param with the gradient)."""

    def __init__(self, params: Iterable, lr: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False,
                 d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = float("inf"),
                 **options: Any):
        betas = tuple(betas)
        super().__init__(params, lr=lr, betas=betas,
                         beta3=_sqrt_beta2(betas) if beta3 is None else beta3, eps=eps,
                         weight_decay=weight_decay, decouple=decouple,
                         use_bias_correction=use_bias_correction,
                         safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                         growth_rate=growth_rate, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("beta3", 0.0) is None:  # a group's own betas give its beta3
            param_group = {**param_group, "beta3": _sqrt_beta2(
                tuple(param_group.get("betas", self.defaults["betas"])))}
        super().add_param_group(param_group)


def _sqrt_beta2(betas) -> float:
    beta2 = betas[1]
    return float(beta2) ** 0.5 if isinstance(beta2, (int, float)) else float(beta2.item()) ** 0.5


class AdamWScheduleFree(optimizer_class(adamw_schedule_free, "AdamWScheduleFree", "")):
    """Schedule-free AdamW (arXiv 2405.15682), as the authors' ``AdamWScheduleFree``: no learning
    rate schedule (``warmup_steps`` only). While training the params hold the point the gradient
    is taken at; call ``optimizer.eval()`` before evaluating or saving the model (the params
    then hold the averaged weights) and ``optimizer.train()`` before training again, as with the
    authors' optimizer. Under the flash codecs the base sequence ``z`` is stored as the weight is
    (bf16 + int8 residual: 9.06 B/param with the gradient)."""

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any):
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            group.setdefault("train_mode", True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("train_mode", True)

    def check_can_step(self) -> None:
        if not all(g.get("train_mode", True) for g in self.param_groups):
            raise RuntimeError("the optimizer is in eval mode (its params hold the averaged "
                               "weights): call optimizer.train() before stepping")

    def eval(self) -> None:
        """Params to the averaged weights x = y + (1 - 1 / beta1) (z - y)."""
        self._swap(lambda beta1: 1 - 1 / beta1, train=False)

    def train(self) -> None:
        """Params back to the training point y = x + (1 - beta1) (z - x)."""
        self._swap(lambda beta1: 1 - beta1, train=True)

    @torch.no_grad()
    def _swap(self, weight, train: bool) -> None:
        for group in self.param_groups:
            if group.get("train_mode", True) == train:
                continue
            if group["betas"][0] <= 0:
                raise ValueError("betas[0] = 0: the params train at z itself, and the average x "
                                 "cannot be recovered from them; use betas[0] > 0")
            w = weight(group["betas"][0])
            for p in group["params"]:
                if self.state.get(p) and "z" in self.state[p]:
                    here = self.master_weight(p)
                    self.set_master_weight(p, here + w * (self.state_value(p, "z") - here))
            group["train_mode"] = train


# Every drop-in class by lower-case name: the package's exports, the command line, bench's rows and
# the contract tests iterate this.
OPTIMIZERS: dict[str, type[Optimizer]] = {cls.__name__.lower(): cls for cls in (
    SGD, SGDW, Adam, AdamW, Lion, LAMB, LARS, AdEMAMix, Adan, Adagrad, RMSprop, Adadelta, Adamax,
    NAdam, RAdam, ASGD, Rprop, Muon, ADOPT, CautiousAdamW, MARS, AdamWScheduleFree, Prodigy,
    Adafactor, CAME)}
