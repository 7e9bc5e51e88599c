"""Lower a traced rule to torch source: element-wise tensor code plus a hoisted scalar prologue.

sympy's common-subexpression elimination names repeated tensor subexpressions. Every subexpression
that depends only on scalars (step and hyperparameters: bias corrections, ``1 - beta``, ``lr * wd``) is
hoisted out of the element-wise code into a prologue that runs once per step on the host in float64;
its results reach the kernel as one small fp32 vector ``_s``, so changing a hyperparameter never
recompiles. ``_s[0]`` is reserved for the number of valid lanes in the last group (the tail mask).

A sum over every parameter (``total``, read by a rule's shared numbers only) is summed by the
update itself into the step's accumulator (``_totals_acc``, one float64 per total); the shared
numbers' new values are then computed from it once per step (:mod:`flashcompile.compiler.shared_update`).

A reduction over the parameter (``sum_all``) is a phase of its own: its argument is lowered like
the outputs (computed over all ``(G, 32)`` lanes; the plan masks padding lanes and sums each
parameter's groups), and the update reads the result as ``_sum0``, ``_sum1``, ... (one value per
group). A sum whose argument uses another sum runs in a later phase. A reduction is never hoisted,
even when its argument is scalar: ``sum_all(0 * g + 1)`` counts the elements (``sum_all(1.0)`` of a
plain number is evaluated when the rule runs, as a one-element parameter's sum: 1.0). A flat call
sums such a lane-free argument as its value times each group's valid lanes, not lane by lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy.logic.boolalg import BooleanAtom, BooleanFunction
from sympy.printing.pycode import PythonCodePrinter

from flashcompile.language.dsl import Orthogonalize, SumAll, Total
from flashcompile.language.trace import STEP, Traced, is_nonnegative, keeps_zero_expr

_RELATIONS = {
    sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
    sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!=",
}
_FUNCTIONS = {sympy.Abs: "torch.abs", sympy.sign: "torch.sign", sympy.exp: "torch.exp",
              sympy.log: "torch.log"}


@dataclass(frozen=True)
class Lowered:
    """Element-wise statements (``name = expr`` over tensors and ``_s[i]``) and the prologue."""

    statements: tuple[tuple[str, str], ...]  # (target, torch expression)
    outputs: tuple[str | None, ...]  # expression per output; None = unchanged (passthrough)
    hoisted: tuple[sympy.Expr, ...]  # _s[1 + i] = hoisted[i]
    prologue_source: str
    # reductions, one phase per nesting depth: (statements, the summed expressions); the sums are
    # numbered _sum0, _sum1, ... across phases in order, and the statements above read them
    phases: tuple[tuple[tuple[tuple[str, str], ...], tuple[str, ...]], ...] = ()
    # per phase, the inputs (param, grad, state names) its sums read
    phase_reads: tuple[frozenset[str], ...] = ()
    step_slot: int = 0  # _s[step_slot] is the step count (stochastic rounding's noise reads it)
    # a matrix stage (orthogonalize): the phase before it; ``statements`` and ``outputs`` above
    # are then the phase after it, which reads the stage's result as ``_stage0``
    stage: Stage | None = None
    # one torch expression per Traced.totals entry (what the update adds to ``_totals_acc``),
    # and whether each is provably 0 on padding lanes (else it is masked)
    totals: tuple[str, ...] = ()
    totals_skip_pads: bool = True
    # per phase, per sum: whether its argument is the same on every lane (a constant, the step,
    # an earlier sum): the sum is then that value times the parameter's size, which a flat call
    # counts from each group's valid lanes instead of summing a masked value per lane
    lane_free_sums: tuple[tuple[bool, ...], ...] = ()


@dataclass(frozen=True)
class Stage:
    """The element-wise phase before a matrix stage and what the stage needs: the phase computes
    ``argument`` (stored, as bf16, for the stage) and the outputs that do not depend on the stage's
    result (``outputs``: an expression per output, None for those left to the phase after)."""

    statements: tuple[tuple[str, str], ...]
    outputs: tuple[str | None, ...]
    argument: str
    slots: tuple[int, ...]  # _s[slot] of steps, a, b, c, eps: read on the host by the stage
    ratio: int  # dsl.LR_RATIOS entry: the shape factor the stage's result carries
    reads: frozenset[str]  # the inputs (param, grad, states) the phase reads


def _is_boolean(e: sympy.Basic) -> bool:
    return e.is_Relational or isinstance(e, (BooleanFunction, BooleanAtom))


class _TorchPrinter:
    def __init__(self, scalars: frozenset[sympy.Symbol]):
        self.scalars = scalars
        self.hoisted: dict[sympy.Expr, int] = {}
        self.guards: tuple[sympy.Basic, ...] = ()  # scalar conditions of the where() being printed

    def is_scalar(self, e: sympy.Basic) -> bool:
        return e.free_symbols <= self.scalars and not e.has(SumAll, Orthogonalize, Total)

    def hoist(self, e: sympy.Basic) -> str:
        if self.guards and not (e.is_Number or _is_boolean(e)):
            # inside where(c, ...) with a scalar c: computed on the host only where c holds, as
            # RAdam's rectification sqrt((rho_t - 4) ...) is defined only for rho_t > 5
            e = sympy.Piecewise((e, sympy.And(*self.guards)), (0, True))
        i = self.hoisted.setdefault(e, len(self.hoisted) + 1)
        return f"(_s[{i}] != 0)" if _is_boolean(e) else f"_s[{i}]"

    def __call__(self, e: sympy.Basic) -> str:
        if e.is_Number:
            return repr(float(e))
        if e is sympy.true or e is sympy.false:
            return repr(bool(e))
        if self.is_scalar(e):
            return self.hoist(e)
        if e.is_Symbol:
            return e.name
        if isinstance(e, sympy.Add):
            return self._add(e)
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e.args)
        if type(e) in _RELATIONS:
            return f"({self(e.lhs)} {_RELATIONS[type(e)]} {self(e.rhs)})"
        if isinstance(e, (sympy.And, sympy.Or)):
            op = " & " if isinstance(e, sympy.And) else " | "
            return "(" + op.join(self(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"(~{self(e.args[0])})"
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "torch.maximum" if isinstance(e, sympy.Max) else "torch.minimum"
            out = self._tensor_arg(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {self._tensor_arg(a)})"
            return out
        if isinstance(e, sympy.sign):
            # torch.sign(nan) is 0: a NaN would vanish (Lion's param never shows it and its group
            # of 32 stops moving); keep it where it lands, as every other op does. Two selects on
            # floats: torch.sign lowers to integer compares, a subtract and a conversion back.
            x = self(e.args[0])
            return f"torch.where(({x}) > 0, 1.0, torch.where(({x}) < 0, -1.0, {x}))"
        if type(e) in _FUNCTIONS:
            return f"{_FUNCTIONS[type(e)]}({self(e.args[0])})"
        raise NotImplementedError(f"cannot lower {type(e).__name__}: {e}")

    def _tensor_arg(self, e: sympy.Basic) -> str:
        # torch.maximum and friends need tensors: hoist even plain numbers into _s.
        return self.hoist(e) if self.is_scalar(e) else self(e)

    def _add(self, e: sympy.Add) -> str:
        scalar = [a for a in e.args if self.is_scalar(a)]
        terms = [self(a) for a in e.args if not self.is_scalar(a)]
        if scalar:
            terms.append(self(sympy.Add(*scalar)))
        return "(" + " + ".join(terms) + ")"

    def _mul(self, e: sympy.Mul) -> str:
        scalar = sympy.Mul(*[a for a in e.args if self.is_scalar(a)])
        num, den = [], []
        for a in e.args:
            if self.is_scalar(a):
                continue
            if isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0:
                den.append(self(a.base) if a.exp == -1 else self(a.base ** -a.exp))
            else:
                num.append(self(a))
        if scalar == -1:
            num[0:0] = ["-1.0"] if not num else []
            prefix = "-"
        else:
            prefix = ""
            if scalar != 1:
                num.append(self(scalar))
        out = " * ".join(num) if num else "1.0"
        if den:
            out = f"{out} / " + (den[0] if len(den) == 1 else "(" + " * ".join(den) + ")")
        return f"({prefix}{out})"

    def _pow(self, e: sympy.Pow) -> str:
        base, ex = e.args
        if ex == sympy.Rational(1, 2):
            return f"torch.sqrt({self(base)})"
        if ex == sympy.Rational(-1, 2):
            return f"torch.rsqrt({self(base)})"
        if ex == 2:
            return f"torch.square({self(base)})"
        if ex == -1:
            return f"(1.0 / {self(base)})"
        if ex.is_Integer and ex > 0:
            return f"({self(base)} ** {int(ex)})"
        return f"torch.pow({self._tensor_arg(base)}, {self._tensor_arg(ex)})"

    def _piecewise(self, pieces) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond is sympy.true or not rest:
            return self._tensor_arg(value)
        outer = self.guards
        scalar = self.is_scalar(cond)
        self.guards = (*outer, cond) if scalar else outer
        taken = self._tensor_arg(value)
        self.guards = (*outer, sympy.Not(cond)) if scalar else outer
        other = self._piecewise(rest)
        self.guards = outer
        return f"torch.where({self(cond)}, {taken}, {other})"


def _split_scalar_powers(traced: Traced, expr: sympy.Expr) -> sympy.Expr:
    """Rewrite ``(t * c) ** e`` as ``t ** e * c ** e`` for scalar ``c`` and provably nonnegative ``t``.

    Adam's ``sqrt(v / (1 - beta2**step))`` becomes ``sqrt(v) * hoisted``: the kernel then computes
    ``sqrt(v)`` once, shared with the sqrt codec that stores ``v``. (Where ``c < 0``, only possible
    outside the declared ranges, both forms are NaN.)
    """
    scalars = traced.scalars

    def split(e: sympy.Pow) -> sympy.Expr:
        base, ex = e.args
        if not (isinstance(base, sympy.Mul) and ex.is_Rational and not ex.is_Integer):
            return e
        c = sympy.Mul(*[a for a in base.args if a.free_symbols <= scalars])
        t = sympy.Mul(*[a for a in base.args if not a.free_symbols <= scalars])
        if c == 1 or t == 1 or not is_nonnegative(traced, t):
            return e
        return sympy.Pow(t, ex) * sympy.Pow(c, ex)

    return expr.replace(lambda e: isinstance(e, sympy.Pow), split)


def lower(traced: Traced) -> Lowered:
    """Lower ``traced`` (one rule, fixed flags) to element-wise torch statements and a prologue."""
    names = [traced.param.name, *traced.rule.states]
    inputs = (traced.param, *traced.states)
    scalar_states = traced.rule.scalar_states  # updated by the prologue, not the kernel
    sums = _reductions(traced)
    named = {r: sympy.Symbol(f"_sum{i}", real=True) for i, r in enumerate(sums)}
    live = [(i, _split_scalar_powers(traced, o.xreplace(named)))
            for i, o in enumerate(traced.outputs)
            if o != inputs[i] and names[i] not in scalar_states]
    printer = _TorchPrinter(traced.scalars)
    stage = None
    if any(o.has(Orthogonalize) for o in traced.outputs):
        if sums:
            raise NotImplementedError(
                f"rule {traced.rule.name} has both a reduction (sum_all, norm) and a matrix stage "
                "(orthogonalize); one of them per rule for now")
        stage, live = _stage(traced, printer, live)
    totals = [_split_scalar_powers(traced, t.args[0]) for t in traced.totals]
    if totals and (sums or stage is not None):
        raise NotImplementedError(
            f"rule {traced.rule.name} has both total(...) and a reduction over the parameter "
            "(sum_all, norm) or a matrix stage; one of them per rule for now")
    lane_free = traced.scalars | set(named.values()) | set(traced.device.values())
    phases, phase_reads, lane_free_sums = [], [], []
    for depth in sorted({d for d in sums.values()}):
        args = [_split_scalar_powers(traced, r.args[0].xreplace(named))
                for r, d in sums.items() if d == depth]
        statements, codes = _lower_exprs(printer, args)
        phases.append((statements, tuple(codes)))
        read = {str(s) for a in args for s in a.free_symbols}
        phase_reads.append(frozenset(read & {*names, traced.grad.name}))
        lane_free_sums.append(tuple(a.free_symbols <= lane_free for a in args))
    # the totals' terms share subexpressions with the outputs (Prodigy's |s| and s)
    statements, codes = _lower_exprs(printer, [o for _, o in live] + totals)
    codes, total_codes = codes[:len(live)], codes[len(live):]
    outputs: list[str | None] = [None] * len(names)

    def on_lanes(expr: sympy.Expr, code: str) -> str:
        if expr.free_symbols <= lane_free:  # a constant or a reduction: broadcast over the group
            return f"({code} + torch.zeros_like({traced.grad.name}))"
        return code

    for (i, expr), code in zip(live, codes):
        outputs[i] = on_lanes(expr, code)
    total_codes = [on_lanes(t, c) for t, c in zip(totals, total_codes)]
    step_slot = printer.hoisted.setdefault(STEP, len(printer.hoisted) + 1)  # after the rule's own
    hoisted = tuple(sorted(printer.hoisted, key=printer.hoisted.get))
    updates = tuple(traced.outputs[names.index(n)] for n in scalar_states)
    return Lowered(tuple(statements), tuple(outputs), hoisted,
                   _prologue(traced, hoisted + updates), tuple(phases), tuple(phase_reads),
                   step_slot, stage, tuple(total_codes),
                   all(keeps_zero_expr(traced, t) for t in totals), tuple(lane_free_sums))


STAGE = sympy.Symbol("_stage0", real=True)  # the matrix stage's result, in the phase after it


def _stage(traced: Traced, printer: _TorchPrinter, live: list[tuple[int, sympy.Expr]]
           ) -> tuple[Stage, list[tuple[int, sympy.Expr]]]:
    """Split ``live`` (output index, expression) at the rule's matrix stage: the phase before it
    (the stage's argument and the outputs that do not use its result) and the outputs after it,
    whose expressions read :data:`STAGE` instead of the stage."""
    rule = traced.rule.name
    atoms = set().union(*(o.atoms(Orthogonalize) for _, o in live))
    if len(atoms) != 1:
        raise NotImplementedError(f"rule {rule}: {len(atoms)} different matrix stages "
                                  "(orthogonalize); one per rule for now")
    (atom,) = atoms
    x, *scalars = atom.args
    if x.has(Orthogonalize, SumAll):
        raise NotImplementedError(f"rule {rule}: orthogonalize's argument uses a reduction or "
                                  "another matrix stage")
    if x.free_symbols <= traced.scalars:
        raise ValueError(f"rule {rule}: orthogonalize's argument {x} is the same for every "
                         "element; it must depend on the gradient or a state")
    if not all(a.free_symbols <= traced.scalars for a in scalars):
        raise ValueError(f"rule {rule}: orthogonalize's steps, coefficients and eps must be "
                         "numbers or hyperparameters")
    before = [(i, o) for i, o in live if not o.has(Orthogonalize)]
    after = [(i, o.xreplace({atom: STAGE})) for i, o in live if o.has(Orthogonalize)]
    inputs = (traced.param, *traced.states)
    stored = {inputs[i] for i, _ in before}
    for i, o in after:
        clash = o.free_symbols & stored
        if clash:
            raise NotImplementedError(
                f"rule {rule}: {[traced.param.name, *traced.rule.states][i]} is updated after "
                f"orthogonalize and reads {sorted(map(str, clash))}, which the phase before the "
                "stage has already stored; compute that part of the update before the stage")
    statements, codes = _lower_exprs(printer, [_split_scalar_powers(traced, o)
                                               for _, o in before] + [x])
    outputs: list[str | None] = [None] * len(inputs)
    for (i, _), code in zip(before, codes):
        outputs[i] = code
    slots = tuple(int(printer.hoist(a)[3:-1]) for a in scalars[:5])
    reads = {str(s) for _, o in before for s in o.free_symbols} | {str(s) for s in x.free_symbols}
    names = {traced.param.name, traced.grad.name, *traced.rule.states}
    return Stage(statements, tuple(outputs), codes[-1], slots, int(scalars[5]),
                 frozenset(reads & names)), after


def _reductions(traced: Traced) -> dict[SumAll, int]:
    """Every ``sum_all`` in the outputs (nested ones too) with its depth: 1 sums element-wise
    terms only, ``d`` sums terms that use sums of depth below ``d``. Ordered by depth."""
    depth: dict[SumAll, int] = {}

    def visit(r: SumAll) -> int:
        if r not in depth:
            depth[r] = 1 + max((visit(q) for q in r.args[0].atoms(SumAll)), default=0)
        return depth[r]

    for out in traced.outputs:
        for r in out.atoms(SumAll):  # atoms() finds nested sums too
            visit(r)
    return dict(sorted(depth.items(), key=lambda kv: (kv[1], str(kv[0]))))


def _lower_exprs(printer: _TorchPrinter, exprs: list[sympy.Expr]
                 ) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """Statements (named common subexpressions) and one torch expression per ``exprs`` entry;
    scalar-only subexpressions are hoisted into ``printer``'s scalar vector."""
    temps, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("_t"))
    scalar_temps: dict[sympy.Symbol, sympy.Expr] = {}
    statements = []
    for sym, expr in temps:
        expr = expr.xreplace(scalar_temps)
        if printer.is_scalar(expr):
            scalar_temps[sym] = expr  # inline: it becomes (part of) a hoisted scalar
        else:
            statements.append((sym.name, printer(expr)))
    return tuple(statements), [printer(e.xreplace(scalar_temps)) for e in reduced]


def _prologue(traced: Traced, hoisted: tuple[sympy.Expr, ...]) -> str:
    """Python source of ``prologue(step, **hyperparameters, **scalar_states) -> list[float]``
    (float64 on the host): the hoisted values, then the scalar states' new values."""
    # A conditional evaluates only its taken branch: keep common subexpressions out of it, or a
    # branch's sqrt or division would run where it is undefined.
    lazy: dict[sympy.Basic, sympy.Dummy] = {}
    temps, reduced = sympy.cse([_opaque(e, lazy) for e in hoisted],
                               symbols=sympy.numbered_symbols("_h"))
    back = {d: e for e, d in lazy.items()}
    temps = [(sym, expr.xreplace(back)) for sym, expr in temps]
    reduced = [expr.xreplace(back) for expr in reduced]
    pr = PythonCodePrinter({"standard": "python3"})
    args = ", ".join([*traced.hyper, *traced.rule.scalar_states])
    lines = [f"def prologue(step, {args}):" if args else "def prologue(step):"]
    for name, syms in traced.hyper.items():
        if isinstance(syms, tuple):
            lines.append(f"    {', '.join(s.name for s in syms)}, = {name}")
    for sym, expr in temps:
        lines.append(f"    {sym.name} = {pr.doprint(expr)}")
    values = ", ".join(f"float({pr.doprint(e)})" for e in reduced)
    lines.append(f"    return [{values}]")
    return "\n".join(lines) + "\n"


def _opaque(e: sympy.Basic, lazy: dict[sympy.Basic, sympy.Dummy]) -> sympy.Basic:
    """``e`` with each outermost Piecewise replaced by a Dummy (recorded in ``lazy``)."""
    if isinstance(e, sympy.Piecewise):
        return lazy.setdefault(e, sympy.Dummy())
    if not e.args:
        return e
    return e.func(*(_opaque(a, lazy) for a in e.args))

