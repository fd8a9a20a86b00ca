"""VeRA (arXiv 2310.11454): the formula, init, files, merging, and parity with the real ``peft``.

A fresh VeRA adapter has ``b = 0`` (the model is unchanged), so every comparison first moves ``b``
and ``d`` to random values and checks that the adapter really changes the output.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from conftest import output_of, tiny_inputs, tiny_model
from safetensors.torch import load_file, save_file
from test_cli import _save_bert, _sentiment
from test_interop_peft import logits, tiny_bert, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.methods.vera import VeRAConfig, projections

peft = pytest.importorskip("peft")

TOL = 1e-5
FFN = (r"intermediate\.dense$", r"layer\.\d+\.output\.dense$")  # 32 -> 64 and 64 -> 32 on tiny BERT


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # peft's save_projection=False and fan_in_fan_out notices
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


def randomize(params, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def vera(model, config: VeRAConfig, name: str = "v", extras: tuple[str, ...] = ()):
    """``model`` with an active VeRA adapter whose trainable vectors (and ``also``) are random."""
    adapters = peftlab.attach(model)
    adapters.add(name, config)
    adapters.activate(name)
    randomize(adapters.train(name, extras=extras))
    model.eval()
    return adapters


def randomize_peft(model) -> None:
    randomize([p for n, p in model.named_parameters() if "vera_lambda" in n or "modules_to_save" in n])


def peft_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the math ---------------------------------------------------------------------------------
def test_a_new_adapter_leaves_the_model_unchanged(bert):
    inputs = tiny_inputs("bert")
    before = output_of(bert, inputs)
    adapters = peftlab.attach(bert)
    adapters.add("v", VeRAConfig(r=16, targets=("query", "value", *FFN)))
    adapters.activate("v")
    assert torch.equal(output_of(bert, inputs), before)  # b = 0 exactly
    piece = adapters["v"].pieces["encoder.layer.0.attention.self.query"]
    assert torch.equal(piece.vera_lambda_d, torch.full((16,), 0.1))


def test_each_layer_computes_the_papers_formula_on_its_slice_of_the_shared_projections(bert):
    adapters = vera(bert, VeRAConfig(r=16, targets=("value", *FFN)))
    shared = adapters["v"].shared
    assert shared.vera_A.shape == (16, 64) and shared.vera_B.shape == (64, 16)  # the largest in, out
    x = torch.randn(2, 5, 64)
    for module, piece in adapters["v"].pieces.items():
        layer = bert.get_submodule(module)
        out_f, in_f = layer.base.weight.shape
        xs = x[..., :in_f]
        A, B = shared.vera_A[:, :in_f], shared.vera_B[:out_f]
        b, d = piece.vera_lambda_b, piece.vera_lambda_d
        expected = layer.base(xs) + xs @ A.T @ torch.diag(d) @ B.T @ torch.diag(b)
        torch.testing.assert_close(layer(xs), expected, atol=1e-6, rtol=1e-5)
        assert b.abs().sum() > 0
    # one A and B for the whole adapter, the very same tensors in every piece
    assert len({id(p.shared.vera_A) for p in adapters["v"].pieces.values()}) == 1


def test_only_the_vectors_train_and_the_projections_stay(bert):
    adapters = peftlab.attach(bert)
    adapters.add("v", VeRAConfig(r=8, targets=("query", "value")))
    adapters.activate("v")
    trainable = adapters.train("v")
    assert {tuple(p.shape) for p in trainable} == {(8,), (32,)}
    assert adapters.summary()["v"].parameters == 4 * (8 + 32)  # r + out per layer, projections frozen
    a_before = adapters["v"].shared.vera_A.clone()
    bert.train()
    output_of(bert, tiny_inputs("bert")).square().mean().backward()
    assert all(p.grad is not None for p in trainable)
    assert not adapters["v"].shared.vera_A.requires_grad
    assert torch.equal(adapters["v"].shared.vera_A, a_before)


def test_the_projections_are_peft_s_for_the_seed_and_differ_between_seeds():
    a, b = projections(16, 64, 48, seed=5)
    model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=16, target_modules=["gate_proj", "down_proj"],
                                                              projection_prng_key=5))
    assert torch.equal(model.base_model.vera_A["default"], projections(16, 64, 64, 5)[0])
    assert torch.equal(model.base_model.vera_B["default"], projections(16, 64, 64, 5)[1])
    assert not torch.equal(a, projections(16, 64, 48, seed=6)[0])
    assert torch.equal(a, projections(16, 64, 48, seed=5)[0]) and b.shape == (48, 16)


def test_dropout_acts_in_training_only(bert):
    vera(bert, VeRAConfig(r=8, dropout=0.5))
    inputs = tiny_inputs("bert")
    assert torch.equal(output_of(bert, inputs), output_of(bert, inputs))
    bert.train()
    for m in bert.modules():  # the model's own dropout off: only the adapter's is left
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    assert not torch.equal(output_of(bert, inputs), output_of(bert, inputs))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_forward_equals_peft_also_with_dropout(p, tmp_path):
    """The same dropout mask as peft's for the same seed: one draw per layer, on the input."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    adapters = vera(model, VeRAConfig(r=8, dropout=p))
    out = adapters.export_peft("v", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out, is_trainable=True)
    model.train(), theirs.train()  # the tiny LLaMA has no other dropout: the masks are the adapters'
    torch.manual_seed(11)
    ours = logits(model)
    torch.manual_seed(11)
    assert (ours - logits(theirs)).abs().max() <= TOL
    torch.manual_seed(12)
    assert ((ours - logits(model)).abs().max() > 1e-4) == (p > 0)  # dropout did act


def test_a_fused_projection_adapter_goes_to_peft_and_back(tmp_path):
    model = tiny_gpt2()
    adapters = vera(model, VeRAConfig(r=8, targets=("value",)))
    assert not any(k.endswith(".index") for k in model.state_dict())  # the feature index is not state
    adapters.export_peft("v", tmp_path / "peft")
    other = tiny_gpt2()
    again = peftlab.attach(other)
    again.import_peft(tmp_path / "peft", "v")
    again.activate("v")
    assert (logits(other) - logits(model)).abs().max() <= TOL


def test_routing_gives_each_example_its_adapter(bert):
    adapters = vera(bert, VeRAConfig(r=8, targets=("query", "value", *FFN)), name="a")
    adapters.add("b", VeRAConfig(r=4, projection_seed=1))
    randomize(adapters.parameters("b"), seed=9)
    inputs = tiny_inputs("bert", batch=3)
    alone = {}
    for name in ("a", "b", None):
        adapters.activate(*([name] if name else []))
        alone[name] = output_of(bert, inputs)
    with adapters.route(["b", None, "a"]):
        routed = output_of(bert, inputs)
    for i, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(routed[i], alone[name][i], atol=1e-6, rtol=1e-5)


# ---- merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_merge_and_unmerge_are_exact_up_to_rounding(family):
    model = tiny_model(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ("query", "value") if family == "gpt2" else ("query", "value", *FFN)  # gpt2: fused c_attn
    adapters = vera(model, VeRAConfig(r=16, targets=targets))
    inputs = tiny_inputs(family)
    unmerged = output_of(model, inputs)
    assert (unmerged - output_of(tiny_model(family), inputs)).abs().max() > 1e-3
    adapters.merge("v")
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    adapters.unmerge("v")
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=1e-6, rtol=1e-6)
    adapters.activate()
    peftlab.detach(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_on_a_fused_projection_only_the_targeted_features_change():
    model = tiny_model("gpt2")
    adapters = vera(model, VeRAConfig(r=8, targets=("value",)))
    piece = adapters["v"].pieces["h.0.attn.c_attn"]
    assert piece.vera_lambda_b.shape == (32,)  # r + the 32 value features, not all 96
    delta = piece.delta_weight()
    assert delta[:64].abs().max() == 0 and delta[64:].abs().max() > 0


# ---- peftlab's files ----------------------------------------------------------------------------
def test_save_and_load_reproduce_the_adapter_with_projections_stored_once(bert, tmp_path):
    adapters = vera(bert, VeRAConfig(r=16, targets=("query", "value", *FFN)))
    inputs = tiny_inputs("bert")
    expected = output_of(bert, inputs)
    adapters.save("v", tmp_path / "v")
    stored = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert sorted(k for k in stored if "vera_A" in k or "vera_B" in k) == ["shared.vera_A", "shared.vera_B"]
    fresh = tiny_model("bert")
    again = peftlab.attach(fresh)
    again.activate(again.load(tmp_path / "v"))
    assert torch.equal(output_of(fresh, inputs), expected)


def test_without_projections_the_file_is_small_and_loads_by_regenerating_them(bert, tmp_path):
    config = VeRAConfig(r=64, targets=("query", "value", *FFN), save_projection=False)
    adapters = vera(bert, config)
    inputs = tiny_inputs("bert")
    expected = output_of(bert, inputs)
    adapters.save("v", tmp_path / "small")
    stored = load_file(tmp_path / "small" / "adapter_model.safetensors")
    # b per layer (query, value, FFN up and down), d per layer, and the check: no 64x64 A or B
    assert sum(t.numel() for t in stored.values()) == 2 * (32 + 32 + 64 + 32 + 4 * 64) + 8
    fresh = tiny_model("bert")
    again = peftlab.attach(fresh)
    again.activate(again.load(tmp_path / "small"))
    assert torch.equal(output_of(fresh, inputs), expected)


def _off(check: torch.Tensor, at: int) -> torch.Tensor:
    check = check.clone()
    check[at] *= 1.03  # 3% off: beyond the rounding of a half-precision file
    return check


@pytest.mark.parametrize("damage", [
    lambda check: -check,  # as from another generator
    lambda check: _off(check, 0),  # the first and last checked values are checked too
    lambda check: _off(check, -1),
], ids=["negated", "first-off", "last-off"])
def test_a_file_whose_projections_this_torch_would_not_regenerate_is_refused(bert, tmp_path, damage):
    adapters = vera(bert, VeRAConfig(r=8, save_projection=False))
    adapters.save("v", tmp_path / "v")
    file = tmp_path / "v" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["shared.vera_check"] = damage(tensors["shared.vera_check"])
    save_file(tensors, file)
    fresh = peftlab.attach(tiny_model("bert"))
    with pytest.raises(peftlab.AdapterLoadError) as refused:
        fresh.load(tmp_path / "v")
    assert str(refused.value).endswith(
        "this VeRA adapter was saved without its projections (save_projection=False), and this torch "
        "build regenerates other random projections from its seed than the one it was trained with, "
        "so it would compute something else; load it where it was trained and save it with "
        "save_projection=True")
    assert fresh.names == ()


def test_check_values_rounded_to_half_precision_still_load(bert, tmp_path):
    adapters = vera(bert, VeRAConfig(r=8, save_projection=False))
    adapters.save("v", tmp_path / "v")
    file = tmp_path / "v" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["shared.vera_check"] = tensors["shared.vera_check"].bfloat16()
    save_file(tensors, file)
    fresh = peftlab.attach(tiny_model("bert"))
    assert fresh.load(tmp_path / "v") == "v"


def test_experts_are_refused():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.MixtralConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, vocab_size=100))
    with pytest.raises(peftlab.TargetError, match="routed experts"):
        peftlab.attach(model).add("v", VeRAConfig(r=8, targets=("ffn_down",)))


def test_bad_configs_are_refused_at_their_bounds():
    for bad, message in (({"r": 0}, "r must be between 1 and 65536, got 0"),
                         ({"r": 65537}, "r must be between 1 and 65536, got 65537"),
                         ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
                         ({"projection_seed": -1}, "projection_seed must be >= 0, got -1")):
        with pytest.raises(peftlab.ConfigError) as refused:
            VeRAConfig(**bad)
        assert str(refused.value) == message
    for good in ({"r": 1}, {"r": 65536}, {"dropout": 0.0}, {"projection_seed": 0}):
        VeRAConfig(**good)


# ---- peft, both ways ----------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "targets", "peft_targets"), [
    (tiny_bert, ("query", "value"), ["query", "value"]),
    (tiny_bert, ("query", "value", *FFN),
     r".*\.(query|value|intermediate\.dense|layer\.\d+\.output\.dense)$"),
    (tiny_llama, ("query", "key", "value", "ffn_up", "ffn_down"),
     ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
])
def test_parameter_counts_and_projections_equal_peft_s(make, targets, peft_targets):
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=32, target_modules=peft_targets))
    theirs_vectors = sum(p.numel() for n, p in theirs.named_parameters() if "vera_lambda" in n)
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("v", VeRAConfig(r=32, targets=targets))
    assert adapters.summary()["v"].parameters == theirs_vectors
    assert torch.equal(adapters["v"].shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(adapters["v"].shared.vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("save_projection", [True, False])
def test_export_loads_in_peft_with_the_same_logits(tmp_path, save_projection):
    base = tiny_bert()
    model = copy.deepcopy(base)
    config = VeRAConfig(r=16, targets=("query", "value", *FFN), save_projection=save_projection)
    adapters = vera(model, config, extras=("classifier",))
    out = adapters.export_peft("v", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["save_projection"]) == ("VERA", 16, save_projection)
    keys = load_file(out / "adapter_model.safetensors")
    assert ("base_model.vera_A" in keys) == save_projection
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    assert (logits(theirs) - logits(model)).abs().max() <= TOL


def test_export_of_a_fused_projection_loads_in_peft_with_the_same_logits(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapters = vera(model, VeRAConfig(r=8, targets=("query", "value")))
    out = adapters.export_peft("v", tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    tensors = load_file(out / "adapter_model.safetensors")
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b"]
    assert b.shape == (96,) and b[32:64].abs().max() == 0  # the key features stay as they are
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    assert (logits(theirs) - logits(model)).abs().max() <= TOL


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_peft_saved_vera_imports_with_the_same_logits(tmp_path, make, save_projection):
    base = make()
    bert = make is tiny_bert
    targets = ["query", "value", "intermediate.dense"] if bert else ["q_proj", "k_proj", "down_proj"]
    task = "SEQ_CLS" if bert else "CAUSAL_LM"
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
        r=16, target_modules=targets, projection_prng_key=7, save_projection=save_projection,
        d_initial=0.05, task_type=task))
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.activate(adapters.import_peft(tmp_path / "peft", name="v"))
    config = adapters.config("v")
    assert (config.r, config.projection_seed, config.d_initial) == (16, 7, 0.05)
    assert config.save_projection is save_projection
    assert adapters.summary()["v"].parameters == sum(
        p.numel() for n, p in theirs.named_parameters() if "vera_lambda" in n)
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    assert (logits(theirs.eval()) - logits(model)).abs().max() <= TOL


def test_peft_files_that_do_not_fit_are_refused(tmp_path):
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=["query", "value"]))
    theirs.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    config_file = tmp_path / "peft" / "adapter_config.json"
    tensors, config = load_file(file), json.loads(config_file.read_text())

    def refused(match: str) -> None:
        attached = peftlab.attach(copy.deepcopy(base))
        with pytest.raises(peftlab.AdapterLoadError, match=match):
            attached.import_peft(tmp_path / "peft", name="v")
        assert attached.names == ()

    save_file({**tensors, "base_model.vera_A": tensors["base_model.vera_A"][:, :16].contiguous()}, file)
    refused("vera_A.*shape")
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, file)
    refused("missing.*vera_B")
    save_file(tensors, file)
    config_file.write_text(json.dumps({**config, "save_projection": False}))
    refused("save_projection=false")
    config_file.write_text(json.dumps({**config, "bias": "vera_only"}))
    refused("bias")
    config_file.write_text(json.dumps(config))
    save_file({**tensors, "base_model.vera_C": tensors["base_model.vera_A"].clone()}, file)
    refused("does not start with")


# ---- the command line ---------------------------------------------------------------------------
def test_the_command_line_trains_a_vera_adapter(tmp_path):
    runner = CliRunner()
    model, data = _save_bert(tmp_path / "bert"), _sentiment(tmp_path / "data")
    result = runner.invoke(app, ["train", "--model", str(model), "--data", str(data), "--method", "vera",
                                 "--set", "r=16", "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--batch-size", "8", "--max-length", "16", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "vera" and saved["config"]["r"] == 16
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert tensors["shared.vera_A"].shape == (16, 32)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("vera_lambda_b"))  # it trained
    listed = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    row = next(r for r in listed if r["name"] == "vera")
    assert row["mergeable"] and row["peft"] == "VERA" and row["lr"] == 4e-3
    assert peftlab.VeRAConfig is VeRAConfig
