"""flashcompile: memory-efficient optimizers compiled from short update rules.

Write the update in fp32 math (:func:`rule`), pick a codec per state (:mod:`flashcompile.codecs`), and
get a ``torch.optim.Optimizer`` whose step is one fused kernel generated through ``torch.compile``.
"""

from flashcompile import codecs
from flashcompile.dsl import abs, exp, log, maximum, minimum, rule, sign, sqrt, where
from flashcompile.explain import explain
from flashcompile.optimizer import Optimizer
from flashcompile.optimizers import SGD, SGDW, Adam, AdamW, Lion

__all__ = [
    "rule", "sqrt", "abs", "sign", "where", "maximum", "minimum", "exp", "log",
    "Optimizer", "SGD", "SGDW", "Adam", "AdamW", "Lion", "codecs", "explain",
]
__version__ = "0.1.0"
