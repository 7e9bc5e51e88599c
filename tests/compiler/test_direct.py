"""flashcompile.compiler.direct: compiled graphs called without dynamo pick the graph whose shape guards
hold, and compute what dynamo's call would."""

from __future__ import annotations

import torch

from flashcompile.compiler.direct import DirectFunction


def _inner(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _compile(fn, backend):
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)


def scale_rows(s, x, y, out):
    """out = x * s[0] + y broadcast over rows; returns nothing (in place)."""
    out.copy_(x * s[0] + y)


def row_sums(s, x, y):
    return (x * s[0]).sum(1) + y


def test_each_call_takes_a_graph_whose_shape_guards_hold_and_matches_eager():
    fn = DirectFunction(scale_rows, _compile, _inner)
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([2.0])
    # rows 1 and 0-1 specialise in dynamo; equal sizes share a symbol (x and y: duck sizing)
    for rows, cols in [(5, 3), (1, 3), (7, 3), (1, 3), (4, 1), (6, 6), (5, 3)]:
        x = torch.randn(rows, cols, generator=gen)
        y = torch.randn(cols, generator=gen)
        out = torch.empty(rows, cols)
        fn(s, x, y, out)
        assert torch.equal(out, x * 2 + y)
    assert fn.direct_calls >= 3  # the repeats of seen shapes ran without dynamo
    assert len(fn.capture.graphs) >= 2


def test_a_function_returning_a_tensor_returns_it_when_called_directly():
    fn = DirectFunction(row_sums, _compile, _inner)
    s = torch.tensor([3.0])
    for rows in (4, 9, 4):
        x, y = torch.randn(rows, 8), torch.randn(rows)
        torch.testing.assert_close(fn(s, x, y), (x * 3).sum(1) + y)
    assert fn.direct_calls >= 2


def _inductor(gm, example_inputs):
    from flashcompile.compiler.direct import inductor

    return inductor(gm, example_inputs)


def test_graphs_compiled_through_direct_inductor_call_the_generated_code_and_match_eager():
    from flashcompile.compiler.direct import GeneratedCode

    fn = DirectFunction(scale_rows, _compile, _inductor)
    s = torch.tensor([2.0])
    for rows in (5, 7, 5):
        x, y, out = torch.randn(rows, 3), torch.randn(3), torch.empty(rows, 3)
        fn(s, x, y, out)
        assert torch.equal(out, x * 2 + y)
    assert fn.direct_calls >= 1
    assert all(isinstance(g.compiled, GeneratedCode) for g in fn.capture.graphs)


def test_a_bound_call_matches_eager_and_other_dtypes_fall_back_to_the_function():
    fn = DirectFunction(scale_rows, _compile, _inductor)
    s = torch.tensor([3.0])
    x, y, out = torch.randn(4, 6), torch.randn(6), torch.empty(4, 6)
    assert fn.bound(s, x, y, out) is None  # nothing compiled yet
    fn(s, x, y, out)
    bound = fn.bound(s, x, y, out)
    before = fn.direct_calls
    x2, y2 = torch.randn(4, 6), torch.randn(6)
    bound(s, x2, y2, out)
    assert torch.equal(out, x2 * 3 + y2) and fn.direct_calls == before + 1
    # float64 inputs: not what the graph was compiled for; the function compiles its own
    x3, y3, out3 = x2.double(), y2.double(), torch.empty(4, 6, dtype=torch.float64)
    bound(s.double(), x3, y3, out3)
    assert torch.equal(out3, x3 * 3 + y3)


def test_a_strided_input_never_takes_a_graph_compiled_for_other_strides():
    """Plans compile without Inductor's size asserts: the direct call's guards check strides. A
    transposed input of the same shape gets a graph of its own, and the same values as eager."""
    from flashcompile.compiler.direct import inductor

    fn = DirectFunction(scale_rows, _compile,
                        lambda gm, inputs: inductor(gm, inputs, {"size_asserts": False}))
    s = torch.tensor([2.0])
    x, y, out = torch.randn(6, 6), torch.randn(6), torch.empty(6, 6)
    fn(s, x, y, out)
    for _ in range(2):  # the second call takes whichever recorded graph fits, directly
        xt = torch.randn(6, 6).t()
        fn(s, xt, y, out)
        assert torch.equal(out, xt * 2 + y)


def test_a_function_compiles_past_dynamos_recompile_limits_and_leaves_the_users_limits_alone():
    """Each dtype is one more graph (dynamic=True covers sizes only): 10 of them pass lowered
    per-function and accumulated limits (torch 2.11 counts every plan's graphs on one frame),
    which with ``fullgraph=True`` raise instead of falling back; the limits outside our calls
    stay as the user set them."""
    def eager(gm, example_inputs):
        return gm.forward  # no Inductor: only dynamo's bookkeeping is under test

    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.int16, torch.int32, torch.int64, torch.uint8, torch.complex64]
    cfg = torch._dynamo.config
    with cfg.patch(accumulated_recompile_limit=3, recompile_limit=3):
        fn = DirectFunction(scale_rows, _compile, eager)
        for dtype in dtypes:
            x = torch.ones(3, 2, dtype=dtype)
            out = torch.empty_like(x)
            fn(torch.tensor([2], dtype=dtype), x, x, out)
            assert torch.equal(out, x * 2 + x)
        assert cfg.accumulated_recompile_limit == 3 and cfg.recompile_limit == 3
    assert cfg.recompile_limit == 8
    assert len(fn.capture.graphs) == len(dtypes)
