"""Adafactor and CAME: rules that run in each parameter's own shape (row and column means, factored
states): Adafactor against torch.optim.Adafactor, its fp32 twin, torch's state dicts and the DSL's
checks; CAME against a float64 implementation of the authors' code."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import flashcompile as fc
from flashcompile.codecs.base import FP32_SLACK

# a matrix, a batch of matrices, a channels_last conv kernel, a vector (full variance), a scalar
SHAPES = [(16, 24), (3, 8, 5), (8, 3, 3, 3), (37,), ()]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    out[2] = out[2].to(memory_format=torch.channels_last)
    return [torch.nn.Parameter(x) for x in out]


def _grads(params, gen, scale=1.0):
    return [torch.randn(p.shape, generator=gen) * scale for p in params]


def _step_alike(ours, theirs, optimizers, gen, steps, scale=1.0):
    """``steps`` steps of every optimizer in ``optimizers``, the same gradients on both lists."""
    for _ in range(steps):
        for p, q, g in zip(ours, theirs, _grads(ours, gen, scale)):
            p.grad, q.grad = g.clone(), g.clone()
        for opt in optimizers:
            opt.step()


def _twins(options, steps=6, compile=False, scale=1.0):
    """fc.Adafactor (fp32 codecs) and torch.optim.Adafactor from the same fp32 weights and
    gradients; returns both param lists and optimizers."""
    ours, gen = _params(), torch.Generator().manual_seed(1)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Adafactor(ours, codecs="fp32", compile=compile, **options)
    ref = torch.optim.Adafactor(theirs, foreach=False, **options)
    _step_alike(ours, theirs, (opt, ref), gen, steps, scale)
    return ours, theirs, opt, ref


# fp32 roundings of one step, over the steps taken: of each weight, and of its update, which the
# RMS and means (summed in another order) scale as a whole, so relative to the param's typical size
def _assert_tracks(ours, theirs, steps=6):
    for p, q in zip(ours, theirs):
        q = q.detach()
        tol = steps * 8 * FP32_SLACK * (q.abs() + q.abs().mean() + 1e-3)
        assert ((p - q).abs() <= tol).all(), (p - q).abs().max()


@pytest.mark.parametrize("options", [
    dict(lr=1e-2),
    dict(lr=0.3, weight_decay=0.1, maximize=True),
    dict(lr=1e-2, eps=(1e-3, 1e-2), d=4.0, beta2_decay=-0.5),
], ids=["defaults", "decay_maximize_rho_capped", "eps_d_decay"])
def test_fp32_codecs_step_as_torch_optim_adafactor_on_every_shape(options):
    ours, theirs, opt, ref = _twins(options)
    _assert_tracks(ours, theirs)
    for p, q in zip(ours, theirs):  # torch's state names; the factored states in its shapes
        mine, torchs = opt.state[p], ref.state[q]
        assert set(mine) == set(torchs)
        assert all(mine[k].shape == torchs[k].shape for k in ("row_var", "col_var") if k in mine)


def test_the_compiled_step_equals_torch_and_shares_one_graph_per_rank_and_layout():
    """Compiled (Inductor's C++ on this CPU) with symbolic shapes: one compiled step per rank and
    memory layout, not per shape; channels_last kept."""
    ours, theirs, opt, _ = _twins(dict(lr=1e-2, weight_decay=0.1), compile=True)
    _assert_tracks(ours, theirs)
    assert ours[2].is_contiguous(memory_format=torch.channels_last)
    more = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 5), (40, 3)]]
    opt.add_param_group({"params": more})
    for p in [*ours, *more]:
        p.grad = torch.randn(p.shape)
    opt.step()
    plan = opt.plan_for(more[0], opt.flags_of(opt.param_groups[1]))
    # matrices: 2-D, 3-D and the 4-D channels_last kernel; three 2-D shapes share one step
    assert len(plan._compiled) == 3
    assert all(fn != plan._step for fn in plan._compiled.values())  # none fell back to eager


def test_matrices_of_whole_and_partial_groups_each_take_their_own_compiled_graph():
    """A matrix of whole groups of 32 steps through a graph without padding (views only), one
    with a partial last group through the padded one: both kinds interleaved in one optimizer,
    compiled and called without dynamo, track torch.optim.Adafactor step after step."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 24), (7, 5), (64, 8), (40, 3)]  # 384 and 512 whole; 35 and 120 not
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Adafactor(ours, codecs="fp32", compile=True, lr=1e-2)
    ref = torch.optim.Adafactor(theirs, foreach=False, lr=1e-2)
    calls = []
    for _ in range(6):
        for p, q, g in zip(ours, theirs, _grads(ours, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        plan = opt.plan_for(ours[0], opt.flags_of(opt.param_groups[0]))
        # the plan (and its compiled steps) may be shared with other tests: count this test's
        fn = plan._compiled[plan._kind(ours[0], ours[0].grad, None)]
        calls.append(fn.direct_calls)
    _assert_tracks(ours, theirs)
    assert fn != plan._step and len(fn.capture.graphs) >= 2, fn.capture.rejected
    assert calls[-1] - calls[0] == 5 * len(shapes)  # every later step called without dynamo


def test_params_of_each_size_range_step_through_a_graph_compiled_on_their_range(monkeypatch):
    """Inductor fixes how a reduction is split across the card by the sizes it compiled on, so a
    matrix of 2^16 elements or more steps through a graph of its own size range, compiled on it:
    the smaller matrix's graphs guard against its arguments, and the other way round. Both
    track torch.optim.Adafactor."""
    from flashcompile.compiler.direct import DirectFunction
    from flashcompile.compiler.shaped import size_class

    calls = {}  # the arguments each compiled function was last called with
    call = DirectFunction.__call__

    def recording(self, *args):
        calls[id(self)] = args
        return call(self, *args)
    monkeypatch.setattr(DirectFunction, "__call__", recording)
    gen = torch.Generator().manual_seed(4)
    # 6144 and 81920 elements, whole groups of 32 both (Inductor's own guards, at 4096 elements
    # on the CPU, would tell 1280 from 6144 apart)
    shapes = [(96, 64), (512, 160)]
    assert [size_class(a * b) for a, b in shapes] == [1, 2]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Adafactor(ours, codecs="fp32", compile=True, lr=1e-2)
    ref = torch.optim.Adafactor(theirs, foreach=False, lr=1e-2)
    _step_alike(ours, theirs, (opt, ref), gen, 3)
    _assert_tracks(ours, theirs)
    plan = opt.plan_for(ours[0], opt.flags_of(opt.param_groups[0]))
    small, large = (plan._compiled[plan._kind(p, p.grad, None)] for p in ours)
    assert plan._step not in (small, large) and small is not large
    assert small.capture.graphs and large.capture.graphs
    for fn, other in ((small, large), (large, small)):
        args = calls[id(other)]
        assert not any(g.guard(g.inputs(args)) for g in fn.capture.graphs if g.guard)


def test_a_compiled_step_that_disagrees_falls_back_to_eager_for_every_later_step(monkeypatch):
    """A compiled graph that disagrees with the eager step (here one that does nothing) is dropped
    with a warning: that step and every later one for such params run eagerly and equal an eager
    optimizer's (the later steps used to call the eager step with the compiled graph's
    arguments)."""
    from flashcompile.compiler.shaped import ShapedPlan

    monkeypatch.setattr(ShapedPlan, "_direct", lambda self, *a: lambda *args: None)
    ours, eager = _params(), _params()
    opts = [fc.Adafactor(ours, lr=1e-2, compile=True), fc.Adafactor(eager, lr=1e-2, compile=False)]
    plan = opts[0].plan_for(ours[0], opts[0].flags_of(opts[0].param_groups[0]))
    monkeypatch.setattr(plan, "_compiled", {})  # plans are shared: none compiled by other tests
    gen = torch.Generator().manual_seed(3)
    with pytest.warns(RuntimeWarning, match="disagrees with its eager step"):
        for _ in range(3):
            for p, q, g in zip(ours, eager, _grads(ours, gen)):
                p.grad, q.grad = g.clone(), g.clone()
            for opt in opts:
                opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, eager))


def test_fp32_codecs_compiled_keep_their_graph_where_sums_round_in_another_order():
    """fp32 codecs leave only fp32 roundings between the compiled and eager steps; the means
    summed in another order scale a whole matrix's update, so a weight near 0 can differ by
    more than its own ulps (GPT-2's c_attn / 16, whose check once fell back to eager)."""
    import warnings

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3141, 48), (48, 144)]]
    opt = fc.Adafactor(params, lr=1e-2, codecs="fp32", compile=True)
    plan = opt.plan_for(params[0], opt.flags_of(opt.param_groups[0]))
    plan._compiled.clear()  # its checks run here, on these shapes
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
    assert plan._compiled and all(fn != plan._step for fn in plan._compiled.values())


def test_eps1_none_is_each_param_dtypes_machine_epsilon():
    """torch's default eps=(None, 1e-3): bf16 params floor the second moment at (2^-7)^2, fp32
    ones at (2^-23)^2, so tiny gradients step as with those values given."""
    for dtype, eps1 in [(torch.bfloat16, 2.0**-7), (torch.float32, 2.0**-23)]:
        a = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in [(6, 4), (9,)]]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        opts = [fc.Adafactor(a, compile=False), fc.Adafactor(b, eps=(eps1, 1e-3), compile=False)]
        for p, q in zip(a, b):
            p.grad = q.grad = torch.full(p.shape, 1e-4).to(dtype)
        for opt in opts:
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        assert opts[0].param_groups[0]["eps"] == (None, 1e-3)  # kept as torch keeps it


@pytest.mark.parametrize("name", ["Adafactor", "CAME"])
def test_flash_codecs_on_a_bf16_model_keep_the_fp32_twins_weights(name):
    """The weight split (3 B/param) and 8-bit states (a vector's variance; CAME's momentum)
    against fp32 codecs from the same bf16 weights and gradients: the master weights move alike,
    within a tenth of how far they moved (an 8-bit variance's few-percent error scales a vector's
    update by about half that)."""
    make = getattr(fc, name)
    flash, gen = _params(torch.bfloat16), torch.Generator().manual_seed(2)
    start = [p.detach().float() for p in flash]
    twin = [torch.nn.Parameter(x.clone()) for x in start]
    opts = [make(flash, lr=1e-2, compile=False), make(twin, lr=1e-2, codecs="fp32", compile=False)]
    for _ in range(8):
        for p, q, g in zip(flash, twin, _grads(flash, gen)):
            p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
        for opt in opts:
            opt.step()
    for p, q, x in zip(flash, twin, start):  # the master weight: bf16 alone rounds a small move
        moved = (q - x).abs().mean()
        assert moved > 1e-3
        assert (opts[0].master_weight(p) - q).abs().mean() <= 0.1 * moved


def test_a_matrix_keeps_its_second_moment_in_under_a_tenth_of_a_byte_per_parameter():
    p = torch.nn.Parameter(torch.zeros(768, 3072, dtype=torch.bfloat16))
    v = torch.nn.Parameter(torch.zeros(768, dtype=torch.bfloat16))
    opt = fc.Adafactor([p, v], compile=False)
    p.grad, v.grad = torch.ones_like(p), torch.ones_like(v)
    opt.step()
    state = opt.state[p]
    second_moment = sum(state[k].numel() * state[k].element_size() for k in ("row_var", "col_var"))
    assert second_moment / p.numel() < 0.1  # 0.0065
    assert set(state) == {"step", "param.residual", "row_var", "col_var"}
    assert "variance.codes" in opt.state[v] and "row_var" not in opt.state[v]


def test_state_dicts_go_to_torch_optim_adafactor_and_back_and_training_goes_on():
    ours, theirs, opt, ref = _twins(dict(lr=1e-2), steps=3)
    # ours from torch's state dict, torch's from ours: both continue as the other would have
    mine = fc.Adafactor(ours, codecs="fp32", compile=False)
    mine.load_state_dict(ref.state_dict())
    back = torch.optim.Adafactor(theirs, foreach=False)
    back.load_state_dict(opt.torch_state_dict())
    _step_alike(ours, theirs, (mine, back), torch.Generator().manual_seed(5), 3)
    _assert_tracks(ours, theirs)


@pytest.mark.parametrize("case", ["row_var_of_another_shape", "col_var_missing", "int_row_var"])
def test_a_factored_state_that_does_not_fit_fails_to_load_and_changes_nothing(case):
    ours, _, opt, _ = _twins(dict(lr=1e-2), steps=2)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    entry = bad["state"][0]
    if case == "row_var_of_another_shape":
        entry["row_var"] = torch.zeros(15, 1)
    elif case == "col_var_missing":
        del entry["col_var"]
    else:
        entry["row_var"] = entry["row_var"].long()
    with pytest.raises(ValueError, match="row_var|col_var|keys"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, st in before["state"].items()
               for k, v in st.items())


def test_gradient_release_steps_adafactor_bit_identically_to_stepping_after_backward():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 3)).bfloat16() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = fc.Adafactor(models[0].parameters(), compile=False)
    released = fc.Adafactor(models[1].parameters(), compile=False)
    fc.enable_gradient_release(models[1], released)
    for seed in range(3):
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed)).bfloat16()
        for model, opt in zip(models, (plain, released)):
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_max_grad_norm_clips_inside_the_shaped_step():
    ours = _params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    clipped = fc.Adafactor(ours, codecs="fp32", compile=False, max_grad_norm=0.5)
    plain = fc.Adafactor(twin, codecs="fp32", compile=False)
    for p, q, g in zip(ours, twin, _grads(ours, torch.Generator().manual_seed(3), 10.0)):
        p.grad, q.grad = g.clone(), g.clone()
    torch.nn.utils.clip_grad_norm_(twin, 0.5)
    clipped.step()
    plain.step()
    _assert_tracks(ours, twin, steps=1)


def test_rules_with_factored_states_explain_their_errors():
    """A factored state on a parameter that has no rows, and what shaped rules refuse."""
    from flashcompile.language import row_mean, rule

    @rule(defaults=dict(lr=0.1), states={"r": "rows"})
    def rows_only(p, g, r, *, step, lr):
        r = r + row_mean(g * g)
        return p - lr * g / (r + 1.0), r

    v = torch.nn.Parameter(torch.randn(5))
    v.grad = torch.randn(5)
    with pytest.raises(ValueError, match="one number per row or column"):
        fc.Optimizer([v], rows_only, compile=False).step()
    with pytest.raises(NotImplementedError, match="scalar states"):
        @rule(defaults=dict(lr=0.1), states={"r": "rows", "k": "scalar"})
        def with_scalar(p, g, r, k, *, step, lr):
            return p - lr * g / (row_mean(g * g) + 1.0), row_mean(g * g), k + 1
    with pytest.raises(ValueError, match="param_flags"):
        @rule(defaults=dict(lr=0.1), states={}, param_flags=("square",))
        def unknown_flag(p, g, *, step, lr, square):
            return (p - lr * g,)


def test_adafactor_runs_properties_one_to_three_and_says_why_four_does_not():
    from flashcompile.testing import UntrackedRule, check_rule

    with pytest.warns(UntrackedRule, match="MeanAll"):
        check_rule(fc.rules.adafactor, max_examples=3, steps=3)


def test_bf16_model_trains_with_flash_adafactor_as_with_its_fp32_twin():
    """A few dozen steps of a small regression: the losses of the flash optimizer and the fp32
    twin end within a few percent of each other, and both well below where they started."""
    losses = {}
    for codecs in ("flash", "fp32"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 1)).bfloat16()
        opt = fc.Adafactor(model.parameters(), lr=0.1, codecs=codecs, compile=False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=gen)
        y = torch.sin(x.sum(1, keepdim=True))
        for _ in range(60):
            loss = (model(x.bfloat16()).float() - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[codecs] = loss.item()
    first = float((y - y.mean()).square().mean())
    assert losses["fp32"] < 0.5 * first
    assert math.isclose(losses["flash"], losses["fp32"], rel_tol=0.1)


def test_explain_shows_the_shaped_rules_math_codecs_and_factored_states():
    p = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.bfloat16))
    text = fc.explain(fc.Adafactor([p], compile=False))
    assert "row_mean" in text and "col_var" in text and "own shape" in text


def _came_float64(params, grads_per_step, lr, eps, clip, betas, wd):
    """The authors' came_pytorch step, in float64 (their (R / mean R)^-1/2 C^-1/2 form)."""
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p),
                  r=torch.zeros(p.shape[:-1], dtype=p.dtype),
                  c=torch.zeros((*p.shape[:-2], p.shape[-1]) if p.dim() >= 2 else (),
                                dtype=p.dtype),
                  rr=torch.zeros(p.shape[:-1], dtype=p.dtype),
                  rc=torch.zeros((*p.shape[:-2], p.shape[-1]) if p.dim() >= 2 else (),
                                 dtype=p.dtype)) for p in params]

    def approx(row, col):
        return (row / row.mean(-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()

    def rms(t):
        return t.norm(2) / t.numel() ** 0.5

    for grads in grads_per_step:
        for p, g, s in zip(params, grads, state):
            update = g * g + eps[0]
            if p.dim() >= 2:
                s["r"] = betas[1] * s["r"] + (1 - betas[1]) * update.mean(-1)
                s["c"] = betas[1] * s["c"] + (1 - betas[1]) * update.mean(-2)
                update = approx(s["r"], s["c"]) * g
            else:
                s["v"] = betas[1] * s["v"] + (1 - betas[1]) * update
                update = s["v"].rsqrt() * g
            update = update / (rms(update) / clip).clamp(min=1.0)
            s["m"] = betas[0] * s["m"] + (1 - betas[0]) * update
            if p.dim() >= 2:
                res = (update - s["m"]) ** 2 + eps[1]
                s["rr"] = betas[2] * s["rr"] + (1 - betas[2]) * res.mean(-1)
                s["rc"] = betas[2] * s["rc"] + (1 - betas[2]) * res.mean(-2)
                update = approx(s["rr"], s["rc"]) * s["m"]
            else:
                update = s["m"]
            p.mul_(1 - wd * lr).add_(-lr * update)


CAME_OPTIONS = dict(lr=1e-2, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999),
                   weight_decay=0.1)


def _came_case(seed=0, steps=6):
    shapes = [(16, 24), (3, 8, 5), (37,)]
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen) for s in shapes]
    return start, [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def test_came_rule_read_in_float64_is_the_authors_update():
    """The rule's own torch reading (the DSL on float64 tensors, states carried by hand) against
    came_pytorch's step in float64: the same math, to float64 rounding."""
    start, steps = _came_case()
    ref = [x.double() for x in start]
    _came_float64(ref, [[g.double() for g in grads] for grads in steps], CAME_OPTIONS["lr"],
                  CAME_OPTIONS["eps"], CAME_OPTIONS["clip_threshold"], CAME_OPTIONS["betas"],
                  CAME_OPTIONS["weight_decay"])
    rule = fc.rules.came
    for i, x in enumerate(start):
        p, matrix = x.double(), x.dim() >= 2
        rows = (*x.shape[:-1], 1) if matrix else ()
        cols = (*x.shape[:-2], 1, x.shape[-1]) if matrix else ()
        states = [torch.zeros_like(p), torch.zeros_like(p), torch.zeros(rows, dtype=p.dtype),
                  torch.zeros(cols, dtype=p.dtype), torch.zeros(rows, dtype=p.dtype),
                  torch.zeros(cols, dtype=p.dtype)]
        for t, grads in enumerate(steps, 1):
            p, *states = rule.fn(p, grads[i].double(), *states, step=torch.tensor(float(t)),
                                 matrix=matrix, **CAME_OPTIONS)
        torch.testing.assert_close(p, ref[i], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_came_with_fp32_codecs_tracks_the_authors_update(compile):
    """fp32 codecs (the plan's fp32 math, eager or compiled) against came_pytorch in float64:
    within 1e-3 of how far each weight moved. Wider than fp32 rounding: the confidence divides by
    (update - momentum)^2, which cancels where the two nearly agree."""
    start, steps = _came_case()
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    opt = fc.CAME(ours, codecs="fp32", compile=compile, **CAME_OPTIONS)
    for grads in steps:
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
    ref = [x.double() for x in start]
    _came_float64(ref, [[g.double() for g in grads] for grads in steps], CAME_OPTIONS["lr"],
                  CAME_OPTIONS["eps"], CAME_OPTIONS["clip_threshold"], CAME_OPTIONS["betas"],
                  CAME_OPTIONS["weight_decay"])
    for p, q, x in zip(ours, ref, start):
        moved = (q.float() - x).abs().max()
        assert moved > 1e-2
        assert (p.detach() - q.float()).abs().max() <= 1e-3 * moved
    # its confidence factors exist for matrices only, in the parameter's rows and columns
    assert opt.state[ours[1]]["exp_avg_res_col"].shape == (3, 1, 5)
    assert "exp_avg_res_row" not in opt.state[ours[2]]


def test_a_shaped_rule_with_a_zero_branch_steps_as_its_torch_reading():
    """A zero branch (a state only a nonzero momentum reads) in a rule that takes row means: at
    momentum 0 no momentum is stored and the step is the rule read with momentum 0."""
    from flashcompile.language import row_mean, rule, sqrt

    @rule(defaults=dict(lr=0.1, momentum=0.0), states={"buf": "signed"},
          zero_branches=("momentum",))
    def row_normalized(p, g, buf, *, step, lr, momentum):
        buf = momentum * buf + g
        return p - lr * buf / sqrt(row_mean(g * g) + 1e-8), buf

    for momentum in (0.0, 0.5):
        p = torch.nn.Parameter(torch.randn(4, 6))
        start = p.detach().clone()
        g = torch.randn(4, 6)
        p.grad = g.clone()
        opt = fc.Optimizer([p], row_normalized, codecs="fp32", compile=False, momentum=momentum)
        opt.step()
        want = start - 0.1 * g / (g * g).mean(-1, keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-6)
        assert ("buf" in opt.state[p]) == (momentum != 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Learning rate should be >= 0"),
    (dict(beta2_decay=0.8), "beta2_decay should be <= 0"),
    (dict(eps=(-1e-30, 1e-3)), "epsilon1 should be >= 0"),
    (dict(eps=(None, -1.0)), "epsilon2 should be >= 0"),
    (dict(d=0.5), "Clipping threshold d should be >= 1"),
    (dict(weight_decay=-0.1), "weight_decay should be >= 0"),
])
def test_adafactor_refuses_what_torch_refuses_with_torchs_message(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=message):
        fc.Adafactor([p], compile=False, **kwargs)
    with pytest.raises(ValueError, match=message):
        torch.optim.Adafactor([p], **kwargs)
