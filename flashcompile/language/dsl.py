"""The rule DSL: element-wise fp32 update rules over named optimizer states.

A rule is a plain Python function ``f(p, g, *states, *, step, **hyperparameters)`` that returns the new
``(p, *states)``. It is written once and run three ways:

* traced with :class:`Sym` values into sympy expressions (the IR the compiler lowers);
* eagerly on torch tensors (float64 for the reference interpretation);
* on Python floats (scalar sanity checks).

Every primitive has one row in :data:`PRIMITIVES`: its torch implementation, its sympy builder and its
Python-float implementation, so adding an op touches one place.

All primitives are element-wise except :func:`sum_all`, the sum over every element of the parameter
(:func:`norm` builds on it; its value is one number per parameter, broadcast back to every element),
:func:`total`, the sum over every element of every parameter the optimizer steps, which only a
rule's optimizer-wide numbers (``shared``, Prodigy's step size ``d``) read, from the next step on,
and the means in the parameter's shape (:func:`row_mean`, :func:`col_mean`, :func:`mean_all`) that
factored states (Adafactor's row and column second moments) are made of: a rule that uses them
runs in each parameter's own shape (``flashcompile.compiler.shaped``).
"""

from __future__ import annotations

import functools
import importlib
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

# "sign": every value is -1, 0 or +1 (Rprop's previous gradient sign), stored exactly in 1 byte;
# "scalar": one number per parameter rather than one per element (torch.optim.NAdam's mu_product);
# "rows" / "cols": one fp32 number per row / column of the parameter's matrix (its last two dims;
# leading dims batch matrices), shaped (..., rows, 1) / (..., 1, cols) as torch.optim.Adafactor's
STATE_FACTS = ("signed", "nonnegative", "sign", "scalar", "rows", "cols")
FACTORED_FACTS = ("rows", "cols")
# facts of the parameter a rule may branch on (``rule(param_flags=...)``): static per parameter
PARAM_FLAGS: dict[str, Callable[[torch.Tensor], bool]] = {
    "matrix": lambda p: p.dim() >= 2,  # Adafactor factors matrices, keeps vectors whole
}


class Sym:
    """A traced value: a sympy expression with Python operators that build more expressions."""

    __slots__ = ("expr",)

    def __init__(self, expr: sympy.Basic):
        self.expr = expr

    def __repr__(self) -> str:
        return f"Sym({self.expr})"

    def __bool__(self) -> bool:
        raise TypeError(
            f"a rule branched on the traced value {self.expr}: Python `if`/`and`/`or` on tensors and "
            "float hyperparameters cannot be compiled; use where(cond, a, b) and `&`, `|`, `~` instead "
            "(bool hyperparameters such as `nesterov` are plain bools and may be branched on)"
        )

    __hash__ = object.__hash__

    def _bin(self, other: Any, fn: Callable[[Any, Any], sympy.Basic], reverse: bool = False) -> Sym:
        other = _to_sympy(other)
        return Sym(fn(other, self.expr) if reverse else fn(self.expr, other))

    def __add__(self, o): return self._bin(o, lambda a, b: a + b)
    def __radd__(self, o): return self._bin(o, lambda a, b: a + b, True)
    def __sub__(self, o): return self._bin(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._bin(o, lambda a, b: a - b, True)
    def __mul__(self, o): return self._bin(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._bin(o, lambda a, b: a * b, True)
    def __truediv__(self, o): return self._bin(o, lambda a, b: a / b)
    def __rtruediv__(self, o): return self._bin(o, lambda a, b: a / b, True)
    def __pow__(self, o): return self._bin(o, lambda a, b: a**b)
    def __rpow__(self, o): return self._bin(o, lambda a, b: a**b, True)
    def __neg__(self): return Sym(-self.expr)
    def __pos__(self): return self
    def __abs__(self): return Sym(sympy.Abs(self.expr))
    def __lt__(self, o): return self._bin(o, sympy.StrictLessThan)
    def __le__(self, o): return self._bin(o, sympy.LessThan)
    def __gt__(self, o): return self._bin(o, sympy.StrictGreaterThan)
    def __ge__(self, o): return self._bin(o, sympy.GreaterThan)
    def __eq__(self, o): return self._bin(o, lambda a, b: sympy.Eq(a, b, evaluate=False))  # type: ignore[override]
    def __ne__(self, o): return self._bin(o, lambda a, b: sympy.Ne(a, b, evaluate=False))  # type: ignore[override]
    def __and__(self, o): return self._bin(o, sympy.And)
    def __rand__(self, o): return self._bin(o, sympy.And, True)
    def __or__(self, o): return self._bin(o, sympy.Or)
    def __ror__(self, o): return self._bin(o, sympy.Or, True)
    def __invert__(self): return Sym(sympy.Not(self.expr))


def _to_sympy(x: Any) -> sympy.Basic:
    if isinstance(x, Sym):
        return x.expr
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        return sympy.Float(x)
    if isinstance(x, sympy.Basic):
        return x
    raise TypeError(f"a rule used a {type(x).__name__} ({x!r}); rules compute on tensors and numbers only")


def _where_sympy(c, a, b):
    return sympy.Piecewise((a, c), (b, True))


def _where_float(c, a, b):
    return a if c else b


class _Reduction(sympy.Function):
    """A reduction of one argument, opaque to sympy apart from the sign facts it keeps from its
    argument (a sum or mean of squares is >= 0), so proofs can see through it."""

    nargs = 1

    def _eval_is_extended_real(self): return self.args[0].is_extended_real
    def _eval_is_extended_nonnegative(self): return self.args[0].is_extended_nonnegative
    def _eval_is_extended_positive(self): return self.args[0].is_extended_positive
    def _eval_is_finite(self): return self.args[0].is_finite


class SumAll(_Reduction):
    """``sum_all(x)``: the sum of ``x`` over every element of the parameter (padding excluded)."""

    @classmethod
    def eval(cls, x):
        return sympy.S.Zero if x.is_zero else None

    def _sympystr(self, printer): return f"sum_all({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\textstyle\sum_{{\mathrm{{all}}}}\left({printer._print(self.args[0])}\right)"


class Total(sympy.Function):
    """``total(x)``: the sum of ``x`` over every element of every parameter the optimizer steps
    with the rule (all its param groups; padding excluded). Only the new values of the rule's
    shared numbers may read it: they are computed once the step has seen every parameter."""

    nargs = 1

    def _eval_is_extended_real(self): return self.args[0].is_extended_real
    def _eval_is_extended_nonnegative(self): return self.args[0].is_extended_nonnegative
    def _sympystr(self, printer): return f"total({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\textstyle\sum_{{\mathrm{{model}}}}\left({printer._print(self.args[0])}\right)"


class _ShapedMean(_Reduction):
    """A mean in the parameter's shape (see :func:`row_mean`)."""

    label = ""

    def _sympystr(self, printer): return f"{self.label}({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\operatorname{{{self.label}}}\left({printer._print(self.args[0])}\right)"


class RowMean(_ShapedMean):
    """``row_mean(x)``: the mean of ``x`` along each row (its last dim), one value per row."""

    label = "row_mean"


class ColMean(_ShapedMean):
    """``col_mean(x)``: the mean of ``x`` along each column (its second-to-last dim)."""

    label = "col_mean"


class MeanAll(_ShapedMean):
    """``mean_all(x)``: the mean of ``x`` over every element of the parameter."""

    label = "mean_all"


SHAPED_MEANS = (RowMean, ColMean, MeanAll)


class Orthogonalize(sympy.Function):
    """``orthogonalize(x, steps, a, b, c, eps, ratio)``: the parameter's matrix ``x`` (its 2-D
    shape) orthogonalized by ``steps`` Newton-Schulz iterations with coefficients ``a, b, c``
    after scaling it to Frobenius norm 1 (``eps`` floors the norm), times the shape ratio
    :data:`LR_RATIOS` ``[ratio]`` of the matrix: Muon's update (arXiv 2502.16982).

    A matrix stage, not element-wise: the compiler ends the element-wise phase that computes
    ``x`` there, runs the iteration on each parameter's matrix (bf16 matrix products, as
    torch.optim.Muon), and starts another phase that reads the result. Opaque to sympy.
    """

    nargs = 7

    def _eval_is_extended_real(self): return True
    def _eval_is_finite(self): return self.args[0].is_finite

    def _sympystr(self, printer):
        return f"orthogonalize({', '.join(printer._print(a) for a in self.args)})"

    def _latex(self, printer):
        return rf"\operatorname{{NS}}\left({printer._print(self.args[0])}\right)"


# torch.optim.Muon's adjust_lr_fn: the factor on the update of a (rows, cols) matrix
LR_RATIOS: dict[str | None, Callable[[int, int], float]] = {
    None: lambda rows, cols: 1.0,
    "original": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),  # Keller Jordan's
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),  # Moonlight's
}
_RATIO_NAMES = list(LR_RATIOS)


def lr_ratio(mode: int, shape: tuple[int, ...]) -> float:
    """The update factor :data:`LR_RATIOS` gives a matrix of ``shape`` (``mode`` indexes it)."""
    return LR_RATIOS[_RATIO_NAMES[int(mode)]](shape[-2], shape[-1])


def newton_schulz(x: torch.Tensor, steps: float, a: float, b: float, c: float,
                  eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization of the matrix ``x`` (2-D, or a batch of matrices of
    one shape): bf16, transposed to wide, scaled to Frobenius norm <= 1, then ``steps`` quintic
    Newton-Schulz iterations. Returns bf16, shaped like ``x``."""
    if x.dim() not in (2, 3):
        raise ValueError(f"orthogonalize needs a matrix (a 2-D parameter); got shape {tuple(x.shape)}")
    tall = x.shape[-2] > x.shape[-1]
    y = x.bfloat16()
    if tall:
        y = y.transpose(-2, -1)
    norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    y = y / norm.clamp(min=eps)
    times_plus = torch.addmm if y.dim() == 2 else torch.baddbmm  # beta * C + alpha * A @ B
    for _ in range(int(round(float(steps)))):
        gram = y @ y.transpose(-2, -1)
        update = times_plus(gram, gram, gram, beta=b, alpha=c)
        y = times_plus(y, update, y, beta=a)
    return y.transpose(-2, -1) if tall else y


def _orthogonalize_torch(x, steps, a, b, c, eps, mode):
    o = newton_schulz(x, *(float(v) for v in (steps, a, b, c, eps))).to(x.dtype)
    return o * lr_ratio(int(mode), tuple(x.shape))


def _orthogonalize_float(x, *args):
    raise TypeError("orthogonalize works on a parameter's matrix, not on single numbers")


# op name -> (torch implementation, sympy builder, Python-float implementation)
PRIMITIVES: dict[str, tuple[Callable, Callable, Callable]] = {
    "sqrt": (torch.sqrt, sympy.sqrt, math.sqrt),
    "abs": (torch.abs, sympy.Abs, abs),
    "sign": (lambda x: torch.where(torch.isnan(x), x, torch.sign(x)), sympy.sign,
             lambda x: x if math.isnan(x) else float((x > 0) - (x < 0))),  # NaN stays NaN
    "exp": (torch.exp, sympy.exp, math.exp),
    "log": (torch.log, sympy.log, math.log),
    "maximum": (torch.maximum, sympy.Max, max),
    "minimum": (torch.minimum, sympy.Min, min),
    "where": (torch.where, _where_sympy, _where_float),
    # the one reduction: over the whole parameter (a Python float is a one-element parameter)
    "sum_all": (torch.sum, SumAll, lambda x: x),
    # over every parameter of the optimizer (eagerly: the tensor given, as one parameter)
    "total": (torch.sum, Total, lambda x: x),
    # the one matrix stage: over the whole parameter as a matrix
    "orthogonalize": (_orthogonalize_torch, Orthogonalize, _orthogonalize_float),
    # means in the parameter's shape, kept as broadcastable dims (a Python float: one element)
    "row_mean": (lambda x: x.mean(-1, keepdim=True), RowMean, lambda x: x),
    "col_mean": (lambda x: x.mean(-2, keepdim=True), ColMean, lambda x: x),
    "mean_all": (torch.mean, MeanAll, lambda x: x),
}


def _apply(op: str, *args: Any) -> Any:
    torch_fn, sympy_fn, float_fn = PRIMITIVES[op]
    if any(isinstance(a, Sym) for a in args):
        return Sym(sympy_fn(*(_to_sympy(a) for a in args)))
    if op == "where" and not isinstance(args[0], torch.Tensor):
        return args[1] if args[0] else args[2]  # a condition on scalars only picks a branch
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors:
        # Numbers take a float operand's dtype: where(mask, 0.5, 1.0) must not turn 0.5 into True.
        like = next((t for t in tensors if t.is_floating_point()), None)
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        return torch_fn(*(a if isinstance(a, torch.Tensor) else tensors[0].new_tensor(a, dtype=dtype)
                          for a in args))
    return float_fn(*args)


def sqrt(x): return _apply("sqrt", x)
def sign(x): return _apply("sign", x)
def exp(x): return _apply("exp", x)
def log(x): return _apply("log", x)
def maximum(a, b): return _apply("maximum", a, b)
def minimum(a, b): return _apply("minimum", a, b)
def where(cond, a, b): return _apply("where", cond, a, b)
def sum_all(x): return _apply("sum_all", x)
def total(x): return _apply("total", x)


def row_mean(x):
    """The mean of ``x`` along each row of the parameter's matrix (its last dim), broadcast back:
    shaped ``(..., rows, 1)``, as a ``"rows"`` state is. The rule then runs in each parameter's
    own shape, one parameter per call (``flashcompile.compiler.shaped``)."""
    return _apply("row_mean", x)


def col_mean(x):
    """The mean of ``x`` along each column (the second-to-last dim), broadcast back: shaped
    ``(..., 1, cols)``, as a ``"cols"`` state is. See :func:`row_mean`."""
    return _apply("col_mean", x)


def mean_all(x):
    """The mean of ``x`` over every element of the parameter (Adafactor's RMS is
    ``sqrt(mean_all(x * x))``). Runs the rule in the parameter's shape, as :func:`row_mean`."""
    return _apply("mean_all", x)


def orthogonalize(x, steps=5, coefficients=(3.4445, -4.775, 2.0315), eps=1e-7,
                  lr_ratio: str | None = None):
    """``x`` as its parameter's matrix, orthogonalized: Frobenius-normalised, then ``steps``
    Newton-Schulz iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` in bf16, as
    torch.optim.Muon (coefficients: Keller Jordan's, which push singular values toward 1 fast
    without converging exactly). ``lr_ratio``: times the matrix's shape factor (torch.optim.Muon's
    ``adjust_lr_fn``: None for 1, ``"original"``, ``"match_rms_adamw"``; a static value). Parameters
    must be 2-D."""
    if lr_ratio not in LR_RATIOS:
        raise ValueError(f"lr_ratio={lr_ratio!r}; use one of {list(LR_RATIOS)}")
    a, b, c = coefficients
    return _apply("orthogonalize", x, steps, a, b, c, eps, _RATIO_NAMES.index(lr_ratio))


def norm(x):
    """The L2 norm of ``x`` over the whole parameter: ``sqrt(sum_all(x * x))``."""
    return sqrt(sum_all(x * x))


abs = abs  # noqa: A001 - the builtin dispatches through Sym.__abs__ and Tensor.__abs__


def zero_flag(name: str) -> str:
    """The static flag saying a :attr:`Rule.zero_branches` hyperparameter is 0."""
    return f"{name}==0"


@dataclass(frozen=True, eq=False)
class Rule:
    """An update rule: the function, its hyperparameter defaults and the facts of its states."""

    fn: Callable[..., tuple]
    name: str
    defaults: Mapping[str, Any]
    states: Mapping[str, str]
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    flash_codecs: Mapping[str, str] = field(default_factory=dict)  # state -> codec name
    # hyperparameter -> its allowed values (strings or None): static, like the bool flags
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # keyword arguments that are positive numbers held on the device, one per call (the gradient
    # factor of amp.unscaling): never hoisted to the host, each its own kernel argument
    device_scalars: tuple[str, ...] = ()
    # float hyperparameters whose value 0 is a static branch of its own (SGD's and RMSprop's
    # momentum): the rule is traced with the literal 0, so a state only a nonzero value reads
    # (the momentum buffer) gets no storage, as torch.optim allocates none
    zero_branches: tuple[str, ...] = ()
    # numbers shared by the whole optimizer (Prodigy's d), each with its start: a number or the
    # name of a float hyperparameter; passed to the rule as keywords, their new values returned
    # after the states'. See :func:`flashcompile.language.declare.rule`.
    shared: Mapping[str, float | str] = field(default_factory=dict)
    # states that start at the parameter's value instead of 0 (Prodigy's p0): state -> "param"
    starts: Mapping[str, str] = field(default_factory=dict)
    # facts of each parameter the rule takes as static keywords (PARAM_FLAGS: "matrix")
    param_flags: tuple[str, ...] = ()

    @property
    def flags(self) -> tuple[str, ...]:
        """Static hyperparameters (bools, and those with ``choices``): each setting selects a
        traced branch (and a compiled kernel of its own)."""
        return tuple(k for k, v in self.defaults.items() if isinstance(v, bool) or k in self.choices)

    def static_value(self, name: str, value: Any) -> Any:
        """A static hyperparameter's value as traces and plans are keyed by: a bool, or one of the
        declared choices (anything else raises ValueError)."""
        if name not in self.choices:
            return bool(value)
        if value not in self.choices[name]:
            raise ValueError(f"{self.name}: {name}={value!r} is not one of {self.choices[name]}")
        return value

    @functools.cached_property
    def needs_matrices(self) -> bool:
        """Whether the rule has a matrix stage (``orthogonalize``) under some flag setting: it
        then steps 2-D parameters only."""
        from flashcompile.language.trace import trace

        return any(any(out.has(Orthogonalize) for out in trace(self, flags).outputs)
                   for flags in self.flag_settings())

    def flag_settings(self) -> list[dict[str, Any]]:
        """Every combination of the static hyperparameters' values (and the parameter's flags)."""
        import itertools

        names = [*self.flags, *map(zero_flag, self.zero_branches), *self.param_flags]
        options = [self.choices.get(k, (False, True)) for k in names]
        return [dict(zip(names, v)) for v in itertools.product(*options)]

    def param_flag_values(self, p: torch.Tensor) -> tuple[tuple[str, bool], ...]:
        """The :attr:`param_flags` of parameter ``p`` (its local shard's shape for FSDP2)."""
        return tuple((k, bool(PARAM_FLAGS[k](p))) for k in self.param_flags)

    @functools.cached_property
    def factored_states(self) -> tuple[str, ...]:
        """States of one number per row or column of the parameter (``"rows"``, ``"cols"``)."""
        return tuple(k for k, fact in self.states.items() if fact in FACTORED_FACTS)

    @functools.cached_property
    def shaped(self) -> bool:
        """Whether the rule runs in each parameter's own shape, one parameter per call: it has
        factored states or takes a mean in the parameter's shape (:func:`row_mean`, ...)."""
        from flashcompile.language.trace import trace

        return bool(self.factored_states) or any(
            any(out.has(*SHAPED_MEANS) for out in trace(self, flags).outputs)
            for flags in self.flag_settings())

    def zero_flags(self, group: Mapping[str, Any]) -> tuple[tuple[str, bool], ...]:
        """The static flags of :attr:`zero_branches` for a group's values: whether each is 0."""
        return tuple((zero_flag(k), bool(group[k] == 0)) for k in self.zero_branches)

    @functools.cached_property  # read per param per step by flat buckets' host path
    def scalar_states(self) -> tuple[str, ...]:
        """States of one number per parameter, updated on the host (see :func:`rule`)."""
        return tuple(k for k, fact in self.states.items() if fact == "scalar")

    def shared_start(self, name: str, group: Mapping[str, Any]) -> float:
        """The value shared number ``name`` starts at for a param group of this rule."""
        start = self.shared[name]
        return float(group[start]) if isinstance(start, str) else float(start)

    @property
    def floats(self) -> tuple[str, ...]:
        """Float and tuple-of-float hyperparameters: runtime inputs of the compiled kernel."""
        return tuple(k for k, v in self.defaults.items()
                     if not isinstance(v, bool) and k not in self.choices)

    def range_of(self, name: str) -> tuple[float, float]:
        """Allowed interval [lo, hi) of a float hyperparameter (tuples: of each entry)."""
        if name in self.ranges:
            return self.ranges[name]
        return (0.0, 1.0) if name == "betas" else (0.0, math.inf)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<rule {self.name}: states {dict(self.states)}>"

    # A rule is code: copies of an optimizer share it (plans are cached per rule), and pickles
    # name it by module and name, as pickle names functions.
    def __copy__(self) -> Rule:
        return self

    def __deepcopy__(self, memo) -> Rule:
        return self

    def __reduce__(self):
        module, name = self.fn.__module__, self.fn.__qualname__
        try:
            found = functools.reduce(getattr, name.split("."), importlib.import_module(module))
        except (ImportError, AttributeError):
            found = None
        if found is not self:
            raise pickle.PicklingError(
                f"rule {self.name} cannot be pickled: it is not the module attribute "
                f"{module}.{name} (rules defined inside a function cannot be found again); define "
                "it at module level, or save opt.state_dict() instead of the optimizer")
        return _import_rule, (module, name)


def _import_rule(module: str, name: str) -> Rule:
    return functools.reduce(getattr, name.split("."), importlib.import_module(module))
