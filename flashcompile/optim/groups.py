"""Param groups of different rules in one optimizer, and the split of a model's parameters that
Muon wants (its matrices, AdamW for the rest).

A group names its rule with ``"rule"``: a :class:`~flashcompile.language.dsl.Rule`, or the name of a
drop-in class (``"adamw"``, ``"muon"``, ...), whose defaults the group then takes (AdamW's weight
decay of 0.01 and decoupled decay, not Adam's)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from flashcompile.language.dsl import Rule
from flashcompile.optim.hyperparameters import IMPLEMENTATION_FLAGS


def resolve(spec: Rule | str) -> tuple[Rule, dict[str, Any]]:
    """The rule a group names and the defaults its group takes."""
    if isinstance(spec, Rule):
        return spec, dict(spec.defaults)
    if isinstance(spec, str):
        return _class_defaults(spec.lower())
    raise TypeError(f"a param group's rule must be a flashcompile.rule or the name of a "
                    f"flashcompile optimizer class, got {type(spec).__name__} {spec!r}")


@functools.lru_cache(maxsize=None)
def _class_defaults(name: str) -> tuple[Rule, dict[str, Any]]:
    from flashcompile.optim.optimizers import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ValueError(f"no optimizer named {name!r}; the drop-in classes: {sorted(OPTIMIZERS)}")
    probe = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1, 1))], compile=False)
    defaults = {k: v for k, v in probe.defaults.items() if k not in IMPLEMENTATION_FLAGS}
    return probe.rule, {**defaults, **probe.fixed_hyperparameters}


# words in a parameter's name that mark it as an embedding or an output head: Muon is for the
# hidden layers' matrices (arXiv 2502.16982 keeps embeddings and the head on AdamW)
HEAD_WORDS = ("embed", "wte", "wpe", "lm_head", "head", "classifier")


def muon_groups(model: torch.nn.Module, *, matrices: str | Rule = "muon",
                others: str | Rule = "adamw", exclude: Sequence[str] = HEAD_WORDS,
                matrix_options: dict[str, Any] | None = None,
                other_options: dict[str, Any] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Param groups for one optimizer: the hidden layers' 2-D weights under ``matrices`` (Muon),
    every other trainable parameter (1-D params, convolution kernels, embeddings and the output
    head: an ``nn.Embedding``'s weight, or a name containing one of ``exclude``) under ``others``
    (AdamW). Returns the groups and, per parameter name, the rule it went to (to print or check).

    A weight tied to another (GPT-2's head and token embedding) is listed once, under its first
    name."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    chosen: dict[str, str] = {}
    split: dict[bool, list[tuple[str, torch.nn.Parameter]]] = {True: [], False: []}
    for name, p in model.named_parameters():  # each Parameter once, tied ones included
        if not p.requires_grad:
            continue
        lowered = name.lower()
        is_matrix = (p.dim() == 2 and id(p) not in embeddings
                     and not any(word in lowered for word in exclude))
        split[is_matrix].append((name, p))
    groups = []
    for is_matrix, rule, options in ((True, matrices, matrix_options),
                                     (False, others, other_options)):
        if not split[is_matrix]:
            continue
        label = rule if isinstance(rule, str) else rule.name
        chosen.update({name: label for name, _ in split[is_matrix]})
        groups.append({"params": [p for _, p in split[is_matrix]],
                       "param_names": [name for name, _ in split[is_matrix]],
                       "rule": rule, **(options or {})})
    return groups, chosen


def describe(chosen: dict[str, str]) -> str:
    """``muon_groups``' assignment as lines ``rule: name, name, ...``."""
    by_rule: dict[str, list[str]] = {}
    for name, rule in chosen.items():
        by_rule.setdefault(rule, []).append(name)
    return "\n".join(f"{rule} ({len(names)}): {', '.join(names)}" for rule, names in by_rule.items())

