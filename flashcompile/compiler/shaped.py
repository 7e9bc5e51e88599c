"""Plans for rules that run in each parameter's own shape: means along its rows and columns
(``row_mean``, ``col_mean``, ``mean_all``) and factored states (Adafactor's ``row_var``,
``col_var``), which the flat ``(G, 32)`` layout cannot express (a row starts anywhere in a group,
a column is strided).

One call steps one parameter. Its grouped fields (the weight split's residual, 8-bit states) are
decoded in the flat layout, viewed in the parameter's shape, the rule runs on them as torch code
(fp32), and the results are flattened, padded and encoded back; factored states are fp32 tensors
of their own shape, written in place. ``torch.compile`` (Inductor) turns the whole function into
a few fused kernels per parameter: the reductions and the element-wise work around them. Shapes
are symbolic, so parameters of many shapes share a graph.

What these plans do not do (yet): flat buckets (every parameter steps on its own), the hardware
division of ``fast_math``, scalar states, shared numbers and matrix stages (refused where the rule
is declared).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from flashcompile.codecs import GROUP, PARAM, layout, stochastic
from flashcompile.compiler.direct import DirectFunction, inductor
from flashcompile.compiler.plan import COMPILE_OPTIONS, Plan, PlanKey
from flashcompile.language.dsl import zero_flag
from flashcompile.language.trace import check_facts, trace

# The step and the hyperparameters reach the graph as one fp32 vector, uploaded once per step and
# group as every plan's: s[0] the last group's valid lanes (unused here: GROUP), s[1] the step,
# then the float hyperparameters in the rule's order.
_STEP_SLOT = 1

# Inductor shapes a graph's reductions by the sizes of the call that compiled it (its size hints),
# and guards only some of those choices: a mean over a whole param is split across the card into
# a number of programs fixed at compile time, unguarded, or, compiled on a small matrix, runs as
# one program (Triton code generated on the CPU for a 64 x 48 matrix against a 50257 x 768 one).
# A graph compiled on small params (or found in Inductor's graph cache, filled by other sizes)
# could then take a large one through a handful of SMs. So params step through one compiled graph
# per range of sizes, [low, high) elements, each a factor of 16 wide and compiled on a param of
# its range.
SIZE_CLASSES = ((0, 2**12), (2**12, 2**16), (2**16, 2**20), (2**20, 2**24), (2**24, None))


def size_class(numel: int) -> int:
    """The index in :data:`SIZE_CLASSES` of a param of ``numel`` elements."""
    return next(i for i, (_, high) in enumerate(SIZE_CLASSES) if high is None or numel < high)


class ShapedPlan(Plan):
    """A :class:`Plan` whose step runs one parameter in its own shape (see the module docstring).
    It keeps the plan's interface where the optimizer reads it: ``codecs``, ``owned_fields``,
    ``scalars``, ``bytes_per_param``; :attr:`factored` names the factored states it stores."""

    def __init__(self, key: PlanKey):  # not Plan's: that one lowers to the flat layout
        self.key = key
        self.traced = trace(key.rule, dict(key.flags))
        check_facts(self.traced)
        self.lowered = None
        self.codecs = dict(key.codecs)
        self.factored = self.traced.live_factored_states()
        self.shared_source = self.shared_update = None
        self.launch = None
        self.eager = self.eager_one = self.fn = self.fn_one = self._step
        # the step for each rank and memory layout of parameter (each a function of its own,
        # checked against the eager step on its first call; the eager step where they disagreed)
        self._compiled: dict[tuple, object] = {}

    shaped = True
    steps_flat = False
    stages = False
    masks_lanes = False

    @property
    def reduces(self) -> bool:
        return True  # whole parameters per call, as a reducing plan's (never split in groups)

    def steps_flat_over(self, numels) -> bool:
        return False

    def bytes_moved_per_param(self, grad_bytes: float) -> float:
        """The gradient read, every grouped field read and written back (a first pass reads the
        inputs of the means again: counted once more), factored states not counted (a few bytes
        per row and column)."""
        moved = 2 * grad_bytes
        for codec in self.codecs.values():
            moved += 3 * codec.bytes_per_value
        return moved

    def scalars(self, step: int, hyper: Mapping[str, object],
                state: Mapping[str, object] | None = None) -> list[float]:
        """``_s[1:]``: the step, then every float hyperparameter (tuples flattened) in the rule's
        order; the rule computes from them inside the graph. A None entry (torch.optim.Adafactor's
        ``eps1``) is the parameter dtype's machine epsilon."""
        dtype_eps = torch.finfo(self.codecs[PARAM].fields[0].dtype).eps
        out = [float(step)]
        for name in self.traced.hyper:
            value = hyper[name]
            for v in value if isinstance(value, tuple) else (value,):
                out.append(dtype_eps if v is None else float(v))
        return out

    def new_scalar_states(self, scalars: list[float]) -> list[tuple[str, float]]:
        return []

    def factored_shape(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of factored state ``name`` for a parameter of ``shape``: ``(..., rows, 1)``
        for a ``"rows"`` state, ``(..., 1, cols)`` for a ``"cols"`` one (torch.optim.Adafactor's
        ``row_var`` and ``col_var``)."""
        if len(shape) < 2:
            raise ValueError(f"{self.key.rule.name}: state {name!r} holds one number per row or "
                             f"column of a matrix; a parameter of shape {tuple(shape)} has none")
        shape = list(shape)
        shape[-1 if self.key.rule.states[name] == "rows" else -2] = 1
        return tuple(shape)

    def init_factored(self, p: torch.Tensor, state: dict) -> None:
        """Allocate the factored states ``state`` lacks (zeros, fp32, on ``p``'s device); check
        the shape of those it has (a loaded state dict's)."""
        for name in self.factored:
            want = self.factored_shape(name, p.shape)
            held = state.get(name)
            if held is None:
                state[name] = torch.zeros(want, dtype=torch.float32, device=p.device)
                continue
            if tuple(held.shape) != want:
                raise ValueError(f"state {name!r} of a parameter of shape {tuple(p.shape)} has "
                                 f"shape {tuple(held.shape)}; it must be {want}")
            if held.dtype != torch.float32 or held.device != p.device:
                state[name] = held.to(device=p.device, dtype=torch.float32)

    # ---- the step -------------------------------------------------------------------------------

    def run_shaped(self, p: torch.Tensor, grad: torch.Tensor, stored: Mapping[str, torch.Tensor],
                   scalars: list[float], factor: torch.Tensor | None = None) -> None:
        """Step ``p`` (the parameter itself, any strides) from ``grad`` (its shape), its grouped
        fields and factored states in ``stored`` (by state key), in place."""
        if p.numel() == 0:
            return
        self.step_shaped(p, grad, layout.scalar_vector(GROUP, scalars, p.device),
                         self.field_args(stored, 0, layout.group_count(p.numel())),
                         [stored[name] for name in self.factored], layout.memory_order(p),
                         factor)

    def step_shaped(self, p: torch.Tensor, grad: torch.Tensor, s: torch.Tensor,
                    fields: Sequence[torch.Tensor], factored: Sequence[torch.Tensor],
                    order: tuple[int, ...] | None, factor: torch.Tensor | None = None) -> None:
        """:meth:`run_shaped` from what the per-tensor path keeps per param: the scalar vector
        (``s[0]`` unused: params sharing a step share one upload), the fields as
        :meth:`field_args` gives them, the factored states in :attr:`factored` order, and ``p``'s
        memory order."""
        if p.numel() == 0:
            return
        device = self.device_args(factor, p.device)
        p, grad = p.detach(), grad.detach()
        if not self.key.compiled:
            self._step(s, p, grad, fields, factored, device, order)
            return
        kind = self._kind(p, grad, order)
        fn = self._compiled.get(kind)
        if fn is None:
            fn = self._compiled[kind] = self._checked_compile(s, p, grad, fields, factored,
                                                              device, order)
        elif fn == self._step:  # the compiled step disagreed with it for such params (a bound
            fn(s, p, grad, fields, factored, device, order)  # method: equal, never identical)
        else:
            fn(s, p, grad, *fields, *factored, *device)

    def bind_shaped(self, p: torch.Tensor, grad: torch.Tensor, fields: Sequence[torch.Tensor],
                    factored: Sequence[torch.Tensor], order: tuple[int, ...] | None,
                    factor: torch.Tensor | None = None):
        """``p``'s compiled step as ``launch(s, grad)``, for a CUDA graph to record
        (``flashcompile.runtime.tensor_graph``): ``grad`` laid out as this one. None where params
        like ``p`` have no compiled step (not compiled, not yet called, or fallen back to the
        eager step, which may read host values)."""
        if not self.key.compiled or p.numel() == 0:
            return None
        p = p.detach()
        fn = self._compiled.get(self._kind(p, grad, order))
        if fn is None or fn == self._step:
            return None
        device = self.device_args(factor, p.device)  # allocated here, not while a graph records

        def launch(s: torch.Tensor, grad: torch.Tensor) -> None:
            fn(s, p, grad.detach(), *fields, *factored, *device)
        return launch

    @staticmethod
    def _kind(p: torch.Tensor, grad: torch.Tensor, order) -> tuple:
        """What a compiled step is specific to: rank, memory order, strides alike, dtypes, and
        the size class (:func:`size_class`)."""
        return (p.dim(), order, p.stride() == grad.stride(), p.dtype, grad.dtype, p.device.type,
                size_class(p.numel()))

    def _direct(self, order, fields: int, factored: int, device: int, sizes: int):
        """The step for params of one rank, memory ``order`` and size class ``sizes``, compiled
        with symbolic sizes and called without dynamo once compiled
        (``flashcompile.compiler.direct``): a function of positional tensors, generated per kind
        so its graphs and recompile counts are its own. It checks the size class: a guard of the
        graph, so neither a call nor Inductor's graph cache gives one class another's kernels."""
        names = ([f"f{i}" for i in range(fields)] + [f"r{i}" for i in range(factored)]
                 + [f"d{i}" for i in range(device)])
        def pack(prefix: str) -> str:  # a tuple of the names starting with prefix
            return "(" + "".join(f"{n}, " for n in names if n[0] == prefix) + ")"

        low, high = SIZE_CLASSES[sizes]
        source = (f"def shaped_step(s, weight, grad, {', '.join(names)}):\n"
                  + (f"    torch._check(weight.numel() >= {low})\n" if low else "")
                  + (f"    torch._check(weight.numel() < {high})\n" if high else "")
                  + f"    step(s, weight, grad, {pack('f')}, {pack('r')}, {pack('d')}, order)\n")
        namespace = {"step": self._step, "order": order, "torch": torch}
        exec(compile(source, f"<flashcompile shaped {self.key.rule.name}>", "exec"), namespace)

        def compile_with(fn, backend):
            return torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)

        return DirectFunction(namespace["shaped_step"], compile_with,
                              lambda gm, example_inputs: inductor(gm, example_inputs,
                                                                  dict(COMPILE_OPTIONS)))

    def _checked_compile(self, s, p, grad, fields, factored, device, order):
        """Compile the step for parameters like ``p`` and take this call's step with it, checked
        against the eager step on copies of the inputs: on disagreement beyond one code step
        (plus fp32 slack) warn, redo the step eagerly and keep the eager step for such params."""
        before = [p.clone(), [f.clone() for f in fields], [f.clone() for f in factored]]
        want_p, want_f, want_r = [p.clone(), [f.clone() for f in fields],
                                  [f.clone() for f in factored]]
        self._step(s, want_p, grad, want_f, want_r, device, order)
        fn = self._direct(order, len(fields), len(factored), len(device), size_class(p.numel()))
        fn(s, p, grad, *fields, *factored, *device)
        mismatch = None
        want, got = self._decoded(want_p, want_f), self._decoded(p, fields)
        old = self._decoded(before[0], before[1])
        for name, codec in self.codecs.items():
            # one code step (at the larger of the two: a weight one fp32 ulp from a bf16 rounding
            # boundary may round its high half into the next binade, whose steps are twice as
            # large), plus fp32 roundings of the values the update combined (a step that nearly
            # cancels a weight rounds in ulps of the old weight), plus the factored states' and
            # means' summation order (checked below to rtol 1e-5), which scales the update as a
            # whole: relative to the param's largest update, not each element's
            larger = torch.maximum(want[name].abs(), got[name].abs())
            update = (want[name] - old[name]).abs().max()
            tol = (codec.code_step(larger) + 1e-6 * (want[name].abs() + old[name].abs())
                   + 1e-5 * update)
            if not torch.all((got[name] - want[name]).abs() <= tol):
                mismatch = f"{name}: largest difference {(got[name] - want[name]).abs().max():.3g}"
        for name, a, b in zip(self.factored, want_r, factored):
            if not torch.allclose(a, b, rtol=1e-5, atol=0.0):
                mismatch = f"{name}: largest difference {(a - b).abs().max():.3g}"
        if mismatch is None:
            return fn
        warnings.warn(f"flashcompile: the compiled {self.key.rule.name} plan disagrees with its "
                      f"eager step for a parameter of shape {tuple(p.shape)}; running such "
                      f"parameters eagerly. {mismatch}", RuntimeWarning, stacklevel=4)
        for t, kept in zip([p, *fields, *factored], [before[0], *before[1], *before[2]]):
            t.copy_(kept)
        self._step(s, p, grad, fields, factored, device, order)
        return self._step

    def _decoded(self, weight: torch.Tensor, fields: Sequence[torch.Tensor]) -> dict:
        flat_w = layout.padded(layout.flat(weight, layout.memory_order(weight))).view(-1, GROUP)
        return self._decode_groups(flat_w, fields)

    def _decode_groups(self, weight_groups: torch.Tensor, fields: Sequence[torch.Tensor]) -> dict:
        """Every codec's values, ``(G, 32)``, from the weight in groups and the grouped fields."""
        return {name: codec.decode(*parts)
                for name, codec, parts in self._parts(weight_groups, fields)}

    def _parts(self, weight: torch.Tensor, fields: Sequence[torch.Tensor]):
        """Per codec: its name, itself and its stored tensors (``weight`` for the weight split's
        value, the rest taken from ``fields`` in order)."""
        it = iter(fields)
        for name, codec in self.codecs.items():
            yield name, codec, [weight if name == PARAM and f.name == "value" else next(it)
                                for f in codec.fields]

    def _elementwise(self, name: str) -> bool:
        """Whether ``name``'s codec stores each value in an element of its own (no per-group or
        packed field) and rounds to nearest: it decodes and encodes in the parameter's shape."""
        codec = self.codecs[name]
        return all(f.per_value for f in codec.fields) and not getattr(codec, "stochastic", False)

    def _decode_in_shape(self, weight: torch.Tensor, fields: Sequence[torch.Tensor], groups_of,
                         in_shape) -> dict:
        """Every codec's values in ``weight``'s shape. A codec without per-group fields (the
        weight split) decodes element by element from its fields read in that shape: reading a
        padded ``(G, 32)`` result back in shape costs Inductor's C++ kernel a 64-bit modulo per
        element and a scalar loop, where reading a stored field in shape is a plain index."""
        out = {}
        for name, codec, parts in self._parts(weight, fields):
            if self._elementwise(name):
                out[name] = codec.decode(*[t if t is weight else in_shape(t) for t in parts])
            else:
                grouped = [groups_of(t) if t is weight else t for t in parts]
                out[name] = in_shape(codec.decode(*grouped))
        return out

    def _step(self, s: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
              fields: Sequence[torch.Tensor], factored: Sequence[torch.Tensor],
              device: Sequence[torch.Tensor], order: tuple[int, ...] | None) -> None:
        """Decode, run the rule in ``weight``'s shape, encode and store (compiled as one graph).
        ``order``: the weight's :func:`~flashcompile.codecs.layout.memory_order` (a constant of
        the graph: dynamo cannot sort symbolic strides)."""
        rule, n = self.key.rule, weight.numel()
        # whole groups (most matrices): views only. Padding and slicing back cost Inductor's C++
        # kernel a 64-bit modulo per element on every read (it cannot prove the index below the
        # padded length), and the reads stay scalar. Compiled graphs guard on it.
        whole = n % GROUP == 0
        count = n // GROUP if whole else -(-n // GROUP)

        def groups_of(x: torch.Tensor) -> torch.Tensor:  # memory order, zero-padded, (G, 32)
            flat = layout.flat_view(x, order)
            if whole:
                return flat.view(count, GROUP)
            return torch.nn.functional.pad(flat, (0, count * GROUP - n)).view(count, GROUP)

        def in_shape(x: torch.Tensor) -> torch.Tensor:  # (G, 32) back to the weight's shape
            return layout.unflat(x.reshape(-1) if whole else x.reshape(-1)[:n], weight, order)

        decoded = self._decode_in_shape(weight, fields, groups_of, in_shape)
        held = dict(zip(self.factored, factored))
        # a state without storage here (a vector's factors, a momentum at momentum 0) is one 0: a
        # zero branch still multiplies it by its literal 0; nothing else reads it
        nothing = torch.zeros((), device=weight.device)
        states = [decoded.get(name, held.get(name, nothing)) for name in rule.states]
        hyper, i = {}, _STEP_SLOT + 1
        for name in self.traced.hyper:
            width = len(rule.defaults[name]) if isinstance(rule.defaults[name], tuple) else 0
            hyper[name] = tuple(s[i + j] for j in range(width)) if width else s[i]
            i += max(width, 1)
        flags = {}
        zero = {zero_flag(k): k for k in rule.zero_branches}
        for k, v in self.key.flags:  # a zero branch taken reads its hyperparameter as 0
            if k not in zero:
                flags[k] = v
            elif v:
                hyper[zero[k]] = 0.0
        # device scalars (1-element) as 0-d tensors: they must not give a 0-d param a dim
        extra = {k: t.reshape(()) for k, t in zip(self.traced.device, device)}
        # the gradient as it is (its values in the weight's shape): no pad to read back through
        out = rule.fn(decoded[PARAM], grad.float(), *states, step=s[_STEP_SLOT],
                      **hyper, **flags, **extra)
        new = dict(zip([PARAM, *rule.states], out))
        values = {name: new[name].expand(weight.shape)
                  for name in self.codecs if new[name] is not decoded[name]}
        # codecs without per-group fields (the weight split) encode in the weight's shape and
        # store through views of their fields (see _decode_in_shape); the others in groups
        in_place = {name for name in values if self._elementwise(name)}
        new_groups = {name: groups_of(v) for name, v in values.items() if name not in in_place}
        encoded, keys = {}, []
        for k, name in enumerate(values):
            codec = self.codecs[name]
            if name in in_place:
                encoded[name] = codec.encode(values[name])
            elif getattr(codec, "stochastic", False):  # the element's gradient and new weight
                if not keys:  # in groups, once for every stochastic state
                    keys.append(groups_of(grad.float()))
                    keys.append(new_groups[PARAM] if PARAM in new_groups
                                else groups_of(values[PARAM]) if PARAM in values else keys[0])
                u = stochastic.uniform_noise(s[_STEP_SLOT], stochastic.salt(codec.seed, k),
                                             *keys)
                encoded[name] = codec.encode(new_groups[name], stochastic.noise_for(codec, u))
            else:
                encoded[name] = codec.encode(new_groups[name])
        # every output encoded before any store: a decoded input may alias its storage
        it = iter(fields)
        for name, codec in self.codecs.items():
            for j, f in enumerate(codec.fields):
                target = None if name == PARAM and f.name == "value" else next(it)
                if name not in encoded:
                    continue
                if name in in_place:
                    (weight if target is None else in_shape(target)).copy_(encoded[name][j])
                elif target is None:
                    weight.copy_(in_shape(encoded[name][j]))
                else:
                    target.copy_(encoded[name][j])
        for name, target in held.items():
            if new[name] is not target:
                target.copy_(new[name])
