"""Cases that once gave wrong results without any error; each test failed before its fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import randomize, tiny_inputs, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.data import load_task, tokenize
from peftlab.train import collator


def _gpt2_lm(seed: int = 0) -> T.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, bos_token_id=1, eos_token_id=1)
    return T.GPT2LMHeadModel(config).eval()


def _bert_classifier(seed: int = 0) -> T.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          vocab_size=100, num_labels=2)
    return T.BertForSequenceClassification(config).eval()


def _mixtral(seed: int = 0) -> T.MixtralForCausalLM:
    """A tiny mixture-of-experts model: routed experts are 3-D parameters, not Linear layers."""
    torch.manual_seed(seed)
    config = T.MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, vocab_size=100,
                             num_local_experts=4, num_experts_per_tok=2)
    return T.MixtralForCausalLM(config).eval()


def _active(model: torch.nn.Module, config: peftlab.AdapterConfig) -> peftlab.AdapterSet:
    """``model``'s adapters with adapter "x" added, active, and moved away from its init."""
    adapters = peftlab.attach(model)
    adapters.add("x", config)
    adapters.activate("x")
    randomize(adapters.parameters("x"))
    return adapters


IDS = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(0))


# ---- 1. adapters added to a model in eval mode follow its mode -----------------------------------
def test_lora_added_to_an_eval_model_runs_no_dropout():
    model = tiny_model("bert")  # in eval mode, as from_pretrained returns it
    _active(model, peftlab.LoRAConfig(dropout=0.5))
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    assert not any(m.training for m in model.modules())
    model.train()  # and dropout does run once the user asks for training
    assert not torch.equal(model(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_loaded_and_imported_adapters_follow_the_model_mode(tmp_path):
    source = tiny_model("bert")
    adapters = peftlab.attach(source)
    adapters.add("x", peftlab.LoRAConfig(dropout=0.5))
    randomize(adapters.parameters("x"))
    adapters.save("x", tmp_path / "mine")
    adapters.export_peft("x", tmp_path / "peft")

    model = tiny_model("bert")
    target = peftlab.attach(model)
    target.load(tmp_path / "mine", name="loaded")
    target.import_peft(tmp_path / "peft", name="imported")
    assert not any(m.training for m in model.modules())
    inputs = tiny_inputs("bert")
    for name in ("loaded", "imported"):
        target.activate(name)
        with torch.no_grad():
            assert torch.equal(model(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_expert_wrappers_follow_the_model_mode_too():
    model = _mixtral()
    peftlab.attach(model).add("x", peftlab.LoRAConfig(targets=("ffn_down", "query")))
    assert not any(m.training for m in model.modules())


def test_a_new_adapter_on_a_training_model_trains():
    model = tiny_model("bert").train()
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.BottleneckConfig.pfeiffer())
    assert all(m.training for m in model.modules())


# ---- 2. merging into a weight tied to the input embeddings ---------------------------------------
@pytest.mark.parametrize("config", [peftlab.LoRAConfig(targets=(r"^lm_head$",)),
                                    peftlab.IA3Config(targets=(r"^lm_head$",), scale_input=())])
def test_merge_into_a_tied_lm_head_unties_it_and_unmerge_ties_it_back(config, tmp_path):
    model = _gpt2_lm()
    embeddings = model.transformer.wte.weight
    before = embeddings.detach().clone()
    adapters = peftlab.attach(model)
    adapters.add("head", config)
    adapters.activate("head")
    randomize(adapters.parameters("head"), scale=0.5)
    embeddings.requires_grad_(False)  # frozen, as in training: the head's own copy stays frozen
    with torch.no_grad():
        expected = model(IDS).logits

        adapters.merge("head")
        assert torch.equal(model.transformer.wte.weight, before)  # the input embeddings are untouched
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.base.weight is not embeddings and not model.lm_head.base.weight.requires_grad
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)

        model.save_pretrained(tmp_path)
        reloaded = T.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)
        assert reloaded.lm_head.weight is not reloaded.transformer.wte.weight

        adapters.unmerge("head")
    assert model.lm_head.base.weight is embeddings  # the very same shared parameter again
    assert model.config.tie_word_embeddings is True and torch.equal(embeddings, before)


def test_merge_into_a_head_that_a_sub_model_still_ties_is_refused_and_changes_nothing():
    """A model wrapping a GPT-2 LM: clearing the wrapper's tie flag leaves the inner model tied,
    so a saved merge would be tied again on reload. Refused; the shared weight comes back."""

    class Wrapper(T.PreTrainedModel):
        config_class = T.PretrainedConfig

        def __init__(self, inner: T.GPT2LMHeadModel):
            super().__init__(T.PretrainedConfig(tie_word_embeddings=True))
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, ids):
            return self.inner(ids).logits

    inner = _gpt2_lm()
    embeddings = inner.transformer.wte.weight
    model = Wrapper(inner).eval()
    adapters = peftlab.attach(model)
    adapters.add("head", peftlab.LoRAConfig(targets=(r"lm_head$",)))
    adapters.activate("head")
    randomize(adapters.parameters("head"), scale=0.5)
    with pytest.raises(peftlab.AdapterStateError) as refused:
        adapters.merge("head")
    assert str(refused.value) == (
        "cannot merge into the output embeddings: the model still ties weights after setting "
        "tie_word_embeddings=False ({'inner.lm_head.weight': 'inner.transformer.wte.weight'})")
    assert inner.lm_head.base.weight is embeddings and model.config.tie_word_embeddings is True
    assert not adapters["head"].merged


def test_merge_into_another_shared_weight_is_refused_and_changes_nothing():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x) + self.b(x)

    net = TwoHeads()
    adapters = _active(net, peftlab.LoRAConfig(targets=(r"^a$",), r=2))
    shared = net.b.weight.detach().clone()
    with pytest.raises(peftlab.AdapterStateError) as refused:
        adapters.merge("x")
    assert str(refused.value) == (
        "cannot merge into a: its weight is shared with ['a.base.weight', 'b.weight'], so merging would "
        "change those too. Keep the adapter unmerged, or untie the weights yourself first")
    assert torch.equal(net.b.weight, shared) and not adapters["x"].merged

    net = TwoHeads()
    net.b.weight = torch.nn.Parameter(net.a.weight.detach().clone())
    net.b.bias = net.a.bias  # only the bias is shared: (IA)³ scaling the output would scale it for both
    adapters = _active(net, peftlab.IA3Config(targets=(r"^a$",), scale_input=()))
    with pytest.raises(peftlab.AdapterStateError) as refused:
        adapters.merge("x")
    assert str(refused.value) == ("cannot merge into a: its bias is shared with ['a.base.bias', 'b.bias']; "
                                  "merging would change them all")
    assert not adapters["x"].merged


def test_merging_where_nothing_is_shared_leaves_the_tie_flag_and_the_weights_alone():
    model = _gpt2_lm()
    embeddings = model.transformer.wte.weight
    adapters = _active(model, peftlab.LoRAConfig(targets=("query", "value")))
    layer = model.transformer.h[0].attn.c_attn
    weight = layer.base.weight
    adapters.merge("x")
    assert model.config.tie_word_embeddings is True and model.lm_head.weight is embeddings
    assert layer.base.weight is weight  # merged in place, not into a copy


# ---- 3. save_pretrained and Trainer checkpoints of an adapted model --------------------------------
def test_save_pretrained_refuses_unmerged_adapters_and_writes_a_plain_model_after_merge(tmp_path):
    model = _bert_classifier()
    adapters = _active(model, peftlab.LoRAConfig())
    with pytest.raises(peftlab.AdapterStateError, match="adapters.save"):
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    with torch.no_grad():
        expected = model(IDS).logits
    adapters.merge("x")
    model.save_pretrained(tmp_path / "merged")
    reloaded = T.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)
    # The adapter is still attached and unmergeable after the save.
    adapters.unmerge("x")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, peftlab.layer.AdaptedLayer)


def test_save_pretrained_with_a_wrapped_state_dict_writes_plain_keys(tmp_path):
    model = _bert_classifier()
    adapters = _active(model, peftlab.IA3Config())
    adapters.merge("x")
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # what Trainer passes under DDP
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = T.BertForSequenceClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)


def _trainer(model, out: Path, steps: int = 4) -> T.Trainer:
    data = [{"input_ids": IDS[i % 2], "labels": i % 2} for i in range(16)]
    args = T.TrainingArguments(str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                               report_to=[], use_cpu=True, logging_steps=1000, disable_tqdm=True)
    return T.Trainer(model=model, args=args, train_dataset=data)


def test_plain_trainer_checkpoints_hold_the_adapter_and_resume_it(tmp_path):
    model = _bert_classifier()
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.LoRAConfig())
    adapters.activate("x")
    adapters.train("x", extras=("classifier",))
    trainer = peftlab.adapter_checkpoints(_trainer(model, tmp_path))  # the one line
    trainer.train()

    checkpoint = tmp_path / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()
    assert os.path.getsize(checkpoint / "adapter_model.safetensors") < 20_000
    trained = {k: v.clone() for k, v in peftlab.io.adapter_files(adapters, "x", None)
               ["adapter_model.safetensors"].items()}

    fresh = _bert_classifier(seed=1)  # another init: the resume must bring the tensors back
    again = peftlab.attach(fresh)
    again.add("x", peftlab.LoRAConfig())
    again.activate("x")
    again.train("x", extras=("classifier",))
    peftlab.adapter_checkpoints(_trainer(fresh, tmp_path / "resumed")).train(
        resume_from_checkpoint=str(checkpoint))
    restored = peftlab.io.adapter_files(again, "x", None)["adapter_model.safetensors"]
    assert restored.keys() == trained.keys()
    assert all(torch.equal(restored[k], trained[k]) for k in trained)

    reader = peftlab.attach(_bert_classifier(seed=2))
    assert reader.load(checkpoint) == "x"  # a checkpoint is an adapter directory


def test_plain_trainer_without_adapter_checkpoints_stops_with_the_fix(tmp_path):
    model = _bert_classifier()
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.LoRAConfig())
    adapters.activate("x")
    adapters.train("x")
    with pytest.raises(peftlab.AdapterStateError, match="adapter_checkpoints"):
        _trainer(model, tmp_path).train()


def test_resume_from_another_adapter_is_refused(tmp_path):
    model = _bert_classifier()
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.LoRAConfig(r=4))
    adapters.activate("x")
    adapters.train("x")
    adapters.save("x", tmp_path / "r4")
    other = _bert_classifier()
    theirs = peftlab.attach(other)
    theirs.add("x", peftlab.LoRAConfig(r=8))
    theirs.activate("x")
    theirs.train("x")
    with pytest.raises(peftlab.AdapterLoadError, match="another adapter"):
        peftlab.io.restore_adapter(theirs, "x", tmp_path / "r4")


# ---- 4. (IA)³ with a zero scale ------------------------------------------------------------------
def test_ia3_with_a_zero_scale_is_not_merged():
    model = tiny_model("bert")
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.IA3Config())
    adapters.activate("x")
    piece = adapters["x"].pieces["encoder.layer.1.output.dense"]
    with torch.no_grad():
        piece.ia3_l[3] = 0.0
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(peftlab.AdapterStateError, match="scale.*0"):
        adapters.merge("x")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not adapters["x"].merged


# ---- 5. causal-LM training learns the eos token ---------------------------------------------------
def _eos_only_tokenizer() -> T.PreTrainedTokenizerBase:
    words = ["[UNK]", "</s>", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")


def test_causal_lm_labels_keep_eos_when_padding_uses_eos(tmp_path):
    tokenizer = _eos_only_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # what load_model does for a tokenizer without one
    (tmp_path / "train.jsonl").write_text('{"text": "the cat sat"}\n{"text": "the cat sat on the mat"}\n')
    split = load_task(tmp_path, splits=("train",), task="causal-lm")["train"]
    dataset, cut = tokenize(split, tokenizer, "causal-lm", max_length=32)
    batch = collator(tokenizer, "causal-lm")([dataset[0], dataset[1]])
    eos = tokenizer.eos_token_id
    assert batch["input_ids"][0].tolist() == [2, 3, 4, eos, eos, eos, eos]  # text, eos, padding
    assert batch["labels"][0].tolist() == [2, 3, 4, eos, -100, -100, -100]  # eos is learned
    assert batch["labels"][1].tolist() == [2, 3, 4, 5, 2, 6, eos]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0] and cut == 0
    short, cut = tokenize(split, tokenizer, "causal-lm", max_length=4)
    assert short[1]["input_ids"] == [2, 3, 4, 5] and cut == 1  # a cut text did not end: no eos


# ---- 6. fields a task does not use ----------------------------------------------------------------
def test_causal_lm_refuses_a_text_pair_it_would_drop(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "the cat", "text_pair": "sat on the mat"}\n')
    with pytest.raises(peftlab.DataError, match="text_pair"):
        load_task(tmp_path, task="causal-lm")
    result = CliRunner().invoke(app, ["train", "--model", str(tmp_path), "--data", str(tmp_path),
                                      "--task", "causal-lm", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


def test_unused_fields_are_listed(tmp_path):
    rows = [{"text": "good", "label": 1, "idx": 0}, {"text": "bad", "label": 0, "idx": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_task(tmp_path, splits=("train",))["train"].ignored == ("idx",)


def test_ia3_on_moe_experts_with_a_zero_scale_is_not_merged():
    model = _mixtral()
    adapters = peftlab.attach(model)
    adapters.add("x", peftlab.IA3Config(targets=("ffn_down",)))
    adapters.activate("x")
    piece = next(iter(adapters["x"].pieces.values()))
    with torch.no_grad():
        piece.ia3_l[1, 3] = 0.0
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(peftlab.AdapterStateError, match="scale.*0"):
        adapters.merge("x")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_save_pretrained_after_merging_into_moe_experts(tmp_path):
    model = _mixtral()
    adapters = _active(model, peftlab.LoRAConfig(targets=("ffn_down", "query")))
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        adapters.merge("x")
        model.save_pretrained(tmp_path)
        reloaded = T.MixtralForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=0)
