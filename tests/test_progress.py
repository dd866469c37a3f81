"""Plain progress lines: what a log reader sees at the end of a run."""

from __future__ import annotations

import io

from rich.console import Console

from newllm_kit.progress import PlainProgress, RichProgress


def _closing_line(ended: int) -> str:
    stream = io.StringIO()
    progress = PlainProgress(stream)
    progress.experiment("v2", 2)
    for i in range(ended):
        progress.begin_unit(f"A-{i}", i + 1, 2)
        progress.end_unit(f"A-{i}", "val_ppl=1.00")
    progress.close()
    return stream.getvalue().splitlines()[-1]


def test_a_complete_run_says_finished() -> None:
    assert "finished in" in _closing_line(2)


def test_a_failed_run_says_how_far_it_got() -> None:
    line = _closing_line(1)
    assert "finished" not in line and "stopped after" in line and "1 of 2 unit(s) done" in line


def test_rich_progress_prints_names_and_messages_as_text_not_markup() -> None:
    console = Console(record=True, width=120, color_system=None, force_terminal=True)
    progress = RichProgress(console)
    progress.experiment("[bold red]X", 1)
    progress.begin_unit("[/x]", 1, 1)
    progress.start("phase1", 3)
    progress.advance("phase1", loss=0.5)
    progress.finish("phase1")
    progress.message("[/x]: resumed from checkpoint")
    progress.end_unit("[/x]", "val_ppl=[1.00]")
    progress.close()
    text = console.export_text()
    for needle in ("[bold red]X", "✓ [/x] val_ppl=[1.00]", "[/x]: resumed from checkpoint"):
        assert needle in text, needle
