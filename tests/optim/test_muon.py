"""Muon: a rule with a matrix stage (orthogonalize) between two element-wise phases.

With fp32 codecs it must track torch.optim.Muon. The Newton-Schulz iteration runs in bf16 in both,
so the only differences are fp32 roundings of the momentum (a lerp evaluated in another order, or
fused) that can flip one bf16 rounding of the iteration's input: that moves the orthogonalized
update by a few bf16 steps (2^-8 relative) where it happens. Each step's update is lr * ratio *
O with |O| <= 1.5 (the iteration's singular values stay below it), so after k steps the params
may differ by k * lr * ratio * 1.5 * 2^-6; a mistaken update (the Nesterov form, the shape
ratio, decay) moves them by a sizeable part of a whole step.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashcompile as fc
from flashcompile.compiler.matrices import Matrices, orthogonalize
from flashcompile.language.dsl import LR_RATIOS, newton_schulz

matrix_shapes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1,
                         max_size=4)


def _tracks(shapes, seed, flat, compiled, steps=4, **hyper):
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fc.Muon(ours, codecs="fp32", flat=flat, compile=compiled, **hyper)
    ref = torch.optim.Muon(theirs, **hyper)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    lr = hyper.get("lr", 1e-3)
    ratio = max(LR_RATIOS[hyper.get("adjust_lr_fn") or "original"](*s) for s in shapes)
    tol = steps * lr * ratio * 1.5 * 2.0**-6
    for p, q in zip(ours, theirs):
        assert (p - q).abs().max().item() <= tol, (tuple(p.shape), (p - q).abs().max().item(), tol)


@settings(max_examples=15)
@given(shapes=matrix_shapes, seed=st.integers(0, 2**16), flat=st.booleans(),
       nesterov=st.booleans(), adjust=st.sampled_from([None, "original", "match_rms_adamw"]),
       lr=st.sampled_from([1e-3, 0.02]), weight_decay=st.sampled_from([0.0, 0.1]),
       momentum=st.sampled_from([0.0, 0.9, 0.95]))
def test_muon_with_fp32_codecs_tracks_torch_optim_muon(shapes, seed, flat, nesterov, adjust, lr,
                                                       weight_decay, momentum):
    _tracks(shapes, seed, flat, False, nesterov=nesterov, adjust_lr_fn=adjust, lr=lr,
            weight_decay=weight_decay, momentum=momentum)


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_compiled_muon_tracks_torch_optim_muon(flat):
    _tracks([(12, 20), (12, 20), (33, 7)], 0, flat, True, lr=0.02)


def test_muon_takes_torch_optim_muons_arguments_and_defaults():
    ours = inspect.signature(fc.Muon.__init__).parameters
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name


@pytest.mark.parametrize("kwargs, match", [
    (dict(adjust_lr_fn="sqrt"), "Adjust learning rate function sqrt is not supported"),
    (dict(ns_steps=100), "less than 100"),
    (dict(ns_coefficients=(1.0, 2.0)), "exactly 3 values"),
    (dict(lr=-1.0), "lr"),
    (dict(momentum=-0.5), "momentum"),
])
def test_muon_refuses_what_torch_optim_muon_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fc.Muon([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
def test_muon_refuses_params_that_are_not_matrices_and_names_the_way_out(shape):
    with pytest.raises(ValueError, match=r"only supports 2D parameters(.|\n)*element-wise rule"):
        fc.Muon([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(shape))])


def test_flash_muon_keeps_the_weight_split_and_8_bit_momentum():
    p = torch.nn.Parameter(torch.randn(64, 48).bfloat16())
    opt = fc.Muon([p], compile=False)
    p.grad = torch.randn_like(p)
    opt.step()
    plan = opt.plan_for(p, opt.flags_of(opt.param_groups[0]))
    assert {k: c.name for k, c in plan.codecs.items()} == {
        "param": "weight_split(bf16+int8)", "momentum_buffer": "softsign_adaptive"}
    assert plan.bytes_per_param == 3 + 1.0625  # + the bf16 gradient: 6.06 B/param


def test_matrices_of_one_shape_orthogonalize_batched_as_each_alone():
    """A flat bucket runs the iteration once for every matrix of a shape (a batched product);
    the result is each matrix's own, to the bf16 rounding of the products."""
    shapes = [(16, 8), (5, 9), (16, 8), (16, 8), (9, 5)]
    params = [torch.zeros(s, device="meta") for s in shapes]
    matrices = Matrices(params, 0, torch.device("cpu"))
    assert sorted(map(len, matrices.batches)) == [1, 1, 3]
    buffer = torch.randn(sum(-(-math.prod(s) // 32) for s in shapes), 32).bfloat16()
    want = [newton_schulz(v.float(), 5, 3.4445, -4.775, 2.0315, 1e-7)
            for v in matrices.views(buffer)]
    orthogonalize(buffer, matrices, [0.0, 5.0, 3.4445, -4.775, 2.0315, 1e-7], (1, 2, 3, 4, 5))
    for got, w in zip(matrices.views(buffer), want):
        assert (got.float() - w.float()).abs().max() <= 2.0**-6 * w.float().abs().max()


def test_orthogonalized_update_has_singular_values_near_one():
    """What the iteration is for: the update's singular values land near 1 (about [0.3, 1.5]:
    five quintic steps do not converge, by design) across the momentum's spread (here 100x)."""
    u, _, v = torch.linalg.svd(torch.randn(48, 32), full_matrices=False)
    x = u @ torch.diag(torch.logspace(-1, 1, 32)) @ v
    s = torch.linalg.svdvals(newton_schulz(x, 5, 3.4445, -4.775, 2.0315, 1e-7).float())
    assert s.min() > 0.3 and s.max() < 1.5


def test_muon_passes_the_public_property_suite():
    """Properties 1-3 (facts, codec bounds, each step within the codecs' bounds of the same fp32
    math from the same decoded state: the stage then sees the same input), and 5 with compiled
    plans; property 4's envelope has no interval rule for a matrix stage, and says so."""
    from flashcompile.rules import muon
    from flashcompile.testing import UntrackedRule, check_rule

    hyper = st.fixed_dictionaries(dict(
        lr=st.floats(1e-4, 0.1), weight_decay=st.sampled_from([0.0, 0.1]),
        momentum=st.floats(0.0, 0.99), nesterov=st.booleans(),
        ns_coefficients=st.just((3.4445, -4.775, 2.0315)), eps=st.just(1e-7),
        ns_steps=st.integers(1, 8), adjust_lr_fn=st.sampled_from(muon.choices["adjust_lr_fn"])))
    with pytest.warns(UntrackedRule, match="Orthogonalize"):
        check_rule(muon, max_examples=6, compiled=True, hyper=hyper)


def test_a_batch_of_same_shape_matrices_holds_at_most_the_batch_size():
    """The stacked batch and the iteration's products are temporaries of the step: 32 matrices
    of 4096 x 4096 go two at a time (64 MiB of bf16 each batch), small ones all in one, and every
    matrix is in exactly one batch."""
    from flashcompile.compiler.matrices import BATCH_ELEMENTS

    shapes = [(4096, 4096)] * 32 + [(768, 768)] * 48 + [(4096, 11008)] * 3
    matrices = Matrices([torch.zeros(s, device="meta") for s in shapes], 0, torch.device("cpu"))
    assert sorted(i for batch in matrices.batches for i in batch) == list(range(len(shapes)))
    for batch in matrices.batches:
        assert len({shapes[i] for i in batch}) == 1
        assert len(batch) == 1 or len(batch) * math.prod(shapes[batch[0]]) <= BATCH_ELEMENTS
    assert sorted(map(len, matrices.batches)) == [1] * 3 + [2] * 16 + [48]
