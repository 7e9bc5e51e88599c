"""Trace a rule into sympy expressions, prove its state facts, and render its math."""

from __future__ import annotations

import functools
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass

import sympy

from flashcompile.language.dsl import (Orthogonalize, Rule, SumAll, Sym, Total, _to_sympy,
                                       zero_flag)

STEP = sympy.Symbol("step", positive=True, integer=True)


@dataclass(frozen=True)
class Traced:
    """One rule under one setting of its static flags, as sympy expressions.

    ``outputs[0]`` is the new param, ``outputs[1:]`` the new states in declared order. ``scalars`` are
    the runtime scalar symbols (step, float hyperparameters and scalar states), ``tensors`` the
    per-element inputs.
    """

    rule: Rule
    flags: tuple[tuple[str, bool], ...]
    param: sympy.Symbol
    grad: sympy.Symbol
    states: tuple[sympy.Symbol, ...]
    hyper: Mapping[str, sympy.Symbol | tuple[sympy.Symbol, ...]]
    outputs: tuple[sympy.Expr, ...]
    # the rule's device scalars (passed to the kernel as 1-element tensors): its own
    # (device_scalars, positive) and its shared numbers (Rule.shared), in that order
    device: Mapping[str, sympy.Symbol] = dataclasses.field(default_factory=dict)
    # the shared numbers' new values, in Rule.shared's order: read totals (``Total``), the shared
    # numbers, step and hyperparameters
    shared_outputs: tuple[sympy.Expr, ...] = ()

    @functools.cached_property  # live_states asks once per state
    def totals(self) -> tuple[Total, ...]:
        """Every ``total`` the shared numbers' new values read, in a fixed order: the kernels
        add each one's sum over their parameters to the step's accumulator, in this order."""
        found = set().union(*(o.atoms(Total) for o in self.shared_outputs))
        return tuple(sorted(found, key=str))

    @property
    def scalars(self) -> frozenset[sympy.Symbol]:
        out = {STEP}
        for v in self.hyper.values():
            out.update(v if isinstance(v, tuple) else (v,))
        return frozenset(out) | frozenset(self.scalar_states.values())

    @property
    def scalar_states(self) -> dict[str, sympy.Symbol]:
        """The scalar states (one number per parameter) by name."""
        return {n: s for n, s in zip(self.rule.states, self.states) if n in self.rule.scalar_states}

    @property
    def tensors(self) -> tuple[sympy.Symbol, ...]:
        scalar = set(self.scalar_states.values())
        return (self.param, self.grad, *(s for s in self.states if s not in scalar))

    def live_states(self) -> tuple[str, ...]:
        """Per-element states that need storage: read by some output, or written with a new value.

        A state the rule passes through untouched and never reads (``max_exp_avg_sq`` without
        amsgrad) gets no storage at all, nor one a zero branch leaves unread (SGD's momentum
        buffer at momentum 0: the step's value is the gradient, and no later step at momentum 0
        reads it). Scalar states are kept on the host, never here, and factored ones (one number
        per row or column) in the parameter's state as they are: :meth:`live_factored_states`.
        """
        return tuple(n for n in self._live() if n not in self.rule.factored_states)

    def live_factored_states(self) -> tuple[str, ...]:
        """The factored states (``"rows"``, ``"cols"``) that need storage, as :meth:`live_states`
        decides it (Adafactor's vectors keep none)."""
        return tuple(n for n in self._live() if n in self.rule.factored_states)

    def _live(self) -> tuple[str, ...]:
        live, zeroed = [], _zeroed(self)
        for i, (name, sym) in enumerate(zip(self.rule.states, self.states)):
            if name in self.rule.scalar_states:
                continue
            rewritten = self.outputs[i + 1] != sym
            read = any(sym in out.free_symbols for j, out in enumerate(self.outputs)
                       if j != i + 1) or any(sym in t.free_symbols for t in self.totals)
            if read or (rewritten and name not in zeroed):
                live.append(name)
        return tuple(live)


def _zeroed(traced: Traced) -> frozenset[str]:
    """States ``traced`` reads nowhere that the rule's general trace (no zero branch taken)
    reads: a zero branch made them dead (:meth:`Traced.live_states`)."""
    flags = dict(traced.flags)
    taken = [zero_flag(k) for k in traced.rule.zero_branches if flags.get(zero_flag(k))]
    if not taken:
        return frozenset()
    general = trace(traced.rule, {**flags, **dict.fromkeys(taken, False)})
    out = set()
    for name, sym in zip(traced.rule.states, traced.states):
        if not any(sym in o.free_symbols for o in traced.outputs) and any(
                sym in o.free_symbols for o in general.outputs):
            out.add(name)
    return frozenset(out)


def _hyper_symbol(name: str, default) -> sympy.Symbol | tuple[sympy.Symbol, ...]:
    if isinstance(default, tuple):
        return tuple(sympy.Symbol(f"{name}_{i}", real=True) for i in range(len(default)))
    return sympy.Symbol(name, real=True)


@functools.lru_cache(maxsize=None)
def _trace_cached(rule: Rule, flags: tuple[tuple[str, bool], ...]) -> Traced:
    names = list(__import__("inspect").signature(rule.fn).parameters)
    param = sympy.Symbol(names[0], real=True)
    grad = sympy.Symbol(names[1], real=True)
    states = tuple(
        sympy.Symbol(n, nonnegative=True) if fact == "nonnegative" else sympy.Symbol(n, real=True)
        for n, fact in rule.states.items()
    )
    hyper = {k: _hyper_symbol(k, rule.defaults[k]) for k in rule.floats}
    kwargs = {k: (tuple(Sym(s) for s in v) if isinstance(v, tuple) else Sym(v)) for k, v in hyper.items()}
    static = dict(flags)
    for name in rule.zero_branches:  # traced with the literal 0 where its flag says so
        if static.pop(zero_flag(name), False):
            kwargs[name] = 0.0
    kwargs.update(static)
    device = {k: sympy.Symbol(k, positive=True) for k in rule.device_scalars}
    device.update({k: sympy.Symbol(k, real=True) for k in rule.shared})
    kwargs.update({k: Sym(s) for k, s in device.items()})
    out = rule.fn(Sym(param), Sym(grad), *(Sym(s) for s in states), step=Sym(STEP), **kwargs)
    want = 1 + len(states) + len(rule.shared)
    if not isinstance(out, tuple) or len(out) != want:
        got = len(out) if isinstance(out, tuple) else f"a {type(out).__name__}"
        raise TypeError(
            f"rule {rule.name} returned {got} values; it must return {want}: the new param then the "
            f"new {', '.join(rule.states) or '(no states)'} in declared order"
            + (f", then the new {', '.join(rule.shared)}" if rule.shared else "")
        )
    out = tuple(_to_sympy(o) for o in out)
    traced = Traced(rule, flags, param, grad, states, hyper, out[:1 + len(states)], device,
                    out[1 + len(states):])
    _check_totals(traced)
    for name, sym in traced.scalar_states.items():
        new = traced.outputs[1 + states.index(sym)]
        if not new.free_symbols <= traced.scalars:
            raise TypeError(
                f"rule {rule.name}: scalar state {name!r} is updated to {new}, which depends on "
                f"per-element values {sorted(map(str, new.free_symbols - traced.scalars))}; a scalar "
                "state may depend on step, hyperparameters and scalar states only (declare it "
                "'signed' or 'nonnegative' to keep one value per element)"
            )
    return traced


def _check_totals(traced: Traced) -> None:
    """``total`` only in the shared numbers' new values, summing per-element terms; those values
    read nothing per element outside a ``total``."""
    rule = traced.rule.name
    if any(o.has(Total) for o in traced.outputs):
        raise TypeError(f"rule {rule}: total(x) sums over every parameter, so it is known only "
                        "once the step has seen them all; only a shared number's new value may "
                        "read it (sum_all(x) sums over the parameter being stepped)")
    lane_free = traced.scalars | set(traced.device.values())
    for name, new in zip(traced.rule.shared, traced.shared_outputs):
        for t in new.atoms(Total):
            if t.args[0].has(Total, SumAll, Orthogonalize):
                raise NotImplementedError(f"rule {rule}: total({t.args[0]}) reads a reduction or "
                                          "a matrix stage")
        rest = new.xreplace({t: sympy.Dummy() for t in new.atoms(Total)})
        if rest.has(SumAll, Orthogonalize) or not rest.free_symbols <= lane_free | rest.atoms(
                sympy.Dummy):
            raise TypeError(
                f"rule {rule}: shared number {name!r} is updated to {new}, which reads "
                "per-element values outside total(...); a shared number is one value for the "
                "whole optimizer")


def trace(rule: Rule, flags: Mapping[str, bool]) -> Traced:
    """Trace ``rule`` with its bool hyperparameters fixed to ``flags`` (cached)."""
    key = tuple(sorted((k, rule.static_value(k, flags[k])) for k in rule.flags))
    # a zero branch's flag absent: the general trace (the hyperparameter a runtime input)
    zero = tuple((zero_flag(k), bool(flags.get(zero_flag(k), False))) for k in rule.zero_branches)
    # a parameter's flag absent: a matrix (the general case; the plan passes each param's own)
    own = tuple((k, bool(flags.get(k, True))) for k in rule.param_flags)
    return _trace_cached(rule, key + zero + own)


def _reparametrize(traced: Traced) -> dict[sympy.Symbol, sympy.Expr]:
    """Substitutions that encode each hyperparameter's declared range in sympy assumptions.

    A value in [lo, hi) is written lo + (hi - lo) * u / (1 + u) with u >= 0 (or lo + u when hi is
    infinite, hi - u when lo is), so sympy's sign reasoning sees e.g. that 1 - beta2 >= 0.
    """
    subs = {}
    for name, syms in traced.hyper.items():
        lo, hi = traced.rule.range_of(name)
        for s in syms if isinstance(syms, tuple) else (syms,):
            u = sympy.Symbol(f"_{s.name}_u", nonnegative=True)
            if lo == -float("inf"):  # (-inf, hi): Adafactor's beta2_decay <= 0
                subs[s] = sympy.nsimplify(hi) - u
                continue
            lo_s = sympy.nsimplify(lo)
            subs[s] = lo_s + u if hi == float("inf") else lo_s + sympy.nsimplify(hi - lo) * u / (1 + u)
    return subs


def _nonnegative(expr: sympy.Expr) -> bool:
    if isinstance(expr, sympy.Piecewise):
        return all(_nonnegative(e) for e, _ in expr.args)
    if isinstance(expr, sympy.Max):
        return any(_nonnegative(a) for a in expr.args)
    if isinstance(expr, sympy.Min):
        return all(_nonnegative(a) for a in expr.args)
    # Sums and products of nonnegatives, and powers of a nonnegative base (a quotient such as
    # Adadelta's (u + eps) / (v + eps) included: a zero denominator gives inf or nan, never < 0).
    if isinstance(expr, (sympy.Add, sympy.Mul)) and all(_nonnegative(a) for a in expr.args):
        return True
    if isinstance(expr, sympy.Pow) and _nonnegative(expr.base):
        return True
    if expr.is_nonnegative:
        return True
    return bool(sympy.together(sympy.nsimplify(expr)).is_nonnegative)


def _sign_valued(expr: sympy.Basic, signs: frozenset[sympy.Symbol]) -> bool:
    """Whether ``expr`` can only be -1, 0 or +1 (NaN aside): a sign, such a constant, a sign state,
    or a choice or product of those. Structural on purpose: the codec stores nothing else."""
    if isinstance(expr, sympy.sign) or expr in signs:
        return True
    if expr.is_Number:
        return float(expr) in (-1.0, 0.0, 1.0)  # sympy's Float(0.0) != Integer(0)
    if isinstance(expr, sympy.Piecewise):
        return all(_sign_valued(e, signs) for e, _ in expr.args)
    if isinstance(expr, sympy.Mul):
        return all(_sign_valued(a, signs) for a in expr.args)
    return False


def check_facts(traced: Traced) -> None:
    """Raise if a state declared nonnegative can be updated to a negative value, or one declared
    a sign to anything but -1, 0 or +1."""
    subs = _reparametrize(traced)
    signs = frozenset(sym for sym, fact in zip(traced.states, traced.rule.states.values())
                      if fact == "sign")
    for i, (name, fact) in enumerate(traced.rule.states.items()):
        if fact == "sign" and not _sign_valued(traced.outputs[i + 1], signs):
            raise ValueError(
                f"rule {traced.rule.name}: state {name!r} is declared a sign (-1, 0 or +1) but its "
                f"update {traced.outputs[i + 1]} is not a sign(...), a constant among those, or a "
                f"where() or product of such (flags {dict(traced.flags)}); declare it 'signed'"
            )
        if fact != "nonnegative":
            continue
        out = traced.outputs[i + 1].subs(subs)
        if not _nonnegative(out):
            raise ValueError(
                f"rule {traced.rule.name}: state {name!r} is declared nonnegative but its update "
                f"{traced.outputs[i + 1]} could not be proven >= 0 for hyperparameters in their "
                f"declared ranges (flags {dict(traced.flags)}); declare it 'signed', or fix the "
                "update (e.g. square the gradient term)"
            )


def is_nonnegative(traced: Traced, expr: sympy.Expr) -> bool:
    """Whether ``expr`` is provably >= 0 for hyperparameters in their declared ranges."""
    return _nonnegative(expr.subs(_reparametrize(traced)))


def keeps_zero(traced: Traced, index: int) -> bool:
    """Whether output ``index`` is provably 0 when the param, gradient and every state are 0.

    Padding lanes hold zeros; for such outputs they stay zero with no masking in the kernel. A
    reduction (``sum_all``) is not local to the lane: there it may hold any value.
    """
    if index and traced.rule.states[list(traced.rule.states)[index - 1]] == "scalar":
        return True  # one number per parameter, no lanes
    return keeps_zero_expr(traced, traced.outputs[index])


def keeps_zero_expr(traced: Traced, expr: sympy.Expr) -> bool:
    """Whether ``expr`` is provably 0 on a lane where the param, gradient and every state are 0
    (whatever any reduction in it sums to)."""
    expr = expr.xreplace({r: sympy.Dummy(real=True) for r in expr.atoms(SumAll)})
    # a matrix stage's result on a padding lane is what its argument left there (the lane is in
    # no matrix): zero where the argument is
    expr = expr.xreplace({m: m.args[0] * sympy.Dummy(real=True)
                          for m in expr.atoms(Orthogonalize)})
    zeros = {s: 0 for s in traced.tensors}
    return sympy.simplify(expr.xreplace(zeros)) == 0


def math_text(traced: Traced, latex: bool = False) -> str:
    """The update as equations, one per output (the shared numbers' last: they read ``total``,
    sums over every parameter), for docs and ``explain``.

    A per-element subexpression used more than once (LAMB's update, inside its norm and outside) is
    written once as ``u_0 = ...`` and the equations refer to it.
    """
    names = [traced.param.name, *traced.rule.states, *traced.rule.shared]
    changed = [(name, out) for name, out in zip(names, (*traced.outputs, *traced.shared_outputs))
               if out not in (sympy.Symbol(name, real=True), sympy.Symbol(name, nonnegative=True))]
    temps, reduced = sympy.cse([out for _, out in changed], symbols=sympy.numbered_symbols("u_"))
    show = sympy.latex if latex else sympy.sstr
    inline: dict[sympy.Symbol, sympy.Expr] = {}
    lines = []
    for sym, expr in temps:
        expr = expr.xreplace(inline)
        if expr.free_symbols <= traced.scalars:
            inline[sym] = expr  # hyperparameter arithmetic such as 1 - beta1 reads best in place
        else:
            lines.append(f"{show(sym)} = {show(expr)}")
    for (name, _), out in zip(changed, reduced):
        lines.append(f"{name} <- {show(out.xreplace(inline))}")
    return "\n".join(lines)
