"""Every extension point of newllm-kit, in one place.

A plugin is a module (or object) with functions decorated by `newllm_kit.hookimpl` whose names
match the hooks below. Installed packages expose their plugin modules through the entry-point
group `newllm_kit`; the built-in plugins in `plugins/` use the same group.

Each `register_*` hook receives a `register` callback. Call it once per component:

    register(name, factory, settings=SettingsModel, description="one line")

* `name` is what an experiment file writes (`architecture = "cvfp"`). Two plugins registering
  the same name for the same kind is an error naming both.
* `factory` is called by the core with the validated settings object as its only argument and
  must return an object satisfying the matching Protocol in `newllm_kit.protocols`. Loading an
  experiment file (`newllm-kit validate` included) calls every factory except the runner's and
  checks the result's members by name, and builds each architecture's model on the meta device:
  keep factories cheap (store the settings; read data, download or allocate in `load`,
  `documents`, `build`). A missing member is an error naming the plugin, the component and the
  member, before anything is trained.
* To fail with a clean one-line message, raise an exception from `newllm_kit.errors`:
  `ConfigError` (a setting is wrong), `DataError` (data missing or malformed), `PluginError`
  (your plugin cannot work here), `UserError` (anything else the user can fix; all exit 2), or
  `RunFailed` (the run produced an untrustworthy number; exit 1). Say what to change.
* `settings` (optional) is a pydantic model: the keys a TOML section may hold for this
  component, with defaults. Unknown keys are rejected with a did-you-mean hint. Without it the
  component accepts no keys and its factory is called with `None`.

Hook implementations must not have default argument values (pluggy does not pass them), and
must be spelt exactly as below: a misspelt `register_solver` is reported when plugins load.
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
    """Register model architectures (kind `architecture`, TOML `[[models]] architecture = NAME`).

    Called once when plugins load. `factory(settings)` returns an `Architecture`
    (`newllm_kit.protocols.Architecture`): `build(vocab_size)` makes the `nn.Module` with a
    ContextBlock, a TokenBlock, an embedding and a head, and `param_groups()` says what each
    phase trains.

    Example::

        @hookimpl
        def register_architectures(register):
            register("tiny-gru", TinyGRUArchitecture, settings=TinyGRUSettings,
                     description="GRU context block baseline")
    """


@hookspec
def register_solvers(register: Register) -> None:
    """Register fixed-point solvers (kind `solver`, TOML `[solver] name = NAME`).

    `factory(settings)` returns a `Solver`: `fit(model, ids, runner, progress)` trains the
    ContextBlock (Phase 1) over a stream of token ids and returns a `Phase1Report`;
    `solve(model, ids, runner, out=None)` returns the frozen block's final-layer context of every
    position as a `SolveResult` (written into `out` when given). Compute token inputs per chunk
    from the ids (`newllm_kit.spans.token_span`): nothing of size [n, T] for a whole stream.

    Example::

        @hookimpl
        def register_solvers(register):
            register("anderson", AndersonSolver, settings=AndersonSettings)
    """


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizers (kind `tokenizer`, TOML `[tokenizer] name = NAME`).

    `factory(settings)` returns a `TokenizerFactory`: `load(train_texts, cache_dir)` returns a
    `Tokenizer` with `encode`, `decode`, `vocab_size` and `fingerprint`. Trainable tokenizers
    may learn from `train_texts` (never from validation text).

    Example::

        @hookimpl
        def register_tokenizers(register):
            register("chars", CharTokenizerFactory)
    """


@hookspec
def register_embeddings(register: Register) -> None:
    """Register token-embedding sources (kind `embedding`, TOML `[embedding] source = NAME`).

    `factory(settings)` returns an `EmbeddingSource`: `load(vocab_size, dim, seed)` returns a
    `[vocab_size, dim]` float tensor, and `freeze` says whether it stays fixed in training.

    Example::

        @hookimpl
        def register_embeddings(register):
            register("word2vec", Word2VecEmbedding, settings=Word2VecSettings)
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register evaluation metrics (kind `metric`, TOML `[experiment] metrics = [NAME, …]`).

    `factory(settings)` returns a `Metric` with `name`, `direction` ("min" or "max"), `unit`
    and `compute(outputs) -> float`, where `outputs` is a `newllm_kit.protocols.EvalOutputs`.

    Example::

        @hookimpl
        def register_metrics(register):
            register("bits_per_token", BitsPerToken)
    """


@hookspec
def register_data_sources(register: Register) -> None:
    """Register corpora (kind `data_source`, TOML `[data] source = NAME`).

    `factory(settings)` returns a `DataSource`: `documents(rows)` returns the texts of the given
    row indices in a stable order, `size()` the number of rows (or None if unknown), and
    `fingerprint()` a hash of what was read.

    Example::

        @hookimpl
        def register_data_sources(register):
            register("wikitext", WikiText, settings=WikiTextSettings)
    """


@hookspec
def register_runners(register: Register) -> None:
    """Register runners (kind `runner`, TOML `[runner] name = NAME`).

    `factory(settings)` returns a `Runner`: it owns device placement, precision (autocast),
    batch sizing and, for distributed runners, process-group setup. Phases and solvers never
    call `torch.cuda` directly.

    Example::

        @hookimpl
        def register_runners(register):
            register("mps", MPSRunner)
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
