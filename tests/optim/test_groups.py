"""Param groups of different rules in one optimizer (Muon's matrices beside AdamW's other params),
and the helper that splits a model's parameters that way."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import flashcompile as fc
from flashcompile.optim.groups import describe, muon_groups


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 40, bias=False)

    def forward(self, x):
        h = self.conv(self.embed(x).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(self.l2(torch.relu(self.l1(h)))))


def _loss(model, step):
    x = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(step))
    return nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())


def test_muon_groups_puts_hidden_matrices_under_muon_and_the_rest_under_adamw():
    groups, chosen = muon_groups(Net())
    assert chosen == {"embed.weight": "adamw", "conv.weight": "adamw", "conv.bias": "adamw",
                      "l1.weight": "muon", "l1.bias": "adamw", "l2.weight": "muon",
                      "l2.bias": "adamw", "norm.weight": "adamw", "norm.bias": "adamw",
                      "head.weight": "adamw"}
    assert describe(chosen).splitlines()[0] == "muon (2): l1.weight, l2.weight"
    assert [g["rule"] for g in groups] == ["muon", "adamw"]


def test_a_tied_weight_is_listed_once():
    model = Net()
    model.head.weight = model.embed.weight
    _, chosen = muon_groups(model)
    assert "head.weight" not in chosen and chosen["embed.weight"] == "adamw"


@pytest.mark.parametrize("flat", [False, True], ids=["per_tensor", "flat"])
def test_each_group_steps_as_an_optimizer_of_its_own_rule_alone(flat):
    """One optimizer with a Muon group and an AdamW group, and a scheduler over both, moves every
    param exactly as a Muon and an AdamW optimizer side by side."""
    mixed, apart = Net(), Net()
    groups, _ = muon_groups(mixed, matrix_options={"lr": 0.02}, other_options={"lr": 3e-3})
    opt = fc.Muon(groups, compile=False, flat=flat)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    split, _ = muon_groups(apart)
    muon = fc.Muon(split[0]["params"], lr=0.02, compile=False, flat=flat)
    adamw = fc.AdamW(split[1]["params"], lr=3e-3, compile=False, flat=flat)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (muon, adamw)]
    for step in range(4):
        _loss(mixed, step).backward()
        _loss(apart, step).backward()
        for o in (opt, muon, adamw):
            o.step()
            o.zero_grad()
        for s in (sched, *scheds):
            s.step()
    assert opt.param_groups[1]["weight_decay"] == 0.01  # AdamW's default, not Muon's 0.1
    for p, q in zip(mixed.parameters(), apart.parameters()):
        assert torch.equal(p, q)


def test_a_mixed_state_dict_loads_weights_only_and_refuses_other_rules():
    model = Net()
    groups, _ = muon_groups(model)
    opt = fc.Muon(groups, compile=False)
    _loss(model, 0).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["param_groups"][1]["rule"] == "adam"
    again = fc.Muon(muon_groups(Net(1))[0], compile=False)
    again.load_state_dict(saved)
    for p, q in zip(opt.param_groups[1]["params"], again.param_groups[1]["params"]):
        assert torch.equal(opt.state_value(p, "exp_avg"), again.state_value(q, "exp_avg"))
    other = fc.Muon(muon_groups(Net(1), others="lion")[0], compile=False)
    with pytest.raises(ValueError, match="different optimizer"):
        other.load_state_dict(saved)


def test_a_group_may_name_its_rule_by_the_rule_itself():
    @fc.rule(defaults=dict(lr=0.1), states={})
    def plain_sgd(p, g, *, step, lr):
        return (p - lr * g,)

    a, b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(3))
    opt = fc.Muon([{"params": [a]}, {"params": [b], "rule": plain_sgd}], compile=False)
    a.grad, b.grad = torch.ones(4, 4), torch.ones(3)
    opt.step()
    assert torch.allclose(b, torch.full((3,), 0.9))
    assert opt.param_groups[1]["rule"] == "plain_sgd"


def test_a_codecs_mapping_applies_to_each_rule_that_has_the_state_and_refuses_unknown_ones():
    a, b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4))
    opt = fc.Muon([{"params": [a]}, {"params": [b], "rule": "adamw"}], compile=False,
                  codecs={"momentum_buffer": "fp32", "exp_avg_sq": "sqrt_uint8_nonzero"})
    a.grad, b.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    assert "momentum_buffer" in opt.state[a] and "exp_avg_sq.codes" in opt.state[b]
    with pytest.raises(ValueError, match="unknown state 'exp_avgs'"):
        fc.Muon([{"params": [a]}, {"params": [b], "rule": "adamw"}], codecs={"exp_avgs": "fp32"})
    with pytest.raises(ValueError, match="nonnegative"):  # a signed state's codec checked too
        fc.Muon([{"params": [a]}, {"params": [b], "rule": "adamw"}],
                codecs={"exp_avg": "sqrt_uint8"})
