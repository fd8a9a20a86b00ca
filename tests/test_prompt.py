"""Prompt tuning: learned virtual tokens in front of the input, on encoders, decoders and T5.

Every test compares against something computed another way: the prompt concatenated by hand
(``inputs_embeds``), the real ``peft`` package, or each example run alone."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
import transformers as T
from conftest import CONFIGS, randomize

import peftlab
from peftlab.errors import AdapterLoadError, AdapterStateError, ConfigError
from peftlab.methods.prompt import PromptTuningConfig

peft = pytest.importorskip("peft")

N = 3
IDS = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _model(family: str, cls: type, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(CONFIGS[family]()).eval()


def _bert() -> torch.nn.Module:
    return _model("bert", T.BertForSequenceClassification)


def _llama() -> torch.nn.Module:
    return _model("llama", T.LlamaForCausalLM)


def _t5() -> torch.nn.Module:
    model = _model("t5", T.T5ForConditionalGeneration)
    model.generation_config.decoder_start_token_id = 0
    return model


def _prompted(model: torch.nn.Module, name: str = "p", n: int = N, seed: int = 2) -> peftlab.AdapterSet:
    adapters = peftlab.attach(model)
    adapters.add(name, PromptTuningConfig(num_virtual_tokens=n))
    adapters.activate(name)
    randomize(adapters.parameters(name), seed=seed)
    return adapters


def _prompt_of(adapters: peftlab.AdapterSet, name: str) -> torch.Tensor:
    return next(iter(adapters[name].pieces.values())).prompt_embeddings


# ---- what it computes -----------------------------------------------------------------------------
def test_bert_classifier_equals_the_prompt_concatenated_by_hand():
    model = _bert()
    adapters = _prompted(model)
    types = torch.ones_like(IDS)
    out = model(input_ids=IDS, attention_mask=MASK, token_type_ids=types).logits
    adapters.activate()
    p = _prompt_of(adapters, "p")
    by_hand = model(inputs_embeds=torch.cat([p.expand(2, -1, -1), model.get_input_embeddings()(IDS)], 1),
                    attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), MASK], 1),
                    token_type_ids=torch.cat([torch.zeros(2, N, dtype=torch.long), types], 1)).logits
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    assert not torch.allclose(out, model(input_ids=IDS, attention_mask=MASK, token_type_ids=types).logits)


def test_causal_lm_loss_ignores_the_virtual_positions():
    model = _llama()
    adapters = _prompted(model)
    out = model(input_ids=IDS, labels=IDS)
    assert out.logits.shape == (2, N + 5, 100)  # peft's layout: virtual positions first
    # labels -100 on the prompt: the last virtual position predicts the first real token
    predicting = out.logits[:, N - 1:-1].reshape(-1, 100)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(predicting, IDS.reshape(-1)))
    assert adapters.summary()["p"].parameters == N * 32


def test_parameter_count_is_n_times_width_and_only_the_prompt_trains():
    model = _bert()
    adapters = _prompted(model, n=20)
    trainable = adapters.train("p")
    assert sum(p.numel() for p in trainable) == 20 * 32 == adapters.summary()["p"].parameters
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "bert.embeddings.word_embeddings.adapters.p.prompt_embeddings"]
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    assert _prompt_of(adapters, "p").grad.abs().sum() > 0


def test_text_and_vocab_init_start_from_real_token_embeddings(tmp_path):
    from test_cli import _save_bert

    folder = _save_bert(tmp_path / "bert")
    model = T.BertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    adapters = peftlab.attach(model)
    adapters.add("text", PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="great movie"))
    ids = tokenizer("great movie", add_special_tokens=False)["input_ids"]
    words = model.get_input_embeddings()(torch.tensor((ids * 3)[:5]))
    torch.testing.assert_close(_prompt_of(adapters, "text"), words)
    adapters.add("vocab", PromptTuningConfig(num_virtual_tokens=4, init="vocab"))
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, w) for w in table) for row in _prompt_of(adapters, "vocab"))
    with pytest.raises(ConfigError, match="init_text"):
        PromptTuningConfig(init="text")


def test_text_init_without_a_usable_tokenizer_is_refused(tmp_path):
    from test_cli import _save_bert

    adapters = peftlab.attach(_bert())  # built from a config: no folder to take a tokenizer from
    with pytest.raises(ConfigError) as refused:
        adapters.add("t", PromptTuningConfig(init="text", init_text="great"))
    assert str(refused.value) == ('init="text" needs a tokenizer: pass tokenizer=<folder or name> '
                                  "(this model was not loaded from a folder)")
    missing = str(tmp_path / "none")
    with pytest.raises(ConfigError, match=f"^cannot load the tokenizer for init_text from '{missing}': "):
        adapters.add("t", PromptTuningConfig(init="text", init_text="great", tokenizer=missing))
    folder = str(_save_bert(tmp_path / "bert"))
    with pytest.raises(ConfigError, match=r"^init_text ' ' has no tokens$"):
        adapters.add("t", PromptTuningConfig(init="text", init_text=" ", tokenizer=folder))
    assert adapters.names == ()


def test_a_tokenizer_for_a_larger_vocabulary_is_refused():
    from peftlab.cli import demo_model_dir

    adapters = peftlab.attach(_bert())  # 100 embeddings; MiniLM's tokenizer has 30,522 tokens
    with pytest.raises(ConfigError, match=r"^the tokenizer gives token ids up to \d+, but the model has 100 "
                                          r"embeddings: wrong tokenizer for this model$"):
        adapters.add("t", PromptTuningConfig(init="text", init_text="a great movie",
                                             tokenizer=str(demo_model_dir())))
    assert adapters.names == ()


def test_a_random_prompt_has_the_spread_of_the_embedding_table():
    model = _bert()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.05)
    adapters = peftlab.attach(model)
    adapters.add("r", PromptTuningConfig(num_virtual_tokens=40))
    spread = model.get_input_embeddings().weight.std()
    assert 0.8 < float(_prompt_of(adapters, "r").std() / spread) < 1.25


def test_config_bounds_and_messages():
    with pytest.raises(ConfigError, match=r"^num_virtual_tokens must be at least 1, got 0$"):
        PromptTuningConfig(num_virtual_tokens=0)
    assert PromptTuningConfig(num_virtual_tokens=1).num_virtual_tokens == 1
    with pytest.raises(ConfigError) as refused:
        PromptTuningConfig(init="text")
    assert str(refused.value) == 'init="text" needs init_text (the text whose tokens start the prompt)'
    for extra in ({"init_text": "hi"}, {"tokenizer": "folder"}):
        with pytest.raises(ConfigError) as refused:
            PromptTuningConfig(init="vocab", **extra)
        assert str(refused.value) == "init_text and tokenizer are read only with init=\"text\", not 'vocab'"


# ---- peft, both ways ----------------------------------------------------------------------------------
def _peft_model(base: torch.nn.Module, folder) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_export_to_peft_gives_equal_logits(tmp_path, family):
    make = {"bert": _bert, "llama": _llama, "t5": _t5}[family]
    model, base = make(), make()
    adapters = _prompted(model)
    if family == "bert":
        adapters.train("p", extras=("classifier",))
        randomize(model.classifier.parameters(), seed=5)
        model.eval()
    adapters.export_peft("p", tmp_path / "peft")
    theirs = _peft_model(base, tmp_path / "peft")
    kwargs = {"input_ids": IDS, "attention_mask": MASK}
    if family == "t5":
        kwargs["decoder_input_ids"] = IDS[:, :3]
    ours, other = model(**kwargs).logits, theirs(**kwargs).logits
    torch.testing.assert_close(ours, other, rtol=0, atol=1e-5)
    assert adapters.summary()["p"].parameters == sum(p.numel() for p in theirs.prompt_encoder.parameters())


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_import_from_peft_gives_equal_logits(tmp_path, family):
    make = {"bert": _bert, "llama": _llama, "t5": _t5}[family]
    task = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}[family]
    theirs = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    randomize(theirs.prompt_encoder.parameters(), seed=7)
    if family == "bert":
        randomize(theirs.base_model.classifier.parameters(), seed=8)
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    model = make()
    adapters = peftlab.attach(model)
    adapters.import_peft(tmp_path / "peft", "p")
    adapters.activate("p")
    kwargs = {"input_ids": IDS, "attention_mask": MASK}
    if family == "t5":  # peft's seq2seq default holds a second, unused block for the decoder
        kwargs["decoder_input_ids"] = IDS[:, :3]
    torch.testing.assert_close(model(**kwargs).logits, theirs(**kwargs).logits, rtol=0, atol=1e-5)
    if family == "bert":
        assert adapters["p"].extras == ("classifier",)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_equals_peft(tmp_path, family):
    make = {"llama": _llama, "t5": _t5}[family]
    model, base = make(), make()
    adapters = _prompted(model)
    adapters.export_peft("p", tmp_path / "peft")
    theirs = _peft_model(base, tmp_path / "peft")
    ids = IDS[:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    other = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.testing.assert_close(ours.scores[0], other.scores[0], rtol=0, atol=1e-5)
    if family == "t5":
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(other.scores), rtol=0, atol=1e-5)
    else:
        # peft 0.21's decoder-only generate on transformers 5 drifts from its own forward after
        # the first token; every step of ours equals peft's forward over the generated text.
        full = theirs(input_ids=ours.sequences).logits[0, N + ids.shape[1] - 1:-1]
        torch.testing.assert_close(torch.stack(ours.scores)[:, 0], full, rtol=0, atol=1e-5)


def test_generate_with_a_cache_equals_running_the_whole_sequence():
    model = _llama()
    _prompted(model)
    ids = IDS[:1]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    full = model(input_ids=out.sequences).logits  # one pass, no cache
    last = full[0, N + ids.shape[1] - 1: -1]
    torch.testing.assert_close(torch.stack(out.scores)[:, 0], last, rtol=0, atol=1e-5)


# ---- files --------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model = _bert()
    adapters = _prompted(model)
    before = model(input_ids=IDS, attention_mask=MASK).logits
    adapters.save("p", tmp_path / "p")
    other = _bert()
    loaded = peftlab.attach(other)
    assert loaded.load(tmp_path / "p") == "p"
    loaded.activate("p")
    torch.testing.assert_close(other(input_ids=IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)


def test_export_writes_the_fields_peft_writes(tmp_path):
    adapters = _prompted(_llama())
    adapters.export_peft("p", tmp_path / "ours")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    peft.get_peft_model(_llama(), config).save_pretrained(tmp_path / "theirs")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                    for d in ("ours", "theirs"))
    fields = ("peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
              "prompt_tuning_init")
    assert {k: ours[k] for k in fields} == {k: theirs[k] for k in fields}


def _save_edited(theirs, folder, edit: dict) -> None:
    """``theirs`` saved by peft to ``folder``, its config edited: ``None`` removes a field."""
    theirs.save_pretrained(folder)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in edit.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, refusal", [
    ({"num_virtual_tokens": None}, "num_virtual_tokens must be a positive integer"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"num_transformer_submodules": 3}, "num_transformer_submodules must be 1 or 2, got 3"),
    ({"token_dim": 16}, "token_dim 16 differs from this 'llama' model's embedding width 32"),
    ({"num_transformer_submodules": None, "token_dim": None}, None),  # peft's defaults: 1, the model's width
], ids=["n-missing", "n-zero", "three-submodules", "width", "defaults"])
def test_peft_prompt_configs_are_read_by_their_rules(tmp_path, edit, refusal):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1)
    theirs = peft.get_peft_model(_llama(), config)
    randomize(theirs.prompt_encoder.parameters(), seed=7)
    _save_edited(theirs, tmp_path / "peft", edit)
    model = _llama()
    adapters = peftlab.attach(model)
    if refusal:
        with pytest.raises(AdapterLoadError, match=re.escape(refusal)):
            adapters.import_peft(tmp_path / "peft", "p")
        assert adapters.names == ()
        return
    adapters.import_peft(tmp_path / "peft", "p")  # one virtual token is a prompt too
    adapters.activate("p")
    theirs.eval()
    torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_peft_file_for_another_width_is_refused_before_the_model_changes(tmp_path):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=16)
    theirs = peft.get_peft_model(_llama(), config)
    theirs.save_pretrained(tmp_path / "peft")
    model = _llama()
    adapters = peftlab.attach(model)
    with pytest.raises(AdapterLoadError, match="token_dim 16"):
        adapters.import_peft(tmp_path / "peft", "p")
    assert adapters.names == () and not any(p.kind == "sequence" for _, layer in adapters.layers()
                                            for p in layer.adapters.values())


# ---- routing ------------------------------------------------------------------------------------------
def test_routing_different_prompts_or_none_equals_separate_runs():
    model = _bert()
    adapters = _prompted(model, "a", n=3, seed=2)
    adapters.add("b", PromptTuningConfig(num_virtual_tokens=5))
    randomize(adapters.parameters("b"), seed=3)
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with adapters.route(["a", None, "b"]):
        routed = model(input_ids=ids, attention_mask=mask).logits
    alone = []
    for i, name in enumerate(["a", None, "b"]):
        adapters.activate(*(() if name is None else (name,)))
        alone.append(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
    torch.testing.assert_close(routed, torch.cat(alone), rtol=0, atol=1e-5)


def test_routing_a_decoder_pads_on_the_left_and_generates_like_separate_runs():
    model = _llama()
    adapters = _prompted(model, "a", n=2, seed=2)
    adapters.add("b", PromptTuningConfig(num_virtual_tokens=4))
    randomize(adapters.parameters("b"), seed=3)
    ids = torch.randint(3, 100, (3, 4), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with adapters.route(["b", None, "a"]):
        routed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    for i, name in enumerate(["b", None, "a"]):
        adapters.activate(*(() if name is None else (name,)))
        alone = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kwargs)
        torch.testing.assert_close(torch.stack(routed.scores)[:, i], torch.stack(alone.scores)[:, 0],
                                   rtol=0, atol=1e-5)


# ---- refusals -----------------------------------------------------------------------------------------
def test_merging_is_refused_with_the_reason():
    adapters = _prompted(_bert())
    with pytest.raises(AdapterStateError, match="virtual tokens"):
        adapters.merge("p")


def test_two_prompts_in_one_example_are_refused():
    model = _bert()
    adapters = _prompted(model, "a")
    adapters.add("b", PromptTuningConfig(num_virtual_tokens=2))
    adapters.activate("a", "b")
    with pytest.raises(AdapterStateError, match="one of them at a time"):
        model(input_ids=IDS)


def test_remove_and_detach_leave_the_plain_model():
    model = _bert()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    adapters = _prompted(model)
    adapters.remove("p")
    torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    _prompted(model, "q")
    peftlab.detach(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)


def test_inputs_too_long_for_the_prompt_are_refused_and_recommend_leaves_the_method_out(tmp_path):
    from test_cli import _save_bert

    from peftlab.errors import UsageError
    from peftlab.recommend import _fits

    model = _bert()  # 512 positions
    _prompted(model, n=20)
    with pytest.raises(UsageError, match="need 520 positions; this 'bert' model has 512"):
        model(input_ids=torch.randint(3, 100, (1, 500)))
    folder = T.BertForSequenceClassification.from_pretrained(_save_bert(tmp_path / "bert"))  # 64 positions
    assert _fits(folder, "prompt-tuning", 44) and not _fits(folder, "prompt-tuning", 45)
    assert _fits(folder, "lora", 64)


def test_last_token_classifier_reads_the_last_real_token_or_refuses_right_padding():
    model = _model("llama", T.LlamaForSequenceClassification)
    model.config.pad_token_id = 0
    adapters = _prompted(model)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = IDS.masked_fill(left == 0, 0)
    out = model(input_ids=ids, attention_mask=left).logits
    adapters.activate()
    p = _prompt_of(adapters, "p")
    full = torch.cat([p.expand(2, -1, -1), model.get_input_embeddings()(ids)], 1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), left], 1)
    hidden = model.model(inputs_embeds=full, attention_mask=mask)
    torch.testing.assert_close(out, model.score(hidden[0][:, -1]), rtol=0, atol=1e-5)
    adapters.activate("p")
    with pytest.raises(peftlab.errors.UsageError, match="pad on the left"):
        model(input_ids=IDS, attention_mask=MASK)


def test_routing_t5_generation_equals_separate_runs():
    model = _t5()
    adapters = _prompted(model, "a", n=2, seed=2)
    adapters.add("b", PromptTuningConfig(num_virtual_tokens=4))
    randomize(adapters.parameters("b"), seed=3)
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    routes = ["b", None, "a"]
    for mask in (torch.ones_like(ids), None):  # generate's encoder call and decoder steps, mask or not
        with adapters.route(routes):
            routed = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for i, name in enumerate(routes):
            adapters.activate(*(() if name is None else (name,)))
            alone = model.generate(input_ids=ids[i:i + 1], **kwargs)
            torch.testing.assert_close(torch.stack(routed.scores)[:, i], torch.stack(alone.scores)[:, 0],
                                       rtol=0, atol=1e-5)
