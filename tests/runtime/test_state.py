"""optimizer.state counts its changes (flashcompile.runtime.state), so flat buckets check each param's
state only after one; copies keep counting."""

import copy
import pickle

import pytest
import torch

from flashcompile.runtime.state import OptimizerState, ParamState

KEY = torch.zeros(1)
CHANGES = {
    "set": lambda st: st.__setitem__(KEY, ParamState()),
    "new_by_lookup": lambda st: st[torch.zeros(1)],
    "del": lambda st: st.__delitem__(KEY),
    "pop": lambda st: st.pop(KEY),
    "popitem": lambda st: st.popitem(),
    "clear": lambda st: st.clear(),
    "update": lambda st: st.update({torch.zeros(1): ParamState()}),
    "param_set": lambda st: st[KEY].__setitem__("step", torch.tensor(0.0)),
    "param_del": lambda st: st[KEY].__delitem__("step"),
    "param_clear": lambda st: st[KEY].clear(),
    "param_pop": lambda st: st[KEY].pop("step"),
    "param_update": lambda st: st[KEY].update(step=torch.tensor(2.0)),
    "param_setdefault": lambda st: st[KEY].setdefault("other", 1),
}


def _state() -> OptimizerState:
    st = OptimizerState()
    st[KEY]["step"] = torch.tensor(1.0)
    return st


@pytest.mark.parametrize("how", sorted(CHANGES))
def test_every_change_to_the_mapping_or_a_params_dict_moves_the_counter(how):
    st = _state()
    before = st.changes.count
    st[KEY]["step"].add_(1)  # in place: not a change
    assert st.changes.count == before
    CHANGES[how](st)
    assert st.changes.count > before


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))])
def test_a_copy_is_tracked_and_its_dicts_count_in_its_own_counter(copier):
    st = _state()
    other = copier(st)
    assert type(other) is OptimizerState and other.tracked
    (key,) = other
    assert type(other[key]) is ParamState and float(other[key]["step"]) == 1.0
    before, mine = other.changes.count, st.changes.count
    other[key].clear()
    assert other.changes.count > before and st.changes.count == mine


def test_a_plain_dict_assigned_by_hand_turns_tracking_off():
    st = _state()
    st[torch.zeros(1)] = {"step": torch.tensor(0.0)}
    assert not st.tracked


def test_a_shallow_copy_shares_the_dicts_and_both_mappings_count_their_changes():
    st = _state()
    other = copy.copy(st)
    before, mine = other.changes.count, st.changes.count
    st[KEY].clear()
    assert st.changes.count > mine and other.changes.count > before
