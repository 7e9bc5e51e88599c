"""The rule language: element-wise fp32 math on named states (the DSL), plus whole-parameter
reductions, sums over the whole optimizer, means in the parameter's shape and matrix stages; its
trace into sympy with the proofs of each state's fact, and the error envelopes the property tests
hold a rule to.

A rule imports its primitives and the ``rule`` decorator from here."""

from flashcompile.language.declare import rule
from flashcompile.language.dsl import (
    abs,
    col_mean,
    exp,
    log,
    maximum,
    mean_all,
    minimum,
    norm,
    orthogonalize,
    row_mean,
    sign,
    sqrt,
    sum_all,
    total,
    where,
)

__all__ = ["rule", "abs", "col_mean", "exp", "log", "maximum", "mean_all", "minimum", "norm",
           "orthogonalize", "row_mean", "sign", "sqrt", "sum_all", "total", "where"]
