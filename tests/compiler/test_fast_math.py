"""flashcompile.compiler.fast_math: what the Triton code generation of CUDA plans emits instead of Inductor's
IEEE division and square root, and that nothing else compiled in the process is touched. The
kernels themselves run in tests/cuda/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from flashcompile.compiler import fast_math


class Var:
    """Stands in for an Inductor CSE variable: a name with a dtype."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __str__(self):
        return self.name


def exact_div(x, y):
    return f"({x} / {y})"


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.int32, torch.float32),
                                    (torch.float32, torch.int64)])
def test_fp32_quotients_use_the_hardware_division(dtypes):
    div = fast_math.fast_truediv(exact_div)
    got = div(Var("a", dtypes[0]), Var("b", dtypes[1]))
    assert got == "libdevice.fast_dividef((a).to(tl.float32), (b).to(tl.float32))"


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16), (torch.int32, torch.int32),
                                    (None, torch.float32)])
def test_other_quotients_keep_inductors_form(dtypes):
    """fp64 and 16-bit operands, integer pairs and bare constants: Inductor's own code."""
    div = fast_math.fast_truediv(exact_div)
    assert div(Var("a", dtypes[0]), Var("b", dtypes[1])) == "(a / b)"


def test_square_root_keeps_inductors_casts_and_drops_only_the_rounding_mode():
    sqrt = fast_math.fast_sqrt(lambda x: f"tl.sqrt_rn({x}.to(tl.float32)).to(tl.bfloat16)")
    assert sqrt("tmp3") == "tl.sqrt(tmp3.to(tl.float32)).to(tl.bfloat16)"


def exact_max(x, y):
    return f"triton_helpers.maximum({x}, {y})"


def test_fp32_maxima_are_one_nan_propagating_instruction():
    maximum = fast_math.nan_propagating("maximum", exact_max)
    assert maximum(Var("a", torch.float32), Var("b", torch.float32)) == \
        "tl.maximum(a, b, tl.PropagateNan.ALL)"


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.float32, torch.int32),
                                    (torch.float64, torch.float64), (None, torch.float32)])
def test_other_maxima_keep_inductors_form(dtypes):
    """Integers (the weight split's clamps), mixed or fp64 operands, bare constants."""
    maximum = fast_math.nan_propagating("maximum", exact_max)
    assert maximum(Var("a", dtypes[0]), Var("b", dtypes[1])) == "triton_helpers.maximum(a, b)"


def test_inductor_overrides_are_patched_only_inside_the_context():
    pytest.importorskip("torch._inductor.codegen.triton")
    from torch._inductor.codegen.triton import TritonOverrides

    before = {name: TritonOverrides.__dict__.get(name)
              for name in ("truediv", "sqrt", "maximum", "minimum")}
    with fast_math.fast_codegen() as active:
        assert active
        assert TritonOverrides.sqrt("x") == "tl.sqrt(x)"
    assert {name: TritonOverrides.__dict__.get(name) for name in before} == before
    assert TritonOverrides.sqrt("x") == "tl.sqrt_rn(x)"


def test_exact_math_switch_keeps_inductors_code(monkeypatch):
    monkeypatch.setenv("FLASHCOMPILE_EXACT_MATH", "1")
    assert not fast_math.enabled()
    with fast_math.fast_codegen() as active:
        assert not active
