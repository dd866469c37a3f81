"""The plugin loader: built-ins through entry points, and every way a plugin can be broken."""

from __future__ import annotations

import pytest
from conftest import load_case

import newllm_kit.registry
from newllm_kit.errors import PluginError
from newllm_kit.plugins import load_plugins


def test_builtins_load_through_the_entry_point_group() -> None:
    plugins = load_plugins()
    ok = {i.name: i for i in plugins.infos if i.status == "ok"}
    assert ok["cvfp"].distribution == "newllm-kit"
    assert "cvfp" in plugins.registry.names("architecture")
    assert {"cvfp", "gradual-decrease"} <= set(plugins.registry.names("solver"))
    assert {"ppl", "accuracy", "effective_rank", "convergence_rate"} <= set(plugins.registry.names("metric"))
    assert {"cpu", "gpu", "auto", "ddp"} <= set(plugins.registry.names("runner"))
    assert {"ultrachat", "text", "embedded", "synthetic"} <= set(plugins.registry.names("data_source"))
    assert {"gpt2", "bpe", "bytes"} <= set(plugins.registry.names("tokenizer"))
    assert not plugins.problems()


def test_autoload_can_be_disabled(no_autoload: None) -> None:
    plugins = load_plugins()
    assert all(i.status == "disabled" for i in plugins.infos)
    assert plugins.registry.names("architecture") == []


def test_named_plugins_load_when_autoload_is_off(no_autoload: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWLLM_KIT_PLUGINS", "metrics")
    plugins = load_plugins()
    assert "ppl" in plugins.registry.names("metric")
    assert plugins.registry.names("architecture") == []


def test_disable_one_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWLLM_KIT_DISABLE_PLUGINS", "gradual_decrease")
    plugins = load_plugins()
    assert "gradual-decrease" not in plugins.registry.names("solver")
    assert "cvfp" in plugins.registry.names("solver")


def test_good_plugin_registers_with_attribution(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("good", load_case("good"))])
    component = plugins.registry.get("metric", "constant")
    assert component.plugin == "good"
    assert plugins.infos[-1].components == {"metric": ["constant"]}


def test_misspelt_hook_is_reported_with_a_suggestion(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("typo", load_case("typo_hook")), ("good", load_case("good"))])
    typo = next(i for i in plugins.infos if i.name == "typo")
    assert typo.status == "broken"
    assert "'register_metric'" in (typo.error or "") and "'register_metrics'" in (typo.error or "")
    assert "constant" in plugins.registry.names("metric")  # the others still load


def test_duplicate_component_names_name_both_plugins(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("good", load_case("good")), ("dup", load_case("duplicate_name"))])
    with pytest.raises(PluginError, match=r"'good' and 'dup'"):
        plugins.registry.get("metric", "constant")
    assert any(i.status == "conflict" for i in plugins.infos)


def test_raising_hook_is_broken_and_leaves_nothing_behind(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("raiser", load_case("raising_hook"))])
    info = plugins.infos[-1]
    assert info.status == "broken" and "~/.half not found" in (info.error or "")
    assert "half" not in plugins.registry.names("metric")
    with pytest.raises(PluginError, match="raiser"):
        plugins.registry.get("metric", "half")


def test_strict_mode_raises_on_the_first_problem(no_autoload: None) -> None:
    with pytest.raises(PluginError, match="typo"):
        load_plugins(extra=[("typo", load_case("typo_hook"))], strict=True)


def test_broken_import_is_reported_and_others_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real entry point whose module fails to import: name, distribution and reason are shown."""
    from conftest import make_fake_dist

    make_fake_dist(tmp_path, monkeypatch, "broken-dist", "1.2", {"broken": "newllm_broken_case"},
                   {"newllm_broken_case.py": "import newllm_kit_missing_dependency\n"})
    plugins = load_plugins()
    info = next(i for i in plugins.infos if i.name == "broken")
    assert info.status == "broken"
    assert info.distribution == "broken-dist" and info.version == "1.2"
    assert "newllm_kit_missing_dependency" in (info.error or "")
    assert "cvfp" in plugins.registry.names("architecture")


def test_unknown_component_suggests_the_closest_name() -> None:
    plugins = load_plugins()
    with pytest.raises(PluginError, match="did you mean 'gradual-decrease'"):
        plugins.registry.get("solver", "gradual-decrese")


@pytest.mark.parametrize(("case", "reason"), [
    ("exiting_hook", "register_metrics raised SystemExit: sys.exit(4) was called"),
    ("base_exception_hook", "register_metrics raised Escape: escaped the Exception hierarchy"),
])
def test_a_hook_that_exits_or_raises_base_exception_is_broken_not_fatal(no_autoload: None, case: str,
                                                                         reason: str) -> None:
    plugins = load_plugins(extra=[(case, load_case(case)), ("good", load_case("good"))])
    info = next(i for i in plugins.infos if i.name == case)
    assert info.status == "broken" and info.error == reason
    assert info.traceback is not None and info.traceback.startswith("Traceback") and case in info.traceback
    assert "quits" not in plugins.registry.names("metric")
    assert "constant" in plugins.registry.names("metric")  # the others still load


def test_a_module_that_exits_at_import_is_broken_and_the_cli_still_works(tmp_path, monkeypatch) -> None:
    from conftest import make_fake_dist
    from test_cli import cli

    make_fake_dist(tmp_path, monkeypatch, "exit-dist", "0.1", {"exits": "newllm_exit_case"},
                   {"newllm_exit_case.py": "import sys\nsys.exit('no GPU here')\n"})
    plugins = load_plugins()
    info = next(i for i in plugins.infos if i.name == "exits")
    assert info.status == "broken" and info.error == "SystemExit: sys.exit('no GPU here') was called"
    assert "newllm_exit_case.py" in (info.traceback or "")
    assert "cvfp" in plugins.registry.names("architecture")
    result = cli("--version", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.startswith("newllm-kit ")
    assert "exits" in result.stderr and "\n" not in result.stderr.strip()


def test_a_duplicate_disables_only_that_name(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("good", load_case("good")), ("dup", load_case("duplicate_and_more"))])
    dup = next(i for i in plugins.infos if i.name == "dup")
    assert dup.status == "conflict" and "'constant'" in (dup.error or "")
    assert plugins.registry.get("metric", "also-here").plugin == "dup"
    assert dup.components == {"metric": ["also-here"]}
    with pytest.raises(PluginError, match=r"registered by plugins 'good' and 'dup'"):
        plugins.registry.get("metric", "constant")
    with pytest.raises(PluginError, match=r"unknown metric 'constnt'.*metric 'constant' is disabled: "
                                          r"registered by plugins 'good' and 'dup'"):
        plugins.registry.get("metric", "constnt")


@pytest.mark.parametrize("order", [["uses_kind", "declares_kind"], ["declares_kind", "uses_kind"]])
def test_a_plugin_declares_a_kind_any_plugin_can_register(no_autoload: None, order: list[str]) -> None:
    plugins = load_plugins(extra=[(name, load_case(name)) for name in order])
    assert [i.status for i in plugins.infos if i.name in order] == ["ok", "ok"]
    assert plugins.registry.get("widget", "knob").plugin == "uses_kind"
    assert next(i for i in plugins.infos if i.name == "uses_kind").components == {"widget": ["knob"]}


def test_a_kind_nobody_declares_is_an_unknown_hook(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("uses_kind", load_case("uses_kind"))])
    info = next(i for i in plugins.infos if i.name == "uses_kind")
    assert info.status == "broken"
    assert info.error == ("unknown hook 'register_widgets' (no loaded plugin declares the kind 'widget': "
                          "install or enable the one that does)")


@pytest.mark.parametrize(("case", "reason"), [
    ("bad_kinds", "PluginError: hookspec 'widgets': a plugin declares kinds only, as register_<kind>s(register)"),
    ("redeclares_kind", "PluginError: hookspec 'register_metrics' is already declared (by the core or another plugin)"),
])
def test_a_malformed_kind_declaration_breaks_only_its_plugin(no_autoload: None, case: str, reason: str) -> None:
    plugins = load_plugins(extra=[(case, load_case(case)), ("good", load_case("good"))])
    info = next(i for i in plugins.infos if i.name == case)
    assert info.status == "broken" and info.error == reason
    assert plugins.registry.get("metric", "constant").plugin == "good"


def test_the_cvfp_recipe_declares_the_solver_kind() -> None:
    plugins = load_plugins()
    assert plugins.registry.get("solver", "cvfp").plugin == "fixed_point"
    assert "solver" not in newllm_kit.registry.KINDS
