"""Sweeps: a `[sweep]` table becomes named variants, validated before anything runs, each resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import ROOT, cli
from test_seeds import write_micro

from newllm_kit.config import load_config
from newllm_kit.errors import ConfigError
from newllm_kit.experiment import plan
from newllm_kit.plugins import load_plugins
from newllm_kit.registry import Registry
from newllm_kit.run import execute

SWEEP = """
[sweep]
"solver.dist_reg_weight" = [0.3, 0.7]
phase2 = { learning_rate = [0.01, 0.02] }
"""


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_plugins().registry


def test_the_product_of_the_keys_is_the_variants_first_key_slowest(registry: Registry, tmp_path: Path) -> None:
    config = load_config(write_micro(tmp_path, SWEEP), registry)
    assert [(v.name, v.changes) for v in config.variants] == [
        ("drw-0.3_lr-0.01", {"solver.dist_reg_weight": 0.3, "phase2.learning_rate": 0.01}),
        ("drw-0.3_lr-0.02", {"solver.dist_reg_weight": 0.3, "phase2.learning_rate": 0.02}),
        ("drw-0.7_lr-0.01", {"solver.dist_reg_weight": 0.7, "phase2.learning_rate": 0.01}),
        ("drw-0.7_lr-0.02", {"solver.dist_reg_weight": 0.7, "phase2.learning_rate": 0.02}),
    ]
    last = config.variants[-1].config.resolved()
    assert (last["solver"]["dist_reg_weight"], last["phase2"]["learning_rate"]) == (0.7, 0.02)
    assert [u.id for u in plan(config)] == [f"{v.name}-A-12" for v in config.variants]
    assert "sweep" not in last and config.resolved()["sweep"]["solver.dist_reg_weight"] == [0.3, 0.7]


def test_a_resolved_config_reloads_to_the_same_variants(registry: Registry, tmp_path: Path) -> None:
    config = load_config(write_micro(tmp_path, SWEEP + 'labels = ["a", "b", "c", "d"]\n'), registry)
    saved = tmp_path / "config.resolved.toml"
    saved.write_text(config.resolved_toml())
    again = load_config(saved, registry)
    assert [(v.name, v.changes) for v in again.variants] == [(v.name, v.changes) for v in config.variants]
    assert [v.name for v in again.variants] == ["a", "b", "c", "d"]


def test_set_overrides_a_sweep_and_other_keys(registry: Registry, tmp_path: Path) -> None:
    config = load_config(write_micro(tmp_path, SWEEP), registry,
                         ["sweep.solver.dist_reg_weight=[0.5]", "phase2.epochs=1"])
    assert [v.name for v in config.variants] == ["drw-0.5_lr-0.01", "drw-0.5_lr-0.02"]
    assert {v.config.recipes["cvfp"].settings.phase2.epochs for v in config.variants} == {1}  # type: ignore[union-attr]


@pytest.mark.parametrize(("sweep", "overrides", "message"), [
    ('"solver.dist_reg_weigth" = [0.3]', [], r"solver\.dist_reg_weigth: unknown key; did you mean "
                                             r"'dist_reg_weight'\? \(in sweep variant 'drw-0.3'\)"),
    ('"phase2.epochs" = ["many"]', [], r"phase2\.epochs: must be an integer, not text \(got 'many'\) "
                                                 r"\(in sweep variant 'epochs-many'\)"),
    ('"phase2.epochs" = 3', [], r"sweep\.phase2\.epochs: expected a non-empty list"),
    ('"phase2.epochs" = [2, 2]', [], r"sweep\.phase2\.epochs: a value is listed twice"),
    ('"experiment.samples" = [[12]]', [], r"sweep\.experiment\.samples: name a key inside a section other than"),
    ('"phase2.epochs" = [1, 2]', ["phase2.epochs=3"], r"--set 'phase2.epochs=3': phase2\.epochs is swept"),
    ('"phase2.epochs" = [1, 2]\nlabels = ["one"]', [], r"sweep\.labels: expected 2 distinct names"),
    ('"phase2.epochs" = [1, 2]\nlabels = ["a/b", "c"]', [], r"sweep\.labels: 'a/b' must be"),
])
def test_bad_sweeps_fail_before_anything_runs(registry: Registry, tmp_path: Path, sweep: str,
                                              overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_micro(tmp_path, f"\n[sweep]\n{sweep}\n"), registry, overrides)


@pytest.mark.slow
def test_validate_and_params_list_the_variants(tmp_path: Path) -> None:
    path = write_micro(tmp_path, SWEEP)
    result = cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "4 sweep variants = 4 unit(s)" in result.stdout
    assert "variant drw-0.7_lr-0.02: solver.dist_reg_weight = 0.7, phase2.learning_rate = 0.02" in result.stdout
    params = cli("params", str(path), "--json")
    assert [v["name"] for v in json.loads(params.stdout)["variants"]][:1] == ["drw-0.3_lr-0.01"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sweep run as a process, killed with SIGKILL once a variant has finished, then resumed."""
    tmp = tmp_path_factory.mktemp("sweep")
    path, out = write_micro(tmp, SWEEP), tmp / "runs"
    process = subprocess.Popen([sys.executable, "-m", "newllm_kit", "run", str(path), "--out", str(out), "--progress",
                                "none"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, finished = time.monotonic() + 240, []
    while time.monotonic() < deadline and process.poll() is None:
        results = list(out.glob("micro/*/results.jsonl"))
        lines = results[0].read_text().splitlines() if results else []
        if lines and all(line.endswith("}") for line in lines):
            os.kill(process.pid, signal.SIGKILL)
            finished = [json.loads(line)["variant"] for line in lines]
            run_dir = results[0].parent
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert finished, "the run ended before a variant finished"
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    result = execute(run_dir, [], out, True, "none", load_plugins())
    return {"run_dir": run_dir, "finished": finished, "before": before, "result": result}


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_recomputing_finished_variants(killed_and_resumed: dict[str, Any]) -> None:
    run_dir, finished = killed_and_resumed["run_dir"], killed_and_resumed["finished"]
    records = killed_and_resumed["result"]["results"]
    assert [r["variant"] for r in records] == ["drw-0.3_lr-0.01", "drw-0.3_lr-0.02", "drw-0.7_lr-0.01",
                                               "drw-0.7_lr-0.02"]
    assert records[-1]["sweep"] == {"solver.dist_reg_weight": 0.7, "phase2.learning_rate": 0.02}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for variant in finished:  # nothing of a finished variant was logged again by the resume
        assert {m["attempt"] for m in metrics if m["unit"].startswith(variant)} == {1}
    assert len(metrics) > len(killed_and_resumed["before"])  # the rest ran in attempt 2
    assert sorted(p.name for p in (run_dir / "variants").iterdir()) == [f"{r['variant']}.toml" for r in records]
    saved = (run_dir / "variants" / "drw-0.7_lr-0.02.toml").read_text()
    assert "dist_reg_weight = 0.7" in saved and "learning_rate = 0.02" in saved
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_plot_draws_the_metric_against_each_swept_key(killed_and_resumed: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from newllm_kit.plots import write_plots

    names = {p.name for p in write_plots(killed_and_resumed["run_dir"], tmp_path / "png")}
    assert {"sweep-solver.dist_reg_weight.png", "sweep-phase2.learning_rate.png"} <= names
    assert all((tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)
