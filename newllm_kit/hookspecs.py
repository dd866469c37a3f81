"""Every extension point of newllm-kit, in one place (docs/writing-plugins.md follows it hook by hook).

A plugin is a module (or object) with functions decorated by `newllm_kit.hookimpl` whose names
match the hooks below. Installed packages expose their plugin modules through the entry-point
group `newllm_kit`; the built-in plugins in `plugins/` use the same group.

Each `register_*` hook is called once whenever plugins load, with a `register` callback. Call it
once per component:

    register(name, factory, settings=SettingsModel, description="one line")

* `name` is what an experiment file writes (`architecture = "cvfp"`). Two plugins registering
  the same name for the same kind is an error naming both.
* `factory(settings)` must return an object with every member of its kind's protocol
  (`newllm_kit.protocols.PROTOCOLS`; a kind a plugin declares: that plugin's contract). Loading
  an experiment file (`newllm-kit validate` included) calls every factory except the runner's,
  checks the members by name and builds each model on the meta device: keep factories cheap
  (store the settings; read, download or allocate in `load`, `documents`, `build`).
* `settings` (optional) is a pydantic model: the TOML keys of this component, validated (unknown
  keys get a did-you-mean hint). Its keys sit in the table that names the component: `[data]`,
  `[tokenizer]`, `[embedding]`, `[runner]`, the `[[models]]` entry, or the recipe table that
  names a component of a declared kind; a recipe's fields are whole top-level tables. Without a
  model the component takes no keys and its factory gets `None`; a metric's factory gets its
  model's defaults (metrics are chosen by name only).
* Errors: raise `ConfigError`, `DataError`, `PluginError` or `UserError` (`newllm_kit.errors`) for
  a one-line message and exit 2, `RunFailed` for an untrustworthy result (exit 1). Any other
  exception from a factory becomes a one-line `PluginError` naming the plugin (exit 2); one from a
  hook marks the plugin broken; one from a component's methods during a run is reported as an
  internal error with its traceback.

Hook implementations must not have default argument values (pluggy does not pass them), and
must be spelt exactly as below: a misspelt `register_metric` is reported when plugins load.

A plugin may declare a kind of component of its own, for components only its recipe uses (the cvfp
recipe declares `solver`): a function named `register_<kind>s(register)`, decorated with
`newllm_kit.hookspec`, in its plugin module. Plugins load kinds before components, so any plugin can
then implement that hook; `[table] name = NAME` in the recipe's table picks one (a `ComponentSection`
with `kind = "<kind>"`, `newllm_kit.config`).
"""

from __future__ import annotations

from typing import Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("newllm_kit")
hookimpl = HookimplMarker("newllm_kit")


class Register(Protocol):
    """The callback passed to every `register_*` hook."""

    def __call__(
        self,
        name: str,
        factory: Any,
        *,
        settings: Any = None,
        description: str = "",
    ) -> None: ...


@hookspec
def register_architectures(register: Register) -> None:
    """Register model architectures (kind `architecture`, TOML `[[models]] architecture = NAME`; the
    entry's other keys are the settings).

    `factory(settings)` returns an `Architecture`: `build(vocab_size) -> nn.Module` makes a fresh
    `LanguageModel` (the core seeds it), `embedding_dim: int` is the width of its token table, and
    `default_recipe: str` names the recipe that trains it unless `[[models]] recipe` says otherwise.
    The model must also have the members that recipe needs (`newllm_kit_plugins.lm.AutoregressiveModel`,
    `newllm_kit_plugins.cvfp.contract.CVFPModel`), and every parameter that requires a gradient must
    be in one of its `param_groups()`, or the core refuses it.

    Example::

        @hookimpl
        def register_architectures(register):
            register("tiny-gru", TinyGRUArchitecture, settings=TinyGRUSettings,
                     description="GRU baseline for the lm recipe")
    """


@hookspec
def register_recipes(register: Register) -> None:
    """Register training recipes (kind `recipe`, TOML `[[models]] recipe = NAME`, default: the
    architecture's `default_recipe`).

    `factory(settings)` returns a `Recipe`: `train(model, data, unit) -> RecipeResult` trains one unit
    (a built model, its `UnitData` token streams, and a `UnitContext` with the runner, progress, the
    checkpoint and the configured metrics) and returns the validation sums (`EvalOutputs`, every
    position 1 … n−1 scored exactly once) with the recipe's own record fields.

    A recipe's `settings` model is special: each field is a top-level TOML table the recipe owns
    (the lm recipe's `lm` field is the `[lm]` table; the cvfp recipe owns `[solver]` and
    `[phase2]`). A field typed as a `newllm_kit.config.ComponentSection` subclass names a component
    of another kind (`[solver] name = "cvfp"`); its other keys are that component's settings, and
    `section.build()` returns the built component.

    Example::

        @hookimpl
        def register_recipes(register):
            register("distill", DistillRecipe, settings=DistillSettings)
    """


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizers (kind `tokenizer`, TOML `[tokenizer] name = NAME`; other keys: settings).

    `factory(settings)` returns a `TokenizerFactory`: `load(train_texts, cache_dir) -> Tokenizer`,
    where a `Tokenizer` has `vocab_size: int`, `fingerprint: str`, `encode(text) -> list[int]` and
    `decode(ids) -> str`. Trainable tokenizers learn from `train_texts` only (never validation text).

    Example::

        @hookimpl
        def register_tokenizers(register):
            register("chars", CharTokenizerFactory)
    """


@hookspec
def register_embeddings(register: Register) -> None:
    """Register token-embedding sources (kind `embedding`, TOML `[embedding] source = NAME`; other
    keys but `freeze`: settings).

    `factory(settings)` returns an `EmbeddingSource`: `load(vocab_size, dim, generator) -> torch.Tensor`
    returns the float [vocab_size, dim] table (draw any randomness from `generator`, seeded with the
    unit's seed), and `fingerprint() -> str` identifies that table. Freezing is not the source's: the
    core passes `[embedding] freeze` to the model's `set_embedding`.

    Example::

        @hookimpl
        def register_embeddings(register):
            register("word2vec", Word2VecEmbedding, settings=Word2VecSettings)
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register evaluation metrics (kind `metric`, TOML `[experiment] metrics = [NAME, …]`).

    `factory(settings)` returns a `Metric`: `name: str` (its registered name), `direction: str`
    ("min" or "max"), `unit: str` and `compute(outputs) -> float` over a unit's validation
    `EvalOutputs`. The value is the results' `val_<name>` (results.jsonl, results.csv) and a column
    `<name> (<unit>) ↓` or `↑` of the end-of-run table.

    Example::

        @hookimpl
        def register_metrics(register):
            register("bits_per_token", BitsPerToken)
    """


@hookspec
def register_data_sources(register: Register) -> None:
    """Register corpora (kind `data_source`, TOML `[data] source = NAME`; the table's other keys but
    the core's `text`, `train_start` and `val` are the settings).

    `factory(settings)` returns a `DataSource`: `size() -> int` is the number of rows,
    `documents(rows) -> list[list[str]]` one document per requested row, in order, each a non-empty
    list of turns (always the same for a row; `[data] text` decides which turns become the text), and
    `fingerprint() -> str` a hash of the corpus read.

    Example::

        @hookimpl
        def register_data_sources(register):
            register("wikitext", WikiText, settings=WikiTextSettings)
    """


@hookspec
def register_runners(register: Register) -> None:
    """Register runners (kind `runner`, TOML `[runner] name = NAME`; other keys: settings).

    `factory(settings)` returns a `Runner` (`newllm_kit.protocols.Runner`), which combines three
    protocols: `Placement` (device, precision, autocast, setup and teardown), `MemoryPolicy` (batch
    sizing, the out-of-memory fallback, and the optional `context_store`, `context_dtype` and
    `memory_fraction`, with defaults for a runner that leaves them out) and `Collectives` (rank, world
    size, shards and the collectives of a process group; identities on one process). Runners, recipes
    and their components never call `torch.cuda` directly: every CUDA call goes through
    `newllm_kit.cuda.backend()`, which tests replace with a fake. Only its class is checked when a file
    loads; it is built when a run starts.

    Example::

        @hookimpl
        def register_runners(register):
            register("mps", MPSRunner)
    """


@hookspec
def register_launchers(register: Register) -> None:
    """Register launchers (kind `launcher`, TOML `[launcher] name = NAME`, or `run --launcher NAME`;
    other keys: settings, besides the core's `stale_after_s`).

    `factory(settings)` returns a `Launcher` (`newllm_kit.protocols.Launcher`): where the units of a
    grid run, with `in_process: bool` (the core runs the units itself and never calls `launch`) and
    `launch(request) -> str | None`, which starts every job of the `LaunchRequest` and, unless
    detached, returns once all have ended. The built-ins: `sequential` (one after another in this
    process), `pool` (local worker processes, one unit per GPU) and `slurm` (a job array through
    submitit). A launcher starts each `UnitJob` as a process running `newllm-kit run RUN_DIR --unit
    ID` (`newllm_kit.launch.job_command` builds the command line, under torchrun for a ddp runner);
    the job claims its unit in the run directory, so a launcher needs no bookkeeping of its own.

    Example::

        @hookimpl
        def register_launchers(register):
            register("my_cluster", MyClusterLauncher, settings=MyClusterSettings)
    """


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment trackers (kind `tracker`, TOML `[tracking] backends = [NAME, …]`; settings: the
    table `[tracking.NAME]`). The built-ins: `tensorboard`, `mlflow` and `wandb`.

    `factory(settings)` returns a `Tracker` (`newllm_kit.protocols.Tracker`), built afresh for every unit
    on rank 0: `start(run)` opens the unit's run (a `TrackedRun`: unit id, attempt, experiment, run
    directory), `log_params(params)` gets the unit's resolved configuration as dotted keys,
    `log_metrics(row, step)` every metrics.jsonl row as it is written, `log_record(record)` the unit's
    results record, `log_artifacts(paths)` its plots, and `end(status)` says how the unit ended
    ("finished", "failed", "interrupted"). Import the backend's package inside `start`, so the kit starts
    fast, and give the tracker an optional `check()` that raises a UserError naming the install command
    when it is missing. metrics.jsonl stays the record: the first exception from a tracker disables it
    for the rest of the run, with one warning, and never fails the run.

    Example::

        @hookimpl
        def register_trackers(register):
            register("neptune", NeptuneTracker, settings=NeptuneSettings)
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the `newllm-kit` CLI. `cli` is the Typer app.

    Example::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello() -> None:
                print("hello")
    """
