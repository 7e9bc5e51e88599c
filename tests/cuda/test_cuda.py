"""GPU checks (run on the device; skipped where no CUDA GPU is present): the compiled CUDA plan
against the eager generated function and the fp32 reference, and Inductor's kernel count."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from parity import assert_tracks

import flashcompile as fc
from flashcompile.codecs import four_bit
from flashcompile.codecs.base import FP32_SLACK
from flashcompile.compiler import fast_math, launch
from flashcompile.compiler.explain import count_kernels, inductor_source, plan_of

pytestmark = pytest.mark.cuda

CASES = {
    "adamw": (lambda p: fc.AdamW(p, lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False)),
    "sgd": (lambda p: fc.SGD(p, lr=1e-2, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False)),
    # per-param norms: a flat bucket sums each param's own groups (no torch.optim twin)
    "lamb": (lambda p: fc.LAMB(p, lr=1e-3), None),
    "lars": (lambda p: fc.LARS(p, lr=1e-2, momentum=0.9), None),
    # stochastic rounding's in-kernel hash (int32 products that must wrap as on the CPU)
    "adamw_relative": (lambda p: fc.AdamW(p, lr=1e-3, codecs="relative"), None),
    # the paper's codecs (the default's adaptive codecs are "adamw")
    "adamw_paper": (lambda p: fc.AdamW(p, lr=1e-3, codecs="paper", step_guard=False), None),
    # 4-bit states two to a byte: packed in a kernel of their own after the step's (four_bit.py)
    "adamw_4bit": (lambda p: fc.AdamW(p, lr=1e-3, codecs=four_bit.ADAM_STATES), None),
    # the weight as bf16 alone, rounded stochastically in the step's kernel (no residual)
    "adamw_bf16_sr": (lambda p: fc.AdamW(p, lr=1e-3, codecs={"param": "bf16_sr"}), None),
    # the rules beyond torch.optim: ADOPT's clip, cautious masking's agreeing count (a
    # reduction), MARS's gradient norm clip, schedule-free's z under the weight split
    "adopt": (lambda p: fc.ADOPT(p, lr=1e-3), None),
    "cautious_adamw": (lambda p: fc.CautiousAdamW(p, lr=1e-3), None),
    "mars": (lambda p: fc.MARS(p, lr=1e-3), None),
    "schedule_free": (lambda p: fc.AdamWScheduleFree(p, lr=1e-3), None),
    # sums over every parameter into the step's accumulator, shared numbers read from the device
    "prodigy": (lambda p: fc.Prodigy(p, d0=1e-4), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("groups", [1, 5, 4099])
def test_cuda_plan_equals_eager_up_to_one_code_step(name, groups):
    make, _ = CASES[name]
    plan = plan_of(make([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))]))
    assert plan.compare_compiled("cuda", groups, seed=groups) is None


# Cautious masking scales every update by numel / (count of lanes whose update agrees with the
# gradient). A momentum within one rounding of 0 can agree under CUDA's fused multiply-add and not
# under the fp32 reference's separate multiply and add: the count moves by one and every update by
# 1/count (seen on an H100: 8e-5 relative, over the weight split's bound). Its compiled kernel is
# checked against its own eager function on the same inputs instead (the test above).
BOUNDED = sorted(set(CASES) - {"cautious_adamw"})


@pytest.mark.parametrize("flat", [True, False], ids=["flat_cuda_graph", "per_tensor"])
@pytest.mark.parametrize("name", BOUNDED)
def test_cuda_flash_steps_stay_within_codec_bounds_of_fp32_steps(name, flat):
    """Flat buckets replay a captured CUDA graph once grads are buffer views (after
    ``opt.zero_grad()``); OneCycleLR changes lr and beta1 (or momentum) every step, which must
    reach the replayed kernel through its scalar vector."""
    from flashcompile.testing import assert_within_bounds, fp32_step

    make, _ = CASES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16))
              for s in [(256, 96), (1000,), (7, 3)]]
    opt = make(params)
    opt.flat = flat
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    for step in range(1, 6):
        opt.zero_grad()
        refs = []
        for p in params:
            g = torch.randn(p.shape, device="cuda", generator=gen).to(torch.bfloat16)
            if p.grad is None:
                p.grad = g  # first step: a foreign grad, staged into the buffer
            else:
                p.grad.copy_(g)  # flat: after opt.zero_grad, a view into the bucket's buffer
            refs.append(fp32_step(opt, p))
        opt.step()
        sched.step()
        assert_within_bounds(opt, params, refs, step, compiled=True, fp32_ulps=8)
    assert all(b._graph is not None for b in opt._buckets.values()) and bool(opt._buckets) == flat


def test_one_parameter_flash_adamw_update_is_one_triton_kernel():
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16, device="cuda"))])
    code = "\n".join(inductor_source(plan_of(opt), "cuda"))
    assert count_kernels(code) == 1, code


def test_cuda_plans_generate_hardware_division_and_square_root():
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16, device="cuda"))])
    code = "\n".join(inductor_source(plan_of(opt), "cuda"))
    assert "libdevice.fast_dividef(" in code and "tl.sqrt(" in code, code
    assert "tl.sqrt_rn(" not in code and not re.search(r"\(tmp\d+ / tmp\d+\)", code), code


def test_hardware_division_and_square_root_stay_within_the_codecs_fp32_slack():
    """Every codec's error bound grants its fp32 arithmetic FP32_SLACK (relative) on top of the
    code step; the approximate division and square root must fit in it (measured against fp64)."""
    from torch._inductor.graph import GraphLowering

    gen = torch.Generator(device="cuda").manual_seed(0)
    # magnitudes e^-40..e^40: quotients and roots stay normal fp32 numbers
    x = torch.exp(torch.empty(1 << 22, device="cuda").uniform_(-40, 40, generator=gen))
    y = torch.exp(torch.empty(1 << 22, device="cuda").uniform_(-40, 40, generator=gen))
    y = torch.where(torch.rand(y.shape, device="cuda", generator=gen) < 0.5, -y, y)
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        fn = torch.compile(lambda a, b: (a / b, torch.sqrt(a)), dynamic=False,
                           backend=fast_math.inductor_backend({"force_disable_caches": True}))
        quotient, root = fn(x, y)
    assert "fast_dividef" in "".join(codes) and "tl.sqrt(" in "".join(codes)
    for got, want in ((quotient, x.double() / y.double()), (root, x.double().sqrt())):
        err = ((got.double() - want) / want).abs().max().item()
        print(f"largest relative error {err:.3g} (FP32_SLACK {FP32_SLACK:.3g})")
        assert err <= FP32_SLACK


TWINS = {  # hyperparameters inside the CPU parity tests' well-conditioned ranges
    "AdamW": dict(lr=1e-3, weight_decay=0.01), "NAdam": dict(lr=1e-3),
    "RAdam": dict(lr=1e-3, decoupled_weight_decay=True, weight_decay=0.1),
    "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True), "Adagrad": dict(lr=1e-2),
    "Adadelta": dict(lr=1.0), "Adamax": dict(lr=2e-3),
}


@pytest.mark.parametrize("name", ["Rprop", "Adamax", "Lion", "AdamW"])
def test_cuda_kernels_carry_a_nan_gradient_into_its_param_only(name):
    """The group kernels' maxima and minima are max.NaN / min.NaN (fast_math): a NaN still
    reaches its weight, as torch.maximum's does, and no other param."""
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(64, device="cuda", dtype=torch.bfloat16))
            for _ in range(2))
    opt = getattr(fc, name)([a, b])
    for nan in (False, True):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        if nan:
            a.grad[3] = float("nan")
        opt.step()
    assert torch.isnan(a[3]) and torch.isfinite(b).all()


@pytest.mark.parametrize("name", sorted(TWINS))
def test_compiled_fp32_plans_on_cuda_match_torch_optim(name):
    """The approximate division and square root do not move fp32 plans off torch.optim: params and
    states within the parity tests' rtol 1e-5 over 12 steps, one flat bucket replayed from a CUDA
    graph, OneCycleLR changing lr (and momentum) every step."""
    kw = TWINS[name]
    cycles = "betas" in kw or "momentum" in kw or name in ("AdamW", "NAdam", "RAdam", "Adamax")
    assert_tracks(lambda p: getattr(fc, name)(p, codecs="fp32", **kw),
                  lambda p: getattr(torch.optim, name)(p, foreach=False, **kw),
                  [(256, 96), (1000,), (7, 3)], seed=0, states=True, device="cuda",
                  scheduler_kind="onecycle" if cycles else "exponential")


@pytest.mark.parametrize("name", ["AdamW", "NAdam", "Adamax", "Adan", "RAdam", "RMSprop",
                                  "Adagrad", "Adadelta", "ASGD", "Rprop", "AdEMAMix", "Lion"])
def test_cuda_group_kernel_launches_with_the_pinned_config_and_stays_correct(name):
    """flashcompile.compiler.launch: Inductor's own tuning lands on slow launch configs, so each plan pins
    its rule's config (launch.config_for) on its group kernel (an odd size: the masked per-tensor
    plan), compiled with fast math, and stays within one code step of its IEEE eager function."""
    p = torch.nn.Parameter(torch.randn(4099 * 32 + 5, device="cuda").to(torch.bfloat16))
    opt = getattr(fc, name)([p])
    p.grad = torch.randn_like(p)
    opt.step()
    plan = plan_of(opt)
    assert plan.launch is not None and plan.launch.pinned >= 1, plan.launch
    assert plan.launch.config == launch.config_for(plan.key.rule.name), plan.launch
    assert plan.compare_compiled("cuda", 4099, seed=1) is None


def test_cuda_gradient_release_is_bit_identical_to_flat_stepping():
    """Release steps buckets of params inside backward (their gradients staged per step, no
    graph); the default CUDA path steps one flat bucket through a CUDA graph. The same kernel on
    the same values: the results must not differ."""
    from flashcompile.tools.bench_models import build

    models = []
    for release in (False, True):
        torch.manual_seed(0)
        model = fc.cast_model(build("tiny_llama", "cuda"))
        opt = fc.AdamW(model.parameters(), lr=1e-2)
        handle = fc.enable_gradient_release(model, opt) if release else None
        gen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(4):
            model(torch.randint(0, 256, (2, 33), device="cuda", generator=gen)).backward()
            if release:
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad()
        models.append((model, opt, handle))
    (a, opt_a, _), (b, opt_b, handle) = models
    assert opt_a._buckets and not opt_b._buckets
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_a.state[p])
    handle.remove()


def test_cuda_graphs_of_two_buckets_with_channels_last_params_step_as_release_does():
    """fp32 BatchNorm params and bf16 channels_last convs: two flat buckets, each replayed from
    its CUDA graph, against release buckets stepping the same kernel without graphs."""
    runs = []
    for release in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                    torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
        model = fc.cast_model(model.cuda()).to(memory_format=torch.channels_last)
        opt = fc.AdamW(model.parameters(), lr=1e-2)
        if release:
            fc.enable_gradient_release(model, opt)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(5):
            x = torch.randn(4, 3, 12, 12, device="cuda", generator=gen).bfloat16()
            model(x.to(memory_format=torch.channels_last)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    (a, opt_a), (b, _) = runs
    assert len(opt_a._buckets) == 2 and all(bk._graph is not None for bk in opt_a._buckets.values())
    assert a[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_cuda_per_tensor_steps_call_the_compiled_graph_without_dynamo():
    params = [torch.nn.Parameter(torch.randn(n, device="cuda").bfloat16()) for n in (1000, 4096)]
    opt = fc.AdamW(params, flat=False)
    opt._tensor_graphs.enabled = False  # each param launched (the second step would record them)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    plan = plan_of(opt)
    before = plan.fn_one.direct_calls
    opt.step()
    assert plan.fn_one.direct_calls - before == len(params), plan.fn_one.capture.rejected


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "CAME"])
def test_per_tensor_steps_replayed_as_one_cuda_graph_equal_launching_each_param(name):
    """flat=False on CUDA: from the third step on the launches replay from one graph while the
    gradients stay where they were; a moved gradient steps eagerly; lr changes reach the replay.
    Adafactor and CAME step each param in its own shape (shaped plans: several kernels each,
    row and column means between them), a channels_last one among them."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(256, 96), (1000,), (7, 3), (33,), (8, 6, 3, 3)]
    start = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    start[-1] = start[-1].to(memory_format=torch.channels_last)
    twins = []
    for graphs in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = getattr(fc, name)(params, lr=1e-2, flat=False)
        opt._tensor_graphs.enabled = graphs
        grads = [torch.zeros_like(t) for t in start]
        for p, g in zip(params, grads):
            p.grad = g
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                    cycle_momentum=False)
        twins.append((params, opt, grads, sched))
    for step in range(7):
        new = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
        for params, opt, grads, sched in twins:
            if step == 4:  # gradients at new addresses: this step cannot replay
                for p, g in zip(params, new):
                    p.grad = g.clone(memory_format=torch.preserve_format)
            else:
                for p, g in zip(params, new):
                    p.grad.copy_(g)
            opt.step()
            sched.step()
        (pa, oa, *_), (pb, ob, *_) = twins
        for a, b in zip(pa, pb):
            assert torch.equal(a, b), step
            for key, value in oa.state[a].items():
                assert torch.equal(value, ob.state[b][key]), (step, key)
    assert oa._tensor_graphs.replays >= 3 and ob._tensor_graphs.replays == 0


@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_a_fused_or_capturable_optimizers_state_dict_keeps_step_on_the_params_device(flag):
    """As torch's fused and capturable optimizers save it (PyTorch's
    test_state_dict_with_cuda_params); the live step stays on the host and a load puts it back."""
    params = [torch.nn.Parameter(torch.randn(40, device="cuda")) for _ in range(2)]
    opt = fc.AdamW(params, lr=1e-2, **{flag: True})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert all(st["step"].device.type == "cuda" for st in sd["state"].values())
    assert all(opt.state[p]["step"].device.type == "cpu" for p in params)
    other = fc.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2,
                     **{flag: True})
    other.load_state_dict(sd)
    assert all(st["step"].device.type == "cuda" for st in sd["state"].values())  # not moved
    assert all(other.state[p]["step"].device.type == "cpu" for p in other.param_groups[0]["params"])
    assert float(other.state_dict()["state"][0]["step"]) == 1.0


def test_flat_buckets_check_gradient_and_weight_pointers_in_one_c_call_and_notice_changes():
    """CUDA builds of torch compare data pointers in C++ (1000 params: about 10 us, where a
    Python loop cost 0.3 ms); a replaced or missing gradient and a moved weight still show."""
    from flashcompile.runtime import arena

    assert arena._ptrs_equal_in_c is not None
    params = [torch.nn.Parameter(torch.randn(n, device="cuda").bfloat16()) for n in (40, 64, 7)]
    opt = fc.AdamW(params, flat=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    (bucket,) = opt._buckets.values()
    assert bucket._grads_now() == (True, True) and bucket.intact()
    params[1].grad = torch.randn_like(params[1])
    assert bucket._grads_now() == (True, False)
    params[1].grad = None
    assert bucket._grads_now() == (False, False)
    params[0].data = params[0].data.clone()
    assert not bucket.intact()


@pytest.mark.parametrize("flat", [True, False], ids=["flat_cuda_graph", "per_tensor"])
def test_cuda_max_grad_norm_equals_clip_then_step_across_graph_replays(flat):
    """The clip factor is a device tensor the kernel reads: a flat bucket's recorded CUDA graph
    must see each step's factor (steps below and above the bound alternate)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(300, 70), (33,), (4096,)]
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = fc.AdamW(ours, lr=1e-2, codecs="fp32", flat=flat, max_grad_norm=1.0)
    b = fc.AdamW(theirs, lr=1e-2, codecs="fp32", flat=flat)
    for step in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, device="cuda", generator=gen) * (5.0 if step % 2 else 1e-3)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        b.step()
    assert (len(a._buckets) > 0) == flat
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cuda_grad_scaler_unscales_fp16_gradients_in_the_kernel():
    """fp16 params under torch.amp.GradScaler: the inverse scale reaches the kernel as a device
    factor; the master weight moves as fp32 AdamW on the unscaled gradients."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, device="cuda").half())
    ref = torch.nn.Parameter(p.detach().float().clone())
    opt = fc.AdamW([p], lr=1e-3, codecs="fp32")  # fp32 master weight and states: torch's math
    ref_opt = torch.optim.AdamW([ref], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for _ in range(3):
        g = torch.randn(4096, device="cuda") * 1e-3
        p.grad = scaler.scale(g).half()  # as scaler.scale(loss).backward() leaves it
        ref.grad = p.grad.float() / scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    torch.testing.assert_close(opt.master_weight(p), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per_tensor"])
def test_cuda_muon_with_fp32_codecs_tracks_torch_optim_muon(flat):
    """Compiled on CUDA, two same-shape matrices batched through one Newton-Schulz product:
    within tests/optim/test_muon.py's bound of torch.optim.Muon (a few bf16 steps of the
    iteration's input per step, 2^-6 of a step's size)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 96), (64, 96), (33, 7)]
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Muon(ours, lr=0.02, codecs="fp32", flat=flat)
    ref = torch.optim.Muon(theirs, lr=0.02)
    steps = 4
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    tol = steps * 0.02 * max(max(1.0, r / c) ** 0.5 for r, c in shapes) * 1.5 * 2.0**-6
    for p, q in zip(ours, theirs):
        assert (p - q).abs().max().item() <= tol


def test_cuda_flash_muon_on_a_bf16_model_stays_within_one_steps_size_of_its_fp32_twin():
    """The default codecs (weight split, 8-bit momentum) against fp32 codecs from the same bf16
    weights: one step moves each weight by lr * ratio * |O| (|O| < 1.5, ratio sqrt(128 / 64));
    the 8-bit momentum's error moves O by its code step's share, and the bf16 weight rounds, so
    the two stay within one step's size of each other and the flash step is not a no-op."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in [(128, 64)] * 3]
    flash = [torch.nn.Parameter(x.clone()) for x in w]
    twin = [torch.nn.Parameter(x.float()) for x in w]
    opts = [fc.Muon(flash, lr=0.02), fc.Muon(twin, lr=0.02, codecs="fp32")]
    for _ in range(3):
        for p, q in zip(flash, twin):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad, q.grad = g.to(torch.bfloat16), g.clone()
        for opt in opts:
            opt.step()
    for p, q, x in zip(flash, twin, w):
        moved = (q - x.float()).abs().max().item()
        assert moved > 0.02 * 0.1
        assert (p.float() - q).abs().max().item() <= 0.02 * 2**0.5 * 1.5


def test_cuda_prodigy_learns_one_d_in_graphs_and_under_release():
    """Prodigy's kernels add their float64 sums to one accumulator and read d from the device:
    flat buckets replaying their CUDA graph and gradient release (buckets inside backward, no
    graph, the same kernel) must step bit for bit alike, d included (rounded to the fp32 the
    kernels read; its float64 value sums in another order)."""
    from flashcompile.tools.bench_models import build

    runs = {}
    for mode in ("flat", "release"):
        torch.manual_seed(0)
        model = fc.cast_model(build("tiny_llama", "cuda"))
        opt = fc.Prodigy(model.parameters(), d0=1e-4)
        if mode == "release":
            fc.enable_gradient_release(model, opt)
        gen = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, 256, (2, 33), device="cuda", generator=gen)
        for _ in range(8):  # one batch: the gradients keep their direction and d grows
            model(tokens).backward()
            opt.step()
            opt.zero_grad()
        runs[mode] = (model, opt)
    (flat_model, flat_opt), (model, opt) = runs["flat"], runs["release"]
    assert float(flat_opt.param_groups[0]["d"]) > 1e-3
    assert flat_opt._buckets and all(b._graph is not None for b in flat_opt._buckets.values())
    assert torch.equal(opt.param_groups[0]["d"].float(), flat_opt.param_groups[0]["d"].float())
    for p, q in zip(flat_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_cuda_prodigy_per_tensor_steps_replay_as_one_graph():
    """flat=False: from the third step on the launches replay from one graph (the gradients stay
    where they are), reading d and adding to the totals through the same tensors as a launch."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(256, 96), (1000,), (7, 3)]
    start = [0.05 * torch.randn(s, device="cuda", generator=gen) for s in shapes]
    drift = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    runs = []
    for graphs in (True, False):
        params = [torch.nn.Parameter(t.clone().bfloat16()) for t in start]
        opt = fc.Prodigy(params, d0=1e-4, flat=False)
        opt._tensor_graphs.enabled = graphs
        for p, g in zip(params, drift):
            p.grad = g.clone().bfloat16()
        for _ in range(8):
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    plan = plan_of(oa)
    assert oa._tensor_graphs.replays >= 3, plan.fn_one.capture.rejected
    assert ob._tensor_graphs.replays == 0 and float(oa.param_groups[0]["d"]) > 1e-3
    assert torch.equal(oa.param_groups[0]["d"], ob.param_groups[0]["d"])
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def _adafactor_params(dtype, gen):
    """A matrix, a batch of matrices, a channels_last conv kernel and a vector (full variance)."""
    shapes = [(64, 48), (3, 16, 8), (8, 3, 3, 3), (37,)]
    out = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    out[2] = out[2].to(memory_format=torch.channels_last)
    return [torch.nn.Parameter(x) for x in out]


def test_cuda_adafactor_with_fp32_codecs_tracks_torch_optim_adafactor():
    """Each parameter in its own shape, compiled on CUDA (row and column means as Inductor's
    reductions): torch.optim.Adafactor's update to fp32 rounding (its RMS and means summed in
    another order), channels_last kept."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ours = _adafactor_params(torch.float32, gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Adafactor(ours, lr=1e-2, weight_decay=0.1, codecs="fp32")
    ref = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert ours[2].is_contiguous(memory_format=torch.channels_last)
    assert opt.state[ours[1]]["col_var"].shape == (3, 1, 8)


@pytest.mark.parametrize("name", ["Adafactor", "CAME"])
def test_cuda_flash_factored_rules_on_a_bf16_model_stay_close_to_their_fp32_twins(name):
    """The default codecs (weight split; 8-bit variance of vectors, CAME's 8-bit momentum) against
    fp32 codecs from the same bf16 weights: the master weights move alike, within a tenth of how
    far they moved."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    flash = _adafactor_params(torch.bfloat16, gen)
    start = [p.detach().float() for p in flash]
    twin = [torch.nn.Parameter(x.clone()) for x in start]
    make = getattr(fc, name)
    opts = [make(flash, lr=1e-2), make(twin, lr=1e-2, codecs="fp32")]
    for _ in range(5):
        for p, q in zip(flash, twin):
            g = torch.randn(p.shape, device="cuda", generator=gen).to(torch.bfloat16)
            p.grad, q.grad = g.clone(), g.float()
        for opt in opts:
            opt.step()
    for p, q, x in zip(flash, twin, start):
        moved = (q - x).abs().mean().item()
        assert moved > 1e-3
        assert (opts[0].master_weight(p) - q).abs().mean().item() <= 0.1 * moved
