"""The drop-in contract, for every shipped optimizer (one registry, no skip table): copies step like
the original, a state reset means fresh state, hooks fire, every load that must fail fails and
changes nothing, and a checkpoint resumes in either order of its two halves.

Eager plans (compile=False): the compiled kernel is not what these properties are about. Each
optimizer runs with the options that give it live states (SGD's momentum buffer exists only with
momentum), on bf16 params, so the master weight is split into the weight and its residual.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import pickle

import pytest
import torch

import flashcompile as fc
from flashcompile.optim.optimizers import OPTIMIZERS
from strategies import rule_of, shapes_for

NAMES = sorted(OPTIMIZERS)
# options under which every state of the optimizer is live (the others' defaults already are)
LIVE = {"sgd": {"momentum": 0.9}, "sgdw": {"momentum": 0.9, "weight_decay": 0.1},
        "rmsprop": {"momentum": 0.9, "centered": True}, "adam": {"amsgrad": True}}
SHAPES = [(30, 20), (7,), (64,)]
SIBLINGS = {"softsign_int8": "linear_int8", "linear_int8": "softsign_int8",
            "sqrt_uint8": "sqrt_uint8_nonzero", "sqrt_uint8_nonzero": "sqrt_uint8",
            "softsign_adaptive": "softsign_int8", "softsign_adaptive_sr": "softsign_int8",
            "sqrt_adaptive_sr": "sqrt_uint8"}


def make(name, params, **options):
    return OPTIMIZERS[name](params, compile=False, **{**LIVE.get(name, {}), **options})


def bf16_params(shapes=SHAPES, seed=0, name=None):
    """bf16 params of ``shapes`` (as matrices for an optimizer that takes only those)."""
    if name is not None:
        shapes = shapes_for(rule_of(OPTIMIZERS[name]), shapes)
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def trained(name, steps=2, **options):
    params = bf16_params(name=name)
    opt = make(name, params, **options)
    for seed in range(steps):
        set_grads(params, seed)
        opt.step()
    return opt, params


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def assert_same_state_dict(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys(), pid
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k])), (pid, k)


def _torch_save(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)),
          "torch_save": _torch_save}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_steps_exactly_like_the_original(name, how, flat):
    opt, params = trained(name, flat=flat)
    twin = COPIES[how](opt)
    assert {k for k in vars(twin) if not k.startswith("_")} == \
        {k for k in vars(opt) if not k.startswith("_")}
    for seed in (5, 6):
        set_grads(params, seed)
        set_grads(params_of(twin), seed)
        opt.step()
        twin.step()
    for p, q in zip(params, params_of(twin)):
        assert torch.equal(p, q)
    assert_same_state_dict(opt.state_dict(), twin.state_dict())


RESETS = {
    "clear": lambda opt, params: opt.state.clear(),
    "del": lambda opt, params: [opt.state.pop(p) for p in params],
    "clear_each": lambda opt, params: [opt.state[p].clear() for p in params],
    "assign_empty": lambda opt, params: [opt.state.__setitem__(p, {}) for p in params],
    "popitem": lambda opt, params: [opt.state.popitem() for _ in params],
    "replace_mapping": lambda opt, params: setattr(opt, "state", collections.defaultdict(dict)),
}


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("how", sorted(RESETS))
@pytest.mark.parametrize("name", NAMES)
def test_a_state_reset_starts_fresh_state_and_the_checkpoint_holds_it(name, how, flat):
    opt, params = trained(name, flat=flat)
    RESETS[how](opt, params)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = make(name, fresh_params, flat=flat)
    set_grads(params, 7)
    set_grads(fresh_params, 7)
    opt.step()
    fresh.step()
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(params)))  # the checkpoint holds the new state
    assert all(float(s["step"]) == 1 for s in sd["state"].values())
    assert_same_state_dict(sd, fresh.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_resetting_one_param_leaves_the_others_stepping_on(name):
    opt, params = trained(name, flat=True)
    rest = copy.deepcopy(opt)
    del opt.state[params[0]]
    set_grads(params, 7)
    set_grads(params_of(rest), 7)
    opt.step()
    rest.step()
    assert float(opt.state[params[0]]["step"]) == 1
    for p, q in zip(params[1:], params_of(rest)[1:]):
        assert torch.equal(p, q)
        assert float(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_hooks_fire_in_order(name):
    opt, params = trained(name)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("step_pre"))
    opt.register_step_post_hook(lambda *a: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda *a: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    set_grads(params, 3)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def _other_codecs(opt):
    """The optimizer's codec mapping with one 8-bit state codec swapped for a sibling whose fields
    have the same dtypes and sizes (their values mean something else)."""
    plans = [opt.plan_for(p, opt.flags_of(opt.param_groups[0])) for p in params_of(opt)]
    state, codec = next((k, c.name) for plan in plans for k, c in plan.codecs.items()
                        if c.name in SIBLINGS)  # Adafactor's matrices keep no 8-bit state
    return {state: SIBLINGS[codec]}


def _edit_state(field_edit):
    def edit(sd, opt):  # the first param with 8-bit codes (Adafactor's matrices have none)
        state = next(st for st in sd["state"].values() if any(k.endswith(".codes") for k in st))
        key = max(k for k in state if k.endswith(".codes"))  # a state's, not the residual
        state[key] = field_edit(state[key])
        return key
    return edit


def _set_step(value):
    def edit(sd, opt):
        sd["state"][0]["step"] = torch.tensor(value)
        return "step"
    return edit


# case -> how the bad state dict is made (the test below builds the first five)
BAD_LOADS = {
    "other_optimizer": None,
    "other_master_weight_codec": None,
    "other_shape_same_group_count": [(31, 19), (7,), (64,)],
    "other_group_count": [(30, 21), (7,), (64,)],
    "one_param_fewer": [(30, 20), (7,)],
    "nan_step": _set_step(math.nan),
    "negative_step": _set_step(-1.0),
    "fractional_step": _set_step(1.5),
    "extra_code_element": _edit_state(lambda t: torch.cat([t, t[:1]])),
    "field_of_another_dtype": _edit_state(lambda t: t.float()),
    "missing_field": None,
}


@pytest.mark.parametrize("case", sorted(BAD_LOADS))
@pytest.mark.parametrize("name", NAMES)
def test_every_load_that_must_fail_fails_and_changes_nothing(name, case):
    opt, params = trained(name)
    before = opt.state_dict()
    before = copy.deepcopy(before)
    weights = [p.detach().clone() for p in params]
    how = BAD_LOADS[case]
    if case == "other_optimizer":
        src, _ = trained("adamw" if name == "lion" else "lion")  # another rule
        bad, match = src.state_dict(), "different optimizer"
    elif case == "other_master_weight_codec":  # its fields belong to the saved model's weights
        src, _ = trained(name, codecs={"param": "weight_split_int16"})
        bad, match = src.state_dict(), "codecs"
    elif isinstance(how, list):
        src_params = bf16_params(how, name=name)
        src = make(name, src_params)
        set_grads(src_params, 0)
        src.step()
        bad = src.state_dict()
        match = "shape|params|expected"
    elif case == "missing_field":
        bad = copy.deepcopy(before)
        key = min(k for k in bad["state"][0] if "." in k)
        del bad["state"][0][key]
        match = "keys"
    else:
        bad = copy.deepcopy(before)
        key = how(bad, opt)
        match = "step count" if key == "step" else f"{key}.*expected"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same_state_dict(opt.state_dict(), before)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


@pytest.mark.parametrize("name", NAMES)
def test_a_load_from_sibling_state_codecs_reencodes_within_the_new_codecs_bound(name):
    """Fields of the same dtypes and sizes that mean something else are never read as ours: a
    state saved with another registered codec is decoded with it and encoded with ours."""
    from flashcompile.codecs.layout import padded

    opt, params = trained(name)
    other = _other_codecs(opt)
    src, src_params = trained(name, codecs=other)
    opt.load_state_dict(src.state_dict())
    for p, q in zip(params, src_params):
        plan = opt.plan_for(p, opt.flags_of(opt.param_groups[0]))
        for state, codec in plan.codecs.items():
            if state == "param":
                continue
            want = padded(src.state_value(q, state), torch.float32)
            got = padded(opt.state_value(p, state), torch.float32)
            if state not in other:
                assert torch.equal(got, want), state
            else:
                assert ((got - want).abs() <= codec.error_bound(want)).all(), state


class Net(torch.nn.Module):
    def __init__(self, seed, bias=True):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(64, 48, bias), torch.nn.Linear(48, 5, bias)


def net(name, seed):
    """Two linear layers; without biases for an optimizer of matrices only."""
    return Net(seed, bias=not rule_of(OPTIMIZERS[name]).needs_matrices)


def _resumed(name, order):
    model = fc.cast_model(net(name, 0))
    opt = make(name, model.parameters())
    params = list(model.parameters())
    for seed in range(3):
        set_grads(params, seed)
        opt.step()
    weights, osd = fc.fp32_state_dict(model, opt), opt.state_dict()
    model2 = fc.cast_model(net(name, 1))
    opt2 = make(name, model2.parameters())
    if order == "fp32_first":
        fc.load_fp32_state_dict(model2, opt2, weights)
        opt2.load_state_dict(osd)
    else:
        opt2.load_state_dict(osd)
        fc.load_fp32_state_dict(model2, opt2, weights)
    return (model, opt), (model2, opt2)


@pytest.mark.parametrize("order", ["fp32_first", "optimizer_first"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_in_either_order_restores_the_weight_split_exactly(name, order):
    """Exported fp32 weights import as the same (bf16 weight, residual) pair the export decoded,
    so the optimizer's residual and the model's weight agree whichever half loads first."""
    (model, opt), (model2, opt2) = _resumed(name, order)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.master_weight(p), opt2.master_weight(q))
    set_grads(list(model.parameters()), 9)
    set_grads(list(model2.parameters()), 9)
    opt.step()
    opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("saver, loader, decoupled", [
    ("adam", "adamw", True), ("adamw", "adam", True), ("sgd", "sgdw", True),
    ("sgdw", "sgd", False)])
def test_a_twins_state_dict_keeps_the_loading_class_update(saver, loader, decoupled):
    src, _ = trained(saver)
    opt, _ = trained(loader)
    opt.load_state_dict(src.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is decoupled


@pytest.mark.parametrize("name", NAMES)
def test_loading_a_state_dict_without_names_keeps_the_groups_names(name):
    model = net(name, 0)
    opt = make(name, model.named_parameters())
    src = make(name, net(name, 1).parameters())
    opt.load_state_dict(src.state_dict())
    assert opt.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in
                                                                 model.named_parameters()]
