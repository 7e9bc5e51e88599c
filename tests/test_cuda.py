"""GPU checks (run on the device; skipped where no CUDA GPU is present): the compiled CUDA plan
against the eager generated function and the fp32 reference, and Inductor's kernel count."""

from __future__ import annotations

import pytest
import torch

import flashcompile as fc
from flashcompile.explain import count_kernels, decode_inputs, inductor_source, plan_of, sample_inputs

pytestmark = pytest.mark.cuda

CASES = {
    "adamw": (lambda p: fc.AdamW(p, lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False)),
    "sgd": (lambda p: fc.SGD(p, lr=1e-2, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("groups", [1, 5, 4099])
def test_cuda_plan_equals_eager_up_to_one_code_step(name, groups):
    make, _ = CASES[name]
    plan = plan_of(make([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))]))
    torch.manual_seed(groups)
    args = sample_inputs(plan, groups, "cuda")
    eager, compiled = [a.clone() for a in args], [a.clone() for a in args]
    plan.eager(*eager)
    plan.fn(*compiled)
    wants, gots = decode_inputs(plan, eager), decode_inputs(plan, compiled)
    for key, codec in plan.codecs.items():
        tol = 2 * codec.error_bound(wants[key]) + 1e-6 * wants[key].abs()
        assert torch.all((gots[key] - wants[key]).abs() <= tol), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_flash_steps_stay_within_codec_bounds_of_fp32_steps(name):
    from flashcompile.testing import assert_within_bounds, fp32_step

    make, _ = CASES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16))
              for s in [(256, 96), (1000,), (7, 3)]]
    opt = make(params)
    for step in range(1, 6):
        refs = []
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(torch.bfloat16)
            refs.append(fp32_step(opt, p))
        opt.step()
        assert_within_bounds(opt, params, refs, step, code_steps=2, fp32_ulps=8)


def test_one_parameter_flash_adamw_update_is_one_triton_kernel():
    opt = fc.AdamW([torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16, device="cuda"))])
    code = "\n".join(inductor_source(plan_of(opt), "cuda"))
    assert count_kernels(code) == 1, code


def test_cuda_flat_buckets_replayed_from_a_cuda_graph_equal_per_tensor_steps():
    torch.manual_seed(0)
    shapes = [(256, 96), (1000,), (7, 3), (64,)]
    init = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    flat = [torch.nn.Parameter(t.clone()) for t in init]
    per_tensor = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a, opt_b = fc.AdamW(flat, flat=True), fc.AdamW(per_tensor, flat=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_a, max_lr=1e-2, total_steps=10)
    sched_b = torch.optim.lr_scheduler.OneCycleLR(opt_b, max_lr=1e-2, total_steps=10)
    for step in range(5):
        for a, b in zip(flat, per_tensor):
            g = torch.randn_like(a)
            a.grad.copy_(g) if a.grad is not None else setattr(a, "grad", g.clone())
            b.grad = g.clone()
        opt_a.step()
        opt_b.step()
        sched.step()
        sched_b.step()
    (bucket,) = opt_a._buckets.values()
    assert bucket._graph is not None  # steps 2.. replayed the captured launch
    for a, b in zip(flat, per_tensor):
        assert torch.equal(a, b)
        assert all(torch.equal(opt_a.state[a][k], opt_b.state[b][k]) for k in opt_b.state[b])
