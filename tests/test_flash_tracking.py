"""Flash codecs against the fp32 math, step by step, within the codecs' declared bounds.

Each step, the reference runs the same rule with fp32 codecs from the flash optimizer's own decoded
master weight and states. Both run the same generated math on the same fp32 inputs, so the only
difference left is the encoding: the flash optimizer's decoded results must lie within each codec's
error bound of the reference (for fp32 storage: exactly equal). A wrong codec, layout, padding or
tail shows up at the step it happens instead of hiding in accumulated drift.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashcompile as fc
from flashcompile.testing import assert_within_bounds, check_rule, fp32_step
from flashcompile.rules import adam, lion, sgd
from strategies import seeds, shape_lists

STEPS = 6

OPTIMIZERS = {
    "sgd": lambda p: fc.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, compile=False),
    "adamw": lambda p: fc.AdamW(p, lr=1e-2, compile=False),
    "adam_amsgrad": lambda p: fc.Adam(p, lr=1e-2, amsgrad=True, weight_decay=0.01, compile=False),
    "lion": lambda p: fc.Lion(p, lr=1e-3, weight_decay=0.1, compile=False),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(shapes=shape_lists, seed=seeds, grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
def test_flash_step_is_within_codec_bounds_of_fp32_step(name, dtype, shapes, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = OPTIMIZERS[name](params)
    for step in range(1, STEPS + 1):
        refs = []
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * grad_scale).to(dtype)
            refs.append(fp32_step(opt, p))
        opt.step()
        assert_within_bounds(opt, params, refs, step)


@pytest.mark.parametrize("rule", [adam, lion, sgd], ids=lambda r: r.name)
def test_builtin_rules_pass_the_public_property_suite(rule):
    check_rule(rule, max_examples=8)
