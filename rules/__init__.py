"""The built-in update rules, one file each. Installed as ``flashcompile.rules``."""

from flashcompile.rules.adam import adam
from flashcompile.rules.adan import adan
from flashcompile.rules.ademamix import ademamix
from flashcompile.rules.lamb import lamb
from flashcompile.rules.lars import lars
from flashcompile.rules.lion import lion
from flashcompile.rules.sgd import sgd

__all__ = ["adam", "adan", "ademamix", "lamb", "lars", "lion", "sgd"]
