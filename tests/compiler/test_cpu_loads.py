"""CPU plans' masked 16-bit loads (flashcompile.compiler.cpu_loads): whole vectors load plainly,
and every lane reads what Inductor's masked load reads."""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.utils import run_and_get_code

from flashcompile.compiler.cpu_loads import _vector_kernel, whole_vector_loads


def _padded_step(x_flat, y):
    """As a per-tensor step reads its weight: the flat 16-bit values padded to rows of 32."""
    x = torch.nn.functional.pad(x_flat, (0, y.shape[0] * 32 - x_flat.shape[0])).view(-1, 32)
    return (x.float() * 3.0 + y).amax(dim=1), x.float() * y  # exact in any order


def _with_whole_vector_loads(gm, example_inputs):
    with whole_vector_loads():
        return compile_fx(gm, example_inputs)


@pytest.mark.skipif(_vector_kernel() is None, reason="this torch's C++ codegen has no such method")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_vector_loads_read_every_lane_as_the_masked_load_does(dtype):
    """Lengths around the vector width and the group of 32 (partial last vectors, a last row with
    one value, whole rows): the compiled step equals the eager one, and the C++ code asks for a
    whole vector before a masked 16-bit load."""
    torch._dynamo.reset()
    step = torch.compile(_padded_step, backend=_with_whole_vector_loads, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    codes = []
    for n in (1, 15, 16, 17, 31, 32, 33, 63, 100, 1000):
        rows = -(-n // 32)
        x = (torch.randn(n, generator=gen) * 100).to(dtype)
        y = torch.randn(rows, 32, generator=gen)
        got, code = run_and_get_code(step, x, y)
        codes += code
        for a, b in zip(got, _padded_step(x, y)):
            assert torch.equal(a, b), n
    assert any(".all_masked()) return" in c for c in codes)


def test_the_patch_is_gone_after_the_context():
    cls = _vector_kernel()
    if cls is None:
        pytest.skip("this torch's C++ codegen has no such method")
    before = cls.__dict__["_get_vec_load_line"]
    with whole_vector_loads() as applied:
        assert applied and cls.__dict__["_get_vec_load_line"] is not before
    assert cls.__dict__["_get_vec_load_line"] is before
