"""The `cvfp` architecture: exact parameter counts of spec §2, the split ContextBlock math, wiring."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from newllm_kit_plugins.cvfp import model as cvfp
from newllm_kit_plugins.cvfp.model import (
    CVFPArchitecture,
    CVFPModel,
    CVFPSettings,
    context_flops_per_token,
    token_flops_per_token,
)
from pydantic import ValidationError

V, E = 50257, 768
EVERY = "token-every-layer"


def meta_model(vocab_size: int = V, **keys: Any) -> CVFPModel:
    """Full-size models on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return CVFPArchitecture(CVFPSettings(**keys)).build(vocab_size)


def tiny_model(**keys: Any) -> CVFPModel:
    torch.manual_seed(0)
    base = {"layers": 2, "context_dim": 16, "embedding_dim": 8}
    return CVFPArchitecture(CVFPSettings(**{**base, **keys})).build(50).double()


# (settings, ContextBlock, TokenBlock, total) — spec §2.2–§2.6, confirmed against the original classes.
COUNTS = [
    pytest.param({"variant": EVERY, "layers": 3, "context_dim": 768, "tie_head": False},
                 3_545_856, 3_545_856, 84_338_257, id="11/27-3L"),
    pytest.param({"variant": EVERY, "layers": 6, "context_dim": 768, "tie_head": False},
                 7_091_712, 7_091_712, 91_429_969, id="11/27-6L"),
    pytest.param({"variant": EVERY, "layers": 6, "context_dim": 768, "num_input_tokens": 2},
                 10_630_656, 7_681_536, 56_911_104, id="v1-A"),
    pytest.param({"variant": EVERY, "layers": 3, "context_dim": 1536, "num_input_tokens": 2},
                 14_169_600, 5_905_152, 58_673_664, id="v1-B"),
    pytest.param({"preset": "6L-768"}, 15_394_304, 8_566_272, 62_559_488, id="v2-A"),
    pytest.param({"preset": "3L-1536"}, 20_730_880, 5_905_152, 65_234_944, id="v2-B"),
    pytest.param({"layers": 3, "context_dim": 768}, 7_155_712, 4_135_680, 49_890_304, id="B-L3-C768-N1"),
    pytest.param({"layers": 6, "context_dim": 768, "num_input_tokens": 2},
                 27_296_768, 26_240_512, 92_136_192, id="B-L6-C768-N2"),
    pytest.param({"layers": 3, "context_dim": 1536, "num_input_tokens": 2},
                 28_598_272, 14_692_352, 81_889_536, id="B-L3-C1536-N2"),
]

SPLIT_COUNTS = [
    pytest.param({"preset": "6L-768", "num_context_splits": 2}, 13_665_280, 10_040_832, id="6L-S2"),
    pytest.param({"preset": "6L-768", "num_context_splits": 3}, 14_295_552, 11_515_392, id="6L-S3"),
    pytest.param({"preset": "3L-1536", "num_context_splits": 2}, 14_311_424, 6_494_976, id="3L-1536-S2"),
]


@pytest.mark.parametrize(("keys", "context_block", "token_block", "total"), COUNTS)
def test_parameter_counts_match_the_reference_models(keys: dict[str, Any], context_block: int,
                                                     token_block: int, total: int) -> None:
    counts = meta_model(**keys).param_counts()
    head = 0 if keys.get("tie_head", True) else V * E + V
    assert counts == {"context_block": context_block, "token_block": token_block, "embedding": V * E + 2 * E,
                      "head": head, "total": total}


@pytest.mark.parametrize(("keys", "context_block", "token_block"), SPLIT_COUNTS)
def test_split_parameter_counts(keys: dict[str, Any], context_block: int, token_block: int) -> None:
    counts = meta_model(**keys).param_counts()
    assert (counts["context_block"], counts["token_block"]) == (context_block, token_block)


def test_gradual_reduction_widths() -> None:
    v2a, v2b = meta_model(preset="6L-768"), meta_model(preset="3L-1536")
    assert v2a.layer_widths == (1408, 1280, 1152, 1024, 896, 768)
    assert v2b.layer_widths == (2048, 1792, 1536)
    assert v2b.config.split_dim + v2b.token_width == 2304  # d_0 = C + T
    assert meta_model(layers=6, context_dim=768, num_input_tokens=2).config.token_layer_widths == (
        1536, 1408, 1280, 1152, 1024, 896, 768)
    every = meta_model(variant=EVERY, layers=2, num_input_tokens=2)
    assert every.config.token_layer_widths == (1536, 768, 768) and every.layer_widths == (768, 768)


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 5), c=st.integers(1, 40), e=st.integers(1, 12), n=st.integers(1, 3))
def test_counts_follow_the_spec_formulas(layers: int, c: int, e: int, n: int) -> None:
    t = n * e
    a = meta_model(vocab_size=7, variant=EVERY, layers=layers, context_dim=c, embedding_dim=e,
                   num_input_tokens=n).param_counts()
    assert a["context_block"] == layers * c * (c + t + 3)
    assert a["token_block"] == e * (c + t + 3) + (layers - 1) * e * (c + e + 3)

    b = meta_model(vocab_size=7, layers=layers, context_dim=c, embedding_dim=e,
                   num_input_tokens=n).param_counts()
    d = [c + t - (t * i) // layers for i in range(layers + 1)]
    tw = [t - ((t - e) * j) // layers for j in range(layers + 1)]
    context_block = (c + t + 3) * d[1] + (d[1] != c) * (c + 1) * d[1] + sum(
        (d[j - 1] + 3) * d[j] + (d[j - 1] != d[j]) * (d[j - 1] + 1) * d[j] for j in range(2, layers + 1))
    token_block = sum((d[j] + tw[j - 1] + 3) * tw[j] + (tw[j - 1] != tw[j]) * (tw[j - 1] + 1) * tw[j]
                      for j in range(1, layers + 1))
    assert (b["context_block"], b["token_block"]) == (context_block, token_block)


def test_token_inputs_concatenate_the_last_n_embeddings_oldest_first() -> None:
    model = tiny_model(num_input_tokens=3)
    ids = torch.tensor([5, 7, 1, 9, 9, 2])
    x = model.token_inputs(ids)
    normed = model.embed_norm(model.embedding(ids))
    for i in range(len(ids)):
        window = [normed[k] if k >= 0 else torch.zeros(8, dtype=x.dtype) for k in range(i - 2, i + 1)]
        torch.testing.assert_close(x[i], torch.cat(window))
    assert x.shape == (6, model.token_width) == (6, 24)


def reference_context_block(model: CVFPModel, context: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """Spec §2.2/§2.4 written out directly: ReLU(Lin([h; x])) on the concatenation, per split."""
    block = model.context_block
    per_split = []
    for s, layers in enumerate(block._split_layers()):
        h, outputs = context[:, s * block.split_dim:(s + 1) * block.split_dim], []
        for layer, takes in zip(layers, block.takes_tokens, strict=True):
            inputs = torch.cat([h, x], dim=-1) if takes else h
            rho = h if layer.proj is None else h @ layer.proj.weight.T + layer.proj.bias
            delta = torch.relu(inputs @ layer.linear.weight.T + layer.linear.bias)
            h = F.layer_norm(rho + delta, (h.shape[-1] if layer.proj is None else layer.proj.out_features,),
                             layer.norm.weight, layer.norm.bias, eps=1e-5)
            outputs.append(h)
        per_split.append(outputs)
    return [torch.cat(parts, dim=-1) for parts in zip(*per_split, strict=True)]


@pytest.mark.parametrize("variant", [EVERY, "gradual-reduction"])
@pytest.mark.parametrize(("splits", "n"), [(1, 1), (1, 2), (2, 1), (4, 3)])
def test_project_tokens_then_step_equals_the_concatenated_layer(variant: str, splits: int, n: int) -> None:
    model = tiny_model(variant=variant, layers=3, num_context_splits=splits, num_input_tokens=n)
    context = torch.randn(5, 16, dtype=torch.float64)
    x = model.token_inputs(torch.tensor([3, 1, 4, 1, 5]))
    projected = model.context_block.project_tokens(x)
    taking = 3 if variant == EVERY else 1
    assert projected.shape == (5, splits * sum(model.config.split_layer_widths[:taking]))
    got = model.context_block.step(context, projected)
    assert [o.shape[-1] for o in got] == list(model.layer_widths) and got[-1].shape == (5, 16)
    for mine, want in zip(got, reference_context_block(model, context, x), strict=True):
        torch.testing.assert_close(mine, want, atol=1e-6, rtol=0)
    for mine, want in zip(model.context_block(context, x), got, strict=True):
        torch.testing.assert_close(mine, want, atol=0, rtol=0)


def test_token_block_of_token_every_layer_keeps_the_current_embedding_as_residual() -> None:
    model = tiny_model(variant=EVERY, num_input_tokens=2)
    x = model.token_inputs(torch.tensor([4, 2, 8]))
    contexts = [torch.randn(3, 16, dtype=torch.float64) for _ in range(2)]
    first, second = model.token_block.layers
    assert first.proj is None and first.linear.in_features == 16 + 16
    u = F.layer_norm(x[:, -8:] + torch.relu(first.linear(torch.cat([contexts[0], x], -1))), (8,),
                     first.norm.weight, first.norm.bias)
    u = F.layer_norm(u + torch.relu(second.linear(torch.cat([contexts[1], u], -1))), (8,),
                     second.norm.weight, second.norm.bias)
    torch.testing.assert_close(model.token_states(contexts, x), u)


def test_gradual_reduction_token_block_projects_where_widths_differ() -> None:
    model = tiny_model(num_input_tokens=2)  # t = 16, 12, 8
    assert [layer.proj is not None for layer in model.token_block.layers] == [True, True]
    contexts = model.context_block.step(torch.zeros(4, 16, dtype=torch.float64),
                                        model.context_block.project_tokens(torch.randn(4, 16).double()))
    assert model.token_states(contexts, torch.randn(4, 16).double()).shape == (4, 8)


def test_heads_tied_and_untied() -> None:
    tied, untied = tiny_model(), tiny_model(tie_head=False)
    weight, bias = tied.output_head()
    assert weight is tied.embedding.weight and bias is None and tied.head is None
    weight, bias = untied.output_head()
    assert weight.shape == (50, 8) and bias is not None and bias.shape == (50,)
    assert not weight.any() and not bias.any()
    assert untied.param_counts()["head"] == 50 * 8 + 50 and tied.param_counts()["head"] == 0


def test_initialisation_scales() -> None:
    torch.manual_seed(0)
    model = CVFPArchitecture(CVFPSettings(layers=2, context_dim=256, embedding_dim=128)).build(2000)
    linears = [m for block in (model.context_block, model.token_block) for m in block.modules()
               if isinstance(m, torch.nn.Linear)]
    assert any(layer.proj is not None for layer in model.context_block._split_layers()[0])  # with projections
    weights = torch.cat([m.weight.flatten() for m in linears])
    biases = torch.cat([m.bias.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.1, rel=0.02)
    assert biases.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(model.embed_norm.weight, torch.ones(128)) and model.embed_norm.eps == 1e-5


def test_set_embedding_copies_checks_shape_and_freezes() -> None:
    model = tiny_model()
    table = torch.randn(50, 8, dtype=torch.float64)
    model.set_embedding(table, freeze=True)
    assert torch.equal(model.embedding.weight, table) and not model.embedding.weight.requires_grad
    model.set_embedding(table, freeze=False)
    assert model.embedding.weight.requires_grad
    with pytest.raises(ValueError, match=r"\(50, 8\)"):
        model.set_embedding(torch.zeros(50, 9), freeze=True)


def test_param_groups() -> None:
    untied = tiny_model(tie_head=False)
    untied.set_embedding(torch.randn(50, 8), freeze=True)
    groups = {k: {id(p) for p in v} for k, v in untied.param_groups().items()}
    assert groups["phase1"] == {id(p) for p in untied.context_block.parameters()}
    assert untied.head is not None
    assert groups["phase2"] == {id(p) for p in [*untied.token_block.parameters(), *untied.head.parameters()]}

    tied = tiny_model()
    tied.set_embedding(torch.randn(50, 8), freeze=False)
    phase2 = {id(p) for p in tied.param_groups()["phase2"]}
    assert id(tied.embedding.weight) in phase2
    assert not phase2 & {id(p) for p in tied.embed_norm.parameters()}  # embed_norm trains in neither phase


def phase_gradients(model: CVFPModel, ids: torch.Tensor) -> tuple[set[str], set[str]]:
    """Names of parameters that get a non-zero gradient from a Phase-1 loss, then from a Phase-2 loss."""
    model.set_embedding(model.embedding.weight.detach().clone(), freeze=True)
    x = model.token_inputs(ids)

    def nonzero() -> set[str]:
        return {k for k, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}

    outputs = model.context_block(torch.randn(len(ids), 16, dtype=torch.float64), x)
    (outputs[-1] ** 2).mean().backward()
    phase1 = nonzero()

    model.zero_grad(set_to_none=True)
    for p in model.param_groups()["phase1"]:
        p.requires_grad_(False)
    with torch.no_grad():
        contexts = model.context_block(torch.zeros(len(ids), 16, dtype=torch.float64), x)
    logits = model(contexts, x)
    assert logits.shape == (len(ids), 50)
    F.cross_entropy(logits[:-1], ids[1:]).backward()
    return phase1, nonzero()


def names(model: CVFPModel, *prefixes: str) -> set[str]:
    return {k for k, _ in model.named_parameters() if k.startswith(prefixes)}


def test_gradients_reach_only_the_block_each_phase_trains() -> None:
    model = tiny_model()
    phase1, phase2 = phase_gradients(model, torch.randint(0, 50, (12,)))
    assert phase1 == names(model, "context_block.")
    assert phase2 == names(model, "token_block.")


def test_zero_untied_head_shields_the_token_block_on_the_first_step() -> None:
    model = tiny_model(tie_head=False)
    _, phase2 = phase_gradients(model, torch.randint(0, 50, (12,)))
    assert phase2 == names(model, "head.")  # d(logits)/d(states) = W_head = 0 until the head has moved


def test_flop_counts() -> None:
    model = meta_model(variant=EVERY, layers=6, context_dim=768, tie_head=False)
    assert context_flops_per_token(model) == 2 * 6 * 768 * (768 + 768)
    assert token_flops_per_token(model, include_head=False) == 2 * 6 * 768 * (768 + 768)
    assert token_flops_per_token(model, include_head=True) == 2 * 6 * 768 * 1536 + 2 * 768 * V
    v2a = meta_model(preset="6L-768")
    d = (768, *v2a.layer_widths)
    matmuls = (768 + 768) * d[1] + 768 * d[1] + sum(2 * d[j - 1] * d[j] for j in range(2, 7))
    assert context_flops_per_token(v2a) == 2 * matmuls


def test_preset_fills_layers_and_width_unless_given() -> None:
    assert (CVFPSettings(preset="3L-1536").layers, CVFPSettings(preset="3L-1536").context_dim) == (3, 1536)
    overridden = CVFPSettings(preset="6L-768", layers=4)
    assert (overridden.layers, overridden.context_dim) == (4, 768)
    assert CVFPSettings().variant == "gradual-reduction" and CVFPSettings().tie_head


@pytest.mark.parametrize(("keys", "field"), [
    ({"layers": 0}, "layers"),
    ({"context_dim": 0}, "context_dim"),
    ({"num_input_tokens": 0}, "num_input_tokens"),
    ({"context_dim": 768, "num_context_splits": 5}, "num_context_splits"),
    ({"preset": "9L-512"}, "preset"),
    ({"variant": "gradual"}, "variant"),
    ({"hidden_dim": 3}, "hidden_dim"),
    ({"layers": 1025}, "layers"),
    ({"context_dim": 2**40}, "context_dim"),
    ({"embedding_dim": 2**40}, "embedding_dim"),
    ({"num_input_tokens": 65}, "num_input_tokens"),
])
def test_invalid_settings_name_the_field(keys: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        CVFPSettings(**keys)
    assert field in str(info.value)
    if field == "num_context_splits":
        assert "not divisible" in str(info.value)


def test_every_setting_is_documented() -> None:
    assert all(f.description for f in CVFPSettings.model_fields.values())


def test_plugin_registers_the_architecture() -> None:
    calls: list[tuple[Any, ...]] = []
    cvfp.register_architectures(lambda name, factory, **kw: calls.append((name, factory, kw)))
    [(name, factory, kw)] = calls
    assert (name, factory, kw["settings"]) == ("cvfp", CVFPArchitecture, CVFPSettings)
    architecture = factory(CVFPSettings(embedding_dim=8, layers=1, context_dim=4))
    assert architecture.embedding_dim == 8
    model = architecture.build(11)
    assert (model.vocab_size, model.context_dim, model.token_width, model.layer_widths) == (11, 4, 8, (4,))


def test_a_model_too_large_for_memory_is_refused_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    from newllm_kit import params
    from newllm_kit.errors import ConfigError

    monkeypatch.setattr(params, "available_bytes", lambda device: 16 << 30)
    architecture = CVFPArchitecture(CVFPSettings(layers=3, context_dim=1_000_000))
    with pytest.raises(ConfigError, match=r"^the cvfp model's weights need ([\d,]+) bytes \(21\.9 TiB\) but cpu "
                                          r"has 17,179,869,184 bytes \(16\.0 GiB\) available; lower context_dim "
                                          r"\(1,000,000\), embedding_dim \(768\) or layers \(3\)") as caught:
        architecture.build(V)
    needed = int(caught.value.args[0].split(" need ")[1].split(" bytes")[0].replace(",", ""))
    assert needed == 4 * meta_model(layers=3, context_dim=1_000_000).param_counts()["total"]
    with torch.device("meta"):  # counting parameters allocates nothing, so it is never refused
        assert architecture.build(V).context_dim == 1_000_000


def test_check_model_fits_names_the_model_the_bytes_and_the_keys(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                 fake_cuda: Any) -> None:
    from newllm_kit import params
    from newllm_kit.config import load_config
    from newllm_kit.errors import ConfigError
    from newllm_kit.plugins import load_plugins

    path = tmp_path / "exp.toml"
    path.write_text('[[models]]\nlabel = "A"\ncontext_dim = 4096\nlayers = 2\n')
    config = load_config(path, load_plugins().registry)
    total = meta_model(vocab_size=256, context_dim=4096, layers=2).param_counts()["total"]
    original = params.available_bytes
    monkeypatch.setattr(params, "available_bytes", lambda device: 4 * total)
    params.check_model_fits(config, 0, 256, torch.device("cpu"))
    monkeypatch.setattr(params, "available_bytes", lambda device: 4 * total - 1)
    with pytest.raises(ConfigError, match=rf"exp\.toml: models\.0 \('A'\): its weights alone need {4 * total:,} "
                                          rf"bytes .* but cpu has .* lower models\.0\.context_dim \(4,096\) or "
                                          rf"models\.0\.embedding_dim \(768\)$"):
        params.check_model_fits(config, 0, 256, torch.device("cpu"))
    monkeypatch.setattr(params, "available_bytes", original)
    monkeypatch.setattr(params, "_cpu_available", lambda: 1 << 50)
    fake_cuda.driver_free, fake_cuda.total = 4 * total - 1, 1 << 40  # free memory is asked of the CUDA backend
    with pytest.raises(ConfigError, match=r"but cuda:0 has [\d,]+ bytes"):  # then moved to the runner's device
        params.check_model_fits(config, 0, 256, torch.device("cuda", 0))
    assert ("mem_get_info", torch.device("cuda", 0)) in fake_cuda.calls


@pytest.mark.slow
def test_run_with_an_unallocatable_width_ends_in_one_line(tmp_path: Any) -> None:
    from test_cli import cli

    path = tmp_path / "exp.toml"
    path.write_text('[experiment]\nsamples = [5]\n[data]\nsource = "embedded"\nval = { start = 100, count = 2 }\n'
                    '[tokenizer]\nname = "bytes"\n[embedding]\nsource = "random"\n'
                    '[[models]]\nlabel = "A"\nlayers = 3\ncontext_dim = 1000000\n')
    result = cli("run", str(path), "--out", str(tmp_path / "runs"), "--progress", "none")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "bytes" in result.stderr and "context_dim (1,000,000)" in result.stderr
