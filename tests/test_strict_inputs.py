"""Inputs are taken as written or refused in one line: TOML values keep their types, contradictory
settings are refused, a plugin that exits or prints cannot silence or corrupt a command, and damaged
or non-finite numbers end in the documented error instead of a traceback."""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HERE, load_case, make_fake_dist
from newllm_kit_plugins.cvfp.diagnostics import classify_trials, context_stats, convergence_check
from newllm_kit_plugins.metrics import effective_rank
from newllm_kit_plugins.tokens.gpt2_embedding import GPT2Embedding, GPT2EmbeddingSettings, read_wte
from safetensors.torch import save_file

from newllm_kit import cli
from newllm_kit.compare import compare_records
from newllm_kit.config import load_config
from newllm_kit.errors import ConfigError, DataError, PluginError, RunFailed, UserError
from newllm_kit.plugins import load_plugins
from newllm_kit.registry import Registry

# Components that build offline and at once: the embedded corpus, byte tokens, a random table.
OFFLINE = """[data]
source = "embedded"
[tokenizer]
name = "bytes"
[embedding]
source = "random"
[runner]
name = "cpu"
[[models]]
label = "A"
context_dim = 8
embedding_dim = 8
"""


@pytest.fixture(scope="module")
def builtins() -> Registry:
    return load_plugins().registry


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`newllm-kit ARGS` in this process, plugins loaded afresh: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["newllm-kit", *args])
    monkeypatch.setitem(cli._state, "plugins", None)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin cases exiting_factory, exiting_import, printing and commands_hook, installed as a
    distribution."""
    cases = ("exiting_factory", "exiting_import", "printing", "commands_hook")
    make_fake_dist(tmp_path / "site", monkeypatch, "strict-cases", "0.1",
                   {case: f"newllm_strict_{case}" for case in cases},
                   {f"newllm_strict_{case}.py": (HERE / "plugin_cases" / f"{case}.py").read_text() for case in cases})
    yield tmp_path
    for case in cases:
        sys.modules.pop(f"newllm_strict_{case}", None)


# --- TOML values keep their types ------------------------------------------------------------------

def with_line(section: str, line: str) -> str:
    """OFFLINE with `line` added to its table `section` (or to a new one)."""
    header = f"[{section}]\n"
    return OFFLINE.replace(header, header + line + "\n") if header in OFFLINE else header + line + "\n" + OFFLINE


@pytest.mark.parametrize(("section", "line", "key", "message"), [
    ("experiment", "seed = true", "experiment.seed", "must be an integer, not true/false (got True)"),
    ("embedding", 'freeze = "no"', "embedding.freeze",
     "must be true or false, not text (true or false, without quotes) (got 'no')"),
    ("experiment", 'samples = ["40"]', "experiment.samples.0",
     "must be an integer, not text (write 40 without quotes) (got '40')"),
    ("experiment", "samples = [true]", "experiment.samples.0", "must be an integer, not true/false (got True)"),
    ("experiment", "seed = 4.0", "experiment.seed", "must be a whole number, without a decimal point (got 4.0)"),
    ("solver", 'max_iterations = "40"', "solver.max_iterations",
     "must be an integer, not text (write 40 without quotes) (got '40')"),
    ("runner", "threads = true", "runner.threads", "must be an integer, not true/false"),
    ("solver", "learning_rate = true", "solver.learning_rate", "must be a number, not true/false (got True)"),
    ("experiment", "description = 2026-12-07", "experiment.description", "a TOML date or time (2026-12-07)"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(tmp_path: Path, builtins: Registry, section: str,
                                                            line: str, key: str, message: str) -> None:
    path = write(tmp_path, with_line(section, line))
    with pytest.raises(ConfigError) as caught:
        load_config(path, builtins)
    assert str(caught.value).startswith(f"{path}: {key}: {message}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("override", "key"), [
    ("experiment.seed=true", "experiment.seed"),
    ("embedding.freeze=no", "embedding.freeze"),
    ('embedding.freeze="no"', "embedding.freeze"),
    ('experiment.samples=["40"]', "experiment.samples.0"),
    ("experiment.samples=[true]", "experiment.samples.0"),
    ("solver.min_iterations=true", "solver.min_iterations"),
])
def test_set_overrides_follow_the_same_rules(tmp_path: Path, builtins: Registry, override: str, key: str) -> None:
    path = write(tmp_path, OFFLINE)
    with pytest.raises(ConfigError, match=rf"^{path}: {key}: must be "):
        load_config(path, builtins, [override])


def test_an_integer_where_a_number_is_expected_stays_a_number(tmp_path: Path, builtins: Registry) -> None:
    path = write(tmp_path, "[solver]\nlearning_rate = 1\n[phase2]\nlearning_rate = 1\n" + OFFLINE)
    config = load_config(path, builtins, ["solver.context_noise=0"])
    solver = config.recipes["cvfp"].settings.solver._choice.settings  # type: ignore[union-attr]
    assert solver.learning_rate == 1.0 and isinstance(solver.learning_rate, float)
    assert solver.context_noise == 0.0 and config.recipes["cvfp"].settings.phase2.learning_rate == 1.0  # type: ignore[union-attr]
    assert config.schema.embedding.freeze is True and config.schema.experiment.seed == 42


def test_a_third_party_settings_model_is_strict_too(tmp_path: Path) -> None:
    from pydantic import BaseModel, ConfigDict

    from newllm_kit.registry import Component

    class Lenient(BaseModel):  # no strict mode of its own
        model_config = ConfigDict(extra="forbid")
        rows: int = 1
        scale: float = 1.0

    registry = load_plugins().registry
    registry.add(Component("data_source", "lenient", lambda settings: object(), "third_party", Lenient))
    path = write(tmp_path, OFFLINE.replace('source = "embedded"', 'source = "lenient"\nrows = "3"'))
    with pytest.raises(ConfigError, match=rf"^{path}: data\.rows: must be an integer, not text"):
        load_config(path, registry)


# --- contradictory settings -----------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["cvfp", "gradual-decrease"])
def test_a_minimum_above_the_budget_is_refused_at_validation(tmp_path: Path, builtins: Registry,
                                                             solver: str) -> None:
    path = write(tmp_path, f'[solver]\nname = "{solver}"\nmin_iterations = 50\nmax_iterations = 40\n' + OFFLINE)
    with pytest.raises(ConfigError) as caught:
        load_config(path, builtins)
    assert str(caught.value) == (f"{path}: solver: min_iterations (50) is more than max_iterations (40); raise "
                                 f"max_iterations or lower min_iterations")
    equal = write(tmp_path, f'[solver]\nname = "{solver}"\nmin_iterations = 40\nmax_iterations = 40\n' + OFFLINE)
    assert load_config(equal, builtins).recipes["cvfp"].settings is not None


# --- plugins that exit, interrupt or print --------------------------------------------------------

@pytest.mark.parametrize(("metric", "reason"), [
    ("leaves", "SystemExit: sys.exit(0) was called"),
    ("interrupts", "KeyboardInterrupt: raised by the plugin itself (no Ctrl-C or SIGTERM arrived)"),
])
def test_a_factory_that_exits_is_an_error_naming_its_plugin(tmp_path: Path, metric: str, reason: str) -> None:
    registry = load_plugins(extra=[("exiting_factory", load_case("exiting_factory"))]).registry
    path = write(tmp_path, f'[experiment]\nmetrics = ["{metric}"]\n' + OFFLINE)
    with pytest.raises(PluginError) as caught:
        load_config(path, registry)
    assert str(caught.value) == (f"{path}: experiment.metrics.0: plugin 'exiting_factory': building metric "
                                 f"{metric!r} failed: {reason}")


def test_a_model_build_that_exits_is_an_error_naming_its_plugin(tmp_path: Path) -> None:
    registry = load_plugins(extra=[("exiting_factory", load_case("exiting_factory"))]).registry
    models = OFFLINE.index("[[models]]")
    path = write(tmp_path, OFFLINE[:models] + '[[models]]\nlabel = "A"\narchitecture = "quits-when-built"\n')
    with pytest.raises(PluginError) as caught:
        load_config(path, registry)
    assert str(caught.value) == (f"{path}: models.0: plugin 'exiting_factory': building a model of architecture "
                                 f"'quits-when-built' failed: SystemExit: sys.exit(3) was called")


def test_a_real_ctrl_c_in_a_factory_still_stops_the_command() -> None:
    from newllm_kit.config.schema import Choice
    from newllm_kit.registry import Component

    def ctrl_c(settings: Any) -> Any:
        signal.raise_signal(signal.SIGINT)  # what the terminal sends: the default handler raises

    choice = Choice("x", Component("metric", "slow", ctrl_c, "slow_plugin"), None)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever started us
    try:
        with pytest.raises(KeyboardInterrupt):
            choice.build()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the watch is gone
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_hook_that_raises_keyboard_interrupt_breaks_only_its_plugin(no_autoload: None) -> None:
    plugins = load_plugins(extra=[("interrupting_hook", load_case("interrupting_hook")), ("good", load_case("good"))])
    info = next(i for i in plugins.infos if i.name == "interrupting_hook")
    assert info.status == "broken"
    assert info.error == ("register_metrics raised KeyboardInterrupt: raised by the plugin itself (no Ctrl-C or "
                          "SIGTERM arrived)")
    assert "constant" in plugins.registry.names("metric")


def test_validate_exits_2_naming_a_plugin_whose_factory_calls_sys_exit(
        installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(installed, '[experiment]\nmetrics = ["leaves"]\n' + OFFLINE)
    code, out, err = main(monkeypatch, capsys, "validate", str(path))
    assert code == 2 and out == ""
    line = f"error: {path}: experiment.metrics.0: plugin 'exiting_factory': building metric 'leaves' failed: " \
           f"SystemExit: sys.exit(0) was called\n"
    assert err.endswith(line) and "Traceback" not in err


def test_validate_exits_2_naming_a_plugin_that_exits_at_import(
        installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(installed, '[experiment]\nmetrics = ["gone"]\n' + OFFLINE)
    code, out, err = main(monkeypatch, capsys, "validate", str(path))
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: experiment.metrics: unknown metric 'gone'")
    assert "plugin 'exiting_import' failed to load (SystemExit: sys.exit(0) was called)" in last


def test_what_a_plugin_prints_never_reaches_json_output(
        installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = main(monkeypatch, capsys, "plugins", "--json")
    assert code == 0
    document = json.loads(out)  # one document and nothing else
    assert {"printing", "exiting_factory"} <= {p["name"] for p in document["plugins"]}
    assert "printing plugin: imported" in err and "printing plugin: registering" in err
    assert "commands hook: registering" in err
    assert ("warning: plugin 'commands_hook': register_commands failed: KeyboardInterrupt: raised by the plugin "
            "itself (no Ctrl-C or SIGTERM arrived)\n") in err
    path = write(installed, '[experiment]\nmetrics = ["chatty"]\n' + OFFLINE)
    code, out, err = main(monkeypatch, capsys, "params", str(path), "--json")
    assert code == 0, err
    assert "models" in json.loads(out) and "printing plugin: building chatty" in err


def test_validation_and_builds_print_to_stderr_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`load_config` (which builds models to check them) and every factory call keep stdout for the command."""
    registry = load_plugins(extra=[("printing", load_case("printing"))]).registry
    capsys.readouterr()  # what importing the case here printed: not a command's output
    models = OFFLINE.index("[[models]]")
    load_config(write(tmp_path, OFFLINE[:models] + '[[models]]\nlabel = "A"\narchitecture = "chatty-arch"\n'),
                registry)
    from newllm_kit.config.schema import Choice

    Choice("m", registry.get("metric", "chatty"), None).build()
    out, err = capsys.readouterr()
    assert out == ""
    assert "printing plugin: building a model" in err and "printing plugin: building chatty" in err


# --- damaged or non-finite numbers ----------------------------------------------------------------

def _embedding_dir(tmp_path: Path, table: torch.Tensor) -> Path:
    folder = tmp_path / "gpt2"
    folder.mkdir(exist_ok=True)
    save_file({"wte.weight": table}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "zeros", "header", "tiny"])
def test_a_damaged_gpt2_embedding_file_is_one_data_error_naming_it(tmp_path: Path, damage: str) -> None:
    folder = _embedding_dir(tmp_path, torch.randn(12, 4))
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes({"truncated": raw[:-9], "zeros": bytes(len(raw)), "header": raw[:8] + b"[" + raw[9:],
                      "tiny": b"\x01"}[damage])
    embedding = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(folder)))
    for step in (embedding.check, embedding.table):  # validate's cheap header read, and the run's load
        with pytest.raises(DataError) as caught:
            step()
        assert str(caught.value).startswith(f"embedding 'gpt2': {file} is not a readable safetensors file (")
        assert str(caught.value).endswith("download it again or point embedding.name_or_path at an intact copy")


def test_a_gpt2_table_with_nan_is_refused_when_loaded(tmp_path: Path) -> None:
    table = torch.randn(12, 4)
    table[3, 1] = float("nan")
    table[5, 0] = float("inf")
    folder = _embedding_dir(tmp_path, table)
    embedding = GPT2Embedding(GPT2EmbeddingSettings(name_or_path=str(folder)))
    embedding.check()  # the header is intact: validate cannot see values without reading the table
    with pytest.raises(DataError, match=r"model\.safetensors: 2 of 48 values of its wte table are NaN or infinite"):
        embedding.load(12, 4, torch.Generator())
    assert torch.equal(read_wte(_embedding_dir(tmp_path, torch.ones(3, 2)) / "model.safetensors"), torch.ones(3, 2))


def test_non_finite_frozen_contexts_end_the_run_naming_the_stream() -> None:
    contexts = torch.randn(40, 6)
    contexts[7, 2] = float("nan")
    with pytest.raises(RunFailed) as caught:
        context_stats(contexts, seed=0, stream="val")
    assert str(caught.value).startswith("diagnostics: 1 of 240 sampled values of the frozen val contexts are NaN "
                                        "or infinite; ")
    assert RunFailed.exit_code == 1


def test_a_rollout_whose_error_overflows_is_diverging_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert classify_trials([0.5, math.inf, math.nan]) == "DIVERGING"

    class Exploding(torch.nn.Module):  # a block whose rollout multiplies its context by 1e30 every step
        def step(self, context: torch.Tensor, projected: torch.Tensor) -> list[torch.Tensor]:
            return [context * 1e30 + projected]

        def project_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs

    class Model:
        context_block, context_dim = Exploding(), 2
        token_inputs = None

    Model.context_block.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    from newllm_kit_plugins.cvfp import diagnostics

    monkeypatch.setattr(diagnostics, "token_span", lambda model, ids, a, b: torch.ones(b - a, 2))
    result = convergence_check(Model(), torch.arange(6), trials=3)
    assert result["status"] == "DIVERGING" and result["slope"] is None


def test_effective_rank_of_non_finite_rows_is_nan() -> None:
    for value in (float("nan"), float("inf")):  # NaN alone makes the SVD raise
        matrix = torch.eye(4)
        matrix[1, 2] = value
        assert math.isnan(effective_rank(matrix))
    assert effective_rank(torch.eye(4)) == pytest.approx(4, rel=1e-6)


# --- exit codes -----------------------------------------------------------------------------------

def test_a_disk_store_that_cannot_fit_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from newllm_kit_plugins.cvfp import context_store

    class Runner:
        device, world_size, context_store, context_dtype, memory_fraction = torch.device("cpu"), 1, "disk", "fp32", 0.5

    monkeypatch.setattr(context_store, "disk_free", lambda folder: 1000)
    with pytest.raises(UserError, match=r"but the disk at .* has 1000\.0 bytes free; free disk space") as caught:
        context_store.plan_stores(Runner(), 1000, 8, tmp_path)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("metric", ["model", "unit", "fast_path"])
def test_a_metric_that_is_not_a_number_is_one_line(metric: str) -> None:
    records = [{"model": m, "samples": 10, "seed": s, "unit": f"{m}-10", "val_ppl": 1.0 + s + (m == "B"),
                "fast_path": m == "A"} for m in "AB" for s in (1, 2)]
    with pytest.raises(UserError) as caught:
        compare_records(records, metric, "model")
    assert str(caught.value) == f"--metric {metric}: not a number in the results; choose one of samples, seed, val_ppl"
