"""The `newllm-kit` command line: the Typer app, thin commands over the library, one error handler.

Every user-caused error surfaces as one line on stderr with exit code 2 (`--traceback` shows
the stack); a run whose numbers cannot be trusted exits 1, an interrupted one 130. Only a bug
shows a traceback. `--json` prints exactly one JSON document on stdout. `cli_errors` turns an
error into that line and code, `cli_help` shapes help and usage, `cli_params` lays out `params`.
"""

from __future__ import annotations

import signal
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .allocator import return_large_blocks_to_os
from .cli_errors import STOP_SIGNALS, exit_for, stop_on_signal
from .cli_help import Command, Commands
from .cli_params import params_tables
from .errors import UserError
from .plugins import Plugins, load_plugins
from .registry import is_plugin_error, one_line, signals_seen
from .skeleton import KINDS as TEMPLATE_KINDS
from .strict_json import json_text

app = typer.Typer(
    name="newllm-kit",
    cls=Commands,
    help="Plugin-based toolkit for language-model experiments from TOML files: CVFP models and baselines.",
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


# Commands that read result files and never build a component: loading the plugins (torch with them,
# ~2 s) would only slow them down, so their command lines skip it.
READS_FILES_ONLY = {"scaling", "compare", "plot", "select"}


def plugins() -> Plugins:
    """The plugins loaded for this invocation (loaded once, on first use)."""
    if _state["plugins"] is None:
        _state["plugins"] = load_plugins(strict=_state["strict"])
    loaded: Plugins = _state["plugins"]
    return loaded


def _print_json(data: Any) -> None:
    """Strict JSON: a NaN or infinite number is null, never a literal other parsers refuse."""
    sys.stdout.write(json_text(data, indent=2, sort_keys=False) + "\n")


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


# A group so that `plugins` still lists while `plugins new` writes a package; the listing is its callback.
plugins_app = typer.Typer(cls=Commands, invoke_without_command=True, add_completion=False,
                          rich_markup_mode="markdown")
app.add_typer(plugins_app, name="plugins")


@plugins_app.command("new", cls=Command)
def plugins_new_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Distribution name, e.g. my-plugin (import name "
                                        "my_plugin); also the plugin's and the component's name.")],
    kind: Annotated[str, typer.Option("--kind", metavar="KIND", help="The component the package registers, one of: "
                                      f"{', '.join(TEMPLATE_KINDS)}.")],
    directory: Annotated[Path, typer.Option("--dir", metavar="DIR",
                                            help="Where the package folder DIR/NAME is written.")] = Path("."),
) -> None:
    """Write a ready-to-install plugin package with one working component, its test and a README.

    Example: `newllm-kit plugins new my-metric --kind metric`, then `cd my-metric && pip install -e .`
    """
    from .skeleton import check_kind, write_plugin

    check_kind(kind)
    loaded = plugins()
    taken = {info.name for info in loaded.infos} | set(loaded.registry.components.get(kind, {}))
    written = write_plugin(name, kind, directory, taken)
    target = directory / name
    console.print(escape(f"wrote the {kind.replace('_', ' ')} plugin {name!r} to {target}:"))
    for path in written:
        console.print(escape(f"  {path.relative_to(target)}"))
    console.print(escape(f"next: cd {target} && pip install -e . && python -m pytest -q"))


@plugins_app.callback()
def plugins_command(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List installed plugins, their distribution and version, and the components each registered.

    `newllm-kit plugins new NAME --kind KIND` writes a new plugin package.

    Example: `newllm-kit plugins --json`
    """
    if ctx.invoked_subcommand is not None:
        return
    loaded = plugins()
    if as_json:
        _print_json({"plugins": [info.to_json() for info in loaded.infos]})
        return
    table = Table(title="newllm-kit plugins")
    for column in ("plugin", "distribution", "status", "components"):
        table.add_column(column)
    for info in loaded.infos:  # names and errors come from third-party code: escaped for rich
        comps = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in info.components.items())
        status = {"ok": "[green]ok", "disabled": "[dim]disabled"}.get(info.status, f"[red]{escape(info.status)}")
        detail = comps if info.status == "ok" else (info.error or "")
        dist = f"{info.distribution} {info.version}" if info.distribution else "(registered directly)"
        table.add_row(escape(info.name), escape(dist), status, escape(detail))
    console.print(table)


@app.command("validate", cls=Command)
def validate_command(file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file.")],
                     set_: SetOption = None) -> None:
    """Check an experiment file (and overrides) without running anything: everything `run` checks before it
    reads data, including the split and whether the data, tokenizer and embedding can load here.

    Example: `newllm-kit validate experiments/v2.toml --set phase2.epochs=3`
    """
    from .experiment import plan
    from .preflight import check_before_data

    config = _load(file, set_)
    check_before_data(config)
    units = plan(config)
    seeds = config.schema.experiment.seed_list()
    grid = [f"{len(config.models)} model(s)", f"{len(config.schema.experiment.samples)} training size(s)"]
    grid += [f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"] if len(seeds) > 1 else []
    grid += [f"{len(config.variants)} sweep variants"] if config.variants else []
    console.print(f"[green]ok[/] {escape(str(file))}: {' × '.join(grid)} = {len(units)} unit(s)")
    for variant in config.variants:
        changes = ", ".join(f"{k} = {_toml_value(v)}" for k, v in variant.changes.items())
        console.print(escape(f"  variant {variant.name}: {changes}"))


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


@app.command("params", cls=Command)
def params_command(file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file.")],
                   set_: SetOption = None, as_json: JsonOption = False) -> None:
    """Parameter counts per model (built on the meta device: instant, no weights allocated).

    Example: `newllm-kit params experiments/v2.toml --json`
    """
    from .params import count_params

    config = _load(file, set_)
    rows = count_params(config)
    variants = [(v.name, v.changes, count_params(v.config)) for v in config.variants]
    if as_json:
        _print_json({"models": rows, **({"variants": [{"name": name, "changes": changes, "models": counts}
                                                      for name, changes, counts in variants]} if variants else {})})
        return
    for name, _, counts in variants or [("", {}, rows)]:
        title = f"parameters: {file}" + (f" [variant {name}]" if name else "")
        for table in params_tables(escape(title), counts, console.width):
            console.print(table)


@app.command("run", cls=Command)
def run_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Experiment TOML file, or a run directory to resume.")],
    set_: SetOption = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Root folder for run directories.")] = Path("runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest run of this experiment "
                                         "(or the run directory given as FILE), skipping finished units.")] = False,
    launcher: Annotated[str | None, typer.Option("--launcher", metavar="NAME", help="Where the units run: "
                                                 "sequential (this process), pool (local workers) or slurm; "
                                                 "sets launcher.name.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", metavar="N", min=1,
                                             help="Units at once for --launcher pool (sets launcher.jobs).")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Submit the units (--launcher slurm) and exit; follow "
                                         "them with `newllm-kit status RUN_DIR`.")] = False,
    unit: Annotated[str | None, typer.Option("--unit", metavar="ID", help="Run one unit of the run directory "
                                             "FILE (what a launcher's job runs).")] = None,
    progress: Annotated[str, typer.Option("--progress", metavar="auto|plain|none",
                                          help="auto (rich on a terminal), plain, or none.")] = "auto",
    as_json: JsonOption = False,
) -> None:
    """Run every model × training size of an experiment: each unit by its recipe, metrics, scaling fit.

    Example: `newllm-kit run experiments/quickstart.toml`, then after a kill:
    `newllm-kit run experiments/quickstart.toml --resume`; a grid on 2 local workers:
    `newllm-kit run experiments/v2.toml --launcher pool --jobs 2`
    """
    from .run import execute

    if progress not in ("auto", "plain", "none"):
        raise UserError(f"--progress: expected auto, plain or none (got {progress!r})")
    overrides = [*(set_ or []), *([f"launcher.name={_toml_value(launcher)}"] if launcher is not None else []),
                 *([f"launcher.jobs={jobs}"] if jobs is not None else [])]
    result = execute(file, overrides, out, resume, "none" if as_json and progress == "auto" else progress,
                     plugins(), unit=unit, detach=detach)
    if result.pop("rank", 0) != 0:
        return  # under torchrun only rank 0 reports
    if "submitted" in result:
        if as_json:
            _print_json(result)
        else:
            console.print(escape(f"submitted {result['submitted']}; follow with: newllm-kit status "
                                 f"{result['run_dir']}"))
        return
    if unit is None:
        result["plots"] = _plots_after_run(Path(result["run_dir"]))
    if as_json:
        _print_json(result)
    else:
        from .report import print_results

        print_results(console, result)


@app.command("status", cls=Command)
def status_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`runs/<experiment>/<run>`).")],
    as_json: JsonOption = False,
) -> None:
    """Each unit of a run: finished, running (claimed by which host and job, which phase), interrupted,
    failed (with its error) or pending; read from the run directory. Rebuilds results.jsonl, results.csv
    and summary.json from the finished units' records.

    Example: `newllm-kit status runs/v2/20261207-…`
    """
    from .config import load_config
    from .experiment import adopt_results_jsonl, plan, publish
    from .rundir import RunDir
    from .status import status_document

    run = RunDir.open(run_dir)
    config = load_config(run.path / "config.resolved.toml", plugins().registry, [])
    units = plan(config)
    warnings: list[str] = []
    try:
        adopt_results_jsonl(run, config, units, warnings.append)
        publish(run, config, units, warnings.append)
    except UserError as error:  # e.g. a read-only copy: the tables stay as they are
        warnings.append(f"warning: tables not rebuilt ({error})")
    document = status_document(run, config, units)
    document["warnings"] = warnings
    if as_json:
        _print_json(document)
        return
    for line in warnings:
        print(line, file=sys.stderr)
    table = Table(title=escape(f"{run.path} ({document['status'] or 'no status'})"))
    for column in ("unit", "state", "detail"):
        table.add_column(column)
    colours = {"finished": "green", "running": "cyan", "failed": "red", "interrupted": "yellow"}
    for entry in document["units"]:
        colour = colours.get(entry["state"], "white")
        table.add_row(escape(entry["unit"]), f"[{colour}]{entry['state']}", escape(entry["detail"]))
    console.print(table)
    console.print(", ".join(f"{n} {state}" for state, n in document["counts"].items()))


def _plots_after_run(run_dir: Path) -> str:
    """Where the run's pictures went, or how to get them: matplotlib is optional."""
    from .plots import write_plots
    from .scaling_plot import INSTALL

    try:
        written = write_plots(run_dir)
    except UserError as error:
        return f"not drawn ({error}); then: newllm-kit plot {run_dir}" if INSTALL in str(error) else str(error)
    return f"{run_dir / 'plots'} ({len(written)} PNG files; redraw with newllm-kit plot {run_dir})"


@app.command("scaling", cls=Command)
def scaling_command(
    sources: Annotated[list[Path] | None, typer.Argument(
        metavar="SOURCE",
        help="Run directories, results.jsonl or CSV files (default: the latest run under runs/ that finished "
             "a unit and did not fail).")] = None,
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
    notes: list[str] = []
    if sources:
        paths = list(sources)
    else:
        latest, notes = scaling.latest_run_dir()
        paths = [latest]
    points, warnings = scaling.load_points(paths)
    scaling.check_comparable(points, allow_mixed, warnings)
    report = scaling.fit_all(points, list(predict or []), form)
    report.warnings[:0] = notes + warnings
    if plot is not None:
        from .scaling_plot import plot as write_plot

        write_plot(report, points, plot)
    if as_json:
        _print_json(scaling.report_to_json(report))
    else:
        scaling.render(report, console)
        if plot is not None:
            console.print(escape(f"plot written to {plot}"))


@app.command("compare", cls=Command)
def compare_command(
    sources: Annotated[list[Path], typer.Argument(
        metavar="RUN_OR_FILE", help="Run directories, results.jsonl or results.csv files.")],
    metric: Annotated[str, typer.Option("--metric", metavar="KEY",
                                        help="Record key: val_ppl, val_acc, train_er, val_er …")] = "val_ppl",
    by: Annotated[str, typer.Option("--by", metavar="model|variant",
                                    help="Compare models (within each variant) or sweep variants (within each "
                                         "model), at each training size.")] = "model",
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Compare sources whose corpus, tokenizer "
                                              "or validation split differ.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Is one model (or variant) better than another? Difference of means with a 95% interval,
    paired by seed where both sides ran the same seeds (Welch otherwise), a verdict, and α differences.

    Example: `newllm-kit compare runs/v2-seeds/20261201-…` or `newllm-kit compare RUN --by variant --metric val_er`
    """
    from .compare import compare, render

    document = compare(list(sources), metric, by, allow_mixed)
    if as_json:
        _print_json(document)
    else:
        render(document, console)


@app.command("select", cls=Command)
def select_command(
    sources: Annotated[list[Path], typer.Argument(
        metavar="RUN_OR_FILE", help="Run directories or results.jsonl files of a sweep with a development split.")],
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Combine sources whose corpus, tokenizer "
                                              "or splits differ.")] = False,
    as_json: JsonOption = False,
) -> None:
    """A sweep's setting chosen on the development rows: per model and size, the variant with the lowest
    mean dev NLL over seeds, and its validation PPL (scored once) with a 95% interval and its FLOPs.

    Example: `newllm-kit select runs/baselines/20261207-…`
    """
    from .selection import render, select_sources

    document = select_sources(list(sources), allow_mixed)
    if as_json:
        _print_json(document)
    else:
        render(document, console)


@app.command("plot", cls=Command)
def plot_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`runs/<experiment>/<run>`).")],
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR",
                                             help="Folder for the PNGs (default RUN_DIR/plots).")] = None,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Plot results whose corpus, tokenizer, "
                                              "split or embedding fingerprints differ.")] = False,
) -> None:
    """Training curves per unit and per model, PPL vs tokens with the fits, and sweep plots, as PNGs
    (needs `pip install 'newllm-kit[plot]'`).

    Example: `newllm-kit plot runs/quickstart/20261201-… --out figures`
    """
    from .plots import write_plots

    written = write_plots(run_dir, out, allow_mixed)
    console.print(escape(f"{len(written)} PNG files in {out or run_dir / 'plots'}:"))
    for path in written:
        console.print(escape(f"  {path.name}"))


UnitOption = Annotated[str | None, typer.Option("--unit", metavar="ID",
                                                 help="The unit whose kept model to use (default: the only one).")]
WeightsOption = Annotated[str, typer.Option("--weights", metavar="best|final",
                                            help="Which kept weights: the best epoch's (default) or the last's.")]


def _weights(value: str) -> str:
    if value not in ("best", "final"):
        raise UserError(f"--weights {value}: choose best or final")
    return value


@app.command("sample", cls=Command)
def sample_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`runs/<experiment>/<run>`).")],
    prompt: Annotated[str, typer.Option("--prompt", metavar="TEXT", help="Text the model continues.")],
    unit: UnitOption = None,
    tokens: Annotated[int, typer.Option("--tokens", metavar="N", help="Tokens to generate.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", metavar="T",
                                               help="Softmax temperature; 0 takes the most likely token.")] = 1.0,
    top_k: Annotated[int | None, typer.Option("--top-k", metavar="K",
                                              help="Draw among the K most likely tokens only.")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the draws: the same text each time.")] = 0,
    weights: WeightsOption = "best",
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda, cuda:1 …")] = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Generate text from a kept model: the prompt, then one token at a time (CVFP: the sequential rollout
    of the frozen ContextBlock and the TokenBlock, as Phase 2 trained them).

    Example: `newllm-kit sample runs/quickstart/20261201-… --unit A-600 --prompt "The weather" --tokens 40`
    """
    from .kept_models import load_model
    from .sampling import SampleSettings, sample

    kept = load_model(run_dir, unit, _weights(weights), plugins().registry, _device(device))
    result = sample(kept, prompt, SampleSettings(tokens, temperature, top_k, seed))
    if as_json:
        _print_json(result)
        return
    console.print(f"[dim]{escape(result['unit'])} ({escape(str(result['weights']))} weights), seed {seed}:[/dim]")
    console.print(escape(prompt), end="", style="bold", soft_wrap=True)
    console.print(escape(result["text"]), soft_wrap=True)


def _device(name: str) -> Any:
    import torch

    from . import cuda

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name}: not a device name ({error}); e.g. cpu, cuda, cuda:1") from error
    if device.type == "cuda" and not cuda.backend().is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


@app.command("evaluate", cls=Command)
def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`runs/<experiment>/<run>`).")],
    unit: Annotated[str | None, typer.Option("--unit", metavar="ID",
                                             help="One unit (default: every unit with a kept model).")] = None,
    overrides: SetOption = None,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Results go to evaluations/NAME.jsonl "
                                             "(default: SOURCE-SCHEME-START-COUNT of the data).")] = None,
    weights: WeightsOption = "best",
    as_json: JsonOption = False,
) -> None:
    """The configured metrics of kept models on other data: `--set data.…` picks the source, the rows
    (`data.val`) and the text scheme; the run's own validation by default. Results are appended to
    RUN_DIR/evaluations/NAME.jsonl with the data's fingerprints.

    Example: `newllm-kit evaluate runs/v2/20261201-… --set data.val.start=2000 --set data.val.count=200`
    """
    from .evaluation import evaluate_run

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    lines = evaluate_run(run_dir, unit, _weights(weights), overrides or [], plugins().registry, name, say)
    if as_json:
        _print_json({"run_dir": str(run_dir), "evaluations": lines})
        return
    table = Table(title=escape(f"{lines[0]['file']}"))
    for column in ("unit", "weights", "tokens", *(k for k in lines[0]["metrics"])):
        table.add_column(column, justify="left" if column in ("unit", "weights") else "right")
    for line in lines:
        table.add_row(escape(line["unit"]), line["weights"], f"{line['val_tokens']:,}",
                      *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in line["metrics"].values()))
    console.print(table)


@app.command("export", cls=Command)
def export_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (`runs/<experiment>/<run>`).")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="A new (or empty) folder for the export.")],
    unit: UnitOption = None,
    format_: Annotated[str, typer.Option("--format", metavar="FORMAT", help="hf: a Hugging Face transformers "
                                         "model folder.")] = "hf",
    weights: WeightsOption = "best",
    as_json: JsonOption = False,
) -> None:
    """Export a kept model: `--format hf` writes a transformers folder (the transformer baseline as
    GPT2LMHeadModel; CVFP and GRU as NewllmKitForCausalLM, loaded after `import newllm_kit`), checked
    against the kit's logits before it is put in place.

    Example: `newllm-kit export runs/quickstart/20261201-… --unit T-600 --format hf --out exports/t600`
    """
    from .hf_export import FORMATS, check_out, export_hf
    from .kept_models import load_model

    if format_ not in FORMATS:
        raise UserError(f"--format {format_}: not an export format; choose one of: {', '.join(FORMATS)}")
    check_out(out)
    kept = load_model(run_dir, unit, _weights(weights), plugins().registry)
    result = export_hf(kept, out, lambda text: print(text, file=sys.stderr))
    if as_json:
        _print_json(result)
        return
    console.print(escape(f"exported {result['unit']} ({weights} weights) as {result['model_class']} to {out}: "
                         f"{', '.join(result['files'])}"), soft_wrap=True)
    console.print(escape(f"tokenizer: {result['tokenizer']}"))
    console.print(escape(f"checked: max |Δlogit| {result['max_abs_logit_diff']:.2g} against the kit on "
                         f"{result['checked_tokens']} tokens"))
    console.print(escape(f"load it with: {result['load']}"), soft_wrap=True)


def _register_plugin_commands() -> None:
    loaded = plugins()
    for impl in loaded.manager.hook.register_commands.get_hookimpls():
        with redirect_stdout(sys.stderr), signals_seen() as seen:  # stdout is the command's (`--json`)
            try:
                impl.function(cli=app)
            except BaseException as error:  # sys.exit included: a plugin's registration must not take the CLI down
                if not is_plugin_error(error, seen):  # a real Ctrl-C or SIGTERM
                    raise
                print(f"warning: plugin {impl.plugin_name!r}: register_commands failed: {one_line(error)}",
                      file=sys.stderr)


def main() -> None:
    """Console-script entry point: run the app, map errors to one line and an exit code."""
    _state["traceback"] = "--traceback" in sys.argv
    _state["strict"] = "--strict-plugins" in sys.argv
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_on_signal)
    return_large_blocks_to_os()
    try:
        if _command_word(sys.argv[1:]) not in READS_FILES_ONLY:
            _warn_about_plugins()
        # Not `app()`: Typer's own main turns Ctrl-C into a silent exit 130 and usage errors into a box.
        command = typer.main.get_command(app)
        with command.make_context("newllm-kit", sys.argv[1:]) as ctx:
            command.invoke(ctx)
    except (Exception, KeyboardInterrupt) as error:
        exit_for(error, _state["traceback"])
        raise  # a bug: its traceback is the report


def _command_word(args: list[str]) -> str | None:
    """The command a command line names (the first word that is not a global option)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def _warn_about_plugins() -> None:
    """Load the plugins, add their commands, and say which did not load."""
    _register_plugin_commands()
    for info in plugins().problems():
        where = f"{info.name!r} ({info.distribution or 'local'})"
        if info.status == "conflict":  # loaded; only the clashing component is disabled
            print(f"warning: plugin {where}: {info.error}", file=sys.stderr)
            continue
        if _state["traceback"] and info.traceback:
            print(info.traceback, file=sys.stderr, end="" if info.traceback.endswith("\n") else "\n")
        print(f"warning: plugin {where} not loaded: {info.error}", file=sys.stderr)
