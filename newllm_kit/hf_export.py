"""`newllm-kit export --format hf`: a kept model as a Hugging Face `transformers` model folder.

The `transformer` baseline becomes a plain `GPT2LMHeadModel` (the same computation: learned
positions, pre-LayerNorm blocks, exact GELU, LayerNorm eps 1e-5, a head tied to the table), loadable
without the kit. Any other model whose recipe decodes (CVFP, GRU) becomes a `NewllmKitForCausalLM`
(`newllm_kit.hf_model`), which `AutoModelForCausalLM` loads after `import newllm_kit`. The folder
also holds the tokenizer where one is exact (`tokenizer.json` and `tokenizer_config.json`, for
`AutoTokenizer`) and the kept model's card. It is written under a hidden sibling name, loaded back
and checked against the kit's logits on a probe stream, then renamed into place: a failed export
leaves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .kept_models import KeptModel

FORMATS = ("hf",)
GPT2_ARCHITECTURE = "transformer"
END_OF_TEXT = "<|endoftext|>"
PROBE_TEXT = "Hello, world! The river ran by the mill.\n\tÜber café — 東京 🙂 end."
PROBE_TOKENS = 64  # positions the export is checked on (a transformer's: at most block_size)
CHECK_TOLERANCE = 1e-4  # |Δlogit| above this fails the export (measured on the built-ins: ≤ 3e-6)


def check_out(out: Path) -> None:
    """`--out` must be a new folder or an empty one."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: {'not a folder' if not out.is_dir() else 'not empty'}; choose a new "
                        f"folder (export never overwrites)")


def export_hf(kept: KeptModel, out: Path, say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write `out` and return what was written: model class, files, tokenizer, the check, how to load it."""
    check_out(out)
    which, run_dir = kept.folder.name, kept.folder.parents[2]  # RUN_DIR/models/<unit>/<which>
    decoder = kept.require("decoder", "be exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tokenizer_note, end_of_text = write_tokenizer(kept, tmp)
        if kept.description.get("architecture") == GPT2_ARCHITECTURE:
            model_class = "GPT2LMHeadModel"
            _write_gpt2(kept, tmp, end_of_text)
        else:
            model_class = "NewllmKitForCausalLM"
            _write_kit(kept, tmp, which)
        (tmp / "README.md").write_text(_card(kept, model_class, out), encoding="utf-8")
        ids = _probe(kept)
        say(f"checking {out.name}: {ids.numel()} tokens through the exported model and the kit's")
        difference = _check(tmp, kept, decoder, ids)
        if out.exists():
            out.rmdir()  # empty: check_out said so
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"run_dir": str(run_dir), "unit": kept.unit, "weights": which, "format": "hf", "out": str(out),
            "model_class": model_class, "files": sorted(p.name for p in out.iterdir()),
            "tokenizer": tokenizer_note, "checked_tokens": ids.numel(), "max_abs_logit_diff": difference,
            "load": load_line(model_class, out)}


def load_line(model_class: str, out: Path) -> str:
    """The one line of Python that loads the folder."""
    kit = "import newllm_kit; " if model_class != "GPT2LMHeadModel" else ""
    return (f"{kit}from transformers import AutoModelForCausalLM; "
            f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})")


# -- the transformer as GPT-2 --------------------------------------------------------------------------

def gpt2_config(settings: dict[str, Any], vocab_size: int, bos_eos: int | None = None) -> Any:
    """The `GPT2Config` of a kit `transformer` with these settings: the same computation."""
    from transformers import GPT2Config

    dropout = float(settings.get("dropout", 0.0))
    return GPT2Config(vocab_size=vocab_size, n_positions=int(settings["block_size"]),
                      n_embd=int(settings["n_embd"]), n_layer=int(settings["n_layer"]),
                      n_head=int(settings["n_head"]), n_inner=settings.get("mlp_width"),
                      activation_function="gelu",  # exact erf GELU, as the kit's F.gelu (GPT-2's own: gelu_new)
                      layer_norm_epsilon=1e-5, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      tie_word_embeddings=True, bos_token_id=bos_eos, eos_token_id=bos_eos)


def gpt2_state_dict(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The kit transformer's weights under GPT-2's names. GPT-2's Conv1D keeps [in, out] (the kit's Linear
    [out, in], transposed); a model without biases (`bias = false`) gets zero biases, the same function.
    Every kit weight must be used, so a changed architecture fails here, not silently."""
    left = dict(state)

    def take(name: str, transpose: bool = False) -> torch.Tensor:
        tensor = left.pop(name)
        return (tensor.t() if transpose else tensor).detach().contiguous().float().cpu()

    def bias(name: str, like: torch.Tensor) -> torch.Tensor:
        return take(name) if name in left else torch.zeros(like.shape[0] if like.dim() == 1 else like.shape[1])

    out = {"transformer.wte.weight": take("embedding.weight"), "transformer.wpe.weight": take("positions.weight")}
    out["transformer.ln_f.weight"] = take("norm.weight")
    out["transformer.ln_f.bias"] = bias("norm.bias", out["transformer.ln_f.weight"])
    pairs = [("ln_1", "attn_norm", False), ("attn.c_attn", "attn.qkv", True), ("attn.c_proj", "attn.proj", True),
             ("ln_2", "mlp_norm", False), ("mlp.c_fc", "mlp.fc", True), ("mlp.c_proj", "mlp.proj", True)]
    for i in range(n_layer):
        for hf_name, kit_name, linear in pairs:
            weight = take(f"blocks.{i}.{kit_name}.weight", transpose=linear)
            out[f"transformer.h.{i}.{hf_name}.weight"] = weight
            out[f"transformer.h.{i}.{hf_name}.bias"] = bias(f"blocks.{i}.{kit_name}.bias", weight)
    if left:
        raise UserError(f"transformer weights the GPT-2 export does not know: {', '.join(sorted(left)[:4])}; "
                        f"the architecture changed since this export was written")
    return out


def gpt2_model(settings: dict[str, Any], vocab_size: int, state: dict[str, torch.Tensor],
               bos_eos: int | None = None) -> Any:
    """A `GPT2LMHeadModel` (eval mode) holding the kit transformer's weights, head tied to the table."""
    from transformers import GPT2LMHeadModel

    config = gpt2_config(settings, vocab_size, bos_eos)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(gpt2_state_dict(state, config.n_layer), strict=False, assign=True)
    model.tie_weights()
    if unexpected or missing != ["lm_head.weight"] or model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError(f"GPT-2 export: weights do not fit GPT2LMHeadModel (missing {missing}, unexpected "
                           f"{unexpected})")
    return model.eval()


def _write_gpt2(kept: KeptModel, folder: Path, bos_eos: int | None) -> None:
    model = gpt2_model(kept.description["settings"], int(kept.description["vocab_size"]),
                       kept.model.state_dict(), bos_eos)
    with _quiet_transformers():
        model.save_pretrained(folder)


# -- any model whose recipe decodes ------------------------------------------------------------------

def _write_kit(kept: KeptModel, folder: Path, which: str) -> None:
    from .hf_config import NewllmKitConfig
    from .hf_model import NewllmKitForCausalLM

    tensors = dict(sorted(kept.kept.tensors.items()))
    config = NewllmKitConfig(
        experiment_toml=(kept.folder / "config.toml").read_text(encoding="utf-8"), label=kept.description["label"],
        architecture=kept.description["architecture"], recipe=kept.recipe_name,
        vocab_size=int(kept.description["vocab_size"]), unit=kept.unit, weights=which, record=kept.kept.record,
        kept_tensors={name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                      for name, t in tensors.items()},
        architectures=["NewllmKitForCausalLM"])
    model = NewllmKitForCausalLM(config)
    model.kit.load_state_dict(kept.model.state_dict(), strict=True)
    for name, tensor in model.kept_tensors().items():
        tensor.copy_(tensors[name])
    with _quiet_transformers():
        model.save_pretrained(folder)


# -- tokenizer ---------------------------------------------------------------------------------------

def byte_tokenizer_json() -> str:
    """A `tokenizers` tokenizer equal to the kit's `bytes` one: each UTF-8 byte is its own id (0–255),
    through GPT-2's byte-to-character alphabet and a BPE without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return str(tokenizer.to_str())


def _tokenizer_json(kept: KeptModel) -> tuple[str | None, str]:
    serialise = getattr(kept.tokenizer, "serialise", None)
    if callable(serialise):
        return str(serialise()), "the kept tokenizer.json"
    if kept.tokenizer.vocab_size == 256 and kept.tokenizer.encode(PROBE_TEXT) == list(PROBE_TEXT.encode()):
        return byte_tokenizer_json(), "the bytes tokenizer as an equal byte-level tokenizer.json"
    return None, (f"no tokenizer files: tokenizer {kept.description.get('tokenizer', {}).get('name')!r} has no "
                  f"serialised form")


def write_tokenizer(kept: KeptModel, folder: Path) -> tuple[str, int | None]:
    """`tokenizer.json` + `tokenizer_config.json` (for `AutoTokenizer`) of a kept model's tokenizer, when
    they encode as the kit's does; returns what was written (or why nothing) and the id of
    <|endoftext|> (GPT-2's bos and eos) where the tokenizer has that token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text, note = _tokenizer_json(kept)
    if text is None:
        return note, None
    backend = Tokenizer.from_str(text)
    end_of_text = backend.token_to_id(END_OF_TEXT)
    special: dict[str, Any] = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT} if end_of_text is not None else {}
    if kept.description["architecture"] == GPT2_ARCHITECTURE:  # GPT-2 reads at most n_positions tokens
        special["model_max_length"] = int(kept.description["settings"]["block_size"])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    with _quiet_transformers():  # the probe may be longer than model_max_length: no warning for that
        if fast(PROBE_TEXT, add_special_tokens=False)["input_ids"] != kept.tokenizer.encode(PROBE_TEXT):
            return "no tokenizer files: their tokenizers form does not encode as the kit's tokenizer does", None
        fast.save_pretrained(folder)
    return note, end_of_text


# -- the check ----------------------------------------------------------------------------------------

def _probe(kept: KeptModel) -> torch.Tensor:
    """A probe stream: the probe text's ids, cycled to PROBE_TOKENS (a transformer's block at most)."""
    ids = kept.tokenizer.encode(PROBE_TEXT) or [0]
    block = kept.description["settings"].get("block_size") if kept.description["architecture"] == GPT2_ARCHITECTURE \
        else None
    n = min(PROBE_TOKENS, int(block)) if block else PROBE_TOKENS
    return torch.tensor((ids * (n // len(ids) + 1))[:n], dtype=torch.long)


def _check(folder: Path, kept: KeptModel, decoder: Any, ids: torch.Tensor) -> float:
    """Max |Δlogit| between the folder loaded by `AutoModelForCausalLM` and the kit's decoder on `ids`."""
    from transformers import AutoModelForCausalLM

    expected = decoder(kept.model, kept.kept).feed(ids)
    with _quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        got = loaded(ids[None]).logits[0].float()
    difference = float((got - expected).abs().max())
    if not difference <= CHECK_TOLERANCE:
        raise RuntimeError(f"export check: the exported model's logits differ from the kit's by {difference:.3g} "
                           f"(> {CHECK_TOLERANCE:g}) on {ids.numel()} tokens; nothing was written")
    return difference


def _card(kept: KeptModel, model_class: str, out: Path) -> str:
    card = (kept.folder / "README.md").read_text(encoding="utf-8") if (kept.folder / "README.md").is_file() else ""
    how = ("a `transformers` `GPT2LMHeadModel`: it loads without newllm-kit" if model_class == "GPT2LMHeadModel"
           else "a `NewllmKitForCausalLM`: `import newllm_kit` (with the plugins that trained it installed) "
                "registers it with `AutoModelForCausalLM`, no remote code")
    return (f"{card.rstrip()}\n\n## Exported with `newllm-kit export --format hf`\n\nThis folder is {how}:\n\n"
            f"```python\n{load_line(model_class, out).replace('; ', chr(10))}\n```\n")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info lines from transformers while the export saves and loads."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
