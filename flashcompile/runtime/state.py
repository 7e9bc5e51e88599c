"""``optimizer.state``: torch.optim's mapping of param -> state dict, counting its changes.

A flat bucket must notice a state reset (``opt.state.clear()``, ``del opt.state[p]``,
``opt.state[p].clear()``, a replaced ``step``) before it steps again. Looking every param's state up
costs a Python-level ``Tensor.__hash__`` per param (0.2 us each: 1000 params, 0.5 ms a step, more
than the kernel of a 200M-parameter step on an H200). Instead, every change to the mapping or to
one of its :class:`ParamState` dicts bumps one counter, and a bucket checks each param's state only
when the counter moved. In-place tensor updates (the step itself) are not changes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class Changes:
    """A counter shared by an :class:`OptimizerState` and its dicts."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class ParamState(dict):
    """One param's optimizer state: a dict whose missing keys say where a state lives, and whose
    changes (keys set, removed, cleared) are counted in the :class:`Changes` of every
    :class:`OptimizerState` that holds it (``copy.copy(opt.state)`` shares the dicts)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counters: list[Changes] = []

    def __missing__(self, key):
        fields = sorted(k for k in self if isinstance(key, str) and k.startswith(f"{key}."))
        if fields:
            raise KeyError(
                f"{key!r} is stored encoded, in {fields}; read it decoded (fp32, shaped like the "
                f"param) with optimizer.state_value(p, {key!r})")
        raise KeyError(f"{key!r} is not in this param's state (its keys: {sorted(self)}; a "
                       "state appears at the param's first step)")

    def _changed(self) -> None:
        for counter in self.counters:
            counter.count += 1

    def __reduce__(self):
        # dict's reduce sets the items before the attributes: the counters must exist first
        return (ParamState, (dict(self),), {"counters": self.counters})


class OptimizerState(defaultdict):
    """``optimizer.state``: a ``defaultdict`` of :class:`ParamState` whose changes, and those of
    its dicts, are counted in :attr:`changes`. A value that is not a ParamState (a plain dict
    assigned by hand) cannot count its own changes: :attr:`tracked` turns False for good, and
    buckets check every param's state at every step, as without the counter."""

    def __init__(self, *args: Any) -> None:
        super().__init__(ParamState)
        self.changes = Changes()
        self.tracked = True
        for key, value in dict(*args).items():
            self[key] = value

    def __missing__(self, key):
        value = self[key] = ParamState()
        return value

    def __setitem__(self, key, value) -> None:
        self.changes.count += 1
        if isinstance(value, ParamState):
            if not any(c is self.changes for c in value.counters):
                value.counters.append(self.changes)
        else:
            self.tracked = False
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.changes.count += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.changes.count += 1
        super().clear()

    def pop(self, *args):
        self.changes.count += 1
        return super().pop(*args)

    def popitem(self):
        self.changes.count += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):
        # defaultdict's own reduce would rebuild through __setitem__ before __init__ ran
        return (_rebuild, (list(self.items()),))

    def __copy__(self) -> OptimizerState:  # defaultdict's passes the factory to __init__
        return OptimizerState(list(self.items()))


def _rebuild(items) -> OptimizerState:
    return OptimizerState(items)


def _counting(name: str):
    method = getattr(dict, name)

    def counted(self, *args, **kwargs):
        self._changed()
        return method(self, *args, **kwargs)

    counted.__name__ = name
    return counted


for _name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update",
              "__ior__"):
    setattr(ParamState, _name, _counting(_name))
