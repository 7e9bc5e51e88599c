"""The update of a rule's shared numbers (``Rule.shared``: Prodigy's d), once per step: Python
source over float64 tensors on the device, so the step never syncs with the host.

``shared_update(_totals, <shared numbers>, step, <hyperparameters>)`` returns their new values from
the step's totals (``_totals[i]`` is ``Traced.totals[i]`` summed over every parameter). A few
scalar operations: printed plainly, not through the element-wise printer, which hoists scalars to
the host and writes tensor code for ``(G, 32)`` lanes.
"""

from __future__ import annotations

import sympy

from flashcompile.compiler.lowering import _FUNCTIONS, _RELATIONS
from flashcompile.language.dsl import Total
from flashcompile.language.trace import Traced


def shared_source(traced: Traced) -> str:
    """Python source of ``shared_update(_totals, <shared numbers>, step, <hyperparameters>)``:
    the shared numbers' new values as float64 tensors on the totals' device (no host sync),
    ``_totals`` holding the step's sums in :attr:`Traced.totals` order."""
    if not traced.rule.shared:
        return ""
    index = {t: i for i, t in enumerate(traced.totals)}
    args = ", ".join(["_totals", *traced.rule.shared, "step", *traced.hyper])
    # a number becomes a tensor by a fill on the device: torch.as_tensor(number, device=cuda)
    # copies it from the host and waits for the stream (an H100 bench step of Prodigy spent
    # 27 ms of host time there, against 8 ms for the kernels)
    lines = [f"def shared_update({args}):",
             "    _t = lambda x: (x.to(torch.float64) if isinstance(x, torch.Tensor) else "
             "torch.full((), x, dtype=torch.float64, device=_totals.device))"]
    for name, syms in traced.hyper.items():
        if isinstance(syms, tuple):
            lines.append(f"    {', '.join(s.name for s in syms)}, = {name}")
    values = ", ".join(f"_t({_host(e, index)})" for e in traced.shared_outputs)
    lines.append(f"    return [{values}]")
    return "\n".join(lines) + "\n"


def _host(e: sympy.Basic, index: dict) -> str:
    """``e`` as Python over float64 tensors (``_t`` makes one of a number; conditions are bool
    tensors): the shared numbers' update, a few scalar operations once per step."""
    def t(a: sympy.Basic) -> str:
        return f"_t({_host(a, index)})"

    if isinstance(e, Total):
        return f"_totals[{index[e]}]"
    if e is sympy.true or e is sympy.false:
        return repr(bool(e))
    if e.is_Number:
        return repr(float(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(_host(a, index) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        return "(" + " * ".join(_host(a, index) for a in e.args) + ")"
    if isinstance(e, sympy.Pow):
        return f"({t(e.base)} ** {_host(e.exp, index)})"
    if isinstance(e, sympy.Piecewise):
        (value, cond), rest = e.args[0], e.args[1:]
        if cond is sympy.true or not rest:
            return t(value)
        return f"torch.where({_host(cond, index)}, {t(value)}, {t(sympy.Piecewise(*rest))})"
    if type(e) in _RELATIONS:
        return f"({t(e.lhs)} {_RELATIONS[type(e)]} {t(e.rhs)})"
    if isinstance(e, (sympy.And, sympy.Or)):
        fn = "torch.logical_and" if isinstance(e, sympy.And) else "torch.logical_or"
        out = _host(e.args[0], index)
        for a in e.args[1:]:
            out = f"{fn}({out}, {_host(a, index)})"
        return out
    if isinstance(e, sympy.Not):
        return f"torch.logical_not({_host(e.args[0], index)})"
    if isinstance(e, (sympy.Max, sympy.Min)):
        fn = "torch.maximum" if isinstance(e, sympy.Max) else "torch.minimum"
        out = t(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}({out}, {t(a)})"
        return out
    if isinstance(e, sympy.sign):
        return f"torch.sign({t(e.args[0])})"
    if type(e) in _FUNCTIONS:
        return f"{_FUNCTIONS[type(e)]}({t(e.args[0])})"
    raise NotImplementedError(f"cannot compute a shared number's {type(e).__name__}: {e}")
