"""The launch config each rule's CUDA group kernel is pinned to (flashcompile.compiler.launch)."""

import pytest

from flashcompile.compiler import launch


def test_a_rule_without_an_entry_launches_with_the_default(monkeypatch):
    monkeypatch.delenv(launch.ENVIRONMENT, raising=False)
    monkeypatch.setattr(launch, "CONFIGS", {"rprop": (32, 2)})
    assert launch.config_for("sgd") == (launch.XBLOCK, launch.NUM_WARPS)
    assert launch.config_for("rprop") == (32, 2)


def test_the_environment_overrides_the_table_per_rule(monkeypatch):
    monkeypatch.setattr(launch, "CONFIGS", {"rprop": (32, 2)})
    monkeypatch.setenv(launch.ENVIRONMENT, " adam=8/1, rprop=16/4 ")
    assert launch.config_for("adam") == (8, 1)
    assert launch.config_for("rprop") == (16, 4)
    assert launch.config_for("lion") == (launch.XBLOCK, launch.NUM_WARPS)


@pytest.mark.parametrize("text", ["adam", "adam=8", "adam=8/x", "adam=12/1", "adam=8/0"])
def test_a_malformed_override_is_refused_with_its_form(monkeypatch, text):
    monkeypatch.setenv(launch.ENVIRONMENT, text)
    with pytest.raises(ValueError, match="FLASHCOMPILE_LAUNCH"):
        launch.config_for("adam")


def test_every_pinned_config_names_a_shipped_rule_and_is_a_launchable_pair():
    """A misspelt key would leave its rule at the default without a word."""
    from flashcompile.rules import RULES

    names = {rule.name for rule in RULES.values()}
    for rule, (xblock, warps) in launch.CONFIGS.items():
        assert rule in names, rule
        assert xblock >= 1 and warps >= 1 and not xblock & (xblock - 1) and not warps & (warps - 1)
