"""Shared by the torch.optim parity tests: run our optimizer and its twin side by side under an LR
scheduler and compare the params (and, on request, every state both keep)."""

from __future__ import annotations

import torch

STEPS = 12
RTOL, ATOL = 1e-5, 1e-6


def scheduler(kind: str, opt):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if kind == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    # OneCycleLR also cycles momentum / beta1 when the optimizer has them.
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.defaults["lr"], total_steps=STEPS)


def assert_tracks(make_ours, make_theirs, shapes, seed, scheduler_kind="step", steps=STEPS,
                  states=False, theirs_as=None, device="cpu"):
    """``states``: also compare each state the twin keeps under the same name (ours decoded);
    ``theirs_as``: state name -> what ours keeps of the twin's (Rprop: only the sign of prev)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    init = [torch.randn(s, generator=gen, device=device) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = make_ours(ours), make_theirs(theirs)
    sched_a, sched_b = scheduler(scheduler_kind, opt_a), scheduler(scheduler_kind, opt_b)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, device=device)
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL)
        if not states:
            continue
        for name in sorted(set(opt_a.rule.states) & set(opt_b.state[b]) - {"step"}):
            want = (theirs_as or {}).get(name, lambda t: t)(opt_b.state[b][name])
            # A state summed from larger terms (a momentum buffer: ~1 / (1 - momentum) steps)
            # carries their rounding where they cancel: absolute tolerance in its largest value.
            atol = ATOL * max(1.0, want.abs().max().item())
            torch.testing.assert_close(opt_a.state_value(a, name), want, rtol=RTOL, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")
