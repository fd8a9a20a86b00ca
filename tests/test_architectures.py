"""Role inference: models without a built-in role map get their roles from their structure.

The coverage over every transformers architecture is measured by
``benchmarks/architectures.py`` (table in ``benchmarks/results/architectures.md``); these tests
pin the behaviour on the architectures the issue names and against the built-in maps.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from conftest import FAMILIES, randomize, tiny_model
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.infer import infer_role_map
from peftlab.roles import ROLE_MAPS, role_map_for
from peftlab.sites import find_sites

H, FF, V = 32, 64, 100
TEXT = dict(vocab_size=V)
SEQ2SEQ = dict(d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=FF, decoder_ffn_dim=FF, vocab_size=V)

# model type -> (config, the module LoRA's "query" lands on, the module (IA)3's "ffn_down" lands on)
NAMED = {
    "albert": (lambda: T.AlbertConfig(hidden_size=H, embedding_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=FF, **TEXT),
               "encoder.albert_layer_groups.N.albert_layers.N.attention.query",
               "encoder.albert_layer_groups.N.albert_layers.N.ffn_output"),
    "modernbert": (lambda: T.ModernBertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=FF, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, cls_token_id=1, sep_token_id=2, **TEXT),
                   "layers.N.attn.Wqkv", "layers.N.mlp.Wo"),
    "gptj": (lambda: T.GPTJConfig(n_embd=H, n_layer=2, n_head=2, rotary_dim=8, **TEXT),
             "h.N.attn.q_proj", "h.N.mlp.fc_out"),
    "codegen": (lambda: T.CodeGenConfig(n_embd=H, n_layer=2, n_head=4, rotary_dim=4, **TEXT),
                "h.N.attn.qkv_proj", "h.N.mlp.fc_out"),
    "bloom": (lambda: T.BloomConfig(hidden_size=H, n_layer=2, n_head=2, **TEXT),
              "h.N.self_attention.query_key_value", "h.N.mlp.dense_4h_to_h"),
    "falcon": (lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **TEXT),
               "h.N.self_attention.query_key_value", "h.N.mlp.dense_4h_to_h"),
    "phi": (lambda: T.PhiConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=FF, **TEXT),
            "layers.N.self_attn.q_proj", "layers.N.mlp.fc2"),
    "stablelm": (lambda: T.StableLmConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=FF, **TEXT),
                 "layers.N.self_attn.q_proj", "layers.N.mlp.down_proj"),
    "pegasus": (lambda: T.PegasusConfig(**SEQ2SEQ), "encoder.layers.N.self_attn.q_proj",
                "encoder.layers.N.fc2"),
    "marian": (lambda: T.MarianConfig(**SEQ2SEQ, decoder_vocab_size=V, pad_token_id=0),
               "encoder.layers.N.self_attn.q_proj", "encoder.layers.N.fc2"),
    "whisper": (lambda: T.WhisperConfig(num_mel_bins=8, max_source_positions=8, max_target_positions=16,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1, **SEQ2SEQ),
                "encoder.layers.N.self_attn.q_proj", "encoder.layers.N.fc2"),
    "swin": (lambda: T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1],
                                  num_heads=[2, 2], window_size=4),
             "encoder.layers.N.blocks.N.attention.q_proj", "encoder.layers.N.blocks.N.mlp.fc2"),
    "clip": (lambda: T.CLIPConfig(
                text_config=dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=FF, **TEXT),
                vision_config=dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=FF, image_size=16, patch_size=8),
                projection_dim=16),
             "text_model.encoder.layers.N.self_attn.q_proj", "text_model.encoder.layers.N.mlp.fc2"),
    "wav2vec2": (lambda: T.Wav2Vec2Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=FF, conv_dim=(8, 8), conv_stride=(4, 4),
                                          conv_kernel=(8, 8), num_conv_pos_embeddings=4,
                                          num_conv_pos_embedding_groups=2, vocab_size=V),
                 "encoder.layers.N.attention.q_proj", "encoder.layers.N.feed_forward.output_dense"),
    "mpnet": (lambda: T.MPNetConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=FF, **TEXT),
              "encoder.layer.N.attention.attn.q", "encoder.layer.N.output.dense"),
}


def _build(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModel.from_config(NAMED[model_type][0]())


def _inputs(model_type: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 6), generator=g)
    if model_type == "swin":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if model_type == "clip":
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if model_type == "wav2vec2":
        return {"input_values": torch.randn(2, 400, generator=g)}
    if model_type == "whisper":
        return {"input_features": torch.randn(2, 8, 16, generator=g), "decoder_input_ids": ids[:, :4]}
    if model_type in ("pegasus", "marian"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def _scalar(out) -> torch.Tensor:
    """A fixed random projection of every float output (a mean square would hide changes of
    layer-normed outputs)."""
    g = torch.Generator().manual_seed(3)
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in tensors)


def _n(module: str) -> str:
    """A module name with block numbers as N."""
    return re.sub(r"(^|\.)\d+(?=\.)", r"\1N", module)


def _modules(model, role, role_map) -> set[str]:
    return {_n(s.module) for s in find_sites(model, (role,), role_map)}


@pytest.mark.parametrize("model_type", NAMED)
def test_the_named_architectures_train_lora_and_ia3_with_default_roles(model_type):
    model = _build(model_type)
    assert model.config.model_type == model_type and model_type not in ROLE_MAPS
    inputs = _inputs(model_type)
    with torch.no_grad():
        before = _scalar(model(**inputs))

    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())          # roles query, value
    adapters.add("ia3", peftlab.IA3Config())            # roles key, value, ffn_down
    _, query, ffn_down = NAMED[model_type]
    assert query in {_n(s.module) for s in adapters["lora"].sites}
    assert ffn_down in {_n(s.module) for s in adapters["ia3"].sites}
    assert adapters.role_map.source == "inferred"
    assert "roles inferred from the model's structure" in str(adapters.summary())

    adapters.activate("lora", "ia3")
    adapters.train("lora")
    for p in adapters.parameters("ia3"):
        p.requires_grad_(True)
    _scalar(model(**inputs)).backward()
    for name in ("lora", "ia3"):
        grads = [p.grad for p in adapters.parameters(name) if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), f"{name} gets no gradient"
    randomize(adapters.parameters("lora") + adapters.parameters("ia3"))
    with torch.no_grad():
        assert not torch.allclose(_scalar(model(**inputs)), before), "the adapters must act"


# ---- inferred maps agree with the built-in ones ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_inference_finds_what_the_built_in_maps_say(family):
    """Every role of the built-in map resolves to the same modules, and on fused projections
    (GPT-2's c_attn thirds, Phi-3's grouped-query qkv_proj and gate_up_proj, GPT-NeoX's per-head
    query_key_value) to the same output features."""
    model = tiny_model(family)
    built_in, inferred = ROLE_MAPS[family], infer_role_map(model)
    compared = 0
    for role in built_in.roles:
        try:
            expected = find_sites(model, (role,), built_in)
        except peftlab.TargetError:
            continue  # e.g. cross_* on an encoder-only model
        got = find_sites(model, (role,), inferred)
        assert [s.module for s in got] == [s.module for s in expected], role
        for a, b in zip(got, expected):
            if b.out_index is None:
                assert a.out_index is None, (role, a.module)
            else:
                assert torch.equal(a.out_index, b.out_index), (role, a.module)
        compared += 1
    assert compared >= 6
    assert set(inferred.roles) >= {r for r in built_in.roles if _has(model, built_in, r)}


def _has(model, role_map, role) -> bool:
    try:
        return bool(find_sites(model, (role,), role_map))
    except peftlab.TargetError:
        return False


def _split_indices(split, out: int):
    """What the model's own split makes of the feature numbers 0..out-1: one index set per part."""
    parts = split(torch.arange(out, dtype=torch.float32).view(1, 1, out))
    return [sorted(set(p.reshape(-1).long().tolist())) for p in parts[:3]]


@pytest.mark.parametrize("config", [
    T.BloomConfig(hidden_size=H, n_layer=1, n_head=4, vocab_size=V),
    T.FalconConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, vocab_size=V),  # multi-query
    T.FalconConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, vocab_size=V,
                   multi_query=False),
    T.FalconConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True, vocab_size=V),
    T.PersimmonConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, vocab_size=V),
], ids=["bloom", "falcon-mq", "falcon-mha", "falcon-new", "persimmon"])
def test_inferred_fused_slices_match_the_models_own_split(config):
    model = T.AutoModel.from_config(config)
    attention = next(m for m in model.modules() if hasattr(m, "query_key_value"))
    fused = attention.query_key_value
    out = fused.weight.shape[0]
    split = getattr(attention, "_split_heads", None) or attention._reshape  # Bloom: _reshape
    expected = _split_indices(split, out)
    role_map = infer_role_map(model)
    for role, want in zip(("query", "key", "value"), expected):
        (site,) = [s for s in find_sites(model, (role,), role_map)]
        assert sorted(site.out_index.tolist()) == want, role


# ---- explicit maps win; whole fused modules are reported ------------------------------------------
def test_built_in_and_given_maps_win_over_inference():
    bert = tiny_model("bert")
    assert role_map_for(bert).source == "built-in"
    bloom = _build("bloom")
    mine = peftlab.RoleMap({"query": r"\.mlp\.dense_h_to_4h$"})
    adapters = peftlab.attach(bloom, role_map=mine)
    adapters.add("x", peftlab.LoRAConfig(targets=("query",)))
    assert {_n(s.module) for s in adapters["x"].sites} == {"h.N.mlp.dense_h_to_4h"}
    assert "inferred" not in str(adapters.summary())


def test_a_fused_projection_with_an_unknown_layout_is_targeted_whole_and_said_so():
    model = _build("codegen")  # qkv_proj splits as [4 groups × (q, v, k)]: not a layout from the config
    table = peftlab.describe_roles(model)
    assert table["query"].modules == (("h.N.attn.qkv_proj", 2),) and table["query"].features is None
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())   # query and value: one update on the whole module
    adapters.add("ia3", peftlab.IA3Config())     # key and value: one vector over the whole output
    lora_site = next(s for s in adapters["lora"].sites if s.module.endswith("qkv_proj"))
    assert lora_site.out_index is None and len(lora_site.parts) == 1
    ia3 = adapters["ia3"].pieces[lora_site.module]
    assert ia3.ia3_l.shape == (3 * 32,)
    text = str(adapters.summary())
    assert "query/key/value: whole fused module h.N.attn.qkv_proj (slices unknown" in text
    assert "lora: " in text and "ia3: " in text


def test_routed_experts_and_shared_experts_get_ffn_roles_routers_none():
    config = T.Qwen2MoeConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=FF, moe_intermediate_size=16,
                              shared_expert_intermediate_size=FF, num_experts=4, num_experts_per_tok=2,
                              vocab_size=V)
    model = T.AutoModel.from_config(config)
    role_map = infer_role_map(model)
    assert _modules(model, "ffn_down", role_map) == {"layers.N.mlp.shared_expert.down_proj",
                                                     "layers.N.mlp.experts.down_proj"}
    assert _modules(model, "ffn_gate", role_map) == {"layers.N.mlp.shared_expert.gate_proj",
                                                     "layers.N.mlp.experts.gate_up_proj"}
    everything = set().union(*(_modules(model, r, role_map) for r in role_map.roles))
    assert not any("gate" == m.rsplit(".", 1)[-1] or "expert_gate" in m for m in everything)


# ---- multi-head latent attention ----------------------------------------------------------------
MLA = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
           kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=10, vocab_size=V)


def _latent_split(attention) -> tuple[list[int], list[int]]:
    """Which kv_b_proj features the model's own expand_kv uses as the non-rotary key and as the
    value: kv_b_proj's weights set so that on an all-ones input each output is its number."""
    proj = attention.kv_b_proj
    out, rank = proj.weight.shape
    with torch.no_grad():
        proj.weight.copy_(torch.arange(out, dtype=torch.float32)[:, None].expand(out, rank) / rank)
        key, value = attention.expand_kv(torch.ones(1, 1, 1, rank), torch.full((1, 1, 1, 4), -1.0))
    key = key.reshape(-1)
    return key[key >= 0].round().long().tolist(), value.reshape(-1).round().long().tolist()


@pytest.mark.parametrize("config", [
    T.DeepseekV3Config(q_lora_rank=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                       topk_group=1, moe_intermediate_size=16, intermediate_size=FF, **MLA),
    T.DeepseekV3Config(q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                       topk_group=1, moe_intermediate_size=16, intermediate_size=FF, **MLA),
    T.MiniCPM3Config(q_lora_rank=8, intermediate_size=FF, **MLA),
], ids=["deepseek_v3", "deepseek_v3-no-q-lora", "minicpm3-inferred"])
def test_latent_attention_key_and_value_are_the_models_own_split(config):
    model = T.AutoModel.from_config(config)
    attention = model.layers[0].self_attn
    key, value = _latent_split(attention)
    assert len(key) == 4 * 6 and len(value) == 4 * 10 and key[:7] == [0, 1, 2, 3, 4, 5, 16]
    maps = [infer_role_map(model)]
    if config.model_type in ROLE_MAPS:
        maps.append(role_map_for(model))
        assert maps[-1].source == "built-in"
    q = "q_b_proj" if config.q_lora_rank else "q_proj"
    for role_map in maps:
        assert _modules(model, "query", role_map) == {f"layers.N.self_attn.{q}"}
        for role, want in (("key", key), ("value", value)):
            (site,) = find_sites(model, (role,), role_map)
            assert site.module == "layers.0.self_attn.kv_b_proj"
            assert site.out_index.tolist() == want, (role_map.source, role)
        assert "non-rotary part" in role_map.get("key").note
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.add("ia3", peftlab.IA3Config())
    assert {s.module for s in adapters["ia3"].sites} >= {"layers.0.self_attn.kv_b_proj"}


def test_latent_attention_with_a_broken_split_is_targeted_whole(monkeypatch):
    model = T.AutoModel.from_config(T.MiniCPM3Config(q_lora_rank=8, intermediate_size=FF, **MLA))
    attention = type(model.layers[0].self_attn)
    monkeypatch.setattr(attention, "expand_kv", lambda self, kv, rot: (rot, rot))
    role_map = infer_role_map(model)
    (site,) = find_sites(model, ("key",), role_map)
    assert site.out_index is None and "whole fused module" in role_map.get("key").note


def test_heads_embeddings_and_patch_projections_get_no_role():
    model = T.AutoModelForCausalLM.from_config(NAMED["bloom"][0]())
    clip = _build("clip")
    for m in (model, clip):
        role_map = infer_role_map(m)
        targeted = set().union(*(_modules(m, r, role_map) for r in role_map.roles))
        assert all(".N." in name for name in targeted), targeted
    query = _modules(model, "query", infer_role_map(model))
    assert query == {"transformer.h.N.self_attention.query_key_value"}


# ---- inspect-model -----------------------------------------------------------------------------
runner = CliRunner()


def test_inspect_model_prints_the_role_table_from_a_config_folder(tmp_path):
    NAMED["bloom"][0]().save_pretrained(tmp_path / "bloom")   # config.json only, no weights
    result = runner.invoke(app, ["inspect-model", str(tmp_path / "bloom")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "inferred from the model's structure" in lines[0] and "'bloom'" in lines[0]
    query = next(line for line in lines if line.strip().startswith("query "))
    assert "h.N.self_attention.query_key_value  (2 blocks)" in query
    assert "features 32 of 96, interleaved" in query    # per head: [heads, 3, head_dim]
    assert any(line.strip().startswith("ffn_down") and "mlp.dense_4h_to_h" in line for line in lines)

    tiny_model("gpt2").config.save_pretrained(tmp_path / "gpt2")
    result = runner.invoke(app, ["inspect-model", str(tmp_path / "gpt2"), "--json"])
    assert result.exit_code == 0 and '"source": "built-in"' in result.output
    assert '"features": "[0:32] of 96"' in result.output


def test_inspect_model_refuses_bad_input_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["inspect-model", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    result = runner.invoke(app, ["inspect-model", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output
