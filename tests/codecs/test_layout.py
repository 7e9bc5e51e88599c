"""flashcompile.codecs.layout: groups of 32, padding, and a parameter's memory order."""

from __future__ import annotations

import pytest
import torch

from flashcompile import codecs
from flashcompile.codecs import layout


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6, 3, 5),
    lambda: torch.randn(4, 6, 3, 5).to(memory_format=torch.channels_last),
    lambda: torch.randn(7, 9).t(),
    lambda: torch.randn(2, 3, 4, 5, 6).permute(0, 3, 1, 4, 2),
])
def test_flat_views_a_dense_tensor_in_memory_order_and_unflat_inverts_it(make):
    t = make()
    order = layout.memory_order(t)
    flat = layout.flat(t, order)
    assert flat.data_ptr() == t.data_ptr() and flat.is_contiguous()  # a view, no copy
    back = layout.unflat(flat, t, order)
    assert torch.equal(back, t) and back.stride() == t.stride()
    like = torch.randn(t.shape)  # a contiguous tensor of the same shape flattens to the same order
    assert torch.equal(layout.unflat(layout.flat(like, order), t, order), like)


def test_a_tensor_with_gaps_flattens_in_logical_order():
    t = torch.randn(6, 8)[:, ::2]
    assert layout.memory_order(t) is None
    assert torch.equal(layout.flat(t, None), t.reshape(-1))


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 100])
def test_encode_flat_then_decode_flat_is_within_the_codec_bound(numel):
    x = torch.randn(numel)
    for codec in (codecs.fp32, codecs.softsign_int8, codecs.get("linear_int8")):
        fields = layout.encode_flat(codec, x)
        assert all(t.numel() == layout.group_count(numel) * f.width
                   for f, t in zip(codec.fields, fields))
        err = (layout.decode_flat(codec, fields, numel) - x).abs()
        groups = layout.padded(x)
        bound = codec.error_bound(groups).expand(groups.shape).reshape(-1)[:numel]
        assert (err <= bound).all(), codec.name


@pytest.mark.parametrize("name", ["softsign_int8", "sqrt_uint8_nonzero", "e4m3_int8",
                                  "sqrt_e4m4", "fp32", "bf16", "weight_split"])
def test_encode_flat_in_chunks_equals_encoding_the_whole(monkeypatch, name):
    codec = codecs.get(name)
    numel = 5 * 32 + 11  # a tail group in the last chunk
    x = torch.randn(numel).abs() if codec.domain == "nonnegative" else torch.randn(numel)
    if name == "weight_split":
        x = x.bfloat16()
    whole = layout.encode_flat(codec, x)
    monkeypatch.setattr(layout, "CHUNK_GROUPS", 2)
    chunked = layout.encode_flat(codec, x)
    assert [t.dtype for t in chunked] == [t.dtype for t in whole]
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))


@pytest.mark.parametrize("name", codecs.names())
def test_encode_zeros_equals_encoding_a_zero_tensor(name):
    codec = codecs.get(name)
    if name.startswith("weight_split"):
        pytest.skip("a master-weight codec encodes the param, never zeros")
    expected = layout.encode_flat(codec, torch.zeros(3 * 32 + 5))
    got = layout.encode_zeros(codec, 3 * 32 + 5, torch.device("cpu"))
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(got, expected))


def test_encoding_an_empty_shard_gives_empty_fields():
    for codec in (codecs.softsign_int8, codecs.fp32):
        into = [torch.empty(0, dtype=f.dtype) for f in codec.fields]
        for got in (layout.encode_flat(codec, torch.zeros(0)), layout.encode_flat(
                codec, torch.zeros(0), into), layout.encode_zeros(codec, 0, torch.device("cpu"), into)):
            assert [t.numel() for t in got] == [0] * len(codec.fields)
