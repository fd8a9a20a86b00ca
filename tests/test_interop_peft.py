"""HF peft's adapter format, both ways, checked against the real ``peft`` package.

Every comparison uses randomised adapter weights (a fresh LoRA has B = 0 and a fresh (IA)³ vector is
all ones, which would make "same logits" hold for any key layout) and first checks that the
adapter really changes the logits.
"""

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5ForConditionalGeneration,
    T5Model,
)

import peftlab

peft = pytest.importorskip("peft")

TOL = 1e-5


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=100, num_labels=3,
                        initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                      n_positions=32, initializer_range=0.2)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(params, around: float = 0.0) -> None:
    """Replace adapter tensors by random values near ``around`` (0 for LoRA, 1 for (IA)³)."""
    with torch.no_grad():
        for p in params:
            p.copy_(around + 0.2 * torch.randn_like(p))


def randomize_peft(model) -> None:
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            randomize([p])
        elif "ia3_l" in name:
            randomize([p], around=1.0)


def assert_same_logits(peft_model, peftlab_model, base) -> None:
    ours, theirs = logits(peftlab_model), logits(peft_model.eval())
    assert (ours - logits(base)).abs().max() > 1e-3, "the adapter does not change the model"
    assert (ours - theirs).abs().max() <= TOL


def export_and_load_in_peft(model, adapters, name, base, tmp_path):
    out = adapters.export_peft(name, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    return loaded, json.loads((out / "adapter_config.json").read_text())


def peft_saved(base, config, tmp_path):
    """A peft adapter with random weights, saved by peft itself; returns (peft model, its dir)."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_peft(model)
    model.save_pretrained(tmp_path / "from_peft")
    return model.eval(), tmp_path / "from_peft"


def import_into_copy(base, path, name="imported"):
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.import_peft(path, name=name)
    adapters.activate(name)
    return model, adapters


# ---- BERT sequence classification ---------------------------------------------------------------
def test_bert_lora_with_classifier_exports_to_peft(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("sst2", peftlab.LoRAConfig(r=4, alpha=6.5, dropout=0.1))
    adapters.activate("sst2")
    trainable = adapters.train("sst2", extras=("classifier",))
    randomize(trainable)
    model.eval()

    loaded, config = export_and_load_in_peft(model, adapters, "sst2", base, tmp_path)

    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 6.5, {})
    assert (config["lora_dropout"], config["use_dora"], config["init_lora_weights"]) == (0.1, False, True)
    assert config["modules_to_save"] == ["classifier"]
    assert "bert.encoder.layer.1.attention.self.value" in config["target_modules"]
    assert_same_logits(loaded, model, base)


def test_bert_lora_with_classifier_imports_from_peft(tmp_path):
    base = tiny_bert()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs, path = peft_saved(base, config, tmp_path)

    model, adapters = import_into_copy(base, path)

    assert adapters["imported"].extras == ("classifier",)
    assert adapters.config("imported").scaling == 4.0
    assert_same_logits(theirs, model, base)


def test_imported_adapter_saves_and_reloads_in_peftlab_format(tmp_path):
    base = tiny_bert()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    _, path = peft_saved(base, config, tmp_path)
    model, adapters = import_into_copy(base, path)
    adapters.save("imported", tmp_path / "own")

    again = copy.deepcopy(base)
    reloaded = peftlab.attach(again)
    name = reloaded.load(tmp_path / "own")
    reloaded.activate(name)

    assert torch.equal(logits(again), logits(model))
    assert reloaded[name].extras == ("classifier",)


def test_bert_ia3_exports_to_peft(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("ia3", peftlab.IA3Config())
    randomize(adapters.parameters("ia3"), around=1.0)
    adapters.activate("ia3")

    loaded, config = export_and_load_in_peft(model, adapters, "ia3", base, tmp_path)

    assert config["peft_type"] == "IA3" and config["init_ia3_weights"] is True
    # No head in the adapter: peft's SEQ_CLS class would demand classifier tensors, so no task type.
    assert config["task_type"] is None and config["modules_to_save"] is None
    assert config["feedforward_modules"] == ["bert.encoder.layer.0.output.dense",
                                             "bert.encoder.layer.1.output.dense"]
    assert_same_logits(loaded, model, base)


@pytest.mark.parametrize("feedforward", ["list", "shapes", "regex"])
def test_bert_ia3_default_of_peft_imports_as_the_file_says(tmp_path, feedforward):
    # peft's BERT default targets "output.dense", which also hits attention.output.dense.
    base = tiny_bert()
    theirs, path = peft_saved(base, peft.IA3Config(task_type="SEQ_CLS"), tmp_path)
    if feedforward == "shapes":  # no rule in the file: the tensor shapes, [1, in] or [out, 1], tell
        edit_config(path, feedforward_modules=None)
    elif feedforward == "regex":  # peft also takes one regex, matched against the whole name
        edit_config(path, feedforward_modules=r".*\.output\.dense")

    model, adapters = import_into_copy(base, path)

    sites = {s.module for s in adapters["imported"].sites}
    assert "bert.encoder.layer.0.attention.output.dense" in sites
    assert len(sites) == 8  # key, value, attention.output.dense, output.dense in 2 layers
    scaled_inputs = {m for m, p in adapters["imported"].pieces.items() if p.scale_input}
    assert scaled_inputs == {m for m in sites if m.endswith("output.dense")}
    assert_same_logits(theirs, model, base)


# ---- GPT-2: Conv1D and the fused c_attn --------------------------------------------------------
@pytest.mark.parametrize("targets", [("query", "value"), ("query", "value", "ffn_down")])
def test_gpt2_fused_lora_exports_as_one_lora_on_c_attn(tmp_path, targets):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("qv", peftlab.LoRAConfig(r=2, alpha=6, targets=targets))
    randomize(adapters.parameters("qv"))
    adapters.activate("qv")

    loaded, config = export_and_load_in_peft(model, adapters, "qv", base, tmp_path)

    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    # c_attn carries query and value: rank 2·2 with alpha 2·6 keeps the scale 6/2.
    assert peft_rank_alpha(config, "transformer.h.0.attn.c_attn") == (4, 12)
    if "ffn_down" in targets:
        assert peft_rank_alpha(config, "transformer.h.0.mlp.c_proj") == (2, 6)
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    lora_b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert lora_b.shape == (96, 4) and not lora_b[32:64].any()  # no update of the key features
    assert_same_logits(loaded, model, base)


def test_exported_fused_lora_imports_back_as_a_whole_module_lora(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("qv", peftlab.LoRAConfig(r=2, alpha=6, targets=("query", "value")))
    randomize(adapters.parameters("qv"))
    adapters.activate("qv")
    adapters.export_peft("qv", tmp_path / "peft")

    again, imported = import_into_copy(base, tmp_path / "peft")

    assert (imported.config("imported").r, imported.config("imported").scaling) == (4, 3.0)
    assert (logits(again) - logits(model)).abs().max() <= TOL


def peft_rank_alpha(config, module):
    """The rank and alpha peft gives ``module`` (our export writes escaped names as pattern keys)."""
    key = re.escape(module)
    rank = config["rank_pattern"].get(key, config["r"])
    return rank, config["alpha_pattern"].get(key, config["lora_alpha"])


def test_gpt2_lora_imports_from_peft(tmp_path):
    base = tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs, path = peft_saved(base, config, tmp_path)

    model, _ = import_into_copy(base, path)

    assert_same_logits(theirs, model, base)


def test_gpt2_fused_ia3_exports_a_full_vector(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("ia3", peftlab.IA3Config(targets=("key", "value", "ffn_down")))
    randomize(adapters.parameters("ia3"), around=1.0)
    adapters.activate("ia3")

    loaded, config = export_and_load_in_peft(model, adapters, "ia3", base, tmp_path)

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    c_attn = tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    c_proj = tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"]
    assert c_attn.shape == (96, 1) and torch.equal(c_attn[:32], torch.ones(32, 1))
    assert c_proj.shape == (1, 128)  # the FFN activation, the down projection's input
    assert config["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert_same_logits(loaded, model, base)


def test_gpt2_ia3_default_of_peft_imports(tmp_path):
    base = tiny_gpt2()
    theirs, path = peft_saved(base, peft.IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=True), tmp_path)

    model, adapters = import_into_copy(base, path)

    assert len(adapters["imported"].sites) == 4  # c_attn (whole) and mlp.c_proj in 2 blocks
    assert_same_logits(theirs, model, base)


# ---- LLaMA-style -------------------------------------------------------------------------------
LLAMA_ROLES = ("query", "key", "value", "attn_out", "ffn_gate", "ffn_up", "ffn_down")
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_lora_exports_to_peft(tmp_path, rslora):
    base = tiny_llama()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("all", peftlab.LoRAConfig(r=4, alpha=8, targets=LLAMA_ROLES, rslora=rslora))
    randomize(adapters.parameters("all"))
    adapters.activate("all")

    loaded, config = export_and_load_in_peft(model, adapters, "all", base, tmp_path)

    assert len(config["target_modules"]) == 14 and config["use_rslora"] is rslora
    assert config["lora_alpha"] == 8 and type(config["lora_alpha"]) is int  # written as 8, not 8.0
    assert_same_logits(loaded, model, base)


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_lora_imports_from_peft(tmp_path, rslora):
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_MODULES, use_rslora=rslora,
                             task_type="CAUSAL_LM")
    theirs, path = peft_saved(base, config, tmp_path)

    model, adapters = import_into_copy(base, path)

    assert len(adapters["imported"].sites) == 14
    assert_same_logits(theirs, model, base)


# ---- parameter counts --------------------------------------------------------------------------
def test_minilm_shaped_lora_has_the_same_parameter_count_as_peft():
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    model = BertModel(config)
    theirs = peft.get_peft_model(copy.deepcopy(model),
                                 peft.LoraConfig(r=8, target_modules=["query", "value"]))
    adapters = peftlab.attach(model)
    adapters.add("qv", peftlab.LoRAConfig(r=8, targets=("query", "value")))

    peft_count = sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    assert adapters.summary()["qv"].parameters == peft_count == 73_728


# ---- errors: the model is never touched -------------------------------------------------------
@pytest.fixture
def peft_lora_dir(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    _, path = peft_saved(tiny_bert(), config, tmp_path)
    return path


def edit_config(path, **changes):
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def assert_untouched(model, adapters, before):
    after = model.state_dict()
    assert adapters.names == ()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "BOFT"}, "peft_type 'BOFT' is not supported"),
    # a DoRA file (read by DoRA's codec) must hold the magnitudes
    ({"use_dora": True}, "missing ['base_model.model.bert.encoder.layer.0.attention.self.query."
                         "lora_magnitude_vector'"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"rank_pattern": {r"layer\.0\.attention\.self\.query": 2}}, "one rank"),
])
def test_unsupported_peft_configs_are_refused(peft_lora_dir, changes, message):
    edit_config(peft_lora_dir, **changes)
    model = tiny_bert()
    adapters = peftlab.attach(model)
    before = copy.deepcopy(model.state_dict())

    with pytest.raises(peftlab.AdapterLoadError, match=re.escape(message)):
        adapters.import_peft(peft_lora_dir, name="x")
    assert_untouched(model, adapters, before)


@pytest.mark.parametrize("rule, message", [
    ({"output.dense": 1}, ": feedforward_modules must be a list of names or a regex string$"),
    (["output.dense", 1], ": feedforward_modules must be a list of names or a regex string$"),
    ("(output", ": feedforward_modules: '\\(output' is not a valid regular expression"),
])
def test_bad_feedforward_modules_are_refused(tmp_path, rule, message):
    _, path = peft_saved(tiny_bert(), peft.IA3Config(task_type="SEQ_CLS"), tmp_path)
    edit_config(path, feedforward_modules=rule)
    adapters = peftlab.attach(tiny_bert())
    with pytest.raises(peftlab.AdapterLoadError, match=message):
        adapters.import_peft(path, name="x")
    assert adapters.names == ()


def test_pickle_only_adapter_is_refused(peft_lora_dir):
    (peft_lora_dir / "adapter_model.safetensors").unlink()
    (peft_lora_dir / "adapter_model.bin").write_bytes(b"never unpickled")
    adapters = peftlab.attach(tiny_bert())

    with pytest.raises(peftlab.AdapterLoadError, match="pickle"):
        adapters.import_peft(peft_lora_dir, name="x")


def test_shape_mismatch_leaves_the_model_unchanged(peft_lora_dir):
    file = peft_lora_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"
    tensors[key] = torch.zeros(5, 32)
    save_file(tensors, file)
    model = tiny_bert()
    adapters = peftlab.attach(model)
    before = copy.deepcopy(model.state_dict())

    with pytest.raises(peftlab.AdapterLoadError, match="shape"):
        adapters.import_peft(peft_lora_dir, name="x")
    assert_untouched(model, adapters, before)


def test_unexpected_tensor_is_refused(peft_lora_dir):
    file = peft_lora_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(tensors, file)
    adapters = peftlab.attach(tiny_bert())

    with pytest.raises(peftlab.AdapterLoadError, match="unexpected tensor"):
        adapters.import_peft(peft_lora_dir, name="x")


# ---- peft's naming rules, on small models with chosen module names ------------------------------
class Named(torch.nn.Module):
    """A Linear(4, 4) under each dotted name."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        for name in names:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, torch.nn.Linear(4, 4))


def exported(model, config, tmp_path, extras=()):
    adapters = peftlab.attach(model)
    adapters.add("a", config)
    adapters.activate("a")
    adapters.train("a", extras=extras)
    out = adapters.export_peft("a", tmp_path / "peft")
    return json.loads((out / "adapter_config.json").read_text())


def test_target_lists_become_a_regex_only_where_peft_would_match_other_modules(tmp_path):
    """peft matches a target_modules entry as a dotted name suffix, a feedforward_modules entry
    as a plain suffix: the list form is kept while it hits exactly the adapted modules."""
    ia3 = peftlab.IA3Config(targets=("^proj$",), scale_input=("^proj$",))
    config = exported(Named("proj", "xproj"), ia3, tmp_path / "1")
    assert config["target_modules"] == ["proj"]  # "xproj" does not end in ".proj"
    assert config["feedforward_modules"] == "proj"  # but it ends in "proj"
    config = exported(Named("proj", "xproj"), peftlab.LoRAConfig(targets=("^proj$",)), tmp_path / "2")
    assert config["target_modules"] == ["proj"]
    lora = peftlab.LoRAConfig(targets=("^proj$", "^other$"))
    config = exported(Named("proj", "block.proj", "other"), lora, tmp_path / "3")
    assert config["target_modules"] == "proj|other"  # "block.proj" ends in ".proj"


def test_extras_must_mean_the_same_to_peft(tmp_path):
    lora = peftlab.LoRAConfig(targets=("^proj$",))
    config = exported(Named("proj", "block.head"), lora, tmp_path / "1", extras="head")
    assert config["modules_to_save"] == ["block.head"]
    with pytest.raises(peftlab.ConfigError, match=re.escape(
            "peft would also treat ['xhead'] as extra modules (it matches modules_to_save ['head'] "
            "as name suffixes)")):
        exported(Named("proj", "head", "xhead"), lora, tmp_path / "2", extras="head")
    with pytest.raises(peftlab.ConfigError, match=re.escape(
            "extra module 'block' holds adapted layers; peft cannot save a module both in "
            "modules_to_save and as an adapter target")):
        exported(Named("block.proj"), peftlab.LoRAConfig(targets=("proj$",)), tmp_path / "3", extras="block")


def test_export_records_the_task_and_base_model(tmp_path):
    from conftest import CONFIGS

    t5 = T5ForConditionalGeneration(CONFIGS["t5"]())
    t5.config._name_or_path = "tiny/t5"
    config = exported(t5, peftlab.LoRAConfig(), tmp_path / "1")
    assert (config["task_type"], config["base_model_name_or_path"]) == ("SEQ_2_SEQ_LM", "tiny/t5")
    assert config["inference_mode"] is True
    config = exported(T5Model(CONFIGS["t5"]()), peftlab.LoRAConfig(), tmp_path / "2")
    assert (config["task_type"], config["base_model_name_or_path"]) == (None, None)
    adapters = peftlab.attach(tiny_bert())
    adapters.add("b", peftlab.BottleneckConfig.pfeiffer(reduction=8))
    with pytest.raises(peftlab.ConfigError, match=re.escape(
            "peft's format has no bottleneck adapters ('b')")):
        adapters.export_peft("b", tmp_path / "3")


# ---- every setting crosses the format, both ways ----------------------------------------------------
def _settings(config) -> dict:
    """A config's fields but its targets (which come back as the module names they matched)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "targets"}


AWAY_FROM_DEFAULTS = [
    peftlab.LoRAConfig(r=4, alpha=7.0, dropout=0.1, rslora=True),
    peftlab.DoRAConfig(r=4, alpha=7.0, dropout=0.1, rslora=True),
    peftlab.VeRAConfig(r=16, dropout=0.1, d_initial=0.3, projection_seed=7, save_projection=False),
    peftlab.LoHaConfig(r=4, alpha=6.0, rank_dropout=0.1, module_dropout=0.2),
    peftlab.LoKrConfig(r=4, alpha=6.0, rank_dropout=0.1, module_dropout=0.2, decompose_both=True,
                       decompose_factor=4, rank_dropout_scale=True),
    peftlab.PromptTuningConfig(num_virtual_tokens=5),
    peftlab.PrefixTuningConfig(num_virtual_tokens=5),
]


@pytest.mark.parametrize("config", AWAY_FROM_DEFAULTS, ids=lambda c: c.method)
def test_every_setting_survives_export_and_import(config, tmp_path):
    """Each setting away from peft's default: one written under another key, or read with another
    default, would come back different."""
    adapters = peftlab.attach(tiny_bert())
    adapters.add("x", config)
    adapters.export_peft("x", tmp_path / "peft")
    again = peftlab.attach(tiny_bert())
    again.import_peft(tmp_path / "peft", "x")
    assert _settings(again["x"].config) == _settings(config)


PEFT_DEFAULTS = {
    "lora": lambda: peft.LoraConfig(target_modules=["query", "value"]),
    "dora": lambda: peft.LoraConfig(target_modules=["query", "value"], use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                  feedforward_modules=["output.dense"]),
    "vera": lambda: peft.VeraConfig(target_modules=["query", "value"]),
    "loha": lambda: peft.LoHaConfig(target_modules=["query", "value"]),
    "lokr": lambda: peft.LoKrConfig(target_modules=["query", "value"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
}


@pytest.mark.parametrize("kind", sorted(PEFT_DEFAULTS))
def test_a_peft_file_without_its_default_fields_imports_as_the_whole_file(kind, tmp_path):
    """peft fills a missing field with its default; so must the import."""
    config = PEFT_DEFAULTS[kind]()
    theirs = peft.get_peft_model(tiny_bert(), config)
    theirs.save_pretrained(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "trimmed")
    data = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in dataclasses.fields(config)
                 if f.default_factory is not dataclasses.MISSING}
    kept = {"peft_type", "target_modules", "task_type"}
    trimmed = {k: v for k, v in data.items() if k in kept or k not in defaults or v != defaults[k]}
    assert len(trimmed) < len(data)
    (tmp_path / "trimmed" / "adapter_config.json").write_text(json.dumps(trimmed))
    whole, cut = peftlab.attach(tiny_bert()), peftlab.attach(tiny_bert())
    whole.import_peft(tmp_path / "whole", "x")
    cut.import_peft(tmp_path / "trimmed", "x")
    assert cut["x"].config == whole["x"].config


@pytest.mark.parametrize("kind", sorted(PEFT_DEFAULTS))
def test_an_imported_peft_file_exports_with_the_keys_and_values_peft_wrote(kind, tmp_path):
    """Every field the export writes is one peft wrote for this adapter, with peft's value."""
    peft.get_peft_model(tiny_bert(), PEFT_DEFAULTS[kind]()).save_pretrained(tmp_path / "theirs")
    adapters = peftlab.attach(tiny_bert())
    adapters.import_peft(tmp_path / "theirs", "x")
    adapters.export_peft("x", tmp_path / "ours")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                    for d in ("ours", "theirs"))
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    # module lists are written as the modules matched (peft's own lists are patterns or repeat names)
    lists = {"target_modules", "feedforward_modules", "modules_to_save", "base_model_name_or_path"}
    compared = set(ours) - lists
    assert {k: ours[k] for k in compared} == {k: theirs[k] for k in compared}
