"""The rule DSL: element-wise fp32 update rules over named optimizer states.

A rule is a plain Python function ``f(p, g, *states, *, step, **hyperparameters)`` that returns the new
``(p, *states)``. It is written once and run three ways:

* traced with :class:`Sym` values into sympy expressions (the IR the compiler lowers);
* eagerly on torch tensors (float64 for the reference interpretation);
* on Python floats (scalar sanity checks).

Every primitive has one row in :data:`PRIMITIVES`: its torch implementation, its sympy builder and its
Python-float implementation, so adding an op touches one place.

All primitives are element-wise except :func:`sum_all`, the sum over every element of the parameter
(:func:`norm` builds on it). Its value is one number per parameter, broadcast back to every element.
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
# "scalar": one number per parameter rather than one per element (torch.optim.NAdam's mu_product)
STATE_FACTS = ("signed", "nonnegative", "sign", "scalar")


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


class SumAll(sympy.Function):
    """``sum_all(x)``: the sum of ``x`` over every element of the parameter (padding excluded).

    Opaque to sympy apart from its sign facts, so proofs see that a sum of squares is >= 0.
    """

    nargs = 1

    @classmethod
    def eval(cls, x):
        return sympy.S.Zero if x.is_zero else None

    def _eval_is_extended_real(self): return self.args[0].is_extended_real
    def _eval_is_extended_nonnegative(self): return self.args[0].is_extended_nonnegative
    def _eval_is_extended_positive(self): return self.args[0].is_extended_positive
    def _eval_is_finite(self): return self.args[0].is_finite
    def _sympystr(self, printer): return f"sum_all({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\textstyle\sum_{{\mathrm{{all}}}}\left({printer._print(self.args[0])}\right)"


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


def norm(x):
    """The L2 norm of ``x`` over the whole parameter: ``sqrt(sum_all(x * x))``."""
    return sqrt(sum_all(x * x))


abs = abs  # noqa: A001 - the builtin dispatches through Sym.__abs__ and Tensor.__abs__


@dataclass(frozen=True, eq=False)
class Rule:
    """An update rule: the function, its hyperparameter defaults and the facts of its states."""

    fn: Callable[..., tuple]
    name: str
    defaults: Mapping[str, Any]
    states: Mapping[str, str]
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    flash_codecs: Mapping[str, str] = field(default_factory=dict)  # state -> codec name

    @property
    def flags(self) -> tuple[str, ...]:
        """Bool hyperparameters: static, each value selects a traced branch."""
        return tuple(k for k, v in self.defaults.items() if isinstance(v, bool))

    @functools.cached_property  # read per param per step by flat buckets' host path
    def scalar_states(self) -> tuple[str, ...]:
        """States of one number per parameter, updated on the host (see :func:`rule`)."""
        return tuple(k for k, fact in self.states.items() if fact == "scalar")

    @property
    def floats(self) -> tuple[str, ...]:
        """Float and tuple-of-float hyperparameters: runtime inputs of the compiled kernel."""
        return tuple(k for k, v in self.defaults.items() if not isinstance(v, bool))

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
