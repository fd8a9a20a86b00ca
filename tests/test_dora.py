"""DoRA: ``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` (row norms), checked against the formula written
out, a plain-autograd reference, and the real ``peft`` package (``use_dora=True``).

Adapters are moved away from their init first (B = 0 and m = ‖W‖ would make most checks hold for
any wrong formula), and each comparison first checks that the adapter changes the output."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers as T
from conftest import tiny_inputs, tiny_model
from test_cli import _ok, _save_bert, _sentiment
from test_interop_peft import IDS, logits, tiny_bert, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.layer import AdaptedLayer
from peftlab.methods.dora import DoRA, row_norms

peft = pytest.importorskip("peft")

TOL = 1e-5


def moved(adapters: peftlab.AdapterSet, name: str, scale: float = 0.2, seed: int = 3) -> None:
    """Add noise to the adapter's tensors; m stays near ‖W‖ (it is a magnitude, not near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() if p.ndim == 1 else 1))


def dora_model(base: torch.nn.Module, config: peftlab.DoRAConfig | None = None, name: str = "d"):
    """A copy of ``base`` with DoRA ``name`` active and moved. The base is frozen, as in training
    (``train`` freezes it), so that DoRA runs as its fused node where it is alone on a layer."""
    model = copy.deepcopy(base).requires_grad_(False)
    adapters = peftlab.attach(model)
    adapters.add(name, config or peftlab.DoRAConfig())
    adapters.activate(name)
    moved(adapters, name)
    return model, adapters


def dora_layers(model: torch.nn.Module, name: str = "d") -> dict[str, tuple[AdaptedLayer, DoRA]]:
    return {n: (m, m.adapters[name]) for n, m in model.named_modules()
            if isinstance(m, AdaptedLayer) and name in m.adapters}


def literal_weight(layer: AdaptedLayer, piece: DoRA) -> torch.Tensor:
    """The paper's W' for ``[out, in]``, with torch.linalg.norm over the materialised W + s·B·A."""
    w = layer.base.weight.detach()
    w = w.t() if isinstance(layer.base, T.pytorch_utils.Conv1D) else w
    v = w + piece.scaling * piece.full_B() @ piece.lora_A
    m = torch.linalg.norm(w, dim=1).clone()  # untargeted rows of a fused projection keep ‖W‖
    m[piece.index if piece.sliced else slice(None)] = piece.magnitude
    return (m / torch.linalg.norm(v, dim=1))[:, None] * v


def with_literal_weights(base: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` whose adapted weights are replaced by their literal W'."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, (layer, piece) in dora_layers(model).items():
            target = out.get_submodule(name)
            w = literal_weight(layer, piece)
            target.weight.copy_(w.t() if isinstance(target, T.pytorch_utils.Conv1D) else w)
    return out


# ---- the math -----------------------------------------------------------------------------------
# 12 tokens scale the output by c, 40 tokens (at least the 32 input features) scale W's rows
@pytest.mark.parametrize("length", [6, 20])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_output_is_the_model_with_the_literal_decomposed_weight(family, length):
    base = tiny_model(family)
    model, _ = dora_model(base)
    inputs = tiny_inputs(family, length=length)
    with torch.no_grad():
        ours, plain = model(**inputs)[0], base(**inputs)[0]
        literal = with_literal_weights(base, model)(**inputs)[0]
    assert (ours - plain).abs().max() > 1e-2
    assert (ours - literal).abs().max() < TOL


def test_a_new_adapter_leaves_the_model_unchanged(bert):
    model = copy.deepcopy(bert)
    adapters = peftlab.attach(model)
    adapters.add("d", peftlab.DoRAConfig(r=4, targets=("query", "value", "ffn_down")))
    adapters.activate("d")
    for _, piece in dora_layers(model).values():
        assert torch.equal(piece.factor(), torch.ones_like(piece.factor()))  # m = ‖W‖ exactly
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert (model(**inputs)[0] - bert(**inputs)[0]).abs().max() < 1e-6


def test_row_norms_equal_the_norms_of_the_materialised_weight():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in [(48, 40), (6, 40), (48, 6)])
    expected = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    assert torch.allclose(row_norms(w, a, b, 0.7).double(), expected, rtol=1e-6)
    assert torch.allclose(row_norms(w, a, torch.zeros_like(b), 0.7), torch.linalg.norm(w, dim=1))


def _one_layer(bias: bool = True, trainable_base: bool = False, **config):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(24, 20, bias=bias))
    model.requires_grad_(trainable_base)
    adapters = peftlab.attach(model, role_map=None)
    adapters.add("d", peftlab.DoRAConfig(r=3, alpha=5, targets=("^proj$",), **config))
    adapters.activate("d")
    moved(adapters, "d", scale=0.5)
    layer, piece = dora_layers(model)["proj"]
    return model, layer, piece


def _reference(layer: AdaptedLayer, piece: DoRA, x: torch.Tensor) -> torch.Tensor:
    """The formula in plain autograd, the norm detached (paper §4.3)."""
    w = layer.base.weight
    v = w + piece.scaling * piece.lora_B @ piece.lora_A
    norm = torch.linalg.norm(v, dim=1).detach()
    return torch.nn.functional.linear(x, piece.magnitude[:, None] * v / norm[:, None], layer.base.bias)


def _grads(model, tensors, x, run) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    out = run(x)
    (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("tokens", [5, 16])  # fewer than the 24 inputs: c scales h; more: W's rows
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_of_the_fused_node_equal_plain_autograd_with_the_norm_detached(bias, tokens):
    model, layer, piece = _one_layer(bias=bias)
    x = torch.randn(2, tokens, 24, dtype=torch.float32).requires_grad_()
    tensors = [x, piece.lora_A, piece.lora_B, piece.magnitude]
    fused = _grads(model, tensors, x, model)
    assert layer._fast_path()  # the custom autograd node ran
    reference = _grads(model, tensors, x, lambda x: _reference(layer, piece, x))
    for ours, ref in zip(fused, reference, strict=True):
        assert ref.abs().max() > 0
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    # The plain-autograd path (dropout, other adapters, autocast) computes the same.
    plain = _grads(model, tensors, x, lambda x: piece.add_delta(layer.base(x), x))
    for ours, ref in zip(plain, reference, strict=True):
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_a_model_that_scales_the_output_in_place_still_gets_exact_gradients():
    """Longformer divides its query by √d in place; the node then recomputes what it needs."""
    model, layer, piece = _one_layer()
    x = torch.randn(5, 6, 24)  # batch × sequence, as in a model
    tensors = [piece.lora_A, piece.lora_B, piece.magnitude]
    ours = _grads(model, tensors, x, lambda x: model(x).div_(3.0))
    reference = _grads(model, tensors, x, lambda x: _reference(layer, piece, x) / 3.0)
    for o, r in zip(ours, reference, strict=True):
        assert torch.allclose(o, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens", [5, 30])
def test_a_trainable_bias_beside_a_frozen_weight_gets_its_gradient(tokens):
    model, layer, piece = _one_layer()
    layer.base.bias.requires_grad_(True)
    x = torch.randn(tokens, 24)
    tensors = [layer.base.bias, piece.magnitude]
    ours = _grads(model, tensors, x, model)
    reference = _grads(model, tensors, x, lambda x: _reference(layer, piece, x))
    for o, r in zip(ours, reference, strict=True):
        assert torch.allclose(o, r, atol=1e-5, rtol=1e-4)


def test_a_trainable_base_weight_gets_its_gradient_through_the_rescaling():
    model, layer, piece = _one_layer(trainable_base=True)
    x = torch.randn(3, 24)
    ours = _grads(model, [layer.base.weight], x, model)[0]
    ref = _grads(model, [layer.base.weight], x, lambda x: _reference(layer, piece, x))[0]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("trainable_base", [False, True])  # the fused node, and the plain path
def test_eval_mode_runs_no_dropout_and_autocast_keeps_the_layer_dtype(trainable_base):
    model, layer, piece = _one_layer(trainable_base=trainable_base, dropout=0.5)
    model.eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(layer, piece, x), atol=1e-5, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == layer.base(x).dtype == torch.bfloat16


def test_delta_weight_is_what_a_merge_adds():
    model, layer, piece = _one_layer()
    before = layer.base.weight.detach().clone()
    delta = piece.delta_weight().detach()
    with torch.no_grad():
        piece.merge_into(layer.base.weight, layer.base.bias, +1)
    torch.testing.assert_close(layer.base.weight - before, delta, atol=1e-6, rtol=0)


# ---- parameter counts and peft's format -----------------------------------------------------------
@pytest.mark.parametrize(("make", "targets", "peft_targets"), [
    (tiny_bert, ("query", "value"), ["query", "value"]),
    (tiny_llama, ("query", "value"), ["q_proj", "v_proj"]),
    (tiny_llama, ("query", "key", "value", "attn_out", "ffn_gate", "ffn_up", "ffn_down"), "all-linear"),
])
def test_parameter_counts_equal_peft_for_the_same_config(make, targets, peft_targets):
    base = make()
    adapters = peftlab.attach(copy.deepcopy(base))
    adapters.add("d", peftlab.DoRAConfig(r=4, alpha=8, targets=targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=peft_targets))
    ours = adapters.summary()["d"].parameters
    assert ours == theirs.get_nb_trainable_parameters()[0] - sum(  # peft's task heads, not DoRA
        p.numel() for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n)
    lora = peftlab.attach(copy.deepcopy(base))
    lora.add("l", peftlab.LoRAConfig(r=4, targets=targets))
    assert ours - lora.summary()["l"].parameters == sum(
        s.out_features for s in adapters["d"].sites)  # LoRA's plus one magnitude per output


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2])
def test_export_loads_in_peft_with_equal_logits(make, tmp_path):
    base = make()
    model, adapters = dora_model(base, peftlab.DoRAConfig(r=4, alpha=6.0))
    model.eval()
    out = adapters.export_peft("d", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    ours = logits(model)
    assert (ours - logits(base)).abs().max() > 1e-3
    assert (ours - logits(loaded)).abs().max() <= TOL


def _peft_dora(base, tmp_path, **config):
    """A DoRA trained-looking by peft (A, B random, m moved off ‖W‖), saved by peft."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "from_peft")
    return model.eval(), tmp_path / "from_peft"


@pytest.mark.parametrize(("make", "config"), [
    (tiny_llama, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny_gpt2, dict(r=2, target_modules=["c_attn"], use_rslora=True)),
])
def test_peft_saved_dora_imports_with_equal_logits(make, config, tmp_path):
    base = make()
    theirs, path = _peft_dora(base, tmp_path, **config)
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.import_peft(path, name="imported")
    adapters.activate("imported")
    assert adapters.config("imported").method == "dora"
    ours = logits(model)
    assert (ours - logits(base)).abs().max() > 1e-3
    assert (ours - logits(theirs)).abs().max() <= TOL


def test_export_then_import_gives_back_the_adapter_and_plain_lora_files_stay_lora(tmp_path):
    base = tiny_llama()
    model, adapters = dora_model(base)
    adapters.import_peft(adapters.export_peft("d", tmp_path / "out"), name="again")
    # the same adapter, at the same modules (named in full: peft's file lists module names)
    assert adapters.config("again") == adapters.config("d").replace(targets=adapters.config("again").targets)
    assert [s.module for s in adapters["again"].sites] == [s.module for s in adapters["d"].sites]
    again = dora_layers(model, "again")
    for module, (_, piece) in dora_layers(model).items():
        assert torch.equal(piece.magnitude, again[module][1].magnitude)
    lora_dir = tmp_path / "lora"
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2)).save_pretrained(lora_dir)
    adapters.import_peft(lora_dir, name="plain")
    assert adapters.config("plain").method == "lora"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_forward_equals_peft_also_with_dropout(p, tmp_path):
    """peft rescales W·dropout(x) when dropout is on (not the layer's W·x); so do we."""
    base = tiny_llama()
    model, adapters = dora_model(base, peftlab.DoRAConfig(r=4, dropout=p))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapters.export_peft("d", tmp_path / "x"),
                                            is_trainable=True)
    model.train(), theirs.train()  # the tiny LLaMA has no other dropout: the masks are the adapters'
    torch.manual_seed(5)
    ours = model(input_ids=IDS).logits
    torch.manual_seed(5)
    assert (ours - theirs(input_ids=IDS).logits).abs().max() <= TOL
    torch.manual_seed(6)
    assert ((ours - model(input_ids=IDS).logits).abs().max() > 1e-3) == (p > 0)  # dropout did act


# ---- merging ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_merge_computes_the_same_and_unmerge_restores_the_weights(family):
    base = tiny_model(family)
    model, adapters = dora_model(base, peftlab.DoRAConfig(targets=("query", "value", "ffn_up")))
    inputs = tiny_inputs(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(**inputs)[0]
        adapters.merge("d")
        assert (model(**inputs)[0] - unmerged).abs().max() < TOL
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(".base." in n for n in changed)
        adapters.unmerge("d")
        assert (model(**inputs)[0] - unmerged).abs().max() < TOL
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6, rtol=0), n


def test_the_state_dict_holds_parameters_only_also_while_merged():
    """The feature index of a fused projection and the factor kept for unmerging are not state:
    a checkpoint of the adapted model holds the base and the adapter's parameters, nothing else."""
    model, adapters = dora_model(tiny_model("gpt2"), peftlab.DoRAConfig(targets=("value",)))
    adapters.merge("d")
    names = {n for n, _ in model.named_parameters()}
    assert set(model.state_dict()) == names | {n for n, _ in model.named_buffers() if "adapters" not in n}


def test_merge_is_refused_where_it_could_not_be_undone(bert):
    model, adapters = dora_model(bert)
    _, piece = next(iter(dora_layers(model).values()))
    with torch.no_grad():
        piece.magnitude[3] = 0.0
    with pytest.raises(peftlab.AdapterStateError, match=re.escape(
            "some output features have a magnitude of 0 (or a zero row of W + s·B·A), so merging "
            "would erase those rows of the weight for good")):
        adapters.merge("d")
    assert not adapters["d"].merged


def test_other_adapters_on_the_layer_compose_and_merges_under_an_active_dora_are_refused(bert):
    """DoRA rescales W·x of the weight the layer holds; a LoRA beside it adds its own update."""
    model, adapters = dora_model(bert)
    adapters.add("l", peftlab.LoRAConfig(r=2, targets=("query",)))
    moved(adapters, "l")
    adapters.activate("d", "l")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        both = model(**inputs)[0]
        expected = with_literal_weights(bert, model)
        for name, module in model.named_modules():
            if isinstance(module, AdaptedLayer) and "l" in module.adapters:
                expected.get_submodule(name).weight.add_(module.adapters["l"].delta_weight())
        assert (both - expected(**inputs)[0]).abs().max() < TOL
        # Merging the LoRA into the weight DoRA's norm reads would change DoRA's output.
        with pytest.raises(peftlab.AdapterStateError, match="DoRA's norm"):
            adapters.merge("l")
        adapters.merge("d")  # DoRA first is exact: the LoRA then adds to the merged weight
        assert (model(**inputs)[0] - both).abs().max() < TOL
        adapters.merge("l")
        assert (model(**inputs)[0] - both).abs().max() < TOL
        adapters.unmerge("l"), adapters.unmerge("d")
        adapters.activate("l")
        adapters.merge("l")
        adapters.activate("l", "d")  # now DoRA runs on the merged weight: unmerging l would change it
        with pytest.raises(peftlab.AdapterStateError, match="deactivate them first"):
            adapters.unmerge("l")


def test_routing_runs_each_example_with_its_own_adapter(bert):
    model, adapters = dora_model(bert)
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad():
        alone = model(**inputs)[0]
        adapters.activate()
        plain = model(**inputs)[0]
        with adapters.route(["d", None, "d"]):
            routed = model(**inputs)[0]
    assert (alone - plain).abs().max() > 1e-2
    assert torch.allclose(routed[[0, 2]], alone[[0, 2]], atol=TOL)
    assert torch.allclose(routed[1], plain[1], atol=TOL)


def test_routed_experts_are_refused():
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=100, num_local_experts=4, num_experts_per_tok=2))
    adapters = peftlab.attach(model)
    with pytest.raises(peftlab.TargetError, match="routed experts"):
        adapters.add("d", peftlab.DoRAConfig(targets=("ffn_down",)))
    assert "d" not in adapters


# ---- files and the command line ----------------------------------------------------------------------
def test_save_and_load_round_trip(bert, tmp_path):
    model, adapters = dora_model(bert, peftlab.DoRAConfig(r=4, targets=("query", "value", "ffn_down")))
    adapters.save("d", tmp_path / "d")
    fresh = copy.deepcopy(bert).requires_grad_(False)  # frozen like ``model``: the same code path
    loaded = peftlab.attach(fresh)
    loaded.activate(loaded.load(tmp_path / "d"))
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs)[0], model(**inputs)[0])
    assert loaded.config("d") == adapters.config("d")


def test_cli_trains_dora_on_a_tiny_bert(tmp_path):
    runner = CliRunner()
    model, data = _save_bert(tmp_path / "bert", dropout=0.0), _sentiment(tmp_path / "data")
    _ok(runner.invoke(app, ["train", "--model", str(model), "--data", str(data), "--method", "dora",
                            "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8",
                            "--max-length", "16", "--quiet"]))
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "dora" and config["config"]["alpha"] == 8.0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "dora" and metrics["lr"] == 5e-4 and metrics["steps"] == 4
    fresh = peftlab.attach(T.AutoModelForSequenceClassification.from_pretrained(model))
    name = fresh.load(tmp_path / "run" / "adapter")
    magnitudes = [p for p in fresh.parameters(name) if p.ndim == 1]
    norms = [torch.linalg.norm(piece.base.weight, dim=1)
             for _, piece in dora_layers(fresh.model, name).values()]
    assert any(not torch.allclose(m, n) for m, n in zip(magnitudes, norms, strict=True))  # m trained
