"""`newllm-kit export --format hf`: every built-in architecture round-trips through `transformers` with the
kit's logits (within 1e-5): the transformer as a plain GPT2LMHeadModel, CVFP and GRU as the kit's
NewllmKitForCausalLM, which `AutoModelForCausalLM` loads in a fresh process after `import newllm_kit`
alone. The tokenizer files encode as the kit's tokenizer; a failed or refused export leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_gpt2_tokenizer_dir
from newllm_kit_plugins.lm.transformer import TransformerArchitecture, TransformerSettings
from newllm_kit_plugins.tokens.gpt2_tokenizer import HFTokenizer
from test_kept_models import MIXED, UNITS
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from newllm_kit import cli
from newllm_kit.errors import UserError
from newllm_kit.hf_export import PROBE_TEXT, PROBE_TOKENS, gpt2_config, gpt2_model, gpt2_state_dict, write_tokenizer
from newllm_kit.hf_model import NewllmKitForCausalLM
from newllm_kit.kept_models import KeptModel, load_model
from newllm_kit.plugins import load_plugins
from newllm_kit.run import execute

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TEXT = ("The river and the old mill stood by the bridge where the children played; "
        "über das Wasser — 東京 🙂 and back again.")
BLOCK = 32  # the fixture transformer's block_size: the longest stream GPT-2 reads


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_kept_models' run: a CVFP, a transformer and a GRU trained on the same bytes, all kept."""
    folder = tmp_path_factory.mktemp("export-run")
    (folder / "mixed.toml").write_text(MIXED)
    result = execute(folder / "mixed.toml", [], folder / "runs", False, "none", load_plugins())
    return Path(result["run_dir"])


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each unit's best weights exported by the command (in this process), with its JSON document."""
    out = tmp_path_factory.mktemp("exports")
    documents = {}
    for unit in UNITS:
        code, document = export(["export", str(run_dir), "--unit", unit, "--out", str(out / unit), "--json"])
        assert code == 0, document
        documents[unit] = json.loads(document)
    return documents


def export(argv: list[str]) -> tuple[int, str]:
    """`newllm-kit ARGV` in this process through the console script's error handling: (exit code,
    stdout on success or stderr on failure)."""
    from io import StringIO
    from unittest import mock

    out, err = StringIO(), StringIO()
    with mock.patch.object(sys, "argv", ["newllm-kit", *argv]), mock.patch.object(sys, "stdout", out), \
            mock.patch.object(sys, "stderr", err), mock.patch.object(cli, "_register_plugin_commands", lambda: None), \
            mock.patch.dict(cli._state, {"plugins": load_plugins()}):
        try:
            cli.main()
            code = 0
        except SystemExit as stopped:
            code = int(stopped.code or 0)
    return code, out.getvalue() if code == 0 else err.getvalue()


def kept(run_dir: Path, unit: str) -> KeptModel:
    return load_model(run_dir, unit, "best", load_plugins().registry)


def stream(n: int) -> torch.Tensor:
    ids = list(TEXT.encode())
    return torch.tensor((ids * (n // len(ids) + 1))[:n])


def kit_logits(model: KeptModel, ids: torch.Tensor) -> torch.Tensor:
    """What `newllm-kit sample` computes: the recipe's decoder reading the stream."""
    return model.recipe.decoder(model.model, model.kept).feed(ids)


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max())


# -- the folder and the command ----------------------------------------------------------------------

def test_each_architecture_exports_a_checked_transformers_folder(run_dir: Path,
                                                                exported: dict[str, dict[str, Any]]) -> None:
    for unit, document in exported.items():
        folder = Path(document["out"])
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= \
            set(document["files"]) == {p.name for p in folder.iterdir()}, unit
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        assert (model_type, document["model_class"]) == (
            ("gpt2", "GPT2LMHeadModel") if unit.startswith("T") else ("newllm-kit", "NewllmKitForCausalLM")), unit
        # the check: the probe text's bytes cycled to 64 positions (the transformer's block at most), through
        # the folder as transformers loads it and through the kit's decoder
        probe = list(PROBE_TEXT.encode())
        ids = torch.tensor((probe * 2)[:BLOCK if unit.startswith("T") else PROBE_TOKENS])
        hf = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            measured = gap(hf(ids[None]).logits[0], kit_logits(kept(run_dir, unit), ids))
        assert document["checked_tokens"] == ids.numel()
        assert document["max_abs_logit_diff"] == pytest.approx(measured, rel=1e-6, abs=1e-9) and measured <= TOLERANCE
        assert ("import newllm_kit; " in document["load"]) == (model_type == "newllm-kit")
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no hidden leftovers


def test_export_refuses_a_used_folder_and_an_unknown_format_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code, message = export(["export", str(run_dir), "--unit", "G-24", "--out", str(used)])
    assert code == 2 and "not empty" in message and len(message.strip().splitlines()) == 1
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    code, message = export(["export", str(run_dir), "--unit", "G-24", "--out", str(tmp_path / "x"),
                            "--format", "onnx"])
    assert code == 2 and "--format onnx" in message and "hf" in message and len(message.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_failed_export_leaves_nothing(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from newllm_kit import hf_export

    written = hf_export.gpt2_model

    def shifted(*args: Any, **kwargs: Any) -> Any:
        """The GPT-2 written with its final LayerNorm's bias off by 0.05 (a new tensor: the model holds the
        kit's own tensors), so its logits are not the kit's."""
        model = written(*args, **kwargs)
        model.transformer.ln_f.bias = torch.nn.Parameter(model.transformer.ln_f.bias.detach() + 0.05)
        return model

    monkeypatch.setattr(hf_export, "gpt2_model", shifted)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match=r"export check: .* differ from the kit's by \S+ \(> 0\.0001\) on 32 tokens"):
        hf_export.export_hf(kept(run_dir, "T-24"), empty)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not list(empty.iterdir())


# -- the transformer as GPT-2 --------------------------------------------------------------------------

def test_transformer_export_is_a_gpt2_with_the_kits_logits(run_dir: Path,
                                                          exported: dict[str, dict[str, Any]]) -> None:
    model = kept(run_dir, "T-24")
    folder = exported["T-24"]["out"]
    ids = stream(BLOCK)
    expected = kit_logits(model, ids)
    windows = torch.stack([stream(BLOCK + 9)[i:i + BLOCK] for i in (0, 4, 9)])
    for loader in (GPT2LMHeadModel, AutoModelForCausalLM):
        for attention in ("eager", "sdpa"):
            gpt2, info = loader.from_pretrained(folder, attn_implementation=attention, output_loading_info=True)
            assert type(gpt2) is GPT2LMHeadModel and not any(info.values()), info
            assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
            with torch.no_grad():
                assert gap(gpt2(ids[None]).logits[0], expected) <= TOLERANCE, attention
                assert gap(gpt2(windows).logits, model.model(windows)) <= TOLERANCE, attention


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_mapping_is_exact_with_or_without_biases(bias: bool, tmp_path: Path) -> None:
    """No run: a transformer with every weight random (biases, LayerNorms, an explicit MLP width)."""
    settings = TransformerSettings(n_layer=2, n_head=2, n_embd=8, block_size=12, mlp_width=20, bias=bias)
    torch.manual_seed(0)
    model = TransformerArchitecture(settings).build(50).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    assert any(name.endswith("bias") for name in model.state_dict()) == bias
    gpt2_model(settings.model_dump(), 50, model.state_dict()).save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (3, 12))
    for attention in ("eager", "sdpa"):
        gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation=attention)
        assert gpt2.config.n_inner == 20 and gpt2.config.activation_function == "gelu"
        with torch.no_grad():
            assert gap(gpt2(ids).logits, model(ids)) <= TOLERANCE, attention


def test_gpt2_mapping_refuses_weights_it_does_not_know() -> None:
    model = TransformerArchitecture(TransformerSettings(n_layer=1, n_head=1, n_embd=4, block_size=4)).build(9)
    with pytest.raises(UserError, match=r"does not know: extra\.weight"):
        gpt2_state_dict({**model.state_dict(), "extra.weight": torch.zeros(1)}, 1)


def test_a_serialised_gpt2_tokenizer_exports_with_its_end_of_text_token(tmp_path: Path) -> None:
    """The kept tokenizer.json of a GPT-2-style tokenizer; <|endoftext|> becomes bos and eos, and a
    GPT-2 export's tokenizer knows its model reads at most block_size tokens."""
    source = PreTrainedTokenizerFast.from_pretrained(make_gpt2_tokenizer_dir(tmp_path / "gpt2"))
    model = SimpleNamespace(tokenizer=HFTokenizer(source), description={
        "architecture": "transformer", "settings": {"block_size": 16}, "tokenizer": {"name": "gpt2"}})
    note, end_of_text = write_tokenizer(model, tmp_path / "out")  # type: ignore[arg-type]
    assert note == "the kept tokenizer.json" and end_of_text == source.convert_tokens_to_ids("<|endoftext|>")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == model.tokenizer.encode(TEXT)
    assert (loaded.eos_token, loaded.bos_token, loaded.model_max_length) == ("<|endoftext|>", "<|endoftext|>", 16)
    assert gpt2_config({"block_size": 16, "n_embd": 8, "n_layer": 1, "n_head": 2}, 600, end_of_text).eos_token_id \
        == end_of_text


def test_the_bytes_tokenizer_exports_as_an_equal_byte_level_tokenizer(run_dir: Path, tmp_path: Path) -> None:
    note, end_of_text = write_tokenizer(kept(run_dir, "G-24"), tmp_path)
    assert "bytes" in note and end_of_text is None
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    every_byte = bytes(range(256)).decode("latin-1")  # 128 one-byte and 128 two-byte characters
    for text in (TEXT, every_byte, " leading and  double  spaces\n\r\t", ""):
        assert loaded(text, add_special_tokens=False)["input_ids"] == list(text.encode()), text
        assert loaded.decode(list(text.encode())) == text
    assert sorted(loaded.get_vocab().values()) == list(range(256))


# -- CVFP and GRU as NewllmKitForCausalLM ------------------------------------------------------------

def test_cvfp_and_gru_exports_are_the_kits_decoders(run_dir: Path, exported: dict[str, dict[str, Any]]) -> None:
    for unit in ("A-24", "G-24"):
        model = kept(run_dir, unit)
        hf, info = AutoModelForCausalLM.from_pretrained(exported[unit]["out"], output_loading_info=True)
        assert type(hf) is NewllmKitForCausalLM and not any(info.values()), (unit, info)
        ids = stream(90)
        expected = kit_logits(model, ids)
        assert gap(hf(ids[None]).logits[0], expected) <= TOLERANCE, unit
        # a left-padded row reads from its first attended token, as the same stream alone
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[None, :20]], dim=1)
        batch = torch.cat([padded, ids[None, :23]])
        mask = torch.ones_like(batch)
        mask[0, :3] = 0
        out = hf(batch, attention_mask=mask, labels=batch)
        assert gap(out.logits[0, 3:], expected[:20]) <= TOLERANCE and gap(out.logits[1], expected[:23]) <= TOLERANCE
        rows = torch.cat([out.logits[0, 3:-1], out.logits[1, :-1]])
        targets = torch.cat([batch[0, 4:], batch[1, 1:]])
        manual = F.cross_entropy(rows, targets, reduction="sum") + F.cross_entropy(
            out.logits[0, :3], batch[0, 1:4], reduction="sum")  # HF's loss counts padded positions unless -100
        assert torch.isclose(out.loss, manual / (batch.shape[0] * (batch.shape[1] - 1)), rtol=1e-6)


def test_generate_is_the_kits_greedy_rollout(run_dir: Path, exported: dict[str, dict[str, Any]]) -> None:
    model = kept(run_dir, "A-24")
    hf = AutoModelForCausalLM.from_pretrained(exported["A-24"]["out"])
    ids = list(b"The river")
    generated = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0].tolist()
    for _ in range(6):
        ids.append(int(kit_logits(model, torch.tensor(ids))[-1].argmax()))
    assert generated == ids


def test_importing_the_kit_after_transformers_registers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other import order (the fresh process below imports the kit first)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from newllm_kit import hf_auto
    from newllm_kit.hf_config import NewllmKitConfig

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, hf_auto._AfterImport)])
    for mapping in (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        monkeypatch.setattr(mapping, "_extra_content", {})
    assert "newllm-kit" not in CONFIG_MAPPING and NewllmKitConfig not in MODEL_FOR_CAUSAL_LM_MAPPING
    hf_auto.install()
    assert CONFIG_MAPPING["newllm-kit"] is NewllmKitConfig
    assert MODEL_FOR_CAUSAL_LM_MAPPING[NewllmKitConfig] is NewllmKitForCausalLM
    assert not any(isinstance(f, hf_auto._AfterImport) for f in sys.meta_path)  # nothing left to wait for


FRESH = """
import json, sys
import newllm_kit
kit_modules = sorted(m for m in sys.modules if m.startswith("newllm_kit"))
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
report = {"kit_modules": kit_modules, "heavy": heavy, "units": {}}
for unit, case in torch.load(sys.argv[1], weights_only=True).items():
    model, info = AutoModelForCausalLM.from_pretrained(case["folder"], output_loading_info=True)
    with torch.no_grad():
        logits = model(case["ids"][None]).logits[0]
    tokenizer = AutoTokenizer.from_pretrained(case["folder"])
    report["units"][unit] = {"class": type(model).__name__, "problems": {k: str(v) for k, v in info.items() if v},
                             "gap": float((logits - case["logits"]).abs().max()),
                             "encoded": tokenizer(case["text"], add_special_tokens=False)["input_ids"],
                             "decoded": tokenizer.decode(tokenizer(case["text"])["input_ids"])}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_exports_load_offline_in_a_fresh_process_after_only_import_newllm_kit(
        run_dir: Path, exported: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """The expected logits are computed here by the kit; the fresh process knows nothing but the folders."""
    cases = {}
    for unit in UNITS:
        model = kept(run_dir, unit)
        ids = stream(BLOCK if unit.startswith("T") else 120)
        cases[unit] = {"folder": exported[unit]["out"], "ids": ids, "logits": kit_logits(model, ids), "text": TEXT}
    torch.save(cases, tmp_path / "cases.pt")
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "cases.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kit_modules"] == ["newllm_kit", "newllm_kit.hf_auto", "newllm_kit.hookspecs"]
    assert report["heavy"] == []  # importing the kit imports neither torch nor transformers
    for unit, found in report["units"].items():
        assert found["class"] == ("GPT2LMHeadModel" if unit.startswith("T") else "NewllmKitForCausalLM"), unit
        assert not found["problems"] and found["gap"] <= TOLERANCE, (unit, found)
        assert found["encoded"] == kept(run_dir, unit).tokenizer.encode(TEXT) == list(TEXT.encode()), unit
        assert found["decoded"] == TEXT, unit
    assert "could not register" not in result.stderr and "initialized" not in result.stderr, result.stderr
