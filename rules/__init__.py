"""The built-in update rules, one file each, found by their file names: ``rules/<name>.py``
defines the rule ``<name>``. Installed as ``flashcompile.rules``; :data:`RULES` maps each name to
its rule (``flashcompile.optim.optimizers`` gives each a class)."""

import importlib
import pkgutil

RULES = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    RULES[_module] = getattr(importlib.import_module(f"{__name__}.{_module}"), _module)
globals().update(RULES)  # flashcompile.rules.adam is the rule, not its module

__all__ = sorted(RULES)
