"""Error envelopes: how far a rule run with lossy codecs may drift from its float64 interpretation.

For one rule under one setting of its flags, every tracked output ``y_i = F_i(x, g)`` (the new master
weight and each stored state) is a sympy expression of the stored inputs ``x_j`` (the same names),
the gradient and the scalars. If every stored input is within ``tol_j`` of the float64 trajectory at
step ``t``, the stored output is within

    tol_i(t + 1) = min(sum_j L_ij * tol_j(t), R_i) + bound_i + slack_i

of it at step ``t + 1``, where

* ``L_ij`` is the rule's sensitivity to input ``j``: ``sup |dF_i / dx_j|`` (sympy's derivative) over
  the box ``x(t) +- tol(t)``, by interval arithmetic (rigorous, no monotonicity assumed);
* ``R_i`` bounds the same change by the range of ``F_i`` itself over the box: it takes over where the
  derivative is unbounded (a square root at 0) or ``F_i`` jumps inside the box (``sign``, a ``where``
  on per-element values), where the first-order term does not hold;
* ``bound_i`` is the codec's declared bound for the value it encoded;
* ``slack_i`` covers the kernel's fp32 arithmetic: ``(ops_i + 8) * 2**-24`` times the first-order
  magnitude ``|F_i| + sum_j |dF_i / dx_j * x_j| + |dF_i / dg * g|``, plus as many underflows
  (``2**-149`` each).

Nothing here is tuned: a failure means a codec broke its bound, or the kernel computed something
other than the rule.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import sympy
from sympy.core.relational import Relational
from sympy.logic.boolalg import ITE, And, BooleanFalse, BooleanTrue, Not, Or

from flashcompile.language.trace import STEP, Traced

FP32_EPS, FP32_TINY = 2.0**-24, 2.0**-149
CODEC_OPS = 8  # roundings of a decode and an encode around the rule's math


class Unsupported(Exception):
    """The rule uses an operation the interval evaluator does not know (a per-tensor reduction)."""


def _clean(d: sympy.Expr) -> sympy.Expr:
    """A derivative usable almost everywhere: jumps (DiracDelta) are covered by the range term,
    and a kink (Heaviside at 0, from max/min) takes either one-sided slope."""
    return d.replace(sympy.DiracDelta, lambda *a: sympy.S.Zero)


class Sensitivity:
    """Outputs and their derivatives for one traced rule, evaluated over boxes of float64 arrays.

    Args:
        traced: the rule under one flag setting.
        tracked: names of the stored inputs and outputs, the master weight first, then live states.
        param_name: the name ``tracked`` uses for the master weight.
    """

    def __init__(self, traced: Traced, tracked: tuple[str, ...], param_name: str = "param"):
        self.tracked, rule = tracked, traced.rule
        self.names = {traced.param: param_name, traced.grad: "grad",
                      **{s: n for n, s in zip(rule.states, traced.states)}}
        index = {param_name: 0, **{n: 1 + i for i, n in enumerate(rule.states)}}
        exprs = {n: traced.outputs[index[n]] for n in tracked}
        self.nonnegative = {n for n in tracked if rule.states.get(n) == "nonnegative"}
        self.scalars = [STEP]
        for v in traced.hyper.values():
            self.scalars += list(v) if isinstance(v, tuple) else [v]
        by_name = {n: s for s, n in self.names.items()}
        d = {(i, j): _clean(sympy.diff(e, by_name[j])) for i, e in exprs.items()
             for j in (*tracked, "grad")}
        self.ops = {n: int(sympy.count_ops(e)) for n, e in exprs.items()}
        tensors = set(self.names)
        jumps = {n: [u.args[0] if isinstance(u, (sympy.sign, sympy.Heaviside)) else u
                     for u in sympy.preorder_traversal(e) if _is_jump(u, tensors)]
                 for n, e in exprs.items()}
        # one program for everything: outputs, derivatives, switching functions
        keys = ([("f", n) for n in exprs] + [("d", k) for k in d]
                + [("jump", n, k) for n in jumps for k in range(len(jumps[n]))])
        values = ([*exprs.values()] + [*d.values()] + [u for n in jumps for u in jumps[n]])
        self.unsupported = ""
        try:
            self.program = _Program(values, [*self.names, *self.scalars])
        except Unsupported as err:
            self.unsupported = str(err)
        self.slot = dict(zip(keys, range(len(keys))))
        self.jumps = {n: len(v) for n, v in jumps.items()}

    def propagate(self, ref: Mapping[str, np.ndarray], tol: Mapping[str, np.ndarray],
                  flash: Mapping[str, np.ndarray], grad: np.ndarray, others: Mapping[str, object],
                  scalars: list[float], bounds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The envelope one step later (see the module docstring).

        ``ref``, ``tol`` and ``flash`` hold the float64 state, its envelope and the stored state
        before the step (flat float64 arrays by tracked name); ``others`` the values of untracked
        states (zeros, or a scalar state's value); ``scalars`` step then the hyperparameters;
        ``bounds`` each codec's bound for the value it encoded this step.
        """
        def run(lo_hi):
            values = {**{n: _point(v, grad) for n, v in others.items()}, "grad": (grad, grad),
                      **lo_hi}
            inputs = [values.get(n, _point(0.0, grad)) for n in self.names.values()]
            out = self.program.run(inputs + [_point(v, grad) for v in scalars])
            return lambda *key: out[self.slot[key]]

        with np.errstate(all="ignore"):
            box = run({n: (np.maximum(ref[n] - tol[n], 0) if n in self.nonnegative
                           else ref[n] - tol[n], ref[n] + tol[n]) for n in self.tracked})
            at_ref = run({n: (ref[n], ref[n]) for n in self.tracked})
            at_flash = run({n: (flash[n], flash[n]) for n in self.tracked})
            out = {}
            for i in self.tracked:
                first_order = sum(_magnitude(box("d", (i, j))) * tol[j] for j in self.tracked)
                (lo, hi), mid = box("f", i), at_ref("f", i)[0]
                spread = np.nan_to_num(np.maximum(hi - mid, mid - lo), nan=np.inf)
                smooth = np.isfinite(first_order)
                for k in range(self.jumps[i]):  # a jump inside the box: only the range holds
                    smooth &= ~_straddles(box("jump", i, k))
                change = np.where(smooth, np.minimum(first_order, spread), spread)
                out[i] = change + bounds[i] + self._slack(i, flash, grad, at_flash)
        return out

    def _slack(self, i, x, grad, at) -> np.ndarray:
        magnitude = np.abs(at("f", i)[0])
        for j, v in [*((j, x[j]) for j in self.tracked), ("grad", grad)]:
            term = np.abs(at("d", (i, j))[0] * v)
            magnitude = magnitude + np.where(v == 0, 0.0, np.nan_to_num(term, nan=np.inf))
        n = self.ops[i] + CODEC_OPS
        return n * FP32_EPS * magnitude + n * FP32_TINY


def _is_jump(node, tensors) -> bool:
    """A discontinuity on per-element values: sign, a step, or a comparison (in a where())."""
    if isinstance(node, (sympy.sign, sympy.Heaviside, Relational)):
        return bool(node.free_symbols & tensors)
    return False


def _straddles(iv) -> np.ndarray:
    """Where a switching function may take both sides of its discontinuity: a comparison that can
    be true and false, or a sign argument whose interval holds 0 and something else."""
    lo, hi = iv
    if lo.dtype == bool:
        return lo & hi
    return (lo <= 0) & (hi >= 0) & (lo < hi)


def _point(v, like: np.ndarray):
    a = np.broadcast_to(np.asarray(v, dtype=np.float64), like.shape)
    return a, a


def _magnitude(iv) -> np.ndarray:
    lo, hi = iv
    return np.nan_to_num(np.maximum(np.abs(lo), np.abs(hi)), nan=np.inf)


# ---- interval arithmetic over sympy expressions (numpy arrays of lower and upper ends) ---------

class _Program:
    """Expressions compiled to one list of interval operations over their shared subexpressions:
    each evaluation is a pass over the list, with no sympy in the loop."""

    def __init__(self, exprs: list[sympy.Basic], inputs: list[sympy.Symbol]):
        self.index = {s: i for i, s in enumerate(inputs)}
        self.steps: list[tuple] = []
        self.outputs = [self._add(e) for e in exprs]

    def _add(self, e) -> int:
        if e in self.index:
            return self.index[e]
        if isinstance(e, (BooleanTrue, BooleanFalse)):
            step = ("const", (np.asarray(bool(e)), np.asarray(not bool(e))))
        elif e.is_Number:
            step = ("const", (np.asarray(float(e)), np.asarray(float(e))))
        else:
            fn = next((fn for kind, fn in _RULES if isinstance(e, kind)), None)
            if fn is None:
                raise Unsupported(f"no interval rule for {type(e).__name__} ({e})")
            args = [a for pair in e.args for a in pair] if isinstance(e, sympy.Piecewise) else e.args
            step = (fn, e, [self._add(a) for a in args])
        self.index[e] = len(self.index)
        self.steps.append(step)
        return self.index[e]

    def run(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> list:
        """Intervals ``(lo, hi)`` of the outputs for input intervals in order; booleans give
        ``(can be true, can be false)``."""
        values = list(inputs)
        for step in self.steps:
            values.append(step[1] if step[0] == "const"
                          else step[0](step[1], [values[i] for i in step[2]]))
        return [values[i] for i in self.outputs]


def _add(e, args):
    return sum(a[0] for a in args), sum(a[1] for a in args)


def _mul2(a, b):
    prods = [x * y for x in a for y in b]  # fmin/fmax skip 0 * inf (0 in the extended reals)
    return functools.reduce(np.fmin, prods), functools.reduce(np.fmax, prods)


def _mul(e, args):
    out = args[0]
    for a in args[1:]:
        out = _mul2(out, a)
    return out


def _pow(e, args):
    (blo, bhi), (elo, ehi) = args
    if np.all(blo == bhi) and np.all(elo == ehi):
        v = np.power(blo, elo)
        return v, v
    k = e.args[1]
    if not k.is_Number:
        raise Unsupported(f"power with a per-element exponent ({e})")
    k = float(k)
    if k == int(k):
        k = int(k)
        lo_k, hi_k = np.power(blo, float(k)), np.power(bhi, float(k))
        straddle = (blo < 0) & (bhi > 0)
        if k > 0 and k % 2 == 0:
            top = np.maximum(lo_k, hi_k)
            return np.where(straddle, 0.0, np.minimum(lo_k, hi_k)), top
        if k > 0:
            return lo_k, hi_k
        # negative powers: monotone on each side of 0, unbounded at it
        touches = (blo <= 0) & (bhi >= 0)
        near = np.minimum(lo_k, hi_k)
        if k % 2 == 0:  # 1/x^2: the far end is the smallest
            return near, np.where(touches, np.inf, np.maximum(lo_k, hi_k))
        return np.where(touches, -np.inf, near), np.where(touches, np.inf, np.maximum(lo_k, hi_k))
    blo, bhi = np.maximum(blo, 0.0), np.maximum(bhi, 0.0)  # fractional powers: x >= 0
    a, b = np.power(blo, k), np.power(bhi, k)
    return (a, b) if k > 0 else (b, a)


def _monotone(fn):
    return lambda e, args: (fn(args[0][0]), fn(args[0][1]))


def _abs(e, args):
    lo, hi = args[0]
    return np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0.0)), np.maximum(np.abs(lo), np.abs(hi))


def _max(e, args):
    return functools.reduce(np.maximum, [a[0] for a in args]), functools.reduce(np.maximum, [a[1] for a in args])


def _min(e, args):
    return functools.reduce(np.minimum, [a[0] for a in args]), functools.reduce(np.minimum, [a[1] for a in args])


def _heaviside(e, args):
    lo, hi = args[0]
    h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
    return (np.where(lo > 0, 1.0, np.where(lo < 0, 0.0, min(h0, 1.0))),
            np.where(hi < 0, 0.0, np.where(hi > 0, 1.0, max(h0, 0.0))))


def _relational(e, args):
    """(can be true, can be false); a NaN end leaves both possible."""
    (alo, ahi), (blo, bhi) = args
    op = e.rel_op
    if op in (">", ">="):
        (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), "<" if op == ">" else "<="
    if op == "<":
        surely, never = ahi < blo, alo >= bhi
    elif op == "<=":
        surely, never = ahi <= blo, alo > bhi
    else:
        surely = (alo == ahi) & (blo == bhi) & (alo == blo)
        never = (ahi < blo) | (bhi < alo)
        if op == "!=":
            surely, never = never, surely
    return ~never, ~surely


def _and(e, args):
    return functools.reduce(np.logical_and, [a[0] for a in args]), functools.reduce(np.logical_or, [a[1] for a in args])


def _or(e, args):
    return functools.reduce(np.logical_or, [a[0] for a in args]), functools.reduce(np.logical_and, [a[1] for a in args])


def _not(e, args):
    return args[0][1], args[0][0]


def _ite(e, args):
    """``ITE(c, a, b)`` over booleans (sympy's form of a condition on conditions)."""
    (c_true, c_false), (a_true, a_false), (b_true, b_false) = args
    return (c_true & a_true) | (c_false & b_true), (c_true & a_false) | (c_false & b_false)


def _piecewise(e, args):
    """Union of the branches that can be taken (a branch needs its condition possibly true and
    every earlier one possibly false); ``args`` alternate value, condition."""
    lo = hi = None
    reachable = np.asarray(True)
    for (vlo, vhi), (can_true, can_false) in zip(args[::2], args[1::2]):
        taken = reachable & can_true
        vlo, vhi = np.where(taken, vlo, np.inf), np.where(taken, vhi, -np.inf)
        lo = vlo if lo is None else np.minimum(lo, vlo)
        hi = vhi if hi is None else np.maximum(hi, vhi)
        reachable = reachable & can_false
    return lo, hi


_RULES = [
    (sympy.Add, _add), (sympy.Mul, _mul), (sympy.Pow, _pow), (sympy.Abs, _abs),
    (sympy.sign, _monotone(np.sign)), (sympy.exp, _monotone(np.exp)),
    (sympy.log, _monotone(np.log)), (sympy.Max, _max), (sympy.Min, _min),
    (sympy.Heaviside, _heaviside), (Relational, _relational), (And, _and), (Or, _or),
    (Not, _not), (ITE, _ite), (sympy.Piecewise, _piecewise),
]
