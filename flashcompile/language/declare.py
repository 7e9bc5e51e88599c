"""Declaring a rule: ``@rule`` checks the function's signature, its states' facts and its codec
choices, and traces it once with default flags, so a malformed rule fails where it is written."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flashcompile.codecs.presets import check_codec_spec
from flashcompile.language.dsl import PARAM_FLAGS, STATE_FACTS, Rule
from flashcompile.language.trace import trace


def rule(
    *,
    defaults: Mapping[str, Any],
    states: Mapping[str, str],
    ranges: Mapping[str, tuple[float, float]] | None = None,
    flash_codecs: Mapping[str, str] | None = None,
    choices: Mapping[str, tuple[Any, ...]] | None = None,
    zero_branches: tuple[str, ...] = (),
    shared: Mapping[str, float | str] | None = None,
    starts: Mapping[str, str] | None = None,
    param_flags: tuple[str, ...] = (),
) -> Callable[[Callable], Rule]:
    """Declare an optimizer update rule.

    Args:
        defaults: every hyperparameter with its default. Bools are static flags; floats and tuples of
            floats (``betas``) are runtime inputs, so changing them never recompiles.
        states: state name -> fact, ``"signed"`` or ``"nonnegative"``. The fact picks the default
            8-bit codec, and a nonnegative state is proven to stay nonnegative when compiled.
            ``"sign"``: every value is -1, 0 or +1 (its update is a ``sign(...)``, a constant among
            those, or a ``where`` or product of such; proven when compiled); stored exactly in
            one byte (``sign_int8``).
            ``"scalar"``: one number per parameter, not per element (a running product over steps,
            a step size set from the previous step's lr). Its update may depend only on step,
            hyperparameters and scalar states; it is computed on the host in float64 and kept as a
            0-d fp32 tensor in the parameter's state, as torch.optim keeps such values.
            ``"rows"`` / ``"cols"``: one fp32 number per row / column of the parameter's matrix
            (its last two dims; leading dims batch matrices), shaped ``(..., rows, 1)`` /
            ``(..., 1, cols)`` (Adafactor's factored second moment). Made from ``row_mean`` /
            ``col_mean``; the rule then runs in each parameter's shape, one per call.
            Every state starts at zero (or at the parameter: ``starts``); another start is
            ``where(step == 1, start, state)``. A scalar state missing from a loaded state dict
            (torch.optim's, or one saved before the rule had it) also loads as zero: after step 1
            the rule must read that as "unknown".
        ranges: optional [lo, hi) interval per float hyperparameter. Default: ``betas`` in [0, 1),
            every other float in [0, inf). Values outside raise at optimizer construction and step.
        flash_codecs: optional state -> codec name the "flash" preset stores that state with, where
            the rule's math makes another codec the better default than its fact's (AdEMAMix's
            slow momentum, beta3 = 0.9999, is rounded stochastically: ``softsign_adaptive_sr``).
        choices: optional hyperparameter -> its allowed values (strings or None; the default
            among them). Static like the bool flags: the rule branches on the value in Python
            (torch.optim.Muon's ``adjust_lr_fn``).
        zero_branches: optional float hyperparameters whose value 0 is a static branch: the rule
            is traced with the literal 0 there, so a state only a nonzero value reads gets no
            storage (SGD's momentum buffer at momentum 0, as torch.optim). Other values stay
            runtime inputs. Going from 0 to another value mid-training starts that state at zero.
        shared: optional numbers the whole optimizer shares (Prodigy's step size ``d``), each
            with its start: a number, or the name of a float hyperparameter that gives it. The
            rule reads them as keywords (every parameter's kernel the same value, from the
            device, never synced) and returns their new values after the states'. A new value
            may read the old shared numbers, hyperparameters and ``total(x)``, the sum of ``x``
            over every element of every parameter: computed once the step has seen them all, it
            is read from the next step on. Kept in every param group of the rule as 0-d float64
            tensors (``opt.param_groups[0]["d"]``), so state dicts carry them; their update
            reads the hyperparameters of the rule's groups, which must agree on those it reads.
        starts: optional state -> ``"param"``: the state starts at the parameter's value when its
            state is allocated (Prodigy's initial weight ``p0``), where ``where(step == 1, p,
            state)`` would store it again every step. A state that only keeps its start is
            read and never written.
        param_flags: optional facts of each parameter the rule takes as static keywords and may
            branch on: ``"matrix"`` (2 or more dims: Adafactor factors those, keeps vectors
            whole). States a parameter's branch never touches get no storage for it.

    The decorated function takes ``(p, g, <states in declared order>, *, step, <hyperparameters>,
    <shared numbers>, <param flags>)`` and returns ``(p, <states in declared order>, <new shared
    numbers>)``.
    """

    def wrap(fn: Callable) -> Rule:
        r = Rule(fn, fn.__name__, dict(defaults), dict(states), dict(ranges or {}),
                 dict(flash_codecs or {}), {k: tuple(v) for k, v in (choices or {}).items()},
                 zero_branches=tuple(zero_branches), shared=dict(shared or {}),
                 starts=dict(starts or {}), param_flags=tuple(param_flags))
        for name in r.param_flags:
            if name not in PARAM_FLAGS or name in r.defaults:
                raise ValueError(f"rule {r.name}: param_flags names {name!r}; the facts of a "
                                 f"parameter a rule may take are {sorted(PARAM_FLAGS)}")
        for name in r.zero_branches:
            if name not in r.floats or isinstance(r.defaults[name], tuple):
                raise ValueError(f"rule {r.name}: zero_branches names {name!r}, which is not a "
                                 "float hyperparameter")
        _check_signature(r)
        for name, start in r.starts.items():
            if name not in r.states or r.states[name] == "scalar" or start != "param":
                raise ValueError(f"rule {r.name}: starts={{{name!r}: {start!r}}}; name a "
                                 "per-element state and 'param' (its start: the parameter)")
        for name, start in r.shared.items():
            if name in r.defaults or name in r.states or name == "step":
                raise ValueError(f"rule {r.name}: shared number {name!r} has the name of a "
                                 "hyperparameter, a state or step")
            if not isinstance(start, (int, float)) and start not in r.floats:
                raise ValueError(f"rule {r.name}: shared number {name!r} starts at {start!r}; "
                                 "give a number or the name of a float hyperparameter")
        for name, fact in r.states.items():
            if fact not in STATE_FACTS:
                raise ValueError(
                    f"rule {r.name}: state {name!r} declares fact {fact!r}; use one of {STATE_FACTS}"
                )
        if r.flash_codecs:
            check_codec_spec(r.flash_codecs, r)  # names, scalar states, domains
        trace(r, {k: r.defaults[k] for k in r.flags})  # with default flags: checks the output arity
        if r.shaped:
            _check_shaped(r)
        return r

    return wrap


def _check_signature(r: Rule) -> None:
    params = inspect.signature(r.fn).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    want_pos = len(r.states) + 2
    if len(positional) != want_pos or positional[2:] != list(r.states):
        raise TypeError(
            f"rule {r.name}: positional parameters are {positional}; expected (p, g, "
            f"{', '.join(r.states)}) - the param, its gradient, then the states in declared order"
        )
    want_kw = {"step", *r.defaults, *r.shared, *r.param_flags}
    if set(keywords) != want_kw:
        raise TypeError(
            f"rule {r.name}: keyword-only parameters are {sorted(keywords)}; expected step plus every "
            f"hyperparameter in defaults, every shared number and param flag: {sorted(want_kw)}"
        )
    for k, values in r.choices.items():
        if k not in r.defaults or r.defaults[k] not in values:
            raise TypeError(f"rule {r.name}: choices for {k!r} must include its default "
                            f"{r.defaults.get(k)!r}; got {values}")
    for k, v in r.defaults.items():
        if k in r.choices:
            continue
        ok = isinstance(v, (bool, int, float)) or (
            isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)
        )
        if not ok:
            raise TypeError(
                f"rule {r.name}: hyperparameter {k!r} has default {v!r}; use a bool, a float or "
                "a tuple of floats"
            )


def _check_shaped(r: Rule) -> None:
    """A rule that runs in each parameter's shape (``row_mean``, factored states) steps one
    parameter per call with its math in torch: what it does not support yet is refused here."""
    unsupported = [what for what, present in (
        ("scalar states", r.scalar_states), ("shared numbers", r.shared),
        ("starts", r.starts)) if present]
    if unsupported or r.needs_matrices:
        raise NotImplementedError(
            f"rule {r.name} takes means in the parameter's shape (row_mean, col_mean, mean_all, "
            f"factored states) and {', '.join(unsupported) or 'a matrix stage'}; such rules do not "
            "support those yet")
