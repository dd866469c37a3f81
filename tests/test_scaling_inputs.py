"""What `scaling`, `compare`, `plot` and `validate` do with inputs they cannot use: mixed fingerprints
within one source, files that are not files, malformed tables and records, numbers at the float
limit, deeply nested values. Each is one line naming the input, exit code 2; and the fast
column-wise reading of a large table gives exactly the points the row-by-row reading gives.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import cli

from newllm_kit import scaling
from newllm_kit.compare import compare
from newllm_kit.config.reading import parse_override, read_toml
from newllm_kit.errors import ConfigError, DataError, UserError
from newllm_kit.scaling.points import Point, _csv_columns, _csv_points, _drop_repeats, _load_csv

HEADER = "model,tokens,val_ppl,fingerprint\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def record(model: str, samples: int, ppl: float, prints: dict[str, str] | None, seed: int = 1) -> str:
    return json.dumps({"model": model, "samples": samples, "train_tokens": samples * 100, "val_ppl": ppl,
                       "seed": seed, **({"fingerprints": prints} if prints else {})})


# -- mixed fingerprints within one source -----------------------------------------------------------

def test_a_csv_whose_rows_have_different_fingerprints_is_refused(tmp_path: Path) -> None:
    table = write(tmp_path / "t.csv", HEADER + "A,100,50,one\nA,200,40,one\nA,400,30,two\n")
    points, warnings = scaling.load_points([table])
    with pytest.raises(UserError, match=r"t\.csv holds results with different data fingerprints \(A at 100 tokens, "
                                        r"A at 400 tokens\), which are not comparable; pass --allow-mixed"):
        scaling.check_comparable(points, False, warnings)
    added = scaling.check_comparable(points, True)
    assert len(added) == 1 and added[0].endswith("combined anyway (--allow-mixed)")


def test_one_fingerprint_per_source_still_passes_and_sources_still_differ(tmp_path: Path) -> None:
    same = write(tmp_path / "same.csv", HEADER + "A,100,50,one\nA,200,40,one\n")
    other = write(tmp_path / "other.csv", HEADER + "B,100,50,two\nB,200,40,two\n")
    assert scaling.check_comparable(scaling.load_points([same])[0], False) == []
    with pytest.raises(UserError, match=r"other\.csv and .*same\.csv have different data fingerprints"):
        scaling.check_comparable(scaling.load_points([same, other])[0], False)


def test_compare_refuses_a_results_file_with_two_fingerprint_sets(tmp_path: Path) -> None:
    lines = [record("A", 10, 50.0, {"tokenizer": "x"}), record("B", 10, 40.0, {"tokenizer": "y"}),
             record("A", 10, 51.0, {"tokenizer": "x"}, seed=2), record("B", 10, 41.0, {"tokenizer": "y"}, seed=2)]
    results = write(tmp_path / "results.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"results\.jsonl holds results with different data fingerprints"):
        compare([results], "val_ppl", "model", False)
    document = compare([results], "val_ppl", "model", True)
    assert document["comparisons"] and any("--allow-mixed" in w for w in document["warnings"])


def test_plot_refuses_a_run_with_two_fingerprint_sets(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from newllm_kit.plots import write_plots

    run = tmp_path / "run"
    run.mkdir()
    write(run / "config.resolved.toml", "")
    write(run / "results.jsonl", record("A", 10, 50.0, {"tokenizer": "x"}) + "\n"
          + record("A", 20, 40.0, {"tokenizer": "y"}) + "\n")
    with pytest.raises(UserError, match="holds results with different data fingerprints"):
        write_plots(run, tmp_path / "plots")
    assert not list((tmp_path / "plots").glob("*.png"))


# -- files that are not files -------------------------------------------------------------------------

def test_a_device_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^cannot read results file /dev/zero: it is a device; give a regular file$"):
        scaling.load_points([Path("/dev/zero")])
    with pytest.raises(ConfigError, match=r"^cannot read experiment file /dev/zero: it is a device"):
        read_toml(Path("/dev/zero"))
    with pytest.raises(DataError, match="it is a device"):
        compare([Path("/dev/zero")], "val_ppl", "model", False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "results.csv"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(DataError, match=r"results\.csv: it is a FIFO \(named pipe\); give a regular file$"):
        scaling.load_points([fifo])
    with pytest.raises(ConfigError, match="it is a FIFO"):
        read_toml(fifo)


def test_an_experiment_file_is_read_to_its_limit_and_no_further(tmp_path: Path) -> None:
    big = write(tmp_path / "big.toml", "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.toml: more than 1,048,576 bytes; experiment files are limited "
                                          r"to 1 MiB$"):
        read_toml(big)


# -- malformed tables and records ---------------------------------------------------------------------

def test_a_csv_field_beyond_the_csv_limit_is_one_line(tmp_path: Path) -> None:
    table = write(tmp_path / "wide.csv", 'model,tokens,val_ppl\n"' + "a" * 140_000 + '",10,5\n')
    with pytest.raises(DataError, match=r"wide\.csv: line 2: not a CSV table \(field larger than field limit"):
        scaling.load_points([table])
    wide = write(tmp_path / "results.csv", 'model,samples,train_tokens\n"' + "a" * 140_000 + '",1,10\n')
    with pytest.raises(DataError, match=r"results\.csv: line 2: not a CSV table"):
        compare([wide], "val_ppl", "model", False)


def test_an_unbalanced_quote_is_one_line(tmp_path: Path) -> None:
    table = write(tmp_path / "quote.csv", 'model,tokens,val_ppl\nA,10,5\n"B,20,4\nB,30,3\n')
    with pytest.raises(DataError, match=r"^[^\n]*quote\.csv[^\n]*$"):
        scaling.load_points([table])


def test_deeply_nested_json_in_compare_is_one_line(tmp_path: Path) -> None:
    deep = write(tmp_path / "deep.jsonl",
                 '{"model":"A","samples":1,"train_tokens":10,"val_ppl":' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:1: not a results record \(JSON nested too deeply\)$"):
        compare([deep], "val_ppl", "model", False)


@pytest.mark.parametrize(("text", "field"), [
    ('{"model":"A","samples":"abc","train_tokens":10,"val_ppl":5}', "samples"),
    ('{"model":"A","samples":true,"train_tokens":10,"val_ppl":5}', "samples"),
    ('{"model":"A","samples":2,"train_tokens":"x","val_ppl":5}', "train_tokens"),
    ('{"model":"A","samples":2,"train_tokens":10,"val_ppl":5,"seed":"s"}', "seed"),
])
def test_compare_names_a_record_field_that_is_not_a_number(tmp_path: Path, text: str, field: str) -> None:
    results = write(tmp_path / "r.jsonl", text + "\n")
    with pytest.raises(DataError, match=rf"r\.jsonl:1: {field} "):
        compare([results], "val_ppl", "model", False)


def test_compare_names_a_csv_row_whose_samples_are_not_a_number(tmp_path: Path) -> None:
    table = write(tmp_path / "results.csv", "model,samples,train_tokens,val_ppl\nA,7,10,5\nA,x,10,5\n")
    with pytest.raises(DataError, match=r"results\.csv: row 3: samples must be a positive whole number \(got 'x'\)"):
        compare([table], "val_ppl", "model", False)


@pytest.mark.parametrize("rows", [
    "A,1e308,1.7e308\nA,1.5e308,1e-300\nA,1e-300,1.7e308\n",  # near the float maximum
    "A,10,1.7e308\nA,20,1e-300\nA,30,1.7e308\n",  # a slope whose A is beyond any float
])
def test_numbers_at_the_float_limit_are_one_line(tmp_path: Path, rows: str) -> None:
    points, _ = scaling.load_points([write(tmp_path / "huge.csv", "model,tokens,val_ppl\n" + rows)])
    with pytest.raises(DataError, match=r"^model A: the fit overflows a float \(.*\); check those values$"):
        scaling.fit_all(points, [1.7e308])


def test_deeply_nested_set_values_are_one_line() -> None:
    for depth in (20, 100_000):
        with pytest.raises(ConfigError, match=r"^--set models\.0\.x: value: nesting too deep "
                                              r"\(limit 16 levels\)$"):
            parse_override("models.0.x=" + "[" * depth + "1" + "]" * depth)
    assert parse_override("models.0.x=[[1]]") == (["models", "0", "x"], [[1]])


@pytest.mark.slow
@pytest.mark.parametrize("args", [["scaling", "/dev/zero"], ["validate", "/dev/zero"], ["scaling", "{fifo}"],
                                  ["validate", "{fifo}"], ["compare", "{deep}"], ["scaling", "{wide}"],
                                  ["scaling", "{huge}"]])
def test_each_input_fault_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    os.mkfifo(tmp_path / "fifo")
    write(tmp_path / "deep.jsonl", '{"model":"A","samples":1,"train_tokens":10,"val_ppl":' + "[" * 100_000 + "}\n")
    write(tmp_path / "wide.csv", 'model,tokens,val_ppl\n"' + "a" * 140_000 + '",10,5\n')
    write(tmp_path / "huge.csv", "model,tokens,val_ppl\nA,10,1.7e308\nA,20,1e-300\nA,30,1.7e308\n")
    names = {"fifo": tmp_path / "fifo", "deep": tmp_path / "deep.jsonl", "wide": tmp_path / "wide.csv",
             "huge": tmp_path / "huge.csv"}
    result = cli(*[a.format(**names) for a in args])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


# -- the column-wise reading of large tables ----------------------------------------------------------

CELLS = st.sampled_from(["A", "B", " A ", "B2"])
ROWS = st.lists(st.tuples(CELLS, st.sampled_from(["", "v1", "v2 "]), st.integers(1, 50),
                          st.sampled_from(["1", "2.5", "3e1", " 7 "]), st.sampled_from(["", "7", "8"]),
                          st.sampled_from(["", "p", "q"])), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(ROWS, st.sampled_from(["\n", "\r\n"]))
def test_the_column_reading_gives_the_points_of_the_row_reading(rows: list[tuple[str, ...]], newline: str) -> None:
    text = "model,variant,tokens,val_ppl,seed,fingerprint" + newline + "".join(
        f"{m},{v},{t},{p},{s},{f}{newline}" for m, v, t, p, s, f in rows)
    fast = _csv_columns(Path("t.csv"), text)
    slow = _csv_points(Path("t.csv"), csv.DictReader(text.splitlines()))
    assert fast == slow


def test_a_table_the_column_reading_cannot_take_is_read_row_by_row(tmp_path: Path) -> None:
    for text in ("model,tokens,val_ppl\nA,10,5\n\nA,20,4\n",  # a blank line
                 "model,tokens,val_ppl\nA,10,\nA,20,4\nA,30,3\n",  # an empty PPL: that unit is skipped
                 'model,tokens,val_ppl\n"A,1",10,5\n"A,1",20,4\n'):  # quoting
        assert _csv_columns(Path("t.csv"), text) is None
        assert _load_csv(Path("t.csv"), text) == _csv_points(Path("t.csv"), csv.DictReader(
            text.splitlines()))


def test_repeats_are_dropped_once_each_and_distinct_points_kept() -> None:
    def p(model: str, tokens: float, prints: str | None, source: str = "s") -> Point:
        return Point(model, tokens, 10.0, prints, source)

    points = [p("A", 1, "x"), p("A", 1, "x"), p("A", 1, "y"), p("A", 1, None, "t"), p("A", 2, None), p("B", 1, None)]
    warnings: list[str] = []
    kept = _drop_repeats(points, warnings)
    assert kept == [p("A", 2, None), p("B", 1, None), p("A", 1, "x"), p("A", 1, "y")]
    assert sorted(warnings) == ["s lists 1 point(s) more than once (A at 1 tokens); each is counted once",
                                "t lists 1 point(s) from s again (A at 1 tokens); each is counted once"]
