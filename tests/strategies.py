"""Hypothesis strategies shared by the tests: shapes, values with special cases, seeds."""

from __future__ import annotations


import torch
from hypothesis import strategies as st

# Odd sizes, 1-element tensors, multi-dim; sizes straddle the group size of 32.
from flashcompile.testing import seeds, shape_lists, shapes  # noqa: E402,F401


@st.composite
def value_tensors(draw, groups: int | None = None, nonnegative: bool = False) -> torch.Tensor:
    """fp32 (G, 32) values: a random magnitude per group plus injected special values."""
    g = groups or draw(st.integers(min_value=1, max_value=6))
    gen = torch.Generator().manual_seed(draw(seeds))
    exps = torch.tensor(draw(st.lists(st.integers(-30, 30), min_size=g, max_size=g)), dtype=torch.float32)
    x = torch.randn(g, 32, generator=gen) * torch.exp2(exps)[:, None]
    specials = [0.0, -0.0, 1e-40, -1e-42, 2.0**-126, 1e30, -1e30, 1e-30, 1.0, -1.0]
    for idx, val in draw(st.lists(st.tuples(st.integers(0, g * 32 - 1), st.sampled_from(specials)),
                                  max_size=6)):
        x.view(-1)[idx] = val
    return x.abs() if nonnegative else x


def all_flags(rule):
    """Every setting of a rule's static hyperparameters, as the dicts ``trace`` takes."""
    yield from rule.flag_settings()


def rule_of(cls):
    """The rule behind a drop-in optimizer class."""
    return cls([torch.nn.Parameter(torch.zeros(1, 1))], compile=False).rule


def shapes_for(rule, shapes):
    """``shapes`` as a rule can step them: a rule with a matrix stage (Muon) takes matrices only,
    so a vector of n values becomes an (n, 1) matrix; any other rule takes them as they are."""
    if not rule.needs_matrices:
        return list(shapes)
    return [tuple(s) if len(s) == 2 else (s[0], 1) if len(s) == 1
            else (s[0], int(torch.Size(s[1:]).numel())) for s in shapes]
