"""LoRA and (IA)³ on every architecture family: formulas, merging, files, detaching."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import FAMILIES, output_of, randomize, tiny_inputs, tiny_model

import peftlab
from peftlab.layer import AdaptedLayer


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _base_state(model):
    """The state dict as if no adapter were attached (wrapped weights under their own names)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- parameter counts -------------------------------------------------------------------------
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


@pytest.mark.parametrize("shape, lora, ia3", [({}, 294_912, 55_296), (MINILM, 73_728, 13_824)])
def test_parameter_counts_match_the_formulas(shape, lora, ia3):
    with torch.device("meta"):
        model = T.BertModel(T.BertConfig(**shape))
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=8, targets=("query", "value")))
    adapters.add("ia3", peftlab.IA3Config())
    summary = adapters.summary()
    assert summary["lora"].parameters == lora  # 2 · layers · 2 matrices · d · r
    assert summary["ia3"].parameters == ia3  # layers · (d_k + d_v + d_ff)
    assert summary["lora"].percent == pytest.approx(100 * lora / summary.base_parameters)


def test_summary_prints_one_row_per_adapter(bert):
    adapters = peftlab.attach(bert)
    adapters.add("lora", peftlab.LoRAConfig(r=2))
    adapters.add("ia3", peftlab.IA3Config(targets=("ffn_down",)))
    adapters.add("idle", peftlab.LoRAConfig(r=1))
    adapters.activate("lora", "ia3")
    adapters.merge("lora")
    assert str(adapters.summary()).splitlines() == [
        "adapter              method             params   % base  sites  state",
        "-" * 70,
        "lora                 lora                  512   1.3525      4  merged",
        "ia3                  ia3                   128   0.3381      2  active",
        "idle                 lora                  256   0.6762      4  ",
        "base model parameters: 37,856",
    ]


# ---- every family -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_new_adapters_leave_the_model_unchanged(family):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    before = output_of(model, inputs)
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=4, targets=("query", "key", "value", "attn_out",
                                                            "ffn_up", "ffn_down")))
    adapters.add("ia3", peftlab.IA3Config())
    adapters.activate("lora", "ia3")
    assert torch.allclose(output_of(model, inputs), before, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_save_load_detach_round_trip(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    original = _state(model)
    base = output_of(model, inputs)
    adapters = peftlab.attach(model)
    for name, config in [("lora", peftlab.LoRAConfig(r=4, alpha=8, targets=("query", "value"))),
                         ("ia3", peftlab.IA3Config())]:
        adapters.add(name, config)
        randomize(adapters.parameters(name))
        adapters.activate(name)
        adapted = output_of(model, inputs)
        assert not torch.allclose(adapted, base, atol=1e-4), "the adapter must change the output"

        adapters.save(name, tmp_path / name)
        fresh = tiny_model(family)
        fresh.load_state_dict(_base_state(model))
        loaded = peftlab.attach(fresh)
        assert loaded.load(tmp_path / name) == name
        loaded.activate(name)
        assert torch.equal(output_of(fresh, inputs), adapted)

        adapters.merge(name)
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
        adapters.unmerge(name)
        assert torch.allclose(output_of(model, inputs), adapted, atol=1e-5)
        now = _base_state(model)
        for key, w in original.items():
            assert torch.allclose(now[key], w, rtol=1e-6, atol=1e-7), key
    peftlab.detach(model)
    assert not _layers(model)
    assert torch.allclose(output_of(model, inputs), base, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_original_state_dict_exactly(family):
    model = tiny_model(family)
    original = _state(model)
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.add("ia3", peftlab.IA3Config())
    adapters.activate("lora", "ia3")
    output_of(model, tiny_inputs(family))
    peftlab.detach(model)
    assert _same_state(model.state_dict(), original)
    assert peftlab.attach(model).names == ()


# ---- the formulas, by hand, on one layer ------------------------------------------------------
# A frozen base (after ``train``) runs LoRA and (IA)³ through their own autograd functions, a
# trainable one through plain autograd: the formulas must hold on both paths.
FROZEN = pytest.mark.parametrize("frozen", [False, True], ids=["trainable_base", "frozen_base"])


@FROZEN
def test_lora_layer_equals_the_formula(bert, frozen):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.LoRAConfig(r=4, alpha=12, targets=("value",)))
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    if frozen:
        adapters.train("a")
    layer = bert.encoder.layer[0].attention.self.value
    A, B = layer.adapters["a"].lora_A, layer.adapters["a"].lora_B
    x = torch.randn(3, 5, 32)
    expected = x @ layer.base.weight.T + layer.base.bias + (12 / 4) * x @ A.T @ B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)

    adapters.remove("a")
    adapters.add("rs", peftlab.LoRAConfig(r=4, alpha=12, targets=("value",), rslora=True))
    assert bert.encoder.layer[0].attention.self.value.adapters["rs"].scaling == 12 / 2


@FROZEN
def test_ia3_layer_equals_the_formula(bert, frozen):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.IA3Config())
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    if frozen:
        adapters.train("a")
    key = bert.encoder.layer[0].attention.self.key
    down = bert.encoder.layer[0].output.dense
    x, h = torch.randn(3, 5, 32), torch.randn(3, 5, 64)
    l_k, l_ff = key.adapters["a"].ia3_l, down.adapters["a"].ia3_l
    assert torch.allclose(key(x), l_k * (x @ key.base.weight.T + key.base.bias), atol=1e-6)
    # the paper's FFN rule: the activation after the nonlinearity (the down projection's input)
    assert torch.allclose(down(h), (l_ff * h) @ down.base.weight.T + down.base.bias, atol=1e-6)


@FROZEN
def test_ia3_and_lora_on_one_layer_follow_the_documented_order(bert, frozen):
    """Where (IA)³ and LoRA both act, ``y = W(l_in⊙x)·l_out + b·l_out + s·B·A·(l_in⊙x)``:
    the (IA)³ input scale feeds LoRA too, the output scale does not touch LoRA's update."""
    adapters = peftlab.attach(bert)
    adapters.add("ia3", peftlab.IA3Config())  # ffn_down: scales the input
    adapters.add("ia3_out", peftlab.IA3Config(targets=("ffn_down",), scale_input=()))
    adapters.add("lora", peftlab.LoRAConfig(r=4, alpha=8, targets=("ffn_down",)))
    adapters.activate("ia3", "ia3_out", "lora")
    # as after training: vectors away from ones, a non-zero LoRA update
    randomize(adapters.parameters("ia3") + adapters.parameters("ia3_out") + adapters.parameters("lora"),
              scale=0.3)
    if frozen:
        adapters.train("lora")
    down = bert.encoder.layer[0].output.dense
    l_in, l_out = down.adapters["ia3"].ia3_l, down.adapters["ia3_out"].ia3_l
    lora = down.adapters["lora"]
    assert (l_in - 1).abs().min() > 1e-4 and (l_out - 1).abs().min() > 1e-4
    assert lora.lora_B.abs().min() > 0
    W, b = down.base.weight, down.base.bias
    assert b.abs().min() > 0
    x = torch.randn(3, 5, 64)
    xs = l_in * x
    expected = (xs @ W.T) * l_out + b * l_out + 2.0 * xs @ lora.lora_A.T @ lora.lora_B.T
    with torch.no_grad():
        assert torch.allclose(down(x), expected, atol=1e-5)
        for _ in range(2):  # the same through per-example routing (each example one group)
            with adapters.route([("ia3", "ia3_out", "lora"), None, ("lora",)]):
                routed = down(x)
            assert torch.allclose(routed[0], expected[0], atol=1e-5)
            assert torch.allclose(routed[1], x[1] @ W.T + b, atol=1e-5)
            assert torch.allclose(routed[2], x[2] @ W.T + b + 2.0 * x[2] @ lora.lora_A.T @ lora.lora_B.T,
                                  atol=1e-5)


def test_ia3_merge_scales_the_bias_too(bert):
    """``l ⊙ (W·x + b) = (diag(l)·W)·x + l ⊙ b``: merging an output scale must scale the bias."""
    adapters = peftlab.attach(bert)
    adapters.add("ia3", peftlab.IA3Config())
    randomize(adapters.parameters("ia3"))
    adapters.activate("ia3")
    key = bert.encoder.layer[0].attention.self.key
    W, b, l_k = key.base.weight.clone(), key.base.bias.clone(), key.adapters["ia3"].ia3_l
    assert b.abs().min() > 0
    inputs = tiny_inputs("bert")
    before = output_of(bert, inputs)
    adapters.merge("ia3")
    assert torch.allclose(key.base.weight, l_k[:, None] * W, atol=1e-6)
    assert torch.allclose(key.base.bias, l_k * b, atol=1e-6)
    assert torch.allclose(output_of(bert, inputs), before, atol=1e-5)
    adapters.unmerge("ia3")
    assert torch.allclose(key.base.bias, b, atol=1e-6) and torch.allclose(key.base.weight, W, atol=1e-6)


@pytest.mark.parametrize("frozen", [False, True], ids=["fresh", "after_train"])
def test_lora_dropout_is_off_in_eval_mode(frozen):
    """``dropout`` acts on the adapter's input while training only: in eval mode two forwards
    give the same output. After ``train`` (frozen base) LoRA shares the layer with (IA)³ here, so
    the update runs through the same path as on an unfrozen base."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0))
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=4, dropout=0.5, targets=("query", "value", "ffn_down")))
    adapters.add("ia3", peftlab.IA3Config())
    adapters.activate(*(("lora", "ia3") if frozen else ("lora",)))
    if frozen:
        adapters.train("lora")
    randomize(adapters.parameters("lora"), scale=0.3)  # lora_B = 0 would make the update vanish
    inputs = tiny_inputs("bert")
    model.eval()
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), output_of(model, inputs))
        model.train()
        assert not torch.allclose(output_of(model, inputs), output_of(model, inputs), atol=1e-3)
        model.eval()
        adapters.activate()
        plain = output_of(model, inputs)
        model.train()  # the base model has no dropout of its own: the difference above was LoRA's
        assert torch.equal(output_of(model, inputs), plain)


@FROZEN
def test_ia3_gradients_equal_plain_autograd(bert, frozen):
    """(IA)³ on a frozen base runs through a custom autograd function; its gradients must be the
    textbook ones, also for an output gradient that arrives transposed (a key's, from attention)."""
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.IA3Config())
    randomize(adapters.parameters("a"), scale=0.3)
    adapters.activate("a")
    if frozen:
        adapters.train("a")
    x = torch.randn(3, 5, 32, requires_grad=True)
    h = torch.randn(3, 5, 64, requires_grad=True)
    key = bert.encoder.layer[0].attention.self.key
    down = bert.encoder.layer[0].output.dense
    l_k, l_ff = key.adapters["a"].ia3_l, down.adapters["a"].ia3_l
    for g1 in (torch.randn(3, 5, 32), torch.randn(3, 32, 5).transpose(1, 2)):
        ours = torch.autograd.grad((key(x), down(h)), (x, h, l_k, l_ff), (g1, g1))
        ref_out = (l_k * (x @ key.base.weight.T + key.base.bias) * g1).sum() + \
            (((l_ff * h) @ down.base.weight.T + down.base.bias) * g1).sum()
        ref = torch.autograd.grad(ref_out, (x, h, l_k, l_ff))
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_frozen_base_gives_the_outputs_and_gradients_of_plain_autograd():
    """Training freezes the base, which switches LoRA and (IA)³ to their custom autograd
    functions; outputs and adapter gradients must not change (also through layers whose input
    needs no gradient, and a layer with both (IA)³ vectors and LoRA)."""
    model = tiny_model("bert")
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=4, targets=("query", "value", "ffn_down")))
    adapters.add("ia3", peftlab.IA3Config())
    adapters.add("ia3_out", peftlab.IA3Config(targets=("ffn_down", "attn_out"), scale_input=()))
    names = ("lora", "ia3", "ia3_out")
    adapters.activate(*names)
    params = [p for n in names for p in adapters.parameters(n)]
    randomize(params, scale=0.3)
    inputs = tiny_inputs("bert")

    def run():
        out = output_of(model, inputs)
        return out, torch.autograd.grad(out.pow(2).mean(), params)

    adapters.train("lora")
    for p in params:
        p.requires_grad_(True)
    frozen_out, frozen_grads = run()
    for p in model.parameters():
        p.requires_grad_(True)
    plain_out, plain_grads = run()
    assert torch.allclose(frozen_out, plain_out, atol=1e-5)
    for a, b in zip(frozen_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module, trainable, input_grad, saved", [
    ("attention.self.key", True, False, "y"),  # l_out's gradient needs y / l_out
    ("output.dense", True, False, "x"),  # l_in's gradient needs x
    ("attention.self.key", False, True, ""),  # x's gradient needs neither
    ("output.dense", False, True, ""),
])
def test_ia3_keeps_only_the_activations_its_gradients_need(bert, module, trainable, input_grad, saved):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.IA3Config())
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    adapters.train("a")  # frozen base: the custom autograd function
    layer = bert.encoder.layer[0].get_submodule(module)
    for p in adapters.parameters("a"):
        p.requires_grad_(trainable)
    x = torch.randn(3, 5, layer.in_features, requires_grad=input_grad)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    activations = {"x" if t is x else "y" if t.shape == y.shape else "?" for t in packed if t.dim() == 3}
    assert activations == set(saved)
    y.sum().backward()


IN_PLACE = [peftlab.LoRAConfig(r=3, targets=("^proj$",)), peftlab.DoRAConfig(r=3, targets=("^proj$",)),
            peftlab.IA3Config(targets=("^proj$",), scale_input=("^proj$",)),
            peftlab.VeRAConfig(r=8, targets=("^proj$",)), peftlab.LoHaConfig(r=3, targets=("^proj$",)),
            peftlab.LoKrConfig(r=3, targets=("^proj$",))]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", IN_PLACE, ids=lambda c: c.method)
def test_a_model_that_changes_an_adapted_output_in_place_gets_the_same_gradients(config, bias):
    """Longformer divides its query by √d in place. A [batch, tokens, features] input with a bias
    is the case where a fused node's output would be a view (which autograd forbids changing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(24, 20, bias=bias))
    model.requires_grad_(False)
    adapters = peftlab.attach(model, role_map=None)
    adapters.add("a", config)
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    params = adapters.train("a")
    x = torch.randn(5, 6, 24)
    grads = []
    for step in (lambda: model(x).div_(3.0), lambda: model(x) / 3.0):
        for p in params:
            p.grad = None
        (step() * torch.linspace(-1, 2, 600).view(5, 6, 20)).sum().backward()
        grads.append([p.grad.clone() for p in params])
    for changed, plain in zip(*grads, strict=True):
        torch.testing.assert_close(changed, plain, atol=1e-6, rtol=1e-5)


def test_ia3_on_an_output_the_model_changes_in_place_is_refused_with_the_way_out():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(24, 20))
    model.requires_grad_(False)
    adapters = peftlab.attach(model, role_map=None)
    adapters.add("a", peftlab.IA3Config(targets=("^proj$",), scale_input=()))
    adapters.activate("a")
    adapters.train("a")
    with pytest.raises(peftlab.AdapterStateError, match=r"scale that module's input instead \(scale_input\)"):
        model(torch.randn(5, 6, 24)).div_(3.0).sum().backward()


def test_fused_qkv_adapts_only_the_targeted_slices():
    """GPT-2's c_attn holds q, k and v: LoRA on query+value touches only those outputs."""
    model = tiny_model("gpt2")
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=2, targets=("query", "value")))
    adapters.add("ia3", peftlab.IA3Config(targets=("key",), scale_input=()))
    randomize(adapters.parameters("lora") + adapters.parameters("ia3"))
    c_attn = model.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    plain = c_attn.base(x)
    adapters.activate("lora")
    delta = c_attn(x) - plain
    assert delta[..., 32:64].abs().max() == 0 and delta[..., :32].abs().min() > 0
    # each role has its own rows of A (query rows 0..r-1, value rows r..2r-1) and of B
    A, B, s = c_attn.adapters["lora"].lora_A, c_attn.adapters["lora"].lora_B, 16 / 2
    assert torch.allclose(delta[..., :32], s * x @ A[:2].T @ B[:32].T, atol=1e-5)
    assert torch.allclose(delta[..., 64:], s * x @ A[2:].T @ B[32:].T, atol=1e-5)
    adapters.activate("ia3")
    ratio = c_attn(x) / plain
    assert torch.allclose(ratio[..., :32], torch.ones(()), atol=1e-5)
    assert torch.allclose(ratio[..., 64:], torch.ones(()), atol=1e-5)
    assert torch.allclose(ratio[..., 32:64], c_attn.adapters["ia3"].ia3_l.expand(2, 3, 32), atol=1e-4)
    # same parameter count as separate q and v projections: 2 roles · r · (in + out_slice)
    assert adapters.summary()["lora"].parameters == 2 * 2 * 2 * (32 + 32)


def test_merged_conv1d_weights_match_the_unmerged_output():
    model = tiny_model("gpt2")
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=2, targets=("query", "value", "ffn_down")))
    randomize(adapters.parameters("lora"))
    adapters.activate("lora")
    inputs = tiny_inputs("gpt2")
    before = output_of(model, inputs)
    adapters.merge("lora")
    assert torch.allclose(output_of(model, inputs), before, atol=1e-5)
    c_attn = model.h[0].attn.c_attn
    assert not c_attn.active_pieces  # merged: forward runs the base projection only


@FROZEN
def test_several_adapters_on_the_same_layers_add_up(bert, frozen):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.LoRAConfig(r=2))
    adapters.add("b", peftlab.LoRAConfig(r=3))
    randomize(adapters.parameters("a") + adapters.parameters("b"))
    if frozen:
        adapters.activate("a")
        adapters.train("a")
    q = bert.encoder.layer[1].attention.self.query
    x = torch.randn(2, 4, 32)
    base = q.base(x)
    adapters.activate("a")
    da = q(x) - base
    adapters.activate("b")
    db = q(x) - base
    adapters.activate("a", "b")
    assert torch.allclose(q(x) - base, da + db, atol=1e-6)
    adapters.activate()
    assert torch.equal(q(x), base)


def test_two_ia3_adapters_on_one_layer_multiply(bert):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.IA3Config())
    adapters.add("b", peftlab.IA3Config())
    randomize(adapters.parameters("a") + adapters.parameters("b"), scale=0.3)
    adapters.activate("a", "b")
    for name in ("attention.self.key", "output.dense"):  # output and input scales
        layer = bert.encoder.layer[0].get_submodule(name)
        la, lb = layer.adapters["a"].ia3_l, layer.adapters["b"].ia3_l
        x = torch.randn(2, 3, layer.in_features)
        if layer.adapters["a"].scale_input:
            expected = layer.base(la * lb * x)
        else:
            expected = la * lb * layer.base(x)
        assert torch.allclose(layer(x), expected, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------
def test_train_freezes_everything_but_the_adapter_and_the_named_modules():
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=3))
    adapters = peftlab.attach(model)
    adapters.add("task", peftlab.LoRAConfig())
    adapters.add("other", peftlab.LoRAConfig())
    adapters.activate("task")
    trainable = adapters.train("task", extras=("classifier",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if any(p is t for t in trainable)}
    assert all(".adapters.task." in n or n.startswith("classifier.") for n in names)
    assert any(n.startswith("classifier.") for n in names)
    out = model(input_ids=torch.randint(0, 100, (2, 5)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lora_A" not in n)  # B = 0 at init, so A's gradient is 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("config, lr, factor", [
    (peftlab.LoRAConfig(r=4), 1e-2, 0.7), (peftlab.IA3Config(), 3e-2, 0.7),
    (peftlab.BottleneckConfig.pfeiffer(), 3e-2, 0.5), (peftlab.CompacterConfig(reduction=8), 3e-2, 0.5),
])
def test_a_short_training_run_lowers_the_loss(config, lr, factor):
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=2)).eval()
    ids = torch.randint(0, 100, (16, 8))
    labels = (ids[:, 0] > 50).long()
    adapters = peftlab.attach(model)
    adapters.add("task", config)
    adapters.activate("task")
    opt = torch.optim.AdamW(adapters.train("task", extras="classifier"), lr=lr)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] * factor


# ---- the model stays a plain nn.Module --------------------------------------------------------
def test_torch_compile_runs_the_adapted_model(bert):
    adapters = peftlab.attach(bert)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.add("ia3", peftlab.IA3Config())
    randomize(adapters.parameters("lora") + adapters.parameters("ia3"))
    adapters.activate("lora", "ia3")
    inputs = tiny_inputs("bert")
    eager = output_of(bert, inputs)
    compiled = torch.compile(bert, backend="aot_eager")
    assert torch.allclose(output_of(compiled, inputs), eager, atol=1e-5)


def test_attach_returns_the_same_set(bert):
    assert peftlab.attach(bert) is peftlab.attach(bert)


# ---- errors -----------------------------------------------------------------------------------
def test_a_target_that_matches_nothing_is_an_error(bert):
    adapters = peftlab.attach(bert)
    with pytest.raises(peftlab.TargetError, match="matched no Linear"):
        adapters.add("x", peftlab.LoRAConfig(targets=("no_such_module",)))
    with pytest.raises(peftlab.TargetError, match="no role 'ffn_gate'"):
        adapters.add("x", peftlab.LoRAConfig(targets=("ffn_gate",)))
    assert adapters.names == () and not _layers(bert)


def test_unknown_architectures_need_regexes_or_a_role_map():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_q = torch.nn.Linear(8, 8)
            self.mlp_out = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.mlp_out(self.attn_q(x))

    model = torch.nn.Sequential(Block(), Block())
    with pytest.raises(peftlab.TargetError, match=r"no built-in role map.*N\.attn_q"):
        peftlab.attach(model).add("x", peftlab.LoRAConfig())
    peftlab.attach(model).add("regex", peftlab.LoRAConfig(targets=(r"attn_q$",)))
    assert peftlab.attach(model).summary()["regex"].sites == 2
    peftlab.detach(model)

    roles = peftlab.RoleMap({"query": r"\.attn_q$", "value": r"\.mlp_out$"})
    adapters = peftlab.attach(model, role_map=roles)
    adapters.add("mapped", peftlab.LoRAConfig())
    assert adapters.summary()["mapped"].sites == 4


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 101, "base", ".hidden", "a\\b", 3])
def test_invalid_adapter_names_are_refused(bert, name):
    with pytest.raises(peftlab.AdapterNameError):
        peftlab.attach(bert).add(name, peftlab.LoRAConfig())


def test_state_errors_are_clear(bert):
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.LoRAConfig())
    with pytest.raises(peftlab.AdapterNameError, match="exists"):
        adapters.add("a", peftlab.LoRAConfig())
    with pytest.raises(peftlab.AdapterStateError, match="not active"):
        adapters.merge("a")
    with pytest.raises(peftlab.AdapterStateError, match="not active"):
        adapters.train("a")
    adapters.activate("a")
    with pytest.raises(peftlab.AdapterStateError, match="not merged"):
        adapters.unmerge("a")
    adapters.merge("a")
    with pytest.raises(peftlab.AdapterStateError, match="already merged"):
        adapters.merge("a")
    with pytest.raises(peftlab.AdapterStateError, match="merged"):
        adapters.activate()
    with pytest.raises(peftlab.AdapterStateError, match="keep_merged"):
        peftlab.detach(bert)
    with pytest.raises(peftlab.AdapterNameError, match="no adapter named"):
        adapters.activate("missing")


def test_merging_into_a_layer_shared_with_an_unmerged_adapter_of_another_kind_is_refused(bert):
    adapters = peftlab.attach(bert)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.add("ia3", peftlab.IA3Config())
    adapters.activate("lora", "ia3")
    with pytest.raises(peftlab.AdapterStateError, match="composes with active unmerged adapter"):
        adapters.merge("ia3")
    with pytest.raises(peftlab.AdapterStateError,
                       match=r"composes with active unmerged adapter\(s\) \['ia3'\]"):
        adapters.merge("lora")


def test_merge_order_and_state_errors_say_what_to_do(bert):
    adapters = peftlab.attach(bert)
    for name in ("a", "b", "c"):
        adapters.add(name, peftlab.LoRAConfig())
    adapters.activate("a", "b", "c")
    for name in ("a", "b", "c"):
        adapters.merge(name)
    with pytest.raises(peftlab.AdapterStateError,
                       match=r"^unmerge \['b', 'c'\] before 'a' \(reverse order of merging\)$"):
        adapters.unmerge("a")
    layer = bert.encoder.layer[0].attention.self.query
    with pytest.raises(peftlab.AdapterStateError,
                       match=r"^adapter 'a' must be unmerged after \['b', 'c'\] \(unmerge in the reverse"):
        layer.unmerge("a")
    assert layer.merged == ["a", "b", "c"]
    adapters.unmerge("c")
    with pytest.raises(peftlab.AdapterStateError, match="^adapter 'a' is merged; unmerge it before train"):
        adapters.train("a")
    with pytest.raises(peftlab.AdapterStateError, match="or pass keep_merged=True to keep them there$"):
        peftlab.detach(bert)
    with pytest.raises(peftlab.AdapterStateError, match="unmerge them before deactivating them$"):
        adapters.activate("a")
    with pytest.raises(peftlab.AdapterNameError, match=r"^an adapter is named twice in \('a', 'a', 'b'\)$"):
        adapters.activate("a", "a", "b")
    with pytest.raises(peftlab.AdapterStateError, match="^adapter 'a' is merged; unmerge it before removing"):
        adapters.remove("a")
    adapters.unmerge("b")
    adapters.unmerge("a")
    assert adapters.summary()["a"].merged is False and adapters["a"].merged is False
    with pytest.raises(KeyError, match="nope"):
        adapters.summary()["nope"]


def test_train_along_every_named_module():
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=3))
    adapters = peftlab.attach(model)
    adapters.add("a", peftlab.LoRAConfig())
    adapters.add("f", peftlab.BottleneckConfig.pfeiffer(reduction=8))
    adapters.activate("a")
    adapters.train("a", extras=("classifier", "pooler"))
    assert adapters["a"].extras == ("classifier", "bert.pooler")
    with pytest.raises(peftlab.TargetError, match="^no module named 'nope' to train along; top-level"):
        adapters.train("a", extras="nope")
    adapters.add("m", peftlab.LoRAConfig(targets=("ffn_down",)))
    adapters.add_fusion("fused", ["f", "m"])
    adapters.activate("m")
    with pytest.raises(peftlab.AdapterStateError,
                       match=r"member of fusion\(s\) \['fused'\]; remove them before merging it$"):
        adapters.merge("m")
    with pytest.raises(peftlab.AdapterStateError,
                       match=r"member of fusion\(s\) \['fused'\]; remove them before removing it$"):
        adapters.remove("m")


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": "8"}, {"dropout": 1.5}, {"targets": "query"},
                                 {"alpha": float("nan")}, {"rank": 8}])
def test_configs_validate_their_fields(bad):
    with pytest.raises(peftlab.ConfigError):
        peftlab.LoRAConfig.from_dict({**peftlab.LoRAConfig().to_dict(), **bad})


def test_lora_config_bounds():
    assert peftlab.LoRAConfig(r=1).r == 1 and peftlab.LoRAConfig(r=65536).r == 65536
    assert peftlab.LoRAConfig(dropout=0.0).dropout == 0.0
    for r in (0, 65537):
        with pytest.raises(peftlab.ConfigError, match=f"r must be between 1 and 65536, got {r}"):
            peftlab.LoRAConfig(r=r)
    for p in (-0.1, 1.0):
        with pytest.raises(peftlab.ConfigError, match=rf"dropout must be in \[0, 1\), got {p}"):
            peftlab.LoRAConfig(dropout=p)


def test_ia3_input_scaling_errors_are_clear():
    with pytest.raises(peftlab.ConfigError, match="^IA3Config.scale_input: "):
        peftlab.IA3Config(scale_input=("(unclosed",))
    fused = peftlab.IA3Config(targets=("key",), scale_input=("key",))
    with pytest.raises(peftlab.TargetError, match="cannot rescale the input of fused module 'h.0.attn"):
        peftlab.attach(tiny_model("gpt2")).add("x", fused)


def test_lora_starts_as_the_reference_code():
    """A ~ Kaiming-uniform(a=√5), i.e. U(-1/√k, 1/√k) for k inputs; B = 0; (IA)³ vectors = 1."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=10))
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=16, targets=("query",)))
    adapters.add("ia3", peftlab.IA3Config())
    piece = model.encoder.layer[0].attention.self.query.adapters["lora"]
    bound = 1 / 256 ** 0.5
    assert piece.lora_A.abs().max() <= bound and piece.lora_A.abs().max() > 0.99 * bound
    assert torch.equal(piece.lora_B, torch.zeros(256, 16))
    assert all(torch.equal(p, torch.ones_like(p)) for p in adapters.parameters("ia3"))


def test_only_lora_and_ia3_pieces_merge(bert):
    adapters = peftlab.attach(bert)
    adapters.add("b", peftlab.BottleneckConfig.pfeiffer(reduction=8))
    layer = bert.encoder.layer[0].output.dense
    with pytest.raises(peftlab.AdapterStateError, match="^Bottleneck cannot be merged into the weights$"):
        layer.adapters["b"].merge_into(layer.weight, layer.bias, 1)


def test_configs_round_trip_through_json():
    for config in [peftlab.LoRAConfig(r=4, targets=("query", r"x\.y$"), rslora=True), peftlab.IA3Config()]:
        again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config


@FROZEN
def test_lora_gradients_equal_plain_autograd(bert, frozen):
    """LoRA's fused autograd function (frozen base) must give the textbook gradients."""
    adapters = peftlab.attach(bert)
    adapters.add("a", peftlab.LoRAConfig(r=4, alpha=6))
    randomize(adapters.parameters("a"), scale=0.3)
    adapters.activate("a")
    if frozen:
        adapters.train("a")
    layer = bert.encoder.layer[0].attention.self.query
    A, B = layer.adapters["a"].lora_A, layer.adapters["a"].lora_B
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    wrt = (x, A, B) if frozen else (x, A, B, layer.base.weight)  # a trainable base gets its gradient
    ours = torch.autograd.grad((layer(x) * g).sum(), wrt)
    ref_out = x @ layer.base.weight.T + layer.base.bias + 1.5 * (x @ A.T) @ B.T
    ref = torch.autograd.grad((ref_out * g).sum(), wrt)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bootstrap_intervals_cover_the_true_score_about_95_percent_of_the_time():
    import numpy as np

    from peftlab.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    hits, trials = 0, 200
    for t in range(trials):  # a classifier that is right 80% of the time, 300 validation examples
        labels = rng.integers(0, 2, 300)
        predictions = np.where(rng.random(300) < 0.8, labels, 1 - labels)
        low, high = bootstrap_ci("classification", "accuracy", [(predictions, labels)], resamples=400, seed=t)
        hits += low <= 0.8 <= high
    assert 0.90 <= hits / trials <= 0.99


def test_paired_intervals_cover_the_true_gain_and_see_what_overlapping_intervals_hide():
    """A is right 75% of the time; B is A with a random fifth of A's errors fixed: a true gain of
    0.25 · 0.2 = 5 points, on the same examples. The paired interval of B − A covers the true
    gain about 95% of the time and excludes 0, while B's and A's own intervals overlap."""
    import numpy as np

    from peftlab.metrics import bootstrap_ci

    rng = np.random.default_rng(1)
    hits, excludes_zero, overlaps, trials = 0, 0, 0, 120
    for t in range(trials):
        labels = rng.integers(0, 2, 500)
        a = np.where(rng.random(500) < 0.75, labels, 1 - labels)
        b = np.where((a != labels) & (rng.random(500) < 0.2), labels, a)
        true_gain = 0.05
        low, high = bootstrap_ci("classification", "accuracy", [(b, labels)], resamples=300, seed=t,
                                 against=[(a, labels)])
        hits += low <= true_gain <= high
        excludes_zero += low > 0
        a_ci = bootstrap_ci("classification", "accuracy", [(a, labels)], resamples=300, seed=t)
        b_ci = bootstrap_ci("classification", "accuracy", [(b, labels)], resamples=300, seed=t)
        overlaps += b_ci[0] <= a_ci[1]
    assert 0.88 <= hits / trials <= 0.995
    assert excludes_zero / trials > 0.9 and overlaps / trials > 0.9
    with pytest.raises(ValueError, match="same examples"):
        bootstrap_ci("classification", "accuracy", [(a, labels)], against=[(a, 1 - labels)])


@pytest.mark.parametrize("classes, num_classes", [(2, None), (3, None), (3, 4), (2, 2)])
def test_classification_metrics_equal_scikit_learns(classes, num_classes):
    """peftlab computes them from the confusion matrix, without importing scikit-learn; they must
    be scikit-learn's, also where a class is never predicted or the prediction is constant."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from peftlab.metrics import classification_metrics

    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 200)
    average = "binary" if (num_classes or classes) <= 2 else "macro"
    for predictions in (np.where(rng.random(200) < 0.7, labels, rng.integers(0, classes, 200)),
                        np.minimum(labels, classes - 2),  # the last class never predicted
                        np.zeros(200, dtype=np.int64)):  # constant: no correlation, F1 of class 1 zero
        ours = classification_metrics(labels, predictions, num_classes)
        assert ours["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
        assert ours["f1"] == pytest.approx(f1_score(labels, predictions, average=average, zero_division=0),
                                           abs=1e-12)
        assert ours["matthews"] == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)


def test_ranks_tie_where_intervals_overlap():
    from peftlab.metrics import ranks_with_ties

    ranks = ranks_with_ties({"a": (0.80, 0.86), "b": (0.78, 0.84), "c": (0.60, 0.70), "d": (0.5, 0.79)})
    assert ranks == {"a": 1, "b": 1, "c": 3, "d": 2}  # d overlaps b but lies wholly below a


def test_a_layer_refuses_to_unmerge_what_it_never_merged(bert):
    adapters = peftlab.attach(bert)
    adapters.add("x", peftlab.LoRAConfig())
    adapters.activate("x")
    layer = adapters._layer("encoder.layer.0.attention.self.query")
    with pytest.raises(peftlab.AdapterStateError, match="not merged"):
        layer.unmerge("x")
