"""Masked 16-bit vector loads in the C++ kernels of CPU plans: whole vectors load unmasked.

The per-tensor step pads its bf16 weight and gradient to whole groups inside the graph
(``codegen._padded``), so Inductor's C++ kernel reads them through a lane mask in every loop that
reads them. For a 16-bit type ATen's masked load (``VecMask<float, 1>::loadu<BFloat16, 1>``,
torch 2.13, AVX-512) widens the 16-lane float mask to 32 int lanes one lane at a time before two
masked loads: perf put those loops at about a third of the AdamW per-tensor kernel's time on
300 params of 1000 values.

Every vector but the param's last one has all its lanes valid. While Inductor generates a plan's
C++ code, a masked load of a 16-bit type first asks whether every lane is set (one mask move and
compare) and then loads the vector plainly; only a partial vector takes ATen's masked load. The
loaded values are the same either way; only the instructions differ.
"""

from __future__ import annotations

import contextlib

import torch

_SIXTEEN_BITS = (torch.bfloat16, torch.float16)


def _vector_kernel():
    try:
        from torch._inductor.codegen.cpp import CppVecKernel
    except ImportError:
        return None
    needed = ("_get_vec_load_line", "_get_mask_cast", "_get_num_vectors")
    if "_get_vec_load_line" not in CppVecKernel.__dict__ or not all(
            hasattr(CppVecKernel, name) for name in needed):
        return None
    return CppVecKernel


def whole_vectors_first(original):
    """``_get_vec_load_line`` that loads a 16-bit vector plainly where its mask has every lane
    set; any other load is Inductor's own line."""

    def load_line(self, var, index, dtype, load_mask=None):
        masked = original(self, var, index, dtype, load_mask)
        if dtype not in _SIXTEEN_BITS or load_mask is None or not getattr(load_mask, "is_vec",
                                                                          False):
            return masked
        from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP, cexpr_index

        # one type for both branches: what the masked load gives (Vectorized for one vector)
        vectors = self._get_num_vectors(dtype)
        kind = (f"at::vec::Vectorized<{DTYPE_TO_CPP[dtype]}>" if vectors == 1
                else f"at::vec::VectorizedN<{DTYPE_TO_CPP[dtype]},{vectors}>")
        mask = self._get_mask_cast(load_mask, torch.float)
        at = f"{var} + {cexpr_index(index)}" if index != 0 else var
        return (f"[&]() -> {kind} {{ if ({mask}.all_masked()) return {kind}::loadu({at}, "
                f"{cexpr_index(self.num_elems)}); return {masked}; }}()")

    return load_line


@contextlib.contextmanager
def whole_vector_loads():
    """While Inductor generates C++ code here, emit :func:`whole_vectors_first` loads (if this
    torch has the method where we expect it; else Inductor's own)."""
    cls = _vector_kernel()
    if cls is None:
        yield False
        return
    saved = cls.__dict__["_get_vec_load_line"]
    cls._get_vec_load_line = whole_vectors_first(saved)
    try:
        yield True
    finally:
        cls._get_vec_load_line = saved
