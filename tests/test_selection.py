"""`newllm-kit select`: per model and size, the sweep variant with the lowest mean development NLL over
seeds, reported by its validation numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from newllm_kit.errors import UserError
from newllm_kit.selection import select

ROOT = Path(__file__).resolve().parents[1]


def record(model: str, variant: str, seed: int, dev: float, val: float, samples: int = 300,
           flops: float | None = 1e12) -> dict[str, Any]:
    return {"model": model, "samples": samples, "train_tokens": 1000 * samples, "variant": variant, "seed": seed,
            "sweep": {"lm.learning_rate": {"lr1": 0.001, "lr3": 0.003}[variant]}, "dev_ppl": dev, "val_ppl": val,
            **({} if flops is None else {"train_flops": flops}), "source": "x"}


def test_the_lowest_mean_dev_nll_wins_and_its_validation_numbers_are_reported() -> None:
    # lr1's dev PPLs have the higher arithmetic mean (150 vs 120) but the lower mean NLL (√(50·250) ≈ 111.8):
    # NLL decides.
    records = [record("T", "lr1", 1, 50.0, 80.0), record("T", "lr1", 2, 250.0, 90.0),
               record("T", "lr3", 1, 120.0, 50.0), record("T", "lr3", 2, 120.0, 60.0)]
    (choice,) = select(records)
    assert (choice.variant, choice.seeds, choice.sweep) == ("lr1", 2, {"lm.learning_rate": 0.001})
    assert math.isclose(choice.dev_ppl, math.sqrt(50.0 * 250.0))
    assert math.isclose(choice.val_ppl, math.sqrt(80.0 * 90.0))
    # the t-interval of the mean validation NLL over the 2 seeds (scipy's), as PPL
    nll = [math.log(80.0), math.log(90.0)]
    low, high = scipy_stats.t.interval(0.95, 1, loc=sum(nll) / 2, scale=scipy_stats.sem(nll))
    assert (choice.val_low, choice.val_high) == (pytest.approx(math.exp(low), rel=1e-12),
                                                 pytest.approx(math.exp(high), rel=1e-12))
    assert math.isclose(choice.others["lr3"], 120.0)


def test_each_model_and_size_is_chosen_on_its_own_and_a_model_the_sweep_does_not_reach_is_all_equal() -> None:
    records = [record(m, v, s, dev, 10.0 + dev, samples=n, flops=None if m == "C" else 2e12)
               for m, n, best in (("T", 300, "lr1"), ("T", 600, "lr3"), ("G", 300, "lr3"))
               for v, dev in (("lr1", 5.0 if best == "lr1" else 6.0), ("lr3", 5.0 if best == "lr3" else 6.0))
               for s in (1, 2)]
    records += [record("C", v, s, 7.0, 9.0, flops=None) for v in ("lr1", "lr3") for s in (1, 2)]
    chosen = {(c.model, c.samples): c for c in select(records)}
    assert {k: c.variant for k, c in chosen.items()} == {("T", 300): "lr1", ("T", 600): "lr3", ("G", 300): "lr3",
                                                          ("C", 300): "all equal"}
    assert chosen[("C", 300)].sweep == {} and chosen[("T", 600)].sweep == {"lm.learning_rate": 0.003}
    assert chosen[("C", 300)].flops is None and chosen[("T", 300)].flops == 2e12
    assert math.isclose(chosen[("C", 300)].val_ppl, 9.0)


def test_without_a_development_split_or_a_sweep_nothing_is_selected() -> None:
    with pytest.raises(UserError, match="no development split"):
        select([{k: v for k, v in record("T", "lr1", 1, 5.0, 6.0).items() if k != "dev_ppl"}])
    with pytest.raises(UserError, match="no sweep variants"):
        select([{k: v for k, v in record("T", "lr1", 1, 5.0, 6.0).items() if k != "variant"}])


@pytest.mark.slow
def test_the_command_prints_one_json_document(tmp_path: Path) -> None:
    rows = [record("T", v, s, 5.0 + (v == "lr3") + s / 10, 7.0 + s) for v in ("lr1", "lr3") for s in (1, 2)]
    file = tmp_path / "results.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run([sys.executable, "-m", "newllm_kit", "select", str(file), "--json"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    (selected,) = json.loads(result.stdout)["selected"]
    assert selected["variant"] == "lr1" and math.isclose(selected["val_ppl"], math.sqrt(8.0 * 9.0))


def test_a_tie_between_some_variants_goes_to_the_first_by_name() -> None:
    records = [record("T", v, 1, dev, 7.0) for v, dev in (("lr3", 5.0), ("lr1", 5.0))]
    records += [{**record("T", "lr1", 1, 6.0, 7.0), "variant": "lr9", "sweep": {"lm.learning_rate": 0.009}}]
    (choice,) = select(records)
    assert choice.variant == "lr1" and set(choice.others) == {"lr1", "lr3", "lr9"}
