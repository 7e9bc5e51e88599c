"""With codecs="fp32", the built-in optimizers reproduce torch.optim (foreach=False), schedulers
included. Plans run eagerly here; compiled == eager is test_compiled.py's job."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from parity import assert_tracks
from strategies import seeds, shape_lists

import flashcompile as fc

lrs = st.floats(1e-4, 0.3)
# beta2 >= 0.9 (torch's practical range). As beta2 falls, Adam divides by an ever shorter average of
# (g + wd * p)^2, which can cancel to a few ulps; torch fuses that sum (one rounding) where the rule
# rounds twice, so at beta2 = 0.5 one element in ~10^5 differs by ~1.2e-5 relative after 12 steps
# (seen), and at beta2 -> 0 by more. That is the problem's conditioning, not a different update.
betas = st.tuples(st.floats(0.0, 0.99), st.floats(0.9, 0.9999))
decays = st.sampled_from([0.0, 1e-4, 0.1])
schedulers = st.sampled_from(["step", "exponential", "onecycle"])


@given(shapes=shape_lists, seed=seeds, lr=lrs, momentum=st.floats(0.0, 0.99),
       dampening=st.sampled_from([0.0, 0.3]), wd=decays, nesterov=st.booleans(),
       maximize=st.booleans(), sched=schedulers)
def test_sgd_matches_torch(shapes, seed, lr, momentum, dampening, wd, nesterov, maximize, sched):
    if nesterov:
        dampening, momentum = 0.0, max(momentum, 0.1)
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
              maximize=maximize)
    if sched == "onecycle" and momentum == 0:
        sched = "step"  # OneCycleLR cycles momentum, which needs one
    assert_tracks(lambda p: fc.SGD(p, codecs="fp32", compile=False, **kw),
                  lambda p: torch.optim.SGD(p, foreach=False, **kw), shapes, seed, sched)


# Adam's lr up to 0.05: an ulp of difference in the L2 sum g + wd * p moves the step by lr * ulp /
# sqrt(v), so at lr 0.25 and beta1 = 0 one element in ~10^4 drifted 1.6e-5 relative (seen).
adam_lrs = st.floats(1e-4, 0.05)


@given(shapes=shape_lists, seed=seeds, lr=adam_lrs, betas=betas, eps=st.sampled_from([1e-8, 1e-3]),
       wd=decays, amsgrad=st.booleans(), maximize=st.booleans(), sched=schedulers,
       decoupled=st.booleans())
def test_adam_and_adamw_match_torch(shapes, seed, lr, betas, eps, wd, amsgrad, maximize, sched,
                                    decoupled):
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    ours, theirs = (fc.AdamW, torch.optim.AdamW) if decoupled else (fc.Adam, torch.optim.Adam)
    assert_tracks(lambda p: ours(p, codecs="fp32", compile=False, **kw),
                  lambda p: theirs(p, foreach=False, **kw), shapes, seed, sched)


class ReferenceLion(torch.optim.Optimizer):
    """Lion as arXiv 2302.06675's pseudo-code, in plain torch. Every product is rounded before the
    sum (no fused ``add_(alpha=)``), as the rule computes it: sign() of a sum within an ulp of zero
    flips on a one-ulp difference."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(-group["lr"] * torch.sign(beta1 * m + (1 - beta1) * g))
                m.copy_(beta2 * m + (1 - beta2) * g)


class ReferenceSGDW(torch.optim.Optimizer):
    """SGD with momentum and decoupled weight decay (arXiv 1711.05101), plain torch."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = p.grad.clone()
                else:
                    state["buf"].mul_(group["momentum"]).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(state["buf"], alpha=-group["lr"])


@given(shapes=shape_lists, seed=seeds, lr=lrs, betas=betas, wd=decays, maximize=st.booleans(),
       sched=st.sampled_from(["step", "exponential"]))
def test_lion_matches_reference(shapes, seed, lr, betas, wd, maximize, sched):
    kw = dict(lr=lr, betas=betas, weight_decay=wd, maximize=maximize)
    assert_tracks(lambda p: fc.Lion(p, codecs="fp32", compile=False, **kw),
                  lambda p: ReferenceLion(p, **kw), shapes, seed, sched)


@given(shapes=shape_lists, seed=seeds, lr=lrs, momentum=st.floats(0.01, 0.99), wd=decays)
def test_sgdw_matches_reference(shapes, seed, lr, momentum, wd):
    kw = dict(lr=lr, momentum=momentum, weight_decay=wd)
    assert_tracks(lambda p: fc.SGDW(p, codecs="fp32", compile=False, **kw),
                  lambda p: ReferenceSGDW(p, **kw), shapes, seed)
