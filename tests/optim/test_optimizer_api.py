"""The torch.optim contract: skipped params, closures, hooks, groups, checkpoints, clear errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import flashcompile as fc
from flashcompile.codecs import PARAM


def _params(*shapes, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_params_without_grad_are_skipped():
    a, b = _params(5, 7)
    opt = fc.AdamW([a, b], compile=False)
    before = b.detach().clone()
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(b, before) and not opt.state.get(b)
    assert not torch.equal(a.detach(), _params(5, 7)[0].detach())


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    (p,) = _params(10, dtype=torch.float32)
    opt = fc.SGD([p], lr=0.1, compile=False)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and p.grad is not None


def test_step_hooks_run():
    (p,) = _params(3)
    opt = fc.Lion([p], compile=False)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]


def test_param_groups_keep_their_own_hyperparameters():
    a, b = _params(33, 33, dtype=torch.float32)
    ra, rb = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ours = fc.Adam([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=1e-3, codecs="fp32", compile=False)
    ref = torch.optim.Adam([{"params": [ra], "lr": 0.1}, {"params": [rb]}], lr=1e-3, foreach=False)
    for seed in range(3):
        _grads([a, b], seed)
        _grads([ra, rb], seed)
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-5, atol=1e-6)


def test_a_group_may_mix_dtypes():
    params = _params(40, dtype=torch.float32) + _params(40, dtype=torch.bfloat16)
    opt = fc.AdamW(params, compile=False)
    _grads(params, 0)
    opt.step()
    assert "param.residual" in opt.state[params[1]] and "param.residual" not in opt.state[params[0]]


def test_states_a_rule_never_uses_get_no_storage():
    (p,) = _params(64)
    opt = fc.Adam([p], compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    # no max_exp_avg_sq without amsgrad; bound_sq is the step guard's one number per param
    assert sorted(opt.state[p]) == ["bound_sq", "exp_avg.codes", "exp_avg.scale",
                                    "exp_avg_sq.codes", "exp_avg_sq.scale", "param.residual", "step"]
    # bf16 weight 2 + int8 residual 1 + two 8-bit states with an fp16 scale per 32: 5.125 B/param
    stored = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if t.dim())
    assert stored + p.numel() * p.element_size() == 5.125 * 64


def test_state_dict_resumes_bit_identically_through_torch_save():
    params = _params(70, (3, 37), 1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a, b = fc.AdamW(params, compile=False), fc.AdamW(twins, compile=False)
    for seed in range(3):
        _grads(params, seed)
        _grads(twins, seed)
        a.step()
        b.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    c = fc.AdamW(fresh_params, compile=False)
    c.load_state_dict(torch.load(buf, weights_only=True))
    for seed in range(3, 6):
        _grads(fresh_params, seed)
        _grads(twins, seed)
        c.step()
        b.step()
    for p, q in zip(fresh_params, twins):
        assert torch.equal(p, q)
        assert all(torch.equal(c.state[p][k], b.state[q][k]) for k in b.state[q])


@pytest.mark.parametrize("other", ["sgd", "shape"])
def test_state_dict_that_does_not_fit_is_rejected_and_nothing_changes(other):
    (p,) = _params(64)
    opt = fc.AdamW([p], compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    if other == "sgd":
        (q,) = _params(64)
        src = fc.SGD([q], momentum=0.9, compile=False)
    else:
        (q,) = _params(96)
        src = fc.AdamW([q], compile=False)
    q.grad = torch.ones_like(q)
    src.step()
    with pytest.raises(ValueError, match="different optimizer|shape"):
        opt.load_state_dict(src.state_dict())
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_nan_gradient_propagates_into_its_param_only():
    a, b = _params(64, 64)
    opt = fc.AdamW([a, b], compile=False)
    _grads([a, b], 0)
    a.grad[3] = float("nan")
    opt.step()
    assert torch.isnan(a[3]) and torch.isfinite(b).all()
    assert torch.isfinite(a[32:]).all()  # the other groups of 32 of the same param stay finite


def test_master_weight_tracks_fp32_sgd_within_the_accumulated_split_bound():
    (p,) = _params(256)
    ref = torch.nn.Parameter(p.detach().float())
    opt = fc.SGD([p], lr=1e-4, compile=False)
    ref_opt = torch.optim.SGD([ref], lr=1e-4)
    steps = 5
    for seed in range(steps):
        _grads([p], seed)
        ref.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    err = (opt.master_weight(p) - ref.detach()).abs()
    # Each step re-encodes once (its bound) after one fp32 rounding of p - lr * g.
    per_step = fc.codecs.weight_split.error_bound(ref.detach().view(-1, 32)).view(-1)
    assert torch.all(err <= steps * (per_step + ref.detach().abs() * 2.0**-24))
    assert err.max() < (p.detach().float() - ref.detach()).abs().max() / 5  # bf16 alone loses far more


def _step_fp32_param_with_weight_split():
    params = _params(3, dtype=torch.float32)
    opt = fc.AdamW(params, codecs={"param": "weight_split"}, compile=False)
    _grads(params, 0)
    opt.step()


def _bad_rule_negative_state():
    @fc.rule(defaults=dict(lr=1e-3), states={"v": "nonnegative"})
    def bad(p, g, v, *, step, lr):
        return p - lr * g, v - g

    return bad


def _step_with_grad(grad, device="cpu", grad_scale=None, sparse=False, flat=None):
    p = torch.nn.Parameter(torch.zeros(3, 3, device=device))
    opt = fc.SGD([p], compile=False, flat=flat)
    if sparse:
        p.grad = grad(p)
    else:
        p.grad = torch.zeros_like(p)
        p.grad.data = grad(p)  # past torch's own check on .grad
    if grad_scale is not None:
        opt.grad_scale = torch.tensor(grad_scale)
    opt.step()


def _differentiable_step():
    p = torch.randn(3, requires_grad=True).clone()  # a non-leaf, as in meta-learning
    opt = fc.SGD([p], differentiable=True, compile=False)
    p.grad = torch.ones(3)
    opt.step()


def _read_encoded_state():
    (p,) = _params(40)
    opt = fc.AdamW([p], compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    return opt.state[p]["exp_avg"]


ERRORS = {
    "sparse param": (lambda: fc.SGD([torch.nn.Parameter(torch.eye(3).to_sparse())]), "sparse"),
    "complex param": (lambda: fc.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.cfloat))]),
                      "complex"),
    "float64 param": (lambda: fc.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]),
                      "float64"),
    "negative lr": (lambda: fc.AdamW(_params(3), lr=-1.0), "lr"),
    "negative eps": (lambda: fc.Adam(_params(3), eps=-1e-8), "eps"),
    "beta of 1": (lambda: fc.Adam(_params(3), betas=(0.9, 1.0)), r"betas\[1\]"),
    "negative beta": (lambda: fc.Lion(_params(3), betas=(-0.1, 0.99)), r"betas\[0\]"),
    "unknown codec": (lambda: fc.AdamW(_params(3), codecs={"exp_avg": "int3"}), "int3"),
    "unknown state": (lambda: fc.AdamW(_params(3), codecs={"momentum": "fp32"}), "momentum"),
    "unknown preset": (lambda: fc.AdamW(_params(3), codecs="tiny"), "preset"),
    "unsigned codec for signed state": (
        lambda: fc.AdamW(_params(3), codecs={"exp_avg": "sqrt_uint8"}), "nonnegative"),
    "weight split on fp32 param": (_step_fp32_param_with_weight_split, "cast"),
    "nesterov without momentum": (lambda: fc.SGD(_params(3), nesterov=True), "Nesterov"),
    "unknown hyperparameter": (lambda: fc.Optimizer(_params(3), fc.rules.lion, momentum=0.9),
                               "momentum"),
    "state going negative": (lambda: fc.Optimizer(_params(3), _bad_rule_negative_state()), "'v'"),
    # checked before the params are read, with torch.optim's wording first (its own tests match it)
    "infinite lr": (lambda: fc.AdamW(None, lr=math.inf), "learning rate: inf; lr must be finite"),
    "lr as a string": (lambda: fc.AdamW(None, lr="1e-3"), "lr must be a float.*str '1e-3'"),
    "lr as a bool": (lambda: fc.SGD(None, lr=True), "lr must be a float.*bool"),
    "two-element tensor lr": (lambda: fc.Adagrad(None, lr=torch.tensor([1e-3, 1e-3])),
                              "Tensor lr must be 1-element"),
    "float and tensor betas": (lambda: fc.Adam(None, betas=(0.9, torch.tensor(0.99))),
                               "betas must be either both floats or both Tensors"),
    "tensor lr with foreach": (lambda: fc.AdamW(None, lr=torch.tensor(1e-3), foreach=True),
                               "lr as a Tensor is not supported for capturable=False"),
    "negative integer weight decay": (lambda: fc.Adam(None, weight_decay=-1),
                                      "Invalid weight_decay value: -1;"),
    "fused with foreach": (lambda: fc.SGD(_params(3), fused=True, foreach=True), "together"),
    "fused with differentiable": (lambda: fc.Adam(_params(3), fused=True, differentiable=True),
                                  "`fused` does not support `differentiable`"),
    "unknown hyperparameter of a class": (lambda: fc.AdamW(_params(3), momentum=0.9),
                                          "AdamW got unknown hyperparameters"),
    "int64 param": (lambda: fc.SGD([torch.zeros(3, dtype=torch.int64)]),
                    r"param 0 of group 0 \(shape \(3,\)\) has dtype torch.int64.*leave them out"),
    "float8 param": (lambda: fc.SGD([torch.zeros(3, dtype=torch.float8_e4m3fn)]),
                     "float8_e4m3fn.*cast_model"),
    "sparse gradient": (lambda: _step_with_grad(lambda p: torch.eye(3).to_sparse(), sparse=True),
                        "SparseAdam"),
    "gradient of another size": (lambda: _step_with_grad(lambda p: torch.zeros(5)),
                                 (r"param \(group 0, index 0, shape \(3, 3\)\) has a gradient "
                                  r"of shape \(5,\)")),
    "gradient on meta": (lambda: _step_with_grad(lambda p: torch.zeros(3, 3, device="meta"),
                                                 device="meta"),
                         "`fused=True` requires all the params to be floating point Tensors"),
    "gradient on meta, flat storage asked for": (
        lambda: _step_with_grad(lambda p: torch.zeros(3, 3, device="meta"), device="meta",
                                flat=True),
        "`fused=True` requires all the params to be floating point Tensors"),
    "differentiable step that needs a graph": (_differentiable_step, "differentiable=True"),
    "zero loss scale": (lambda: _step_with_grad(lambda p: torch.ones(3, 3), grad_scale=0.0),
                        "loss scale"),
    "encoded state read by name": (_read_encoded_state, "state_value"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_raises_a_message_naming_it(case):
    make, match = ERRORS[case]
    with pytest.raises((ValueError, TypeError, RuntimeError, KeyError), match=match):
        make()


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": True},
                                   {"fused": None, "foreach": None}, {"capturable": True},
                                   {"differentiable": True}], ids=str)
def test_torch_implementation_flags_are_taken_where_their_meaning_holds(flags):
    """flashcompile is fused and foreach by construction; a step captured in no CUDA graph and
    differentiated by nobody is the same step: the flags change nothing and are kept as torch's."""
    runs = []
    for extra in ({}, flags):
        params = _params(40, 7)
        opt = fc.AdamW(params, compile=False, **extra)
        for seed in range(3):
            _grads(params, seed)
            opt.step()
        runs.append(params)
        assert all(opt.param_groups[0][k] == v for k, v in extra.items())
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_rule_returning_the_wrong_number_of_values_is_rejected_at_definition():
    with pytest.raises(TypeError, match="returned 1 values; it must return 2"):
        @fc.rule(defaults=dict(lr=1e-3), states={"m": "signed"})
        def bad(p, g, m, *, step, lr):
            return (p - lr * g,)


def test_branching_on_a_traced_value_explains_where_instead():
    with pytest.raises(TypeError, match="where"):
        @fc.rule(defaults=dict(lr=1e-3), states={})
        def bad(p, g, *, step, lr):
            return (p - lr * g if g > 0 else p,)


def test_master_weight_of_a_param_never_stepped_is_the_param():
    (p,) = _params(5)
    assert torch.equal(fc.AdamW([p]).master_weight(p), p.detach().float())
    assert PARAM == "param"


@pytest.mark.parametrize("make", [fc.Lion, fc.Rprop], ids=["lion", "rprop"])
def test_a_nan_gradient_is_visible_in_its_param_when_the_rule_takes_a_sign(make):
    # torch.sign(nan) == 0: the NaN used to vanish, and Lion's group of 32 stopped moving unseen
    a, b = _params(64, 64)
    opt = make([a, b], compile=False)
    _grads([a, b], 0)
    a.grad[3] = float("nan")
    opt.step()
    assert torch.isnan(a[3]) and torch.isfinite(b).all()


@pytest.mark.parametrize("flat", [False, True])
def test_a_param_listed_twice_in_a_group_warns_and_steps_once(flat):
    runs = []
    for twice in (False, True):
        a, b = _params(40, 7)
        with pytest.warns(UserWarning, match="duplicate") if twice else _no_warning():
            opt = fc.AdamW([a, a, b] if twice else [a, b], compile=False, flat=flat)
        assert len(opt.param_groups[0]["params"]) == 2
        for seed in range(2):
            _grads([a, b], seed)
            opt.step()
        runs.append((a, b))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_params_and_grads_with_gaps_in_their_storage_step_as_contiguous_ones():
    def run(strided: bool):
        torch.manual_seed(0)
        base = [torch.randn(50, 6), torch.randn(100)]
        params = [torch.nn.Parameter(b[:, ::2] if b.dim() == 2 else b[::2]) if strided
                  else torch.nn.Parameter(b[:, ::2].contiguous() if b.dim() == 2
                                          else b[::2].contiguous()) for b in base]
        opt = fc.AdamW(params, lr=0.1)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                g = torch.randn(p.shape[0], 2 * p.shape[1] if p.dim() == 2 else 2, generator=gen)
                p.grad = g[:, ::2] if p.dim() == 2 else g.reshape(-1)[: 2 * p.numel()][::2]
            opt.step()
        return params

    for p, q in zip(run(True), run(False)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_a_state_set_before_the_first_step_is_adopted_or_refused_never_misread(flat):
    """torch.optim lets a step pre-hook initialise states. A value shaped like the param, in a
    dtype the stored field holds exactly, is encoded as the plan stores it (the step then starts
    from it); a layout the plan cannot adopt raises instead of being read as padded groups."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20, 7))
    start = torch.rand(20, 7).bfloat16()
    opt = fc.AdamW([p], lr=1e-2, betas=(0.9, 0.999), codecs="fp32", compile=False, flat=flat)
    p.grad = torch.randn(20, 7)
    opt.state[p]["step"] = torch.tensor(0.0)
    opt.state[p]["exp_avg"] = start.clone()
    opt.step()
    torch.testing.assert_close(opt.state_value(p, "exp_avg"), 0.9 * start.float() + 0.1 * p.grad,
                               rtol=2 ** -23, atol=0)  # one fp32 rounding of the EMA
    bad = torch.nn.Parameter(torch.randn(20, 7))
    opt = fc.AdamW([bad], codecs="fp32", compile=False, flat=flat)
    bad.grad = torch.ones_like(bad)
    opt.state[bad]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg.*shape \\(3,\\)"):
        opt.step()


def _sr_run(steps, resume_at=None, flat=True):
    """AdamW with stochastically rounded states on fixed gradients; optionally saved after
    ``resume_at`` steps and continued in a fresh optimizer from the state dict."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16()) for n in (300, 64)]
    grads = [[torch.randn(p.shape, generator=gen).bfloat16() for p in params] for _ in range(steps)]
    sr = {"exp_avg": "softsign_int8_sr", "exp_avg_sq": "sqrt_uint8_sr"}
    opt = fc.AdamW(params, lr=1e-2, codecs=sr, compile=False, flat=flat)
    for t in range(steps):
        if t == resume_at:
            saved = copy.deepcopy(opt.state_dict())
            opt = fc.AdamW(params, lr=1e-2, codecs=sr, compile=False, flat=flat)
            opt.load_state_dict(saved)
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
    return [opt.state_value(p, "exp_avg_sq") for p in params] + [p.detach().clone() for p in params]


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per_tensor"])
def test_stochastic_rounding_repeats_for_the_same_steps_and_resumes_from_a_checkpoint(flat):
    once, again, resumed = _sr_run(6, flat=flat), _sr_run(6, flat=flat), _sr_run(6, 3, flat=flat)
    assert all(torch.equal(a, b) for a, b in zip(once, again))
    assert all(torch.equal(a, b) for a, b in zip(once, resumed))


def test_a_checkpoint_saved_with_other_state_codecs_is_reencoded_on_load():
    """Rprop's prev was softsign_int8 before sign_int8: its checkpoints still load, exactly (the
    signs decode to -1, 0, +1 in either), and the next step is the one the saver would take."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100, generator=gen).bfloat16())
    grads = [torch.randn(100, generator=gen).bfloat16() for _ in range(3)]
    old = fc.Rprop([p], codecs={"prev": "softsign_int8"}, compile=False)
    for g in grads[:2]:
        p.grad = g.clone()
        old.step()
    saved, weight = copy.deepcopy(old.state_dict()), p.detach().clone()
    new = fc.Rprop([p], compile=False)
    new.load_state_dict(saved)
    assert torch.equal(new.state_value(p, "prev"), old.state_value(p, "prev"))
    p.grad = grads[2].clone()
    old.step()
    want = p.detach().clone()
    with torch.no_grad():
        p.copy_(weight)
    new.step()
    assert torch.equal(p.detach(), want)
    with pytest.raises(ValueError, match="was saved with codecs"):
        fc.Rprop([p], codecs={"param": "fp32"}, compile=False).load_state_dict(saved)


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_momentum_zero_keeps_no_momentum_buffer_as_torch_optim(name):
    """At momentum 0 (both classes' default) the buffer is never read, so it gets no storage
    (1.06 B/param and its traffic), as torch.optim allocates none; any other momentum keeps one."""
    def held(**kw):
        p = torch.nn.Parameter(torch.randn(8, 40).bfloat16())
        opt = getattr(fc, name)([p], lr=0.01, compile=False, **kw)
        p.grad = torch.randn_like(p)
        opt.step()
        return {k.split(".")[0] for k in opt.state[p]}

    assert "momentum_buffer" not in held()
    assert "momentum_buffer" in held(momentum=0.9)


def test_momentum_raised_from_zero_mid_training_starts_its_buffer_as_torch_sgd():
    """A group whose momentum goes from 0 to 0.9 (a schedule) gets its buffer then, starting from
    the gradient as torch.optim.SGD's missing buffer does."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 40))
    q = torch.nn.Parameter(p.detach().clone())
    ours = fc.SGD([p], lr=0.1, codecs="fp32", compile=False)
    theirs = torch.optim.SGD([q], lr=0.1)
    for step in range(6):
        if step == 3:
            ours.param_groups[0]["momentum"] = theirs.param_groups[0]["momentum"] = 0.9
        g = torch.randn(p.shape)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_a_state_dict_holding_a_momentum_buffer_loads_at_momentum_zero():
    """A state dict saved while the buffer had storage at momentum 0 (before it got none), or
    with a nonzero momentum, loads into an optimizer at momentum 0: the buffer is dropped (no step
    at momentum 0 reads it) and the other states load as saved."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 40).bfloat16())
    saver = fc.RMSprop([p], lr=0.01, momentum=0.9, compile=False)
    p.grad = torch.randn_like(p)
    saver.step()
    saved = copy.deepcopy(saver.state_dict())
    saved["param_groups"][0]["momentum"] = 0.0
    loader = fc.RMSprop([p], lr=0.01, compile=False)
    loader.load_state_dict(saved)
    assert "momentum_buffer.codes" not in loader.state[p]
    assert torch.equal(loader.state[p]["square_avg.codes"], saver.state[p]["square_avg.codes"])
    p.grad = torch.randn_like(p)
    loader.step()


def test_a_checkpoint_of_the_earlier_default_loads_into_the_adaptive_default_unchanged():
    """AdamW saved under the paper's codecs and the guard (the default before the adaptive codecs)
    loads into today's default: its states re-encoded, and where a group's values are alike the
    adaptive codecs hold the paper's very codes, so every state decodes as saved up to the
    adaptive codec's own bound (a group with a quiet lane is stored relative to each value)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 40, generator=gen).bfloat16())
    old = fc.AdamW([p], codecs={"exp_avg": "softsign_int8", "exp_avg_sq": "sqrt_uint8"},
                   compile=False)
    for _ in range(3):
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        old.step()
    new = fc.AdamW([p], compile=False)
    new.load_state_dict(copy.deepcopy(old.state_dict()))
    plan = new.plan_for(p, new.flags_of(new.param_groups[0]))
    for state in ("exp_avg", "exp_avg_sq"):
        want = old.state_value(p, state).float().reshape(-1, 32)
        got = new.state_value(p, state).float().reshape(-1, 32)
        assert ((got - want).abs() <= plan.codecs[state].error_bound(want)).all(), state
        alike = new.state[p][f"{state}.scale"].float().view(-1) > 0  # the paper's code kept
        assert alike.any() and torch.equal(got[alike], want[alike]), state


def test_a_per_tensor_param_is_checked_again_when_its_shape_gradient_or_state_changes():
    """The per-tensor path skips its checks for a param as it was last step; a reshaped param, a
    gradient of another shape or layout, or a replaced state entry is noticed, as at the first
    step: torch.optim's results, or its errors."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 8))
    q = torch.nn.Parameter(p.detach().clone())
    ours = fc.AdamW([p], lr=0.1, codecs="fp32", flat=False)
    theirs = torch.optim.AdamW([q], lr=0.1)

    def step(grad):
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)

    for _ in range(2):
        step(torch.randn(4, 8))
    p.data, q.data = p.data.view(8, 4), q.data.view(8, 4)  # same storage, another shape
    for key in ("exp_avg", "exp_avg_sq"):  # torch's states are shaped like the param
        theirs.state[q][key] = theirs.state[q][key].view(8, 4)
    step(torch.randn(8, 4))
    with torch.no_grad():  # a replaced state: the step reads the new tensor
        ours.state[p]["exp_avg"] = torch.zeros(8, 4)
        theirs.state[q]["exp_avg"] = torch.zeros(8, 4)
    step(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    p.grad.data = torch.randn(32)  # .data bypasses torch's shape check on assignment
    with pytest.raises(RuntimeError, match="gradient of shape"):
        ours.step()
    p.grad = torch.randn(8, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        ours.step()
