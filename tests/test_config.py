"""Experiment files: validation messages, overrides, limits, and the resolved round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from newllm_kit_plugins.cvfp.recipe import CVFPRecipeSettings
from pydantic import BaseModel, ConfigDict, Field

from newllm_kit.config import apply_override, load_config, parse_override
from newllm_kit.errors import ConfigError, PluginError
from newllm_kit.registry import KINDS, Component, Registry


class ArchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    layers: int = Field(6, ge=1)
    context_dim: int = Field(768, ge=1)
    dropout: float = Field(0.0, ge=0.0, le=1.0)


class SolverSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    learning_rate: float = Field(0.002, gt=0)
    max_iterations: int = Field(40, ge=1)
    path: str | None = None


class Anything:
    """Has every member any protocol asks for: these tests are about settings, not components."""

    default_recipe = "cvfp"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return Anything()


def _registry() -> Registry:
    registry = Registry(kinds=(*KINDS, "solver"))  # the kind the cvfp recipe declares

    def factory(settings: Any) -> Any:
        return Anything()

    for kind, name, model in [("architecture", "cvfp", ArchSettings), ("solver", "cvfp", SolverSettings),
                              ("data_source", "ultrachat", SolverSettings), ("tokenizer", "gpt2", None),
                              ("embedding", "gpt2", None), ("runner", "auto", None), ("launcher", "sequential", None),
                              ("metric", "ppl", None),
                              ("metric", "accuracy", None), ("metric", "effective_rank", None),
                              ("metric", "convergence_rate", None)]:
        registry.add(Component(kind, name, factory, "test", model))
    registry.add(Component("recipe", "cvfp", factory, "test", CVFPRecipeSettings))
    return registry


MINIMAL = '[[models]]\nlabel = "A"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_defaults_reproduce_the_seed_v2_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), _registry())
    resolved = config.resolved()
    assert resolved["experiment"]["samples"] == [500, 1000]
    assert resolved["data"]["val"] == {"start": 1000, "count": 50}
    assert resolved["data"]["text"] == "first_turn"
    assert resolved["phase2"]["patience"] == 1 and resolved["phase2"]["learning_rate"] == 0.001
    assert resolved["models"][0] == {"label": "A", "architecture": "cvfp", "layers": 6, "context_dim": 768,
                                     "dropout": 0.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[experiment]\nsampels = [1]\n' + MINIMAL, r"experiment\.sampels: unknown key; did you mean 'samples'"),
        ('[[models]]\nlabel = "A"\nlayerz = 4\n', r"models\.0\.layerz: unknown key; did you mean 'layers'"),
        ('[[models]]\nlabel = "A"\nlayers = "six"\n', r"models\.0\.layers: .*integer.*'six'"),
        ('[[models]]\nlabel = "A"\nlayers = 0\n', r"models\.0\.layers: .*greater than or equal to 1"),
        ('[solver]\nlearning_rate = nan\n' + MINIMAL, r"solver\.learning_rate: non-finite value"),
        ('[phase2]\nlearning_rate = inf\n' + MINIMAL, r"phase2\.learning_rate: non-finite"),
        ('[phase2]\nepochs = -1\n' + MINIMAL, r"phase2\.epochs"),
        ('[experiment]\nname = "../escape"\n' + MINIMAL, r"experiment\.name: .*no '\.\.'"),
        ('[experiment]\nsamples = [10, 10]\n' + MINIMAL, r"experiment\.samples: .*distinct"),
        ('[data]\ntext = "all"\n' + MINIMAL, r"data\.text: .*first_turn"),
        (MINIMAL + '[[models]]\nlabel = "A"\n', r"models\.1\.label: duplicate label 'A'"),
        ('[phase2]\nbatch_size = 0\n' + MINIMAL,
         r"phase2\.batch_size: Input should be greater than or equal to 1 or Input should be 'auto' \(got 0\)$"),
        ("[experiment]\n", r"models: Field required"),
        ("models = [", r"invalid TOML"),
    ],
)
def test_bad_input_gives_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, _registry())
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_unknown_component_name_is_a_plugin_error_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[solver]\nname = "cvpf"\n' + MINIMAL)
    with pytest.raises(PluginError, match=r"solver: unknown solver 'cvpf'; did you mean 'cvfp'"):
        load_config(path, _registry())


def test_component_without_settings_rejects_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab: unknown key \(tokenizer 'gpt2' takes no settings\)"):
        load_config(write(tmp_path, '[tokenizer]\nvocab = 3\n' + MINIMAL), _registry())


def test_large_files_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n" + MINIMAL)
    with pytest.raises(ConfigError, match="limited to 1 MiB"):
        load_config(big, _registry())
    deep = write(tmp_path, "a = " + "[" * 40 + "]" * 40 + "\n" + MINIMAL)
    with pytest.raises(ConfigError, match="nesting too deep"):
        load_config(deep, _registry())
    deeper = write(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"nesting too deep|invalid TOML"):
        load_config(deeper, _registry())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read experiment file"):
        load_config(tmp_path / "nope.toml", _registry())


def test_overrides_reach_list_elements_and_create_tables(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), _registry(),
                         ["models.0.layers=4", 'data.source="ultrachat"', "phase2.epochs=3",
                          "solver.path=some/dir"])
    resolved = config.resolved()
    assert resolved["models"][0]["layers"] == 4
    assert resolved["phase2"]["epochs"] == 3
    assert resolved["solver"]["path"] == "some/dir"


@pytest.mark.parametrize("text", ["models.3.layers=4", "noequals", "=3", "a..b=1"])
def test_bad_overrides(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config(write(tmp_path, MINIMAL), _registry(), [text])


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="is a value, not a table"):
        apply_override({"a": 1}, "a.b=2")


def test_bare_words_are_strings_and_literals_are_typed() -> None:
    assert parse_override("data.source=embedded") == (["data", "source"], "embedded")
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=1e-3") == (["x"], 0.001)


overrides = st.fixed_dictionaries(
    {},
    optional={
        "models.0.layers": st.integers(1, 64),
        "models.0.context_dim": st.integers(1, 4096),
        "models.0.dropout": st.floats(0, 1, allow_nan=False),
        "solver.learning_rate": st.floats(1e-9, 10, allow_nan=False),
        "solver.max_iterations": st.integers(1, 1000),
        "solver.path": st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
        "phase2.epochs": st.integers(1, 50),
        "phase2.restore_best": st.booleans(),
        "experiment.seed": st.integers(0, 2**31),
        "experiment.samples": st.lists(st.integers(1, 10**6), min_size=1, max_size=5, unique=True),
        "data.val.start": st.integers(0, 10**6),
        "data.text": st.sampled_from(["first_turn", "first_turn_128", "all_turns", "all_turns_space_512"]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=overrides)
def test_resolved_config_round_trips(tmp_path: Path, values: dict[str, Any]) -> None:
    import tomli_w

    texts = [f"{key}={tomli_w.dumps({'v': value})[4:].strip()}" for key, value in values.items()]
    registry = _registry()
    config = load_config(write(tmp_path, MINIMAL), registry, texts)
    again_path = tmp_path / "resolved.toml"
    again_path.write_text(config.resolved_toml())
    again = load_config(again_path, registry)
    assert again.resolved() == config.resolved()
    assert again.schema.experiment == config.schema.experiment
    recipe, recipe_again = config.recipes["cvfp"].settings, again.recipes["cvfp"].settings
    assert recipe is not None and recipe_again is not None
    assert recipe_again.phase2 == recipe.phase2  # type: ignore[attr-defined]
    solver, solver_again = recipe.solver._choice, recipe_again.solver._choice  # type: ignore[attr-defined]
    for before, after in [(solver, solver_again), (config.data_source, again.data_source),
                          (config.models[0][1], again.models[0][1])]:
        assert after.settings == before.settings


@pytest.mark.parametrize("label", ["../../../../tmp/victim", "a/b", "..", "a..b", ".hidden", "a\x00b", "A\n",
                                   "x" * 101, "", "two words"])
def test_model_labels_cannot_leave_the_run_directory(tmp_path: Path, label: str) -> None:
    import tomli_w

    path = write(tmp_path, tomli_w.dumps({"models": [{"label": "A"}, {"label": label}]}))
    with pytest.raises(ConfigError, match=r"models\.1\.label: must be 1–100 letters") as caught:
        load_config(path, _registry())
    assert "\n" not in str(caught.value)


def test_experiment_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"experiment\.name: must be"):
        load_config(write(tmp_path, '[experiment]\nname = "runs\\n"\n' + MINIMAL), _registry())
    assert load_config(write(tmp_path, MINIMAL), _registry(), ["models.0.label=" + "x" * 100])


@pytest.mark.parametrize(("override", "message"), [
    ("experiment.seed=4294967296", r"experiment\.seed: must be between 0 and 4,294,967,295 \(got 4294967296\)"),
    ("experiment.samples=[10, 10000000000]", r"experiment\.samples: .*between 1 and 1,000,000,000"),
    ("data.train_start=1000000001", r"data\.train_start: must be between 0 and 1,000,000,000"),
    ("data.val.start=99999999999", r"data\.val\.start: must be between 0 and 1,000,000,000"),
    ("data.val.count=9223372036854775807", r"data\.val\.count: must be between 1 and 1,000,000,000"),
    ("solver.max_iterations=9223372036854775808", r"solver\.max_iterations: integer outside the 64-bit range"),
    ("phase2.epochs=-99999999999999999999999", r"phase2\.epochs: integer outside the 64-bit range"),
])
def test_numbers_that_would_overflow_later_are_refused_with_their_range(tmp_path: Path, override: str,
                                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), _registry(), [override])


def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid TOML: an integer with thousands of digits"):
        load_config(write(tmp_path, "[experiment]\nseed = " + "9" * 5000 + "\n" + MINIMAL), _registry())
    with pytest.raises(ConfigError, match=r"experiment\.seed: .*\(got '99999.*…\)$"):
        load_config(write(tmp_path, MINIMAL), _registry(), ["experiment.seed=" + "9" * 5000])


@pytest.fixture(scope="module")
def builtins() -> Registry:
    from newllm_kit.plugins import load_plugins

    return load_plugins().registry


@pytest.mark.parametrize(("override", "message"), [
    ("models.0.layers=100000", r"models\.0\.layers: must be between 1 and 1,024 \(got 100000\)"),
    ("models.0.context_dim=1099511627776", r"models\.0\.context_dim: must be between 1 and 1,048,576"),
    ("models.0.num_input_tokens=1000", r"models\.0\.num_input_tokens: must be between 1 and 64"),
    ("solver.max_iterations=1000000000000", r"solver\.max_iterations: must be between 1 and 1,000,000"),
    ("solver.batch_size=10000000000", r"solver\.batch_size: must be between 1 and 1,000,000,000"),
    ("solver.min_converged_ratio=2.0", r"solver\.min_converged_ratio: must be between 0 and 1 \(got 2\.0\)"),
    ("tokenizer.expect_vocab=1000000000000", r"tokenizer\.expect_vocab: must be between 1 and 16,777,216"),
    ("experiment.metrics=['effective_rank']", None),
])
def test_builtin_integer_settings_have_upper_bounds(tmp_path: Path, builtins: Registry, override: str,
                                                    message: str | None) -> None:
    if message is None:
        load_config(write(tmp_path, MINIMAL), builtins, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), builtins, [override])


@pytest.mark.parametrize(("text", "message"), [
    ('data = { source = "synthetic", order = 10000000000 }', r"data\.order: must be between 1 and 23"),
    ('data = { source = "synthetic", seed = 4294967296 }', r"data\.seed: must be between 0 and 4,294,967,295"),
    ('data = { source = "synthetic", docs = 100000000000 }', r"data\.docs: must be between 1 and 10,000,000"),
    ('tokenizer = { name = "bpe", vocab_size = 100000000000 }', r"tokenizer\.vocab_size: must be between 256"),
    ('tokenizer = { name = "bpe", min_frequency = 18446744073709551 }', r"tokenizer\.min_frequency: must be"),
])
def test_plugin_integer_settings_have_upper_bounds(tmp_path: Path, builtins: Registry, text: str,
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text + "\n" + MINIMAL), builtins)


def wrong_kind_registry() -> Registry:
    from conftest import load_case

    from newllm_kit.plugins import load_plugins

    return load_plugins(extra=[("wrong_kind", load_case("wrong_kind"))]).registry


@pytest.mark.parametrize(("text", "message"), [
    ('[[models]]\nlabel = "H"\narchitecture = "hollow"\n',
     r"exp\.toml: models\.0: plugin 'wrong_kind': architecture 'hollow' builds HollowModel, which lacks "
     r"'param_counts' required by newllm_kit\.protocols\.LanguageModel"),
    ('[solver]\nname = "fit-only"\n' + MINIMAL,
     r"exp\.toml: solver: plugin 'wrong_kind': solver 'fit-only' returned FitOnly, which lacks 'solve' "
     r"required by newllm_kit_plugins\.cvfp\.contract\.Solver"),
    ('[runner]\nname = "lazy"\n' + MINIMAL,
     r"exp\.toml: runner: plugin 'wrong_kind': runner 'lazy' is Lazy, which lacks 'all_reduce_sum' \(also "
     r"autocast, barrier, .*teardown\) required by newllm_kit\.protocols\.Runner"),
    ('[data]\nsource = "broken"\n' + MINIMAL,
     r"exp\.toml: data: plugin 'wrong_kind': building data source 'broken' failed: ValueError: cannot parse"),
])
def test_a_factory_returning_the_wrong_kind_of_object_is_caught_when_loading(tmp_path: Path, text: str,
                                                                             message: str) -> None:
    with pytest.raises(PluginError, match=message) as caught:
        load_config(write(tmp_path, text), wrong_kind_registry())
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_validate_catches_a_model_missing_a_protocol_member(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import HERE, make_fake_dist
    from test_cli import cli

    make_fake_dist(tmp_path, monkeypatch, "hollow-dist", "0.1", {"wrong_kind": "newllm_wrong_kind"},
                   {"newllm_wrong_kind.py": (HERE / "plugin_cases" / "wrong_kind.py").read_text()})
    path = write(tmp_path, '[[models]]\nlabel = "H"\narchitecture = "hollow"\n')
    result = cli("validate", str(path), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("\n") == 1 and "lacks 'param_counts'" in result.stderr


@pytest.mark.parametrize("data", [b"\xff\xfe[experiment]\n", b"[experiment]\nname = \"\xe9\"\n"])
def test_a_file_that_is_not_utf8_is_named_as_such(tmp_path: Path, data: bytes) -> None:
    """UnicodeDecodeError is a ValueError: it must not be reported as an oversized integer."""
    path = tmp_path / "exp.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"exp\.toml: not UTF-8 text$"):
        load_config(path, Registry(), [])


def test_a_folder_given_as_experiment_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read experiment file"):
        load_config(tmp_path, Registry(), [])
