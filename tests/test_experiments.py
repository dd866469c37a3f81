"""The shipped experiment files: valid, faithful to the seed's settings, exact parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from newllm_kit.config import load_config
from newllm_kit.experiment import plan
from newllm_kit.params import count_params
from newllm_kit.plugins import load_plugins
from newllm_kit.registry import Registry

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

EXPECTED = {
    "2025-11-27-3L.toml": {"3L": (3_545_856, 3_545_856, 84_338_257)},
    "2025-11-27-6L.toml": {"6L": (7_091_712, 7_091_712, 91_429_969)},
    "v1.toml": {"A": (10_630_656, 7_681_536, 56_911_104), "B": (14_169_600, 5_905_152, 58_673_664)},
    "v2.toml": {"A": (15_394_304, 8_566_272, 62_559_488), "B": (20_730_880, 5_905_152, 65_234_944)},
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_plugins().registry


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts_are_the_seeds(registry: Registry, name: str) -> None:
    rows = count_params(load_config(EXPERIMENTS / name, registry))
    got = {r["label"]: (r["context_block"], r["token_block"], r["total"]) for r in rows}
    assert got == EXPECTED[name]


def test_untied_11_27_head_is_trained_in_phase_2(registry: Registry) -> None:
    row = count_params(load_config(EXPERIMENTS / "2025-11-27-3L.toml", registry))[0]
    assert row["head"] == 50257 * 768 + 50257
    assert row["trainable"]["phase2"] == 42_193_489  # TokenBlock + head, as the 11/27 log printed


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_file_validates_and_opens_with_a_header(registry: Registry, path: Path) -> None:
    config = load_config(path, registry)
    assert plan(config)
    assert path.read_text().startswith("# "), "each experiment opens with a comment header"


def test_settings_follow_the_spec(registry: Registry) -> None:
    def resolved(name: str) -> dict[str, Any]:
        return load_config(EXPERIMENTS / name, registry).resolved()

    v2, v1, l3 = resolved("v2.toml"), resolved("v1.toml"), resolved("2025-11-27-3L.toml")
    assert v2["data"]["text"] == v1["data"]["text"] == "first_turn"
    assert l3["data"]["text"] == "first_turn_128"
    assert v2["data"]["val"] == {"start": 1000, "count": 50} and l3["data"]["val"] == {"start": 500, "count": 10}
    assert (v2["solver"]["min_iterations"], v2["solver"]["max_iterations"], v2["solver"]["batch_size"]) == (5, 40, 8000)
    assert (v1["solver"]["min_iterations"], v1["solver"]["max_iterations"], v1["solver"]["batch_size"]) == (3, 10, 4096)
    assert l3["solver"]["loss_scope"] == "stream"
    assert (v2["phase2"]["learning_rate"], v2["phase2"]["batch_size"], v2["phase2"]["patience"]) == (0.001, 1024, 1)
    assert (v1["phase2"]["learning_rate"], v1["phase2"]["batch_size"], v1["phase2"]["patience"]) == (0.002, 512, 2)
    assert [m["num_input_tokens"] for m in v1["models"]] == [2, 2]
    assert l3["models"][0]["tie_head"] is False


def test_quickstart_keeps_v2s_phase_1_objective(registry: Registry) -> None:
    """The quick-start changes Phase 1's schedule (so it converges on small blocks), not what it optimises."""
    quick = load_config(EXPERIMENTS / "quickstart.toml", registry).resolved()["solver"]
    v2 = load_config(EXPERIMENTS / "v2.toml", registry).resolved()["solver"]
    for key in ("learning_rate", "context_noise", "dist_reg_weight", "convergence_threshold", "min_converged_ratio",
                "min_iterations", "batch_size", "init", "loss_scope"):
        assert quick[key] == v2[key], key


def test_baselines_are_matched_to_cvfp_a_by_trainable_parameters(registry: Registry) -> None:
    """baselines.toml's header states these counts; the table besides the shared 1,024 × 64 table."""
    rows = {r["label"]: r for r in count_params(load_config(EXPERIMENTS / "baselines.toml", registry))}
    a = rows["A"]["context_block"] + rows["A"]["token_block"]
    trained = {label: rows[label]["trainable"]["train"] - 1024 * 64 for label in ("Transformer", "GRU")}
    assert (a, trained["Transformer"], trained["GRU"]) == (170_320, 170_269, 171_232)
    assert all(abs(n - a) / a < 0.01 for n in trained.values())


@pytest.mark.parametrize(("override", "message"), [
    ("models.2.recipe=cvfp", r"models\.2: plugin 'transformer': architecture 'transformer' builds \(for recipe "
                             r"'cvfp'\) TransformerModel, which lacks 'context_block'.* set models\.2\.recipe to a "
                             r"recipe this architecture supports \(its default: 'lm'\)"),
    ("models.0.recipe=lmm", r"models\.0\.recipe: unknown recipe 'lmm'; did you mean 'lm'\?"),
    ("lm.epochz=3", r"lm\.epochz: unknown key; did you mean 'epochs'\?"),
])
def test_a_model_trained_by_the_wrong_recipe_or_a_bad_recipe_key_is_one_line(
        registry: Registry, override: str, message: str) -> None:
    from newllm_kit.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(EXPERIMENTS / "baselines.toml", registry, [override])


def test_a_table_of_a_recipe_no_model_uses_names_that_recipe(registry: Registry, tmp_path: Path) -> None:
    from newllm_kit.errors import ConfigError

    text = (EXPERIMENTS / "baselines.toml").read_text()
    lm_only = text[:text.index("[[models]]")] + text[text.index('[[models]]\nlabel = "Transformer"'):]
    (tmp_path / "lm.toml").write_text(lm_only)
    with pytest.raises(ConfigError, match=r"solver: this table belongs to recipe 'cvfp', which no model uses "
                                          r"\(recipes in use: lm\)"):
        load_config(tmp_path / "lm.toml", registry)
