"""4-bit codecs, two codes to a byte: the packing, the bytes they keep, the checkpoint layout
that holds one code per element, and AdamW with 4-bit m and v."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds

import flashcompile as fc
from flashcompile import codecs
from flashcompile.codecs import GROUP, Field, four_bit, packing
from flashcompile.runtime import distributed

FOUR_BIT = ["softsign_int4", "sqrt_uint4", "softsign_int4_sr", "sqrt_uint4_sr"]
FOUR_BIT_ADAM = four_bit.ADAM_STATES


@given(groups=st.integers(1, 5), bits=st.sampled_from([1, 2, 4]), seed=seeds)
def test_packed_codes_unpack_to_themselves(groups, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (groups, GROUP), generator=gen, dtype=torch.int32)
    stored = packing.pack(codes, bits)
    assert stored.dtype == torch.uint8 and stored.shape == (groups, GROUP * bits // 8)
    assert torch.equal(packing.unpack(stored, bits), codes)


@given(groups=st.integers(1, 5), bits=st.sampled_from([1, 2, 4]), seed=seeds)
def test_packed_byte_holds_its_first_code_in_its_lowest_bits(groups, bits, seed):
    """The stored format (checkpoints keep it): byte i holds codes i*k .. i*k + k - 1 (k = 8 /
    bits), the first in its lowest bits, whichever way pack gets there (through int32 words for
    2 and 4 bits)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (groups, GROUP), generator=gen, dtype=torch.int32)
    per = 8 // bits
    want = sum(codes[:, k::per] << (bits * k) for k in range(per)).to(torch.uint8)
    assert torch.equal(packing.pack(codes, bits), want)


def test_a_code_out_of_range_leaves_its_neighbours_bits_alone():
    """A NaN's conversion gives an arbitrary int32; its group decodes to NaN through the scale,
    but the other code of its byte must keep its own bits."""
    codes = torch.tensor([[-2**31, 5] * (GROUP // 2)], dtype=torch.int32)
    assert torch.equal(packing.unpack(packing.pack(codes, 4), 4)[0, 1::2],
                       torch.full((GROUP // 2,), 5, dtype=torch.int32))


def test_packing_is_refused_where_it_cannot_hold_codes():
    with pytest.raises(ValueError, match="pack"):
        Field("codes", torch.int8, pack=2)
    with pytest.raises(ValueError, match="pack"):
        Field("scale", torch.uint8, per_group=True, pack=2)
    with pytest.raises(ValueError, match="pack"):
        Field("codes", torch.uint8, pack=3)


@pytest.mark.parametrize("name", FOUR_BIT)
def test_four_bit_codecs_keep_half_a_byte_and_a_scale_per_value(name):
    codec = codecs.get(name)
    assert codec.bytes_per_value == 0.5 + 2 / GROUP
    fields = codec.encode(torch.randn(3, GROUP) ** (2 if codec.domain == "nonnegative" else 1))
    assert [tuple(t.shape) for t in fields] == [(3, GROUP // 2), (3, 1)]


def test_four_bit_codes_hold_the_companded_levels_exactly():
    """softsign: c s / (14 - |c|) for c in -7..7 (code 7 is the scale itself); sqrt: (c s / 15)^2,
    and a nonzero value never decodes to 0."""
    levels = torch.arange(-7, 8, dtype=torch.float32)
    s = 3.0  # an fp16 value: the largest level is it exactly
    x = torch.zeros(1, GROUP)
    x[0, :15] = levels * s / (14 - levels.abs())
    assert torch.equal(codecs.softsign_int4.decode(*codecs.softsign_int4.encode(x)), x)
    r = torch.zeros(1, GROUP)
    r[0, :16] = torch.arange(16) * s / 15
    v = r * r
    assert torch.equal(codecs.sqrt_uint4.decode(*codecs.sqrt_uint4.encode(v)), v)
    tiny = torch.full((1, GROUP), 1e-6)
    tiny[0, 0] = 1.0
    assert (codecs.sqrt_uint4.decode(*codecs.sqrt_uint4.encode(tiny)) > 0).all()


def _trained(codecs_spec, shape=(5, 39)):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16))
    opt = fc.AdamW([p], lr=1e-2, codecs=codecs_spec, compile=False)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def test_four_bit_adamw_keeps_its_bytes_per_param():
    """AdamW with 4-bit m and v on a bf16 param: residual 1 + two states of 0.5 + 2/32 each (the
    bf16 weight and gradient are the param's own)."""
    p, opt = _trained(FOUR_BIT_ADAM, (4, 64))
    stored = sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
                 if isinstance(v, torch.Tensor) and v.dim())
    assert stored / p.numel() == 1 + 2 * (0.5 + 2 / GROUP)


def test_checkpoint_layout_holds_a_code_per_element_and_reencodes_regrouped_values():
    """The layout DCP saves (one 4-bit code per element, each group's scale repeated for its
    elements) loads back as the stored state where its groups are this param's, and within the
    codec's bound where elements of differently scaled groups meet in one group (as on another
    number of ranks): here the saved elements shifted by 7 lanes."""
    p, opt = _trained(FOUR_BIT_ADAM)
    plan = opt.plan_for(p, opt.flags_of(opt.param_groups[0]))
    saved = distributed.export_state(p, plan, opt.state[p])
    assert saved["exp_avg.codes"].shape == p.shape and saved["exp_avg.codes"].dtype == torch.uint8
    assert int(saved["exp_avg.codes"].max()) < 16
    before = {k: opt.state_value(p, k) for k in ("exp_avg", "exp_avg_sq")}

    fresh = fc.AdamW([p], lr=1e-2, codecs=FOUR_BIT_ADAM, compile=False)
    fresh.load_state_dict({**opt.state_dict(), "state": {0: saved}})
    for key, stored in opt.state[p].items():
        assert torch.equal(fresh.state[p][key], stored), key

    def shifted(t):
        return torch.roll(t.reshape(-1), 7).view(t.shape) if t.dim() else t

    moved = fc.AdamW([p], lr=1e-2, codecs=FOUR_BIT_ADAM, compile=False)
    moved.load_state_dict({**opt.state_dict(),
                           "state": {0: {k: shifted(v) for k, v in saved.items()}}})
    reencoded = False
    for key in before:
        want, got = shifted(before[key]), moved.state_value(p, key)
        values = torch.zeros(-(-p.numel() // GROUP) * GROUP)
        values[:p.numel()] = want.reshape(-1)
        bound = plan.codecs[key].error_bound(values.view(-1, GROUP)).reshape(-1)[:p.numel()]
        assert ((got - want).abs() <= bound.view(p.shape)).all(), key
        reencoded |= not torch.equal(got, want)
    assert reencoded, "no value moved: the shift made no group of differently scaled values"


def test_a_finer_checkpoint_loads_into_four_bit_states_with_a_warning():
    """An 8-bit checkpoint loads into 4-bit states re-encoded, each value within the 4-bit
    codec's bound, and says so; a 4-bit checkpoint loads into the 8-bit default silently (no
    precision is lost there beyond the 8-bit codec's own)."""
    p, opt = _trained("flash")
    saved = {k: opt.state_value(p, k) for k in ("exp_avg", "exp_avg_sq")}
    coarse = fc.AdamW([p], lr=1e-2, codecs=FOUR_BIT_ADAM, compile=False)
    with pytest.warns(UserWarning, match="re-encoded within the coarser codec's error bound"):
        coarse.load_state_dict(opt.state_dict())
    plan = coarse.plan_for(p, coarse.flags_of(coarse.param_groups[0]))
    for key, want in saved.items():
        values = torch.zeros(-(-p.numel() // GROUP) * GROUP)
        values[:p.numel()] = want.reshape(-1)
        bound = plan.codecs[key].error_bound(values.view(-1, GROUP)).reshape(-1)[:p.numel()]
        assert ((coarse.state_value(p, key) - want).abs() <= bound.view(p.shape)).all(), key
    fine = fc.AdamW([p], lr=1e-2, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine.load_state_dict(coarse.state_dict())
