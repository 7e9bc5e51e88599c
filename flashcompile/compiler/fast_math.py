"""Hardware division, square root and NaN-propagating min/max in the Triton kernels of CUDA plans.

A flash step moves few bytes per element, so on an H200 its group kernel runs out of instruction
issue slots before it runs out of memory bandwidth (ncu: issue slots 80-87% busy, DRAM 75-85%).
Much of the issue goes to the forms of three operations Inductor emits. Counted in the sm_90 SASS
of the group kernels (Triton 3.6, ``benchmarks/sass_offline.py``), per element:

==================================  ====  ===========================================  ====
Inductor emits                      SASS  CUDA plans emit                              SASS
==================================  ====  ===========================================  ====
``x / y`` (``div.full.f32``)        ~8    ``libdevice.fast_dividef`` (``div.approx``)  ~2
``tl.sqrt_rn``                      ~17   ``tl.sqrt`` (``sqrt.approx``)                ~2
fp32 ``maximum``: ``a > b | a != a``  ~3    ``tl.maximum(a, b, PropagateNan.ALL)``       1
==================================  ====  ===========================================  ====

``div.full`` rescales around one reciprocal for huge and denormal divisors; ``sqrt.rn`` refines an
estimate and calls a slow path. With both (and fused multiply-adds, :mod:`flashcompile.compiler.launch`)
AdamW's kernel goes from 116 to 75 static instructions per element. The min/max form is exact
(``max.NaN``: NaN from either side, as torch.maximum); it took Rprop's kernel, whose step sizes
are clamped, from 79 to 74.

Accuracy: both approximations are a few fp32 ulps from IEEE (``tests/cuda/test_cuda.py`` measures them),
far below the smallest code step of any 8- or 16-bit codec, and fp32-codec plans still follow
torch.optim within the parity tests' rtol of 1e-5. Where they differ from IEEE: a divisor above
2^126 in magnitude gives 0, and fp32 denormals (below 1.2e-38) may flush to zero. ``compare_compiled``
checks every plan against its IEEE eager function before first use.

Only plans' own graphs see this: the overrides are in place while Inductor generates a plan's code,
and never while it compiles anything else. ``FLASHCOMPILE_EXACT_MATH=1`` keeps Inductor's IEEE forms.
"""

from __future__ import annotations

import contextlib
import os

import torch


def enabled() -> bool:
    return os.environ.get("FLASHCOMPILE_EXACT_MATH", "0") != "1"


def _overrides():
    try:
        from torch._inductor.codegen.triton import TritonOverrides
    except ImportError:
        return None
    if not all(hasattr(TritonOverrides, name) for name in ("truediv", "sqrt")):
        return None
    return TritonOverrides


_INTEGERS = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool}


def fast_truediv(exact):
    """``truediv`` through ``div.approx`` where the result is fp32; ``exact`` otherwise."""

    def truediv(x, y):
        dtypes = {getattr(x, "dtype", None), getattr(y, "dtype", None)}
        if torch.float32 in dtypes and dtypes <= _INTEGERS | {torch.float32}:
            return f"libdevice.fast_dividef(({x}).to(tl.float32), ({y}).to(tl.float32))"
        return exact(x, y)  # fp64, fp16/bf16 operands, Python constants: Inductor's own form

    return truediv


def fast_sqrt(exact):
    """``sqrt`` through ``sqrt.approx``: Inductor's code (upcasts included) with ``tl.sqrt``."""

    def sqrt(x):
        return str(exact(x)).replace("tl.sqrt_rn(", "tl.sqrt(")

    return sqrt


def nan_propagating(name, exact):
    """``maximum``/``minimum`` of floats as one ``max.NaN``/``min.NaN`` (FMNMX.NAN, sm_80+) where
    Inductor selects on two compares (``a > b or a != a``): the same results, NaN from either side."""

    def minmax(x, y):
        dtypes = {getattr(x, "dtype", None), getattr(y, "dtype", None)}
        if dtypes == {torch.float32}:
            return f"tl.{name}({x}, {y}, tl.PropagateNan.ALL)"
        return exact(x, y)

    return minmax


@contextlib.contextmanager
def fast_codegen():
    """While Inductor generates Triton code here, emit the approximate forms (if this torch has
    the overrides where we expect them; else Inductor's own)."""
    cls = _overrides()
    if cls is None or not enabled():
        yield False
        return
    saved = {name: cls.__dict__.get(name) for name in ("truediv", "sqrt", "maximum", "minimum")}
    cls.truediv = staticmethod(fast_truediv(cls.truediv))
    cls.sqrt = staticmethod(fast_sqrt(cls.sqrt))
    cls.maximum = staticmethod(nan_propagating("maximum", cls.maximum))
    cls.minimum = staticmethod(nan_propagating("minimum", cls.minimum))
    try:
        yield True
    finally:
        for name, attr in saved.items():
            if attr is None:  # inherited: drop ours, the base class's shows through again
                delattr(cls, name)
            else:
                setattr(cls, name, attr)


def inductor_backend(options: dict):
    """A torch.compile backend: Inductor with ``options``, generating code under
    :func:`fast_codegen`."""

    def inductor_with_fast_math(gm, example_inputs):
        from flashcompile.compiler.direct import inductor

        with fast_codegen():
            return inductor(gm, example_inputs, options)

    return inductor_with_fast_math
