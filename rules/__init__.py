"""The built-in update rules, one file each. Installed as ``flashcompile.rules``."""

from flashcompile.rules.adadelta import adadelta
from flashcompile.rules.adagrad import adagrad
from flashcompile.rules.adam import adam
from flashcompile.rules.adamax import adamax
from flashcompile.rules.adan import adan
from flashcompile.rules.ademamix import ademamix
from flashcompile.rules.asgd import asgd
from flashcompile.rules.lamb import lamb
from flashcompile.rules.lars import lars
from flashcompile.rules.lion import lion
from flashcompile.rules.nadam import nadam
from flashcompile.rules.radam import radam
from flashcompile.rules.rmsprop import rmsprop
from flashcompile.rules.rprop import rprop
from flashcompile.rules.sgd import sgd

__all__ = [
    "adadelta", "adagrad", "adam", "adamax", "adan", "ademamix", "asgd", "lamb", "lars", "lion",
    "nadam", "radam", "rmsprop", "rprop", "sgd",
]
