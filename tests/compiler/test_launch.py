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


def test_an_override_naming_no_shipped_rule_warns_and_still_reaches_a_rule_of_that_name(
        monkeypatch):
    launch._warn_if_unknown.cache_clear()
    monkeypatch.setenv(launch.ENVIRONMENT, "AdamW=8/1")
    with pytest.warns(RuntimeWarning, match=r"'AdamW' \(keys are rule names: .*adam,"):
        assert launch.config_for("adam") == launch.CONFIGS["adam"]  # AdamW is not adam
    monkeypatch.setenv(launch.ENVIRONMENT, "my_rule=32/2")
    with pytest.warns(RuntimeWarning, match="'my_rule'"):
        assert launch.config_for("my_rule") == (32, 2)


def test_an_override_of_a_shipped_rule_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setenv(launch.ENVIRONMENT, "adam=8/1")
    launch._warn_if_unknown.cache_clear()
    assert launch.config_for("adam") == (8, 1)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
