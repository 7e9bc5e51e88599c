"""Calling a plan's compiled graphs without dynamo on every call.

``torch.compile`` sends each call through dynamo: its frame machinery and guards, then the compiled
graph. Measured on CPU (torch 2.13) for a plan-sized function: about 30-50 us per call through
dynamo against 7-12 us for the compiled graph itself (skipping guard evaluation with
``set_stance(skip_guard_eval_unsafe=True)`` saved nothing). A plan called once per parameter (the
per-tensor path: parameters that cannot go flat, FSDP2's fallback) paid that every call.

A plan's arguments are tensors whose dtypes, devices and group layout the plan fixes; only their
sizes vary. So the backend records, for each graph Inductor compiles, where each graph input comes
from (an argument, or one of its sizes, strides or offsets) and the shape guards under which that
graph is valid (the ShapeEnv's own guard expression, static sizes included). A later call takes the
first recorded graph whose guards (sizes and strides included) hold for its arguments and calls it
directly. A call no recorded graph fits goes through
``torch.compile`` as before: dynamo compiles a graph for it, which is recorded too.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Graph:
    """One compiled graph: how to gather its inputs from the function's arguments, and when it is
    valid."""

    def __init__(self, readers: tuple, guard: Callable[[list], bool] | None, device: int,
                 compiled: Callable, outputs: int):
        self.readers = readers  # per graph input: (argument index, None) or (index, accessor)
        self.guard = guard
        self.device = device  # get_device() of the inputs (CUDA code has the index baked in)
        self.compiled = compiled
        self.outputs = outputs  # the graph's outputs (the function's return value is rebuilt
        # from them by dynamo's bytecode: called directly, only None or one tensor is kept)

    def inputs(self, args: Sequence[Any]) -> list:
        return [args[i] if read is None else read(args[i]) for i, read in self.readers]


class Capture:
    """A ``torch.compile`` backend: compiles with ``inner`` and records each graph (see module)."""

    def __init__(self, inner: Callable, argnames: Sequence[str]):
        self.inner = inner
        self.argnames = list(argnames)
        self.graphs: list[_Graph] = []
        self.rejected: list[str] = []  # why a compiled graph is left to dynamo (for diagnosis)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        readers = [_reader(n.meta.get("grapharg"), self.argnames) for n in placeholders]
        # the traced values: fake tensors with symbolic sizes, SymInts (example_inputs are hints)
        traced = [n.meta.get("example_value") for n in placeholders]
        start = len(_RECORDED)
        compiled = self.inner(gm, example_inputs)
        recorded = _RECORDED[start:]
        del _RECORDED[start:]
        if None in readers:
            sources = [n.meta.get("grapharg") for n, r in zip(placeholders, readers) if r is None]
            self.rejected.append(f"inputs from {[getattr(g, 'source', g) for g in sources]}")
        else:
            guard = _guard(traced)
            if isinstance(guard, str):
                self.rejected.append(f"shape guards not checkable: {guard}")
            else:
                # a fake tensor's get_device() is its meta storage's (-1): read its device
                device = next(_index(t.device) for t in traced if isinstance(t, torch.Tensor))
                out = gm.graph.output_node().args[0]
                outputs = len(out) if isinstance(out, (tuple, list)) else 1
                # called from eager code only: skip the wrapper that keeps dynamo from tracing
                # into the graph (it sets and resets dynamo's frame callback: ~5 us per call)
                direct = _inductor_callable(recorded, len(placeholders), outputs)
                if direct is None:
                    direct = compiled
                    if getattr(direct, "_torchdynamo_disable", False):
                        direct = getattr(direct, "_torchdynamo_orig_callable", direct)
                self.graphs.append(_Graph(tuple(readers), guard, device, direct, outputs))
        return compiled


class DirectFunction:
    """``fn`` compiled through ``torch.compile(..., backend=Capture(...))``, called directly where
    a recorded graph fits the arguments. Positional arguments only, the first a tensor on the
    device of the call (a plan's scalar vector); dynamo runs under ``no_grad`` (grad mode is one
    of its guards; a compiled graph does not track gradients)."""

    built = 0  # functions made in this process (each may add its variants to one code object)

    def __init__(self, fn: Callable, compile_with: Callable[[Callable, Callable], Callable],
                 inner_backend: Callable):
        DirectFunction.built += 1
        self.capture = Capture(inner_backend, inspect.signature(fn).parameters)
        self.dynamo = compile_with(fn, self.capture)
        self.returns: str | None = None  # "none" or "tensor" once a call through dynamo showed it
        self.direct_calls = 0  # calls that skipped dynamo (tests read it)

    def __call__(self, *args):
        # inside a region torch.compile traces (a user's compiled training step), dynamo traces us
        if self.returns is not None and not torch.compiler.is_compiling():
            device = args[0].get_device()
            for graph in self.capture.graphs:
                if graph.device != device or (self.returns == "tensor" and graph.outputs != 1):
                    continue
                inputs = graph.inputs(args)
                if graph.guard is None or graph.guard(inputs):
                    self.direct_calls += 1
                    out = graph.compiled(*inputs)
                    return None if self.returns == "none" else out[0]
        with torch.no_grad(), _room_to_compile():
            out = self.dynamo(*args)
        if self.returns is None:
            self.returns = ("none" if out is None else "tensor" if isinstance(out, torch.Tensor)
                            else "other")
        return out

    def bound(self, *args, fresh: Sequence[int] | None = None) -> Bound | None:
        """A callable for later calls whose arguments have these arguments' sizes and strides
        (see :class:`Bound`; ``fresh``: the positions whose tensors may change between calls, all
        by default); None where no recorded graph fits them yet (the first call) or the return
        value is neither None nor one tensor."""
        if self.returns not in ("none", "tensor") or not all(
                isinstance(a, torch.Tensor) for a in args):
            return None
        device = args[0].get_device()
        for graph in self.capture.graphs:
            if graph.device != device or (self.returns == "tensor" and graph.outputs != 1):
                continue
            if graph.guard is None or graph.guard(graph.inputs(args)):
                return Bound(self, graph, args, fresh)
        return None


# Graphs one function may compile: dtypes, devices, whole groups or one-group tails (dynamic=True
# covers the sizes). Dynamo's own limit (8) is made for a user's function that recompiles by mistake.
VARIANTS = 64


def _room_to_compile():
    """Dynamo's recompile limits raised for this call only (the user's settings are kept outside).

    Both limits count graphs per code object, and torch 2.11 traces every compiled function from
    one shared wrapper frame: a process holding many plans (PyTorch's test_optim.py, 11 optimizers
    with all their flags) reached the per-function limit at 64 and the accumulated one at 256, and
    with ``fullgraph=True`` dynamo raises there instead of falling back. So both allow
    :data:`VARIANTS` graphs for every function built in this process.
    """
    cfg = torch._dynamo.config
    patch = {}
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            patch[name] = max(getattr(cfg, name), VARIANTS * DirectFunction.built)
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            patch[name] = max(getattr(cfg, name), VARIANTS * DirectFunction.built)
            break
    return cfg.patch(**patch)


class Bound:
    """A :class:`DirectFunction` bound to one set of arguments: calls skip the search for a graph
    whose guards hold. The caller passes, at the positions not in ``fresh``, the tensors it bound
    (or ones of the same dtype, device, sizes and strides); at ``fresh`` positions, tensors of the
    bound sizes and strides, whose dtypes and devices are checked per call (anything else falls
    back to the function). Sizes and strides are not checked (Inductor's size asserts are off,
    ``plan.COMPILE_OPTIONS``). The per-tensor path keeps that: the same state and weight tensors
    (``PerTensor.holds``), and fresh scalars of the plan's length and a contiguous gradient of the
    param's shape (``guards.check_grad``, ``layout.flat``)."""

    def __init__(self, fn: DirectFunction, graph: _Graph, args: Sequence[Any],
                 fresh: Sequence[int] | None = None):
        self.fn, self.graph = fn, graph
        self.fresh = list(range(len(args)) if fresh is None else fresh)
        self.kinds = _kinds([args[i] for i in self.fresh])
        inputs = graph.inputs(args)
        # per call: the tensors themselves and storage offsets; sizes and strides are fixed
        self.dynamic = [(k, i, read) for k, (i, read) in enumerate(graph.readers)
                        if read is None or read is _storage_offset]
        self.template = [None if any(k == d for d, _, _ in self.dynamic) else v
                         for k, v in enumerate(inputs)]  # holds no tensor alive

    def __call__(self, *args):
        if torch.compiler.is_compiling() or _kinds([args[i] for i in self.fresh]) != self.kinds:
            return self.fn(*args)
        inputs = self.template.copy()
        for k, i, read in self.dynamic:
            inputs[k] = args[i] if read is None else read(args[i])
        self.fn.direct_calls += 1
        out = self.graph.compiled(*inputs)
        return None if self.fn.returns == "none" else out[0]


# Inductor graphs compiled by :func:`inductor`, with the graph AOT autograd handed it; each
# Capture takes those its own compile added
_RECORDED: list[tuple[torch.fx.GraphModule, Any]] = []


def inductor(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None):
    """``compile_fx(gm, example_inputs, config_patches=options)``, recording the Inductor graph it
    compiles so that :class:`Capture` can call that graph's generated code without AOT autograd's
    runtime wrapper and Inductor's call wrapper (about 20 us per call, measured on CPU)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def recording(aot_gm, inputs, **kwargs):
        compiled = compile_fx_inner(aot_gm, inputs, **kwargs)
        _RECORDED.append((aot_gm, compiled))
        return compiled

    # AOT autograd's cache would hand back its wrapped graph without compiling (nothing
    # recorded); Inductor's own graph cache still serves the generated code
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=recording,
                          config_patches=options or {})


def _inductor_callable(recorded: list, inputs: int, outputs: int) -> Callable | None:
    """The generated code of the one Inductor graph a compile recorded, where calling it equals
    calling the compiled graph: AOT autograd handed Inductor the graph's inputs as they are and
    takes its outputs as they are (no input mutation applied after the call, no RNG seeds or
    effect tokens added: those change the counts). None otherwise."""
    if len(recorded) != 1:
        return None
    aot_gm, compiled = recorded[0]
    out = aot_gm.graph.output_node().args[0]
    aot_outputs = len(out) if isinstance(out, (tuple, list)) else 1
    aot_inputs = sum(1 for n in aot_gm.graph.nodes if n.op == "placeholder")
    if (aot_inputs, aot_outputs) != (inputs, outputs) or not hasattr(compiled, "current_callable"):
        return None
    return GeneratedCode(compiled)


class GeneratedCode:
    """Calls an Inductor graph's generated code with the graph's inputs (boxed: one list)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        # read at each call: Inductor's post-compile steps may replace it
        return self.compiled.current_callable(list(args))


_storage_offset = torch.Tensor.storage_offset
_dtype = operator.attrgetter("dtype")


def _kinds(args: Sequence[torch.Tensor]) -> tuple:
    """The arguments' dtypes and device indices (C-level maps: this runs on every bound call)."""
    return (*map(_dtype, args), *map(torch.Tensor.get_device, args))


def _index(device: torch.device) -> int:
    """``Tensor.get_device()`` of a tensor on ``device``: -1 on CPU, the index elsewhere."""
    return -1 if device.type == "cpu" else (device.index or 0)


def _reader(grapharg, argnames: list[str]):
    """(argument index, accessor or None) for a graph input, or None where its source is not an
    argument or a size, stride or storage offset of one."""
    if grapharg is None:
        return None
    src = grapharg.source
    prop = None
    if type(src).__name__ == "TensorPropertySource":
        prop, src = (src.prop, src.idx), src.base
    if type(src).__name__ == "GetItemSource" and isinstance(src.index, int) and (
            type(src.base).__name__ == "LocalSource" and src.base.local_name == "args"
            and "args" not in argnames):
        index = src.index  # torch 2.11 traces from a wrapper frame: its *args are the arguments
    elif type(src).__name__ == "LocalSource" and src.local_name in argnames:
        index = argnames.index(src.local_name)
    else:
        return None
    if prop is None:
        return index, None
    kind, dim = prop
    name = getattr(kind, "name", str(kind))
    if name == "SIZE":
        return index, lambda t, d=dim: t.shape[d]
    if name == "STRIDE":
        return index, lambda t, d=dim: t.stride(d)
    if name == "STORAGE_OFFSET":
        return index, _storage_offset
    return None


def _guard(traced: list):
    """A predicate on a graph's inputs that holds where the graph is valid: the tensors' dtypes
    and strides, every static size of its tensor inputs, every symbolic size equal to the graph
    input that carries its symbol (dynamo gives equal sizes one symbol), and the ShapeEnv's guards
    over the symbols (as Inductor's own graph cache checks them). None: no constraints; a string:
    why they cannot be checked here (the graph then runs through dynamo)."""
    if any(v is None for v in traced):
        return "a graph input without its traced value"
    carrier = {t.node.expr: i for i, t in enumerate(traced) if isinstance(t, torch.SymInt)}
    static, same, strides = [], [], []
    dtypes = [(i, t.dtype) for i, t in enumerate(traced) if isinstance(t, torch.Tensor)]
    for i, t in enumerate(traced):
        if not isinstance(t, torch.Tensor):
            continue
        for d, size in enumerate(t.shape):
            if isinstance(size, int):
                static.append((i, d, size))
            elif size.node.expr in carrier:
                same.append((i, d, carrier[size.node.expr]))
            else:
                return f"input {i} has a size derived from others: {size}"
        # strides too: plans compile without Inductor's size asserts (COMPILE_OPTIONS)
        strides.append((i, tuple(st if isinstance(st, int) else st.node.expr for st in t.stride())))
    symbols = sorted(carrier.values())
    # symbolic strides (a (rows, cols) input with dynamic cols has stride (cols, 1)) as functions
    # of the symbols' carriers
    expected = _stride_function(strides, carrier, symbols)
    if isinstance(expected, str):
        return expected
    fake_mode = torch._guards.detect_fake_mode(traced)
    shape_env = getattr(fake_mode, "shape_env", None)
    check = None
    if symbols and shape_env is not None:
        try:
            from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

            code = shape_env.produce_guards_expression([traced[i] for i in symbols])
            if code is not None:
                check = eval(compile(f"lambda L: {code}", "<flashcompile graph guard>", "eval"),
                             dict(SYMPY_INTERP))
        except Exception as e:  # noqa: BLE001 - another torch version: such graphs use dynamo
            return f"{type(e).__name__}: {e}"
    names = [f"t{k}" for k in range(len(symbols))]

    def holds(inputs: list) -> bool:
        if any(inputs[i].dtype != dtype for i, dtype in dtypes):  # the code has them baked in
            return False
        if any(inputs[i].shape[d] != size for i, d, size in static):
            return False
        if any(inputs[i].shape[d] != inputs[j] for i, d, j in same):
            return False
        if expected is not None and expected([inputs[i] for i in symbols]) != [
                inputs[i].stride() for i, _ in strides]:
            return False
        return check is None or bool(check(dict(zip(names, [inputs[i] for i in symbols]))))

    return holds


def _stride_function(strides: list, carrier: dict, symbols: list[int]):
    """``f(values of the symbols' carriers) -> [stride tuple of each tensor input]`` for the
    traced ``strides`` ((input, strides with ints or sympy expressions) pairs), or None where
    there are no tensors; a string where a stride is not a function of the carried symbols."""
    if not strides:
        return None
    import sympy

    by_index = {i: sympy.Symbol(f"t{k}") for k, i in enumerate(symbols)}
    rename = {expr: by_index[i] for expr, i in carrier.items()}
    rows = []
    for _, stride in strides:
        row = []
        for st in stride:
            if not isinstance(st, int):
                st = sympy.sympify(st).xreplace(rename)
                if not st.free_symbols <= set(by_index.values()):
                    return f"a stride not given by the inputs' sizes: {st}"
            row.append(st)
        rows.append(tuple(row))
    names = [by_index[i] for i in symbols]
    return sympy.lambdify([names], [sympy.Tuple(*row) for row in rows], modules=[{}, "math"])
