"""The `newllm-kit` command line: thin commands over the library, one error handler.

Every user-caused error surfaces as one line on stderr with exit code 2 (`--traceback` shows
the stack); a run whose numbers cannot be trusted exits 1. `--json` prints exactly one JSON
document on stdout.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import RunFailed, UserError
from .plugins import Plugins, load_plugins

app = typer.Typer(
    name="newllm-kit",
    help="Plugin-based toolkit for Context Vector Fixed-Point (CVFP) language-model experiments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
_state: dict[str, Any] = {"plugins": None, "traceback": False, "strict": False}

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a key with a TOML value, e.g. `models.0.layers=4`. Repeatable."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]


def plugins() -> Plugins:
    """The plugins loaded for this invocation (loaded once, on first use)."""
    if _state["plugins"] is None:
        _state["plugins"] = load_plugins(strict=_state["strict"])
    loaded: Plugins = _state["plugins"]
    return loaded


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _version(value: bool) -> None:
    if value:
        print(f"newllm-kit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
    show_traceback: Annotated[bool, typer.Option("--traceback", help="Show the full traceback on errors.")] = False,
    strict_plugins: Annotated[bool, typer.Option("--strict-plugins",
                                                 help="Fail if any installed plugin is broken.")] = False,
) -> None:
    """Run CVFP experiments from TOML files, fit scaling laws, inspect plugins.

    Example: `newllm-kit run experiments/quickstart.toml`
    """
    _state["traceback"] = show_traceback
    _state["strict"] = strict_plugins


def _load(file: Path, overrides: list[str] | None) -> Any:
    from .config import load_config

    return load_config(file, plugins().registry, overrides or [])


@app.command("plugins")
def plugins_command(as_json: JsonOption = False) -> None:
    """List installed plugins, their distribution and version, and the components each registered.

    Example: `newllm-kit plugins --json`
    """
    loaded = plugins()
    if as_json:
        _print_json({"plugins": [info.to_json() for info in loaded.infos]})
        return
    table = Table(title="newllm-kit plugins")
    for column in ("plugin", "distribution", "status", "components"):
        table.add_column(column)
    for info in loaded.infos:
        comps = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in info.components.items())
        status = {"ok": "[green]ok", "disabled": "[dim]disabled"}.get(info.status, f"[red]{info.status}")
        detail = comps if info.status == "ok" else (info.error or "")
        dist = f"{info.distribution} {info.version}" if info.distribution else "(registered directly)"
        table.add_row(info.name, dist, status, detail)
    console.print(table)


@app.command("validate")
def validate_command(file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file.")],
                     set_: SetOption = None) -> None:
    """Check an experiment file (and overrides) without running anything.

    Example: `newllm-kit validate experiments/v2.toml --set phase2.epochs=3`
    """
    from .experiment import plan

    config = _load(file, set_)
    units = plan(config)
    console.print(f"[green]ok[/] {file}: {len(config.models)} model(s) × "
                  f"{len(config.schema.experiment.samples)} training size(s) = {len(units)} unit(s)")


@app.command("params")
def params_command(file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file.")],
                   set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Parameter counts per model (built on the meta device: instant, no weights allocated).

    Example: `newllm-kit params experiments/v2.toml --json`
    """
    from .params import count_params

    config = _load(file, set_)
    rows = count_params(config)
    if as_json:
        _print_json({"models": rows})
        return
    table = Table(title=f"parameters: {file}")
    for column in ("model", "context_block", "token_block", "embedding", "head", "total", "phase 1 trains",
                   "phase 2 trains"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for row in rows:
        table.add_row(row["label"], *(f"{row[k]:,}" for k in ("context_block", "token_block", "embedding",
                                                               "head", "total")),
                      f"{row['trainable']['phase1']:,}", f"{row['trainable']['phase2']:,}")
    console.print(table)


@app.command("run")
def run_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file, or a run directory to resume.")],
    set_: SetOption = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Root folder for run directories.")] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest run of this experiment "
                                         "(or the run directory given as FILE), skipping finished units.")] = False,
    progress: Annotated[str, typer.Option("--progress", metavar="auto|plain|none",
                                          help="auto (rich on a terminal), plain, or none.")] = "auto",
    as_json: JsonOption = False,
) -> None:
    """Run every model × training size of an experiment: Phase 1, Phase 2, metrics, scaling fit.

    Example: `newllm-kit run experiments/quickstart.toml`, then after a kill:
    `newllm-kit run experiments/quickstart.toml --resume`
    """
    from .run import execute

    if progress not in ("auto", "plain", "none"):
        raise UserError(f"--progress: expected auto, plain or none (got {progress!r})")
    result = execute(file, set_ or [], out, resume, "none" if as_json and progress == "auto" else progress,
                     plugins())
    if result.pop("rank", 0) != 0:
        return  # under torchrun only rank 0 reports
    if as_json:
        _print_json(result)
    else:
        from .report import print_results

        print_results(console, result)


@app.command("scaling")
def scaling_command(
    sources: Annotated[list[Path] | None, typer.Argument(
        metavar="SOURCE...",
        help="Run directories, results.jsonl or CSV files (default: the latest run under runs/).")] = None,
    predict: Annotated[list[float] | None, typer.Option(
        "--predict", metavar="TOKENS", help="Token count to predict PPL at. Repeatable.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Write a log-log PNG here.")] = None,
    form: Annotated[str, typer.Option(
        "--form", metavar="power|offset",
        help="power, or offset (PPL = E + A·tokens^α, ≥ 4 points) reported beside the power law.")] = "power",
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Combine sources whose corpus, tokenizer "
                                              "or validation split differ.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fit PPL = A · tokens^α per model, with intervals, doubling reduction and predictions.

    Example: `newllm-kit scaling --predict 5e6` (after a run), or
    `newllm-kit scaling results.csv --predict 5e5 --predict 1e6 --plot fit.png`
    """
    from . import scaling

    if form not in ("power", "offset"):
        raise UserError(f"--form: expected power or offset (got {form!r})")
    paths = list(sources or []) or [scaling.latest_run_dir()]
    points, warnings = scaling.load_points(paths)
    scaling.check_comparable(points, allow_mixed, warnings)
    report = scaling.fit_all(points, list(predict or []), form)
    report.warnings[:0] = warnings
    if plot is not None:
        scaling.plot(report, points, plot)
    if as_json:
        _print_json(scaling.report_to_json(report))
    else:
        scaling.render(report, console)
        if plot is not None:
            console.print(f"plot written to {plot}")


def _register_plugin_commands() -> None:
    loaded = plugins()
    for impl in loaded.manager.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as error:  # a plugin's command registration must not take the CLI down
            print(f"warning: plugin {impl.plugin_name!r}: register_commands failed: {error}", file=sys.stderr)


def main() -> None:
    """Console-script entry point: run the app, map errors to one line and an exit code."""
    _state["traceback"] = "--traceback" in sys.argv
    _state["strict"] = "--strict-plugins" in sys.argv
    try:
        _register_plugin_commands()
        for info in plugins().problems():
            print(f"warning: plugin {info.name!r} ({info.distribution or 'local'}) not loaded: {info.error}",
                  file=sys.stderr)
        app()
    except (UserError, RunFailed) as error:
        if _state["traceback"]:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted; finished units are kept, continue with --resume", file=sys.stderr)
        sys.exit(130)
