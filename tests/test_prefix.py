"""Prefix tuning (P-tuning v2): learned keys and values in front of every attention layer's own.

Checked against a BERT forward written out by hand, the real ``peft`` package (LLaMA, T5), a
single pass over the whole text (generation with a cache) and each example run alone (routing)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import CONFIGS, randomize, tiny_model
from test_prompt import IDS, MASK, _bert, _llama, _peft_model, _save_edited, _t5

import peftlab
from peftlab.errors import AdapterStateError, ConfigError, TargetError
from peftlab.methods.prefix import PrefixTuningConfig

peft = pytest.importorskip("peft")

N = 3


def _prefixed(model: torch.nn.Module, name: str = "p", n: int = N, seed: int = 2, **kw) -> peftlab.AdapterSet:
    adapters = peftlab.attach(model)
    adapters.add(name, PrefixTuningConfig(num_virtual_tokens=n, **kw))
    adapters.activate(name)
    randomize(adapters.parameters(name), scale=1.0, seed=seed)
    return adapters


def _piece(adapters: peftlab.AdapterSet, name: str = "p"):
    return next(iter(adapters[name].pieces.values()))


# ---- what it computes -----------------------------------------------------------------------------
def _bert_by_hand(model, ids, mask, prefix):
    """BertForSequenceClassification written out, with ``prefix [layers, 2, heads, n, hd]`` in
    front of every layer's keys and values; positions start after the prefix (as BERT's own
    embeddings do after a cache)."""
    bert, n = model.bert, prefix.shape[3]
    e = bert.embeddings
    positions = torch.arange(n, n + ids.shape[1])
    h = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(positions) + e.token_type_embeddings(
        torch.zeros_like(ids)))
    keep = torch.cat([torch.ones(ids.shape[0], n), mask.float()], 1)[:, None, None, :]
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention.self
        heads, hd = att.num_attention_heads, att.attention_head_size

        q, k, v = (x.view(x.shape[0], -1, heads, hd).transpose(1, 2)
                   for x in (att.query(h), att.key(h), att.value(h)))
        k = torch.cat([prefix[i, 0].expand(ids.shape[0], -1, -1, -1), k], 2)
        v = torch.cat([prefix[i, 1].expand(ids.shape[0], -1, -1, -1), v], 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(keep == 0, torch.finfo(scores.dtype).min)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = layer.attention.output.LayerNorm(layer.attention.output.dense(a) + h)
        up = F.gelu(layer.intermediate.dense(h))
        h = layer.output.LayerNorm(layer.output.dense(up) + h)
    return model.classifier(torch.tanh(bert.pooler.dense(h[:, 0])))


def test_bert_classifier_equals_the_forward_written_out_by_hand():
    model = _bert()
    adapters = _prefixed(model)
    out = model(input_ids=IDS, attention_mask=MASK).logits
    by_hand = _bert_by_hand(model, IDS, MASK, _piece(adapters).prefix().detach())
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-5)
    adapters.activate()
    assert (out - model(input_ids=IDS, attention_mask=MASK).logits).abs().max() > 1e-4


def test_parameter_count_and_gradient():
    model = _llama()  # grouped-query attention: one key/value head of 16
    adapters = _prefixed(model, n=20)
    assert adapters.summary()["p"].parameters == 20 * 2 * 2 * 16
    adapters.train("p")
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert _piece(adapters).prefix_embeddings.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.adapters.p.prefix_embeddings"]


# ---- peft, both ways ----------------------------------------------------------------------------------
def test_llama_export_and_import_match_peft(tmp_path):
    model = _llama()
    adapters = _prefixed(model)
    adapters.export_peft("p", tmp_path / "out")
    theirs = _peft_model(_llama(), tmp_path / "out")
    kwargs = {"input_ids": IDS, "attention_mask": MASK}
    torch.testing.assert_close(model(**kwargs).logits, theirs(**kwargs).logits, rtol=0, atol=1e-5)

    made = peft.get_peft_model(_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    randomize(made.prompt_encoder.parameters(), seed=9)
    made.save_pretrained(tmp_path / "in")
    other = _llama()
    imported = peftlab.attach(other)
    imported.import_peft(tmp_path / "in", "q")
    imported.activate("q")
    torch.testing.assert_close(other(**kwargs).logits, made.eval()(**kwargs).logits, rtol=0, atol=1e-5)
    assert imported.summary()["q"].parameters == made.get_nb_trainable_parameters()[0]


def test_llama_generate_with_a_cache_equals_one_pass_and_peft(tmp_path):
    model = _llama()
    adapters = _prefixed(model)
    ids = IDS[:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    one_pass = model(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0], one_pass, rtol=0, atol=1e-5)
    # peft 0.21's own generate loses the prefix on transformers 5 (its scores equal neither its
    # forward nor ours); its forward over the generated text gives every step of ours.
    adapters.export_peft("p", tmp_path / "out")
    theirs = _peft_model(_llama(), tmp_path / "out")
    peft_pass = theirs(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0], peft_pass, rtol=0, atol=1e-5)


def test_t5_import_gives_each_decoder_layer_the_rows_peft_gives_it(tmp_path):
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
    theirs = peft.get_peft_model(_t5(), config)
    randomize(theirs.prompt_encoder.parameters(), seed=9)
    theirs.save_pretrained(tmp_path / "in")
    model = _t5()
    adapters = peftlab.attach(model)
    adapters.import_peft(tmp_path / "in", "p")
    adapters.activate("p")
    kwargs = {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": IDS[:, :3]}
    torch.testing.assert_close(model(**kwargs).logits, theirs.eval()(**kwargs).logits, rtol=0, atol=1e-5)


SHAPED = {  # encoder-decoders with a decoder unlike the encoder, so reading the encoder's shows
    "t5-asymmetric": lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0)),
    "bart-asymmetric": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    **{family: (lambda family=family: T.AutoModelForCausalLM.from_config(CONFIGS[family]()))
       for family in ("llama", "gpt2", "mistral", "qwen2", "gemma", "phi3", "opt", "gpt_neox")},
}


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_the_prefix_shape_is_the_shape_of_the_models_own_cache(name):
    """(layers, key/value heads, head width) read from the config equal what the model's own
    cache holds after a forward: the decoder's self-attention on an encoder-decoder."""
    from peftlab.methods.prefix import attention_shape

    torch.manual_seed(0)
    model = SHAPED[name]().eval()
    kwargs = {"decoder_input_ids": IDS[:, :2]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        cache = model(input_ids=IDS, use_cache=True, **kwargs).past_key_values
    cache = getattr(cache, "self_attention_cache", cache)
    keys = cache.layers[0].keys
    assert attention_shape(model) == (len(cache.layers), keys.shape[1], keys.shape[3])


@pytest.mark.parametrize("fields, shape", [
    (dict(n_layer=3, n_head=4, n_embd=64), (3, 4, 16)),  # GPT-2's names
    (dict(num_layers=3, num_heads=4, d_model=32), (3, 4, 8)),
    (dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=8),
     (3, 2, 8)),
    (dict(is_encoder_decoder=True, num_layers=5, num_decoder_layers=2, num_heads=4, d_kv=8), (2, 4, 8)),
    (dict(is_encoder_decoder=True, encoder_layers=5, decoder_layers=2, encoder_attention_heads=4,
          decoder_attention_heads=2, d_model=32), (2, 2, 16)),
    (dict(is_encoder_decoder=True, num_layers=3, num_attention_heads=4, hidden_size=32), (3, 4, 8)),
    (dict(is_encoder_decoder=True, num_hidden_layers=3, num_heads=2, d_model=32), (3, 2, 16)),
    (dict(config=T.LlavaConfig(text_config=dict(model_type="llama", num_hidden_layers=3,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  hidden_size=64))), (3, 2, 16)),
], ids=["gpt2-names", "t5-like-decoder-only", "kv-heads", "t5-names", "bart-names", "enc-dec-plain",
        "enc-dec-hidden", "text-config-of-a-composite"])
def test_the_prefix_shape_reads_every_naming_of_the_sizes(fields, shape):
    """Configs name their sizes differently; each known name is read (decoder names first on an
    encoder-decoder), with no transformers attribute map to translate them."""
    from types import SimpleNamespace

    from peftlab.methods.prefix import attention_shape

    config = fields["config"] if "config" in fields else T.PretrainedConfig(**fields)
    assert attention_shape(SimpleNamespace(config=config)) == shape


def test_a_model_whose_sizes_cannot_be_read_is_refused():
    from types import SimpleNamespace

    from peftlab.methods.prefix import attention_shape

    with pytest.raises(peftlab.TargetError, match="^prefix tuning needs a transformers model with a config, "
                                                  "not SimpleNamespace$"):
        attention_shape(SimpleNamespace())
    with pytest.raises(peftlab.TargetError, match=r"^cannot read the attention's shape \(layers, heads, head "
                                                  r"width\) from this .* model's config; prefix tuning "
                                                  r"cannot size its prefix$"):
        attention_shape(SimpleNamespace(config=T.PretrainedConfig(n_layer=3)))
    for partial in (dict(n_layer=3, n_embd=64), dict(n_head=4, n_embd=64)):  # no heads; no layers
        with pytest.raises(peftlab.TargetError, match="^cannot read the attention's shape"):
            attention_shape(SimpleNamespace(config=T.PretrainedConfig(**partial)))


def _peft_file(tmp_path, make, task: str, edit: dict):
    """peft's saved prefix for ``make()``, its config edited: ``None`` removes a field."""
    theirs = peft.get_peft_model(make(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N))
    randomize(theirs.prompt_encoder.parameters(), seed=9)
    _save_edited(theirs, tmp_path / "peft", edit)
    return theirs.eval(), tmp_path / "peft"


@pytest.mark.parametrize("edit, refusal", [
    ({"num_virtual_tokens": None}, "num_virtual_tokens must be a positive integer"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"num_layers": 3}, "the file's prefix is sized for (layers, key/value heads, token_dim) (3, 1, 16); "
                        "this 'llama' model's attention has (2, 1, 16)"),
    ({"num_attention_heads": 4}, "(2, 4, 16); this 'llama' model's attention has (2, 1, 16)"),
    ({"token_dim": 32}, "(2, 1, 32); this 'llama' model's attention has (2, 1, 16)"),
    ({"num_layers": None, "num_attention_heads": None, "token_dim": None}, None),  # the model's sizes
], ids=["n-missing", "n-zero", "layers", "heads", "width", "defaults"])
def test_peft_prefix_configs_are_read_by_their_rules(tmp_path, edit, refusal):
    theirs, path = _peft_file(tmp_path, _llama, "CAUSAL_LM", edit)
    model = _llama()
    adapters = peftlab.attach(model)
    if refusal:
        with pytest.raises(peftlab.AdapterLoadError, match=re.escape(refusal)):
            adapters.import_peft(path, "p")
        assert adapters.names == ()
        return
    adapters.import_peft(path, "p")
    adapters.activate("p")
    torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_a_t5_file_without_its_submodule_count_is_read_as_peft_reads_it(tmp_path):
    """peft gives a seq2seq prefix two submodules (encoder, decoder) unless the file says one."""
    theirs, path = _peft_file(tmp_path, _t5, "SEQ_2_SEQ_LM", {"num_transformer_submodules": None})
    model = _t5()
    adapters = peftlab.attach(model)
    adapters.import_peft(path, "p")
    adapters.activate("p")
    kwargs = {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": IDS[:, :3]}
    torch.testing.assert_close(model(**kwargs).logits, theirs(**kwargs).logits, rtol=0, atol=1e-5)


def test_t5_export_matches_peft_or_is_refused(tmp_path):
    config = T.T5Config(**{**CONFIGS["t5"]().to_dict(), "num_layers": 3, "num_decoder_layers": 3})
    torch.manual_seed(0)
    three = T.T5ForConditionalGeneration(config).eval()  # odd depth: peft's layer order is a permutation
    base = T.T5ForConditionalGeneration(config).eval()
    base.load_state_dict(three.state_dict())
    adapters = _prefixed(three)
    adapters.export_peft("p", tmp_path / "three")
    theirs = _peft_model(base, tmp_path / "three")
    kwargs = {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": IDS[:, :3]}
    torch.testing.assert_close(three(**kwargs).logits, theirs(**kwargs).logits, rtol=0, atol=1e-5)
    two = _prefixed(_t5())  # 2 layers: peft gives both the rows of layer 0
    with pytest.raises(ConfigError, match="2i mod 2"):
        two.export_peft("p", tmp_path / "two")
    assert not (tmp_path / "two").exists()


# ---- the reparameterisation -----------------------------------------------------------------------------
def test_projection_trains_through_the_mlp_and_is_folded_when_saved(tmp_path):
    model = _bert()
    adapters = _prefixed(model, projection=8)
    made = peft.get_peft_model(_bert(), peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8))
    assert adapters.summary()["p"].parameters == sum(p.numel() for p in made.prompt_encoder.parameters())
    adapters.train("p")
    optimizer = torch.optim.SGD(adapters.parameters("p"), lr=0.1)
    model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    model.eval()
    trained = model(input_ids=IDS, attention_mask=MASK).logits
    adapters.save("p", tmp_path / "p")
    other = _bert()
    loaded = peftlab.attach(other)
    loaded.load(tmp_path / "p")
    loaded.activate("p")
    assert loaded.config("p") == PrefixTuningConfig(num_virtual_tokens=N)  # no MLP left
    assert loaded.summary()["p"].parameters == N * 2 * 2 * 32
    torch.testing.assert_close(other(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=0, atol=1e-6)


def test_a_projected_t5_prefix_folds_with_its_decoder_rows(tmp_path):
    """Folding keeps the encoder-decoder layout: the decoder's self- and cross-attention prefixes
    come back from the file."""
    model = _t5()
    adapters = _prefixed(model, projection=8)
    kwargs = {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": IDS[:, :3]}
    with torch.no_grad():
        expected = model(**kwargs).logits
    adapters.save("p", tmp_path / "p")
    other = _t5()
    loaded = peftlab.attach(other)
    loaded.load(tmp_path / "p")
    loaded.activate("p")
    assert loaded.config("p") == PrefixTuningConfig(num_virtual_tokens=N)
    with torch.no_grad():
        torch.testing.assert_close(other(**kwargs).logits, expected, rtol=0, atol=1e-5)


# ---- routing ------------------------------------------------------------------------------------------
def test_routing_bert_with_different_prefixes_or_none_equals_separate_runs():
    model = _bert()
    adapters = _prefixed(model, "a", n=2)
    adapters.add("b", PrefixTuningConfig(num_virtual_tokens=4))
    randomize(adapters.parameters("b"), scale=1.0, seed=3)
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    routes = ["b", None, "a"]
    with adapters.route(routes):
        routed = model(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(routes):
        adapters.activate(*(() if name is None else (name,)))
        alone = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        torch.testing.assert_close(routed[i:i + 1], alone, rtol=0, atol=1e-5)


def test_routing_llama_generation_equals_separate_runs():
    model = _llama()
    adapters = _prefixed(model, "a", n=2)
    adapters.add("b", PrefixTuningConfig(num_virtual_tokens=4))
    randomize(adapters.parameters("b"), scale=1.0, seed=3)
    ids = torch.randint(3, 100, (3, 4), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    routes = ["a", "b", None]
    with adapters.route(routes):
        routed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    for i, name in enumerate(routes):
        adapters.activate(*(() if name is None else (name,)))
        alone = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs)
        torch.testing.assert_close(torch.stack(routed.scores)[:, i], torch.stack(alone.scores)[:, 0],
                                   rtol=0, atol=1e-5)


# ---- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["distilbert", "deberta-v2"])
def test_architectures_without_a_cache_are_refused_by_model_type(family):
    adapters = peftlab.attach(tiny_model(family))
    with pytest.raises(TargetError, match=f"model_type '{family}'"):
        adapters.add("p", PrefixTuningConfig())
    assert adapters.names == ()


def test_a_model_whose_attention_ignores_the_cache_is_refused_not_run_without_the_prefix():
    model = _bert()
    _prefixed(model)
    for layer in model.bert.encoder.layer:  # an attention that drops the cache it is given
        inner = layer.attention.self.forward
        layer.attention.self.forward = lambda *a, _f=inner, **k: _f(*a, **{**k, "cache": None})
    with pytest.raises(TargetError, match="did not read the prefix"):
        model(input_ids=IDS)


def test_merging_is_refused_and_the_config_is_checked():
    adapters = _prefixed(_bert())
    with pytest.raises(AdapterStateError, match="attention positions"):
        adapters.merge("p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="hidden width"):
            PrefixTuningConfig(projection=True)


# ---- the command line -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,sets,saved", [
    ("prompt-tuning", ["num_virtual_tokens=4"],
     {"num_virtual_tokens": 4, "init": "random", "init_text": None, "tokenizer": None}),
    ("prefix-tuning", ["num_virtual_tokens=4", "projection=8"],
     {"num_virtual_tokens": 4, "projection": False}),
])
def test_both_methods_train_from_the_command_line(tmp_path, method, sets, saved):

    from test_cli import _save_bert, _sentiment
    from typer.testing import CliRunner

    from peftlab.cli import app

    bert, data = _save_bert(tmp_path / "bert"), _sentiment(tmp_path / "data")
    args = ["train", "--model", str(bert), "--data", str(data), "--method", method, "--out",
            str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--quiet"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["config"] == saved  # prefix tuning's MLP folded away in the saved adapter
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == method and "accuracy" in metrics["eval"]


def test_routing_prompt_and_prefix_adapters_side_by_side_equals_separate_runs():
    from peftlab.methods.prompt import PromptTuningConfig

    model = _llama()
    adapters = _prefixed(model, "prefix", n=2)
    adapters.add("prompt", PromptTuningConfig(num_virtual_tokens=3))
    randomize(adapters.parameters("prompt"), seed=3)
    ids = torch.randint(3, 100, (3, 4), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    routes = ["prompt", "prefix", None]
    with adapters.route(routes):
        routed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    for i, name in enumerate(routes):
        adapters.activate(*(() if name is None else (name,)))
        alone = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs)
        torch.testing.assert_close(torch.stack(routed.scores)[:, i], torch.stack(alone.scores)[:, 0],
                                   rtol=0, atol=1e-5)


def test_mean_pooling_head_reads_the_backbone_with_either_method():
    from peftlab.heads import MeanPoolClassifier
    from peftlab.methods.prompt import PromptTuningConfig

    torch.manual_seed(0)
    model = MeanPoolClassifier(T.BertModel(CONFIGS["bert"](), add_pooling_layer=False), 2).eval()
    adapters = peftlab.attach(model)
    adapters.add("prompt", PromptTuningConfig(num_virtual_tokens=N))
    adapters.add("prefix", PrefixTuningConfig(num_virtual_tokens=N))
    randomize(adapters.parameters("prefix"), scale=1.0)
    with adapters.route(["prompt", "prefix"]):
        routed = model(input_ids=IDS, attention_mask=MASK).logits
    adapters.activate("prompt")
    p = _piece(adapters, "prompt").prompt_embeddings
    words = model.backbone.embeddings.word_embeddings(IDS)
    hidden = model.backbone(inputs_embeds=torch.cat([p.expand(2, -1, -1), words], 1),
                            attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), MASK], 1))[0]
    keep = torch.cat([torch.ones(2, N), MASK.float()], 1)[..., None]
    by_hand = model.classifier((hidden * keep).sum(1) / keep.sum(1))  # the mean covers the prompt
    torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[:1], by_hand[:1], rtol=0, atol=1e-5)
    adapters.activate("prefix")  # the prefix goes to the backbone: the head's mask stays the text's
    alone = model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(routed[1:], alone[1:], rtol=0, atol=1e-5)


def test_training_with_gradient_checkpointing_is_refused():
    from peftlab.errors import UsageError

    model = _llama()
    adapters = _prefixed(model)
    model.gradient_checkpointing_enable()
    adapters.train("p")
    model.train()
    with pytest.raises(UsageError, match="gradient checkpointing"):
        model(input_ids=IDS, labels=IDS)
