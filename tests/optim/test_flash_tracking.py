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
from flashcompile.rules import adam, lion, sgd
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds, shape_lists

from flashcompile.codecs import four_bit
from flashcompile.testing import check_rule, check_steps

STEPS = 6

# rule and hyperparameters; flags as the torch-named classes set them
CASES = {
    "sgd": (sgd, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adamw": (adam, dict(lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)),
    "adam_amsgrad": (adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
    "lion": (lion, dict(lr=1e-3, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(shapes=shape_lists, seed=seeds, grad_scale=st.sampled_from([1e-4, 1.0, 100.0]))
def test_flash_step_is_within_codec_bounds_of_fp32_step(name, dtype, shapes, seed, grad_scale):
    rule, hyper = CASES[name]
    check_steps(rule, hyper, shapes, seed, dtype, steps=STEPS, grad_scale=grad_scale)


@pytest.mark.parametrize("rule", [adam, lion, sgd], ids=lambda r: r.name)
def test_builtin_rules_pass_the_public_property_suite(rule):
    check_rule(rule, max_examples=8)


def test_adam_with_the_relative_codecs_passes_the_public_property_suite():
    # precision relative to each value (codecs/relative.py) for both moments
    check_rule(adam, codecs={"exp_avg": "e4m3_int8", "exp_avg_sq": "sqrt_e4m4"}, max_examples=8)


@pytest.mark.parametrize("rule", [adam, lion], ids=lambda r: r.name)
def test_relative_stochastic_preset_passes_the_public_property_suite(rule):
    """The "relative" preset (e4m3_int8_sr, sqrt_e4m4_sr): the same proofs, bounds and float64
    envelope as the flash codecs, with stochastic rounding's one-code-step bounds."""
    check_rule(rule, codecs="relative", max_examples=4)


@pytest.mark.parametrize("rule", [adam, lion], ids=lambda r: r.name)
def test_four_bit_codecs_pass_the_public_property_suite(rule):
    """4-bit codes two to a byte (``four_bit.ADAM_STATES``: stochastically rounded): the same
    proofs, bounds and float64 envelope, with the 4-bit codes' bounds."""
    states = {k: v for k, v in four_bit.ADAM_STATES.items() if k in rule.states}
    check_rule(rule, codecs=states, max_examples=4)
