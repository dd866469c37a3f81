"""benchmarks/gpu_check.py, the GPU smoke lane: its check runner fails the lane on any failed check, and its
`--device cpu` dry run goes through every check's code path on the CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = ["solves", "phase1", "phase2", "quickstart", "stores", "tf32", "lm", "kill_resume", "device_memory",
          "pinned_host"]
CUDA_ONLY = {"tf32", "pinned_host"}


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (its sibling imports, such as _common, resolve from benchmarks/)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_a_failed_assertion_fails_its_check_and_keeps_its_numbers(gpu_check: ModuleType) -> None:
    def too_far(numbers: dict[str, Any]) -> str:
        numbers["max_abs_diff"] = 0.5
        gpu_check.expect(numbers["max_abs_diff"] <= 1e-4, "max |cuda − cpu| 5.0e-01 > 0.0001")
        return "never reached"

    outcome = gpu_check.run_check("solves", too_far)
    assert (outcome.status, outcome.detail, outcome.numbers) == ("FAIL", "max |cuda − cpu| 5.0e-01 > 0.0001",
                                                                 {"max_abs_diff": 0.5})
    assert outcome.line() == "FAIL solves: max |cuda − cpu| 5.0e-01 > 0.0001"


def test_an_error_inside_a_check_is_a_failure_and_a_skip_is_not(gpu_check: ModuleType) -> None:
    def broken(numbers: dict[str, Any]) -> str:
        raise KeyError("val_ppl")

    def needs_cuda(numbers: dict[str, Any]) -> str:
        raise gpu_check.Skipped("(no CUDA) TF32")

    assert gpu_check.run_check("quickstart", broken).line() == "FAIL quickstart: KeyError: 'val_ppl'"
    assert gpu_check.run_check("tf32", needs_cuda).line() == "SKIP tf32: (no CUDA) TF32"


def test_one_failed_check_makes_the_lane_exit_1_and_every_check_still_runs(
        gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    ran = []

    def passing(name: str) -> Any:
        def check(numbers: dict[str, Any]) -> str:
            ran.append(name)
            return "within bounds"
        return check

    def failing(numbers: dict[str, Any]) -> str:
        ran.append("stores")
        raise AssertionError("fp32 stores' val PPL differ by 3.0e-02 (relative) > 1e-05")

    checks = {"solves": passing("solves"), "stores": failing, "lm": passing("lm")}
    assert gpu_check.run_checks(checks, as_json=False) == 1
    assert ran == ["solves", "stores", "lm"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["PASS solves: within bounds",
                         "FAIL stores: fp32 stores' val PPL differ by 3.0e-02 (relative) > 1e-05",
                         "PASS lm: within bounds"]
    assert lines[3].startswith("FAILED: 2 passed, 1 failed, 0 skipped of 3 checks")

    assert gpu_check.run_checks({"solves": passing("solves")}, as_json=True) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["checks"][0]["name"] == "solves" and document["checks"][0]["passed"] is True
    assert document["summary"]["FAIL"] == 0


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_check_it_can_run(tmp_path: Path) -> None:
    """Every check's code path on the CPU with tiny sizes: the CUDA-only ones skip, all others pass."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--json", "--keep", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert [c["name"] for c in document["checks"]] == CHECKS
    for check in document["checks"]:
        if check["name"] in CUDA_ONLY:
            assert (check["status"], check["passed"]) == ("SKIP", None), check
            assert check["detail"].startswith("(no CUDA)")
        else:
            assert (check["status"], check["passed"]) == ("PASS", True), check
    stores = {c["name"]: c["numbers"] for c in document["checks"]}["stores"]
    assert {name: stores[name]["context_store"]["kind"] for name in ("device", "host", "disk", "bf16")} == {
        "device": "device", "host": "host", "disk": "disk", "bf16": "device"}
    assert document["summary"] == {**document["summary"], "FAIL": 0, "SKIP": len(CUDA_ONLY)}
