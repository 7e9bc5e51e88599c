"""Adam's step guard (rules/adam.py): a bound that exact Adam never reaches, under any beta
schedule, kept as one number per param; off where the history is unknown."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashcompile as fc


def _run(guard: bool, betas_per_step, grads, codecs="fp32"):
    """Final weights, state, and the largest single step |dp| / lr."""
    p = torch.nn.Parameter(torch.zeros(grads.shape[1]))
    opt = fc.AdamW([p], lr=1e-2, weight_decay=0.0, codecs=codecs, step_guard=guard,
                   compile=False, flat=False)
    largest = 0.0
    for betas, g in zip(betas_per_step, grads):
        opt.param_groups[0]["betas"] = betas
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        largest = max(largest, ((p.detach() - before).abs().max() / 1e-2).item())
    return p.detach(), opt.state[p], largest


@settings(max_examples=25, deadline=None)
@given(betas=st.lists(st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)), min_size=1,
                      max_size=12),
       seed=st.integers(0, 2**16), spread=st.floats(0.0, 8.0))
def test_the_guard_never_changes_exact_adam_under_any_beta_schedule(betas, seed, spread):
    # Gradients whose scale jumps by up to e^8 between steps push |m| / sqrt(v) toward the bound;
    # exact Adam never exceeds it, so with fp32 states the floor on the denominator is never above
    # the denominator itself beyond rounding: a few fp32 ulps of the step.
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(len(betas), 64, generator=gen)
    grads *= torch.exp(spread * torch.rand(len(betas), 1, generator=gen))
    guarded, _, _ = _run(True, betas, grads)
    plain, _, _ = _run(False, betas, grads)
    torch.testing.assert_close(guarded, plain, rtol=4e-7, atol=1e-2 * 1e-6 * len(betas))


def test_bound_sq_is_the_cauchy_schwarz_sum_for_constant_betas():
    b1, b2, steps = 0.9, 0.999, 7
    _, state, _ = _run(True, [(b1, b2)] * steps, torch.randn(steps, 32))
    # m = sum a_k g_k, v = sum c_k g_k^2 with a_k = (1 - b1) b1^(t-k), c_k = (1 - b2) b2^(t-k)
    want = sum((1 - b1) ** 2 * b1 ** (2 * j) / ((1 - b2) * b2**j) for j in range(steps))
    assert abs(float(state["bound_sq"]) - want) <= 1e-6 * want


def test_state_from_torch_optim_turns_the_guard_off():
    # torch.optim keeps no bound: after loading, bound_sq stays 0 (history unknown, no clip)
    # and flashcompile continues exactly as torch.optim would.
    a = torch.nn.Parameter(torch.randn(40))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, foreach=False)
    for _ in range(3):
        a.grad = torch.randn(40)
        ref.step()
    opt = fc.AdamW([b], lr=1e-2, codecs="fp32", compile=False)
    with torch.no_grad():
        b.copy_(a)
    opt.load_state_dict(ref.state_dict())
    g = torch.randn(40)
    a.grad, b.grad = g, g.clone()
    ref.step()
    opt.step()
    assert float(opt.state[b]["bound_sq"]) == 0
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_the_guard_caps_a_step_whose_second_moment_decoded_to_zero():
    # One loud lane per group of 32 drowns the quiet lanes' v in sqrt_uint8 (decoded 0) while their
    # m survive: unguarded, Adam steps by m / eps; guarded, by at most Adam's bound.
    gen = torch.Generator().manual_seed(0)
    grads = 1 + 0.3 * torch.randn(30, 4, 32, generator=gen)
    grads[:, :, 0] = 1000 * torch.randn(30, 4, generator=gen)
    grads = grads.reshape(30, -1)
    paper = {"exp_avg": "softsign_int8", "exp_avg_sq": "sqrt_uint8"}
    _, _, plain = _run(False, [(0.9, 0.999)] * 30, grads, paper)
    _, _, guarded = _run(True, [(0.9, 0.999)] * 30, grads, paper)
    b1, b2, steps = 0.9, 0.999, 30
    # the largest bound over the 30 steps (it grows with t): constant betas, closed form
    bound = max((sum(b1 ** (2 * j) / b2**j for j in range(t)) * (1 - b2**t)) ** 0.5
                * (1 - b1) / (1 - b2) ** 0.5 / (1 - b1**t) for t in range(1, steps + 1))
    assert plain > 10 * bound  # measured: 65x
    # measured as a difference of fp32 weights of at most 30 bounded steps: a few ulps of those
    assert guarded <= bound * (1 + 1e-4)


def test_a_checkpoint_saved_before_the_guard_loads_and_steps_without_it():
    # Saved by flashcompile before Adam had bound_sq and step_guard: the flag takes this
    # optimizer's value, the missing scalar state loads as 0 (history unknown: no floor).
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    old = fc.AdamW([p], compile=False)
    p.grad = torch.randn(64).bfloat16()
    old.step()
    sd = old.state_dict()
    del sd["param_groups"][0]["step_guard"]
    for state in sd["state"].values():
        del state["bound_sq"]
    q = torch.nn.Parameter(p.detach().clone())
    new = fc.AdamW([q], compile=False)
    new.load_state_dict(sd)
    q.grad = p.grad.clone()
    new.step()
    assert float(new.state[q]["bound_sq"]) == 0 and torch.isfinite(q).all()


def test_edge_betas_keep_the_guard_finite_or_off():
    # beta2 = 0: v forgets and m does not, so there is no bound (Q stays 0). beta1^2 > beta2: Q grows
    # without limit and leaves fp32's range; it is stored as inf (no bound), never an error.
    for betas, steps in (((0.9, 0.0), 3), ((0.99, 1e-6), 40)):
        gen = torch.Generator().manual_seed(0)
        grads = torch.randn(steps, 64, generator=gen)
        guarded, state, _ = _run(True, [betas] * steps, grads)
        plain, _, _ = _run(False, [betas] * steps, grads)
        q = float(state["bound_sq"])
        assert q == 0 if betas[1] == 0 else q == float("inf")
        torch.testing.assert_close(guarded, plain, rtol=4e-7, atol=1e-2 * 1e-6 * steps)
