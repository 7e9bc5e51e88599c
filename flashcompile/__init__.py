"""flashcompile: memory-efficient optimizers compiled from short update rules.

Write the update in fp32 math (:func:`rule`), pick a codec per state (:mod:`flashcompile.codecs`), and
get a ``torch.optim.Optimizer`` whose step is one fused kernel generated through ``torch.compile``.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

if _importlib_util.find_spec("flashcompile.rules") is None:
    # A source checkout (no install) keeps the rules in ../rules; installs map them to
    # flashcompile.rules (pyproject's package-dir).
    _rules = _os.path.join(_os.path.dirname(__file__), _os.pardir, "rules")
    _spec = _importlib_util.spec_from_file_location(
        "flashcompile.rules", _os.path.join(_rules, "__init__.py"),
        submodule_search_locations=[_rules])
    _module = _importlib_util.module_from_spec(_spec)
    _sys.modules["flashcompile.rules"] = _module
    _spec.loader.exec_module(_module)
    rules = _module  # as an import would bind it: fc.rules.adam

from flashcompile import codecs  # noqa: E402
from flashcompile.compiler.explain import explain  # noqa: E402
from flashcompile.language import (  # noqa: E402
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
    rule,
    sign,
    sqrt,
    sum_all,
    total,
    where,
)
from flashcompile.optim.model import (  # noqa: E402
    BATCH_NORMS,
    NORM_LAYERS,
    cast_model,
    fp32_state_dict,
    load_fp32_state_dict,
)
from flashcompile.optim.groups import muon_groups  # noqa: E402
from flashcompile.optim.optimizer import Optimizer  # noqa: E402
from flashcompile.optim.optimizers import OPTIMIZERS as _OPTIMIZERS  # noqa: E402
from flashcompile.optim.release import enable_gradient_release  # noqa: E402

# the drop-in classes (SGD, Adam, AdamW, Lion, ...), one per registry entry
globals().update({cls.__name__: cls for cls in _OPTIMIZERS.values()})

__all__ = [
    "rule", "sqrt", "abs", "sign", "where", "maximum", "minimum", "exp", "log", "sum_all", "norm",
    "total", "orthogonalize", "row_mean", "col_mean", "mean_all",
    "Optimizer", "codecs", "explain", *(cls.__name__ for cls in _OPTIMIZERS.values()),
    "cast_model", "BATCH_NORMS", "NORM_LAYERS", "enable_gradient_release", "fp32_state_dict",
    "load_fp32_state_dict", "muon_groups",
]
__version__ = "0.1.0"
