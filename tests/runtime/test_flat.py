"""Flat storage (one launch per group) steps exactly like the per-tensor path, survives the ways
users move params and grads around, and keeps gradients accumulating in place."""

from __future__ import annotations

import io
from unittest import mock

import pytest
import torch

import flashcompile as fc
from strategies import rule_of, shapes_for
from flashcompile.compiler.explain import plan_of
from flashcompile.optim.optimizers import OPTIMIZERS

SHAPES = [(33, 7), (64,), (5,), (2, 3, 4)]


def _model(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.GELU(), torch.nn.Linear(33, 5)).to(dtype)


def _batch(seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 7, generator=gen).to(dtype), torch.randn(16, 5, generator=gen).to(dtype)


def _train(model, opt, steps, start=0, accumulate=1):
    for step in range(start, start + steps):
        for micro in range(accumulate):
            x, y = _batch(step * 10 + micro)
            ((model(x).float() - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make", [
    lambda p, flat: fc.AdamW(p, lr=1e-2, flat=flat, compile=False),
    lambda p, flat: fc.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, flat=flat, compile=False),
    lambda p, flat: fc.Lion(p, lr=1e-3, weight_decay=0.1, flat=flat, compile=False),
], ids=["adamw", "sgd", "lion"])
def test_flat_steps_equal_per_tensor_steps(make):
    a, b = _model(), _model()
    opt_a, opt_b = make(a.parameters(), True), make(b.parameters(), False)
    _train(a, opt_a, 5, accumulate=2)
    _train(b, opt_b, 5, accumulate=2)
    assert opt_a._buckets and not opt_b._buckets
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_b.state[q])


@pytest.mark.parametrize("name,kw", [
    ("Adagrad", {"initial_accumulator_value": 0.1}), ("Adamax", {}), ("Rprop", {}),
])
def test_rules_whose_pads_may_not_stay_zero_step_every_param_flat_and_equal(name, kw):
    """Such rules mask their states' padding lanes group by group (``_lanes``): params of any
    size share one launch, and every value and code equals stepping each param alone (where
    a padding lane that grew would have enlarged its group's scale)."""
    torch.manual_seed(0)
    shapes = [(64, 32), (96,), *SHAPES]
    ps = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt_a = getattr(fc, name)(ps, flat=True, compile=False, **kw)
    opt_b = getattr(fc, name)(qs, flat=False, compile=False, **kw)
    for _ in range(4):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape).to(torch.bfloat16)
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
            q.grad = g.clone()
        opt_a.step()
        opt_b.step()
    (bucket,) = opt_a._buckets.values()
    assert [id(p) for p in bucket.params] == [id(p) for p in ps] and bucket.steps_flat
    assert any(p.numel() % 32 for p in ps) and bucket.plan.masks_lanes
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_b.state[q])


def test_params_and_grads_live_in_one_buffer_and_grads_accumulate_in_place():
    model = _model()
    opt = fc.AdamW(model.parameters(), flat=True, compile=False)
    _train(model, opt, 1)
    (bucket,) = opt._buckets.values()
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    _train(model, opt, 2)
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs
    base = bucket.weights.data_ptr()
    assert all(base <= p.data_ptr() < base + bucket.weights.numel() * 2 for p in model.parameters())
    starts = sorted((p.data_ptr() - base) // 2 for p in model.parameters())
    assert all(s % 32 == 0 for s in starts)  # every param starts a group: none straddles two


def test_moving_params_and_grads_out_of_the_buffers_is_repaired():
    a, b = _model(), _model()
    opt_a = fc.AdamW(a.parameters(), flat=True, compile=False)
    opt_b = fc.AdamW(b.parameters(), flat=False, compile=False)
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    a.zero_grad(set_to_none=True)  # the module's zero_grad drops our gradient views
    a.to(torch.bfloat16).float().to(torch.bfloat16)  # new .data tensors for every param
    _train(a, opt_a, 2, start=2)
    _train(b, opt_b, 2, start=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_param_without_grad_is_skipped_like_torch():
    a, b = _model(), _model()
    opt_a = fc.AdamW(a.parameters(), flat=True, compile=False)
    opt_b = fc.AdamW(b.parameters(), flat=False, compile=False)
    _train(a, opt_a, 1)
    _train(b, opt_b, 1)
    for m, opt in ((a, opt_a), (b, opt_b)):
        x, y = _batch(99)
        ((m(x).float() - y.float()) ** 2).mean().backward()
        m[2].bias.grad = None
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt_a.state[a[2].bias]["step"], torch.tensor(1.0))


def test_flat_checkpoint_resumes_bit_identically():
    a, twin = _model(), _model()
    opt_a = fc.AdamW(a.parameters(), flat=True, compile=False)
    opt_t = fc.AdamW(twin.parameters(), flat=True, compile=False)
    _train(a, opt_a, 3)
    _train(twin, opt_t, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = _model(seed=1)
    c.load_state_dict(ckpt["model"])
    opt_c = fc.AdamW(c.parameters(), flat=True, compile=False)
    opt_c.load_state_dict(ckpt["opt"])
    _train(c, opt_c, 3, start=3)
    _train(twin, opt_t, 3, start=3)
    for p, q in zip(c.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_flat_compiled_bucket_matches_eager_bucket_up_to_one_code_step():
    a, b = _model(), _model()
    opt_a = fc.AdamW(a.parameters(), flat=True)
    opt_b = fc.AdamW(b.parameters(), flat=True, compile=False)
    _train(a, opt_a, 1)
    _train(b, opt_b, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        for name in ("param", "exp_avg", "exp_avg_sq"):
            got = opt_a.master_weight(p) if name == "param" else opt_a.state_value(p, name)
            want = opt_b.master_weight(q) if name == "param" else opt_b.state_value(q, name)
            codec = opt_b.plan_for(q, opt_b.flags_of(opt_b.param_groups[0])).codecs[name]
            padded = torch.zeros(-(-want.numel() // 32) * 32)
            padded[: want.numel()] = want.reshape(-1)
            step = codec.code_step(padded.view(-1, 32)).reshape(-1)[: want.numel()].view_as(want)
            assert torch.all((got - want).abs() <= step + 1e-6 * want.abs()), name


def test_a_param_that_never_had_a_gradient_is_never_stepped():
    """torch.optim leaves a param whose grad is None alone; a flat bucket must not give it a
    zero gradient (weight decay would then shrink it every step)."""
    used, unused = (torch.nn.Parameter(torch.randn(64).bfloat16()) for _ in range(2))
    before = unused.detach().clone()
    opt = fc.AdamW([used, unused], lr=1e-2, weight_decay=0.1, compile=False, flat=True)
    for _ in range(3):
        used.grad = torch.randn_like(used)
        opt.step()
    assert torch.equal(unused, before) and unused.grad is None and not opt.state.get(unused)


def _conv_run(flat: bool, steps: int = 3, grad_views: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Conv2d(8, 5, 1))
    model = fc.cast_model(model).to(memory_format=torch.channels_last)
    opt = fc.AdamW(model.parameters(), lr=1e-2, compile=False, flat=flat)
    opt.grad_views = grad_views
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 9, 9, generator=gen).bfloat16().to(memory_format=torch.channels_last)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_channels_last_params_keep_their_format_in_flat_buffers_and_step_as_per_tensor():
    flat_model, flat_opt = _conv_run(True)
    ref_model, ref_opt = _conv_run(False)
    weight = flat_model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert weight.grad.is_contiguous(memory_format=torch.channels_last)  # a view, in place
    bucket = next(iter(flat_opt._buckets.values()))
    assert weight.untyped_storage().data_ptr() == bucket.weights.untyped_storage().data_ptr()
    for p, q in zip(flat_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(flat_opt.state_value(p, name), ref_opt.state_value(q, name))
        assert torch.equal(flat_opt.master_weight(p), ref_opt.master_weight(q))


def test_a_flat_bucket_steps_from_its_own_gradient_buffer_without_staging_a_copy():
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (40, 64)]
    opt = fc.SGD(params, lr=0.1, momentum=0.9, compile=False, flat=True)  # no scalar states
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # gradients it did not make: copied for this step
    opt.zero_grad()  # now views into the bucket's gradient buffer
    bucket = next(iter(opt._buckets.values()))
    assert bucket.keep_grads
    for p in params:
        p.grad.add_(torch.randn_like(p))  # as autograd accumulates
    with mock.patch.object(torch, "cat", wraps=torch.cat) as copies:
        opt.step()
    assert copies.call_count == 0


def test_a_step_never_replaces_or_writes_a_params_gradient():
    """torch.optim's contract (its test_grads_are_never_inplaced_into): a flat bucket copies
    gradients it did not make instead of adopting them; only zero_grad re-points them."""
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (40, 64)]
    opt = fc.AdamW(params, lr=0.1, compile=False, flat=True)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    versions = [g._version for g in grads]
    for _ in range(3):
        opt.step()
    assert all(p.grad is g for p, g in zip(params, grads))
    assert [g._version for g in grads] == versions


def test_staged_gradients_step_like_gradient_views_and_leave_grads_to_autograd():
    """``grad_views = False``: autograd's own gradients, concatenated per step (channels_last
    weights, BatchNorm params padded to whole groups): the same steps, bit for bit, and
    ``zero_grad`` frees the gradients as torch.optim's does."""
    views_model, views_opt = _conv_run(True)
    staged_model, staged_opt = _conv_run(True, grad_views=False)
    assert all(not b.keep_grads for b in staged_opt._buckets.values())
    assert all(p.grad is None for p in staged_model.parameters())
    for p, q in zip(staged_model.parameters(), views_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(staged_opt.master_weight(p), views_opt.master_weight(q))


@pytest.mark.parametrize("name", ["AdamW", "NAdam"])
def test_scalar_states_of_a_bucket_are_each_params_own_and_match_per_tensor_steps(name):
    """A bucket stores its params' scalar states (AdamW's bound_sq, NAdam's mu_product) in one
    vector; each param still reads its own value, equal to stepping it alone, and replacing
    one param's value (as a user or a load may) rebuilds the bucket from it."""
    runs = []
    for flat in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (40, 64, 5)]
        opt = getattr(fc, name)(params, lr=1e-2, compile=False, flat=flat)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 7 + i)).bfloat16()
            opt.step()
        runs.append((params, opt))
    (fp, fo), (tp, to) = runs
    key = fo.rule.scalar_states[0]
    views = [fo.state[p][key] for p in fp]
    assert len({v.data_ptr() for v in views}) == len(views)  # distinct elements of one vector
    for p, q in zip(fp, tp):
        assert torch.equal(fo.state[p][key], to.state[q][key])
        assert torch.equal(p, q)
    bucket = next(iter(fo._buckets.values()))
    fo.state[fp[0]][key] = torch.tensor(float(fo.state[fp[0]][key]))
    assert not bucket.intact()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_params_no_backward_reaches_after_zero_grad_step_as_torch_steps_their_grads(set_to_none):
    """zero_grad(set_to_none=True) keeps flat params' gradient buffers, yet a param that no
    backward then reaches (a frozen layer; a step with no backward at all) is skipped as
    torch.optim skips a None gradient; with set_to_none=False its zero gradient steps, as in
    torch. Flat and per-tensor steps (where .grad really is None) agree exactly."""
    a, b = _model(), _model()
    opt_a = fc.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, flat=True, compile=False)
    opt_b = fc.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, flat=False, compile=False)
    for step in range(7):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=set_to_none)
            model[2].requires_grad_(not 3 <= step < 5)  # frozen for two steps
            if step != 2:  # one step with no backward at all
                x, y = _batch(step)
                ((model(x).float() - y.float()) ** 2).mean().backward()
            opt.step()
        assert opt_a._buckets  # the flat path stays in use
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), step
            assert (p.grad is None) == (q.grad is None), step
        for st_a, st_b in zip(opt_a.state_dict()["state"].values(),
                              opt_b.state_dict()["state"].values()):
            assert all(torch.equal(st_a[k], st_b[k]) for k in st_b), step
    steps = [float(opt_a.state[p]["step"]) for p in a.parameters()]
    assert steps == ([6.0, 6.0, 4.0, 4.0] if set_to_none else [7.0] * 4)


@pytest.mark.parametrize("name", [cls.__name__ for cls in OPTIMIZERS.values()
                                  if not rule_of(cls).shaped])  # Adafactor: per param, in shape
def test_a_plan_passes_lane_counts_exactly_where_its_step_masks_padding_lanes(name):
    """Plan.masks_lanes (what callers pass) and the generated step's signature (what the kernel
    takes) come from one predicate; every shipped rule but those that run in each parameter's
    shape steps flat at any param size."""
    cls = getattr(fc, name)
    p = torch.nn.Parameter(torch.zeros(shapes_for(rule_of(cls), [(40,)])[0], dtype=torch.bfloat16))
    p.grad = torch.zeros_like(p)
    plan = plan_of(cls([p], compile=False))
    step = plan.source.split("def step_one")[0] if not plan.reduces else plan.source
    assert plan.masks_lanes == ("_lanes" in step)
    assert plan.steps_flat
    # states that start or move off zero on padding lanes, or a count of the param's elements
    assert plan.masks_lanes == (name in ("Adagrad", "Adamax", "Rprop", "CautiousAdamW"))
