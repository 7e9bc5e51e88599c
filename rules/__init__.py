"""The built-in update rules, one file each. Installed as ``flashcompile.rules``."""

from flashcompile.rules.adam import adam
from flashcompile.rules.lion import lion
from flashcompile.rules.sgd import sgd

__all__ = ["adam", "lion", "sgd"]
