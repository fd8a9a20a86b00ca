"""Bottleneck adapters (Houlsby, Pfeiffer) and Compacter / Compacter++: counts, formulas,
stacking, training, files and every architecture family."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import FAMILIES, output_of, randomize, tiny_inputs, tiny_model
from safetensors import safe_open

import peftlab
from peftlab.layer import AdaptedLayer, WeightCache, cached_weights, serial_pieces
from peftlab.methods.compacter import Compacter, PHMLinear, SharedRules
from peftlab.sites import find_sites

BC, CC = peftlab.BottleneckConfig, peftlab.CompacterConfig
# The tiny models are 32 wide: reduction 8 gives a bottleneck of 4, divisible by phm_dim 4.
TINY_COMPACTER = CC(reduction=8)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _base_state(model):
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}


# ---- parameter counts (AdapterHub's for the same configs) -------------------------------------
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


@pytest.mark.parametrize("shape, pfeiffer, houlsby, compacter, plus_plus", [
    (MINILM, 113_040, 226_080, 14_320, 7_192),
    ({}, 894_528, 1_789_056, 57_088, 28_576),  # bert-base
])
def test_parameter_counts(shape, pfeiffer, houlsby, compacter, plus_plus):
    with torch.device("meta"):
        model = T.BertModel(T.BertConfig(**shape))
    adapters = peftlab.attach(model)
    adapters.add("pfeiffer", BC.pfeiffer())
    adapters.add("houlsby", BC.houlsby())
    adapters.add("compacter", CC())
    adapters.add("plus_plus", CC.plus_plus())
    summary = adapters.summary()
    assert summary["pfeiffer"].parameters == pfeiffer  # layers · (2·m·d + m + d)
    assert summary["houlsby"].parameters == houlsby
    assert summary["compacter"].parameters == compacter  # 2·layers · (2·(d + m) + m + d) + n³
    assert summary["plus_plus"].parameters == plus_plus
    assert adapters["plus_plus"].num_parameters() == plus_plus


def test_unshared_rules_cost_two_rule_tensors_per_module():
    with torch.device("meta"):
        model = T.BertModel(T.BertConfig(**MINILM))
    adapters = peftlab.attach(model)
    adapters.add("own", CC.plus_plus(shared_rules=False))
    assert adapters["own"].num_parameters() == 6 * (1_188 + 2 * 4**3)


# ---- init and the formulas, by hand -----------------------------------------------------------
def test_new_adapters_leave_the_model_unchanged(bert):
    inputs = tiny_inputs("bert")
    before = output_of(bert, inputs)
    adapters = peftlab.attach(bert)
    adapters.add("houlsby", BC.houlsby())
    adapters.activate("houlsby")
    assert torch.equal(output_of(bert, inputs), before)  # W_up = 0: exactly the identity
    adapters.add("compacter", TINY_COMPACTER)
    adapters.activate("compacter")
    # The rules (std 1e-4) scale both projections: the change is far below float32 rounding.
    assert torch.allclose(output_of(bert, inputs), before, rtol=0, atol=1e-6)


def test_bottleneck_layer_equals_the_formula(bert):
    adapters = peftlab.attach(bert)
    adapters.add("a", BC.houlsby())
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    layer = bert.encoder.layer[0].output.dense
    piece = layer.adapters["a"]
    x = torch.randn(3, 5, 64)
    y = x @ layer.base.weight.T + layer.base.bias
    h = F.silu(y @ piece.down.weight.T + piece.down.bias)  # swish, bottleneck 32 // 16 = 2
    assert piece.down.weight.shape == (2, 32)
    assert torch.allclose(layer(x), y + h @ piece.up.weight.T + piece.up.bias, atol=1e-6)


@pytest.mark.parametrize("rank, shared", [(1, True), (2, True), (2, False)])
def test_compacter_layer_equals_the_sum_of_kronecker_products(bert, rank, shared):
    adapters = peftlab.attach(bert)
    adapters.add("c", TINY_COMPACTER.replace(rank=rank, shared_rules=shared))
    randomize(adapters.parameters("c"))
    adapters.activate("c")
    layer = bert.encoder.layer[1].attention.output.dense
    piece = layer.adapters["c"]
    assert (piece.shared is not None) == shared and (piece.down.rules is None) == shared
    assert (adapters["c"].shared is not None) == shared  # no unused rule tensor when unshared
    rules = piece.shared.rules if shared else None

    def kron_weight(phm):
        r = phm.rules if rules is None else rules
        return sum(torch.kron(r[i], phm.w_left[i] @ phm.w_right[i]) for i in range(4))

    w_down, w_up = kron_weight(piece.down), kron_weight(piece.up)
    assert w_down.shape == (32, 4) and w_up.shape == (4, 32)
    assert torch.allclose(piece.down.weight(rules), w_down, atol=1e-6)
    assert torch.allclose(piece.down(torch.ones(32), rules), w_down.sum(0) + piece.down.bias, atol=1e-5)
    assert torch.allclose(piece.up.weight(rules), w_up, atol=1e-6)
    x = torch.randn(3, 5, 32)
    y = x @ layer.base.weight.T + layer.base.bias
    h = F.gelu(y @ w_down + piece.down.bias)
    assert torch.allclose(layer(x), y + h @ w_up + piece.up.bias, atol=1e-5)


def test_one_rule_tensor_serves_every_projection_of_an_adapter(bert):
    adapters = peftlab.attach(bert)
    adapters.add("c1", TINY_COMPACTER)
    adapters.add("c2", TINY_COMPACTER)
    pieces = list(adapters["c1"].pieces.values())
    assert len(pieces) == 4 and all(p.shared is adapters["c1"].shared for p in pieces)
    assert isinstance(adapters["c1"].shared, SharedRules)
    assert adapters["c2"].shared is not adapters["c1"].shared
    rules = adapters["c1"].shared.rules
    assert sum(p is rules for p in adapters.parameters("c1")) == 1


def test_kronecker_sums_are_kept_only_under_a_weight_cache_and_never_go_stale(bert):
    """A server keeps each W = Σ A_i ⊗ B_i between forwards; a weight changed in place or
    replaced is seen at once, and nothing is kept while gradients are recorded."""
    adapters = peftlab.attach(bert)
    adapters.add("c", TINY_COMPACTER)
    randomize(adapters.parameters("c"))
    adapters.activate("c")
    piece = bert.encoder.layer[1].attention.output.dense.adapters["c"]
    inputs = tiny_inputs("bert")
    cache = WeightCache()
    with torch.no_grad():
        fresh = output_of(bert, inputs)
        with cached_weights(cache):
            assert torch.equal(output_of(bert, inputs), fresh)
            assert len(cache) == 2 * len(adapters["c"].pieces)  # the down and up W of each module
            rules = piece.shared.rules
            assert piece.down.weight(rules) is piece.down.weight(rules)  # kept, not built again
            piece.down.w_left.mul_(2)  # in place: its version counter moves
            doubled = output_of(bert, inputs)
            replacement = torch.nn.Parameter(piece.up.w_right * 3)
            while replacement._version < piece.up.w_right._version:  # so that only identity tells
                replacement.add_(0)
            piece.up.w_right = replacement  # replaced
            tripled = output_of(bert, inputs)
        assert torch.allclose(tripled, output_of(bert, inputs), atol=1e-6, rtol=0)  # as without a cache
        piece.up.w_right.div_(3)
        assert torch.allclose(doubled, output_of(bert, inputs), atol=1e-6, rtol=0)
        assert not torch.allclose(doubled, fresh, atol=1e-3)
        assert not torch.allclose(tripled, doubled, atol=1e-3)
    cache.clear()
    with cached_weights(cache):
        output_of(bert, inputs).sum().backward()  # training: products are rebuilt every forward
    assert len(cache) == 0 and piece.down.w_left.grad is not None


# mutmut runs each mutant in a process forked from one that ran this test: GNU OpenMP's thread
# pool does not survive a fork, and a second parallel region there hangs for good.
@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="OpenMP threads hang in forked workers")
def test_serial_pieces_run_the_adapters_on_one_thread_and_the_projections_on_all(bert):
    adapters = peftlab.attach(bert)
    adapters.add("p", BC.pfeiffer())
    randomize(adapters.parameters("p"))
    adapters.activate("p")
    threads_seen: list[int] = []
    for piece in adapters["p"].pieces.values():
        piece.register_forward_pre_hook(lambda *_: threads_seen.append(torch.get_num_threads()))
    inputs = tiny_inputs("bert")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            plain = output_of(bert, inputs)
            assert set(threads_seen) == {2}
            threads_seen.clear()
            with serial_pieces():
                serial = output_of(bert, inputs)
            assert set(threads_seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(serial, plain, atol=1e-6, rtol=0)

# ---- stacking ---------------------------------------------------------------------------------
def test_stacked_adapters_run_in_activation_order(bert):
    adapters = peftlab.attach(bert)
    adapters.add("a", BC.pfeiffer())
    adapters.add("b", TINY_COMPACTER.replace(placement=("ffn_down",)))
    randomize(adapters.parameters("a") + adapters.parameters("b"), scale=0.5)
    layer = bert.encoder.layer[0].output.dense
    a, b = layer.adapters["a"], layer.adapters["b"]
    x = torch.randn(2, 4, 64)
    y = layer.base(x)
    ya = y + a.up(F.relu(a.down(y)))  # Pfeiffer by hand
    rules = b.shared.rules
    yab = ya + F.gelu(ya @ b.down.weight(rules) + b.down.bias) @ b.up.weight(rules) + b.up.bias
    adapters.activate("a", "b")
    assert torch.allclose(layer(x), yab, atol=1e-5)
    adapters.activate("b", "a")
    assert torch.allclose(layer(x), a(b(y)), atol=1e-6)
    assert not torch.allclose(layer(x), yab, atol=1e-3)  # the order matters


# ---- training ---------------------------------------------------------------------------------
def test_gradients_reach_only_the_adapter_and_the_layernorms(tmp_path):
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=3))
    adapters = peftlab.attach(model)
    adapters.add("houlsby", BC.houlsby())
    adapters.add("other", TINY_COMPACTER)
    adapters.activate("other", "houlsby")
    # Houlsby et al. also trained the LayerNorms; "LayerNorm" matches every BERT LayerNorm.
    trainable = adapters.train("houlsby", extras=("LayerNorm",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if any(p is t for t in trainable)}
    assert all(".adapters.houlsby." in n or ".LayerNorm." in n for n in names)
    assert len([n for n in names if ".LayerNorm." in n]) == 2 * (1 + 2 * 2)  # embeddings + 2/layer
    out = model(input_ids=torch.randint(0, 100, (2, 5)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    up = [p for n, p in model.named_parameters() if p.requires_grad and ".down." not in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in up)  # W_up = 0: down's is 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    adapters.save("houlsby", tmp_path / "houlsby")  # the LayerNorms are saved with the adapter
    with safe_open(str(tmp_path / "houlsby" / "adapter_model.safetensors"), "pt") as f:
        assert len([k for k in f.keys() if k.startswith("extra.") and ".LayerNorm." in k]) == 10


# ---- files, merging, detaching ----------------------------------------------------------------
def test_save_load_round_trip_saves_the_shared_rules_once(bert, tmp_path):
    inputs = tiny_inputs("bert")
    adapters = peftlab.attach(bert)
    adapters.add("houlsby", BC.houlsby())
    adapters.add("compacter", TINY_COMPACTER.replace(rank=2))
    randomize(adapters.parameters("houlsby") + adapters.parameters("compacter"))
    adapters.activate("houlsby", "compacter")
    adapted = output_of(bert, inputs)
    adapters.save("houlsby", tmp_path / "houlsby")
    adapters.save("compacter", tmp_path / "compacter")

    with safe_open(str(tmp_path / "compacter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert [k for k in keys if "rules" in k] == ["shared.rules"]
    assert len(keys) == 1 + 4 * 6  # the rules + 4 modules · (w_left, w_right, bias) · (down, up)
    saved = json.loads((tmp_path / "compacter" / "adapter_config.json").read_text())
    assert saved["config"] == {"placement": ["attn_out", "ffn_down"], "reduction": 8, "phm_dim": 4,
                               "rank": 2, "shared_rules": True, "activation": "gelu"}

    fresh = tiny_model("bert")
    fresh.load_state_dict(_base_state(bert))
    loaded = peftlab.attach(fresh)
    loaded.load(tmp_path / "houlsby")
    loaded.load(tmp_path / "compacter")
    loaded.activate("houlsby", "compacter")
    assert torch.equal(output_of(fresh, inputs), adapted)
    pieces = loaded["compacter"].pieces.values()
    assert all(p.shared is loaded["compacter"].shared for p in pieces)  # still one tensor
    assert torch.equal(loaded["compacter"].shared.rules, adapters["compacter"].shared.rules)


@pytest.mark.parametrize("config", [BC.pfeiffer(), TINY_COMPACTER])
def test_merge_is_refused_with_the_mergeable_methods_named(bert, config):
    adapters = peftlab.attach(bert)
    adapters.add("a", config)
    adapters.activate("a")
    with pytest.raises(peftlab.AdapterStateError,
                       # every mergeable method is named, in registry order
                       match=r"they add a nonlinear module\); mergeable methods: lora(, [\w+-]+)*$"):
        adapters.merge("a")


def test_detach_restores_the_original_state_dict(bert):
    original = _state(bert)
    adapters = peftlab.attach(bert)
    adapters.add("houlsby", BC.houlsby())
    adapters.add("compacter", TINY_COMPACTER)
    randomize(adapters.parameters("houlsby") + adapters.parameters("compacter"))
    adapters.activate("houlsby", "compacter")
    output_of(bert, tiny_inputs("bert"))
    peftlab.detach(bert)
    state = bert.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert not any(isinstance(m, AdaptedLayer) for m in bert.modules())


# ---- every family -----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [BC.houlsby(), TINY_COMPACTER], ids=["houlsby", "compacter"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_houlsby_and_compacter(family, config):
    model = tiny_model(family)
    adapters = peftlab.attach(model)
    adapters.add("a", config)
    blocks = 4 if family in ("t5", "mt5", "bart") else 2  # encoder-decoders: 2 + 2 blocks
    assert adapters.summary()["a"].sites == 2 * blocks  # attention output and FFN output
    # Off the init, so that every tensor (W_down too) has a gradient to check.
    randomize(adapters.parameters("a"))
    adapters.activate("a")
    params = adapters.train("a")
    output_of(model, tiny_inputs(family)).pow(2).mean().backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ---- configs and errors -----------------------------------------------------------------------
def test_presets_and_json_round_trip():
    assert BC.pfeiffer() == BC(placement=("ffn_down",), reduction=16, activation="relu")
    assert BC.houlsby() == BC() and BC.houlsby().targets == ("attn_out", "ffn_down")
    assert CC.plus_plus(phm_dim=8) == CC(placement=("ffn_down",), phm_dim=8)
    for config in [BC.pfeiffer(reduction=8), CC.plus_plus(rank=2, shared_rules=False)]:
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(peftlab.ConfigError, match="unknown field"):
        BC.from_dict({"targets": ["ffn_down"]})  # the field is called placement
    with pytest.raises(peftlab.ConfigError, match="activation"):
        BC(activation="softmax")
    with pytest.raises(peftlab.ConfigError, match="phm_dim"):
        CC(phm_dim=0)


@pytest.mark.parametrize("config, error, message", [
    (CC(reduction=8, phm_dim=3), peftlab.ConfigError, "32 output features are not divisible by phm_dim=3"),
    (CC(reduction=16), peftlab.ConfigError,
     r"bottleneck size 2 \(= 32 // reduction 16\) is not divisible by phm_dim=4; "
     "change reduction or phm_dim"),
    (BC(reduction=64), peftlab.ConfigError, "leaves no bottleneck"),
])
def test_sizes_that_do_not_fit_are_refused_before_the_model_changes(bert, config, error, message):
    adapters = peftlab.attach(bert)
    with pytest.raises(error, match=message):
        adapters.add("x", config)
    assert adapters.names == () and not any(isinstance(m, AdaptedLayer) for m in bert.modules())


def test_an_adapter_on_part_of_a_fused_projection_is_refused():
    model = tiny_model("gpt2")
    with pytest.raises(peftlab.TargetError, match="fused projection"):
        peftlab.attach(model).add("x", BC(placement=("query",)))


def test_compacter_piece_needs_its_shared_rules():
    site = find_sites(tiny_model("bert"), ("ffn_down",), peftlab.ROLE_MAPS["bert"])[0]
    with pytest.raises(peftlab.ConfigError,
                       match="^a Compacter with shared_rules=True needs the adapter's SharedRules$"):
        Compacter(TINY_COMPACTER, site, None)


def test_compacter_factors_start_glorot_uniform():
    """Each factor, taken as a matrix ``[rows, cols]``, is U(-b, b) with b = √(6 / (rows + cols))."""
    torch.manual_seed(0)
    phm = PHMLinear(32, 64, n=4, rank=4, own_rules=True)  # w_left [4, 8, 4], w_right [4, 4, 16]
    for w, bound in [(phm.w_left, (6 / 12) ** 0.5), (phm.w_right, (6 / 20) ** 0.5)]:
        assert w.max() <= bound and w.min() >= -bound
        assert w.max() > 0.95 * bound and w.min() < -0.95 * bound
    assert phm.rules.std() < 1e-3 and torch.equal(phm.bias, torch.zeros(64))


@pytest.mark.parametrize("config, field, good, bad", [
    (BC, "reduction", [1, 65536], [0, 65537]),
    (CC, "reduction", [1, 65536], [0, 65537]),
    (CC, "phm_dim", [1, 256], [0, 257]),
    (CC, "rank", [1, 65536], [0, 65537]),
])
def test_config_bounds_are_inclusive(config, field, good, bad):
    for value in good:
        assert getattr(config(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(peftlab.ConfigError, match=rf"{field} must be between 1 and \d+, got {value}"):
            config(**{field: value})


def test_bottleneck_starts_as_houlsby_and_may_be_one_wide():
    """W_down ~ N(0, 0.01²) truncated at ±0.02, W_up and both biases 0; a bottleneck of 1 is fine."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=10))
    adapters = peftlab.attach(model)
    adapters.add("b", BC.pfeiffer())  # 256 // 16 = 16: W_down has 4096 entries
    adapters.add("one", BC.pfeiffer(reduction=256))
    piece = model.encoder.layer[0].output.dense.adapters["b"]
    w = piece.down.weight
    assert w.abs().max() <= 0.02 and w.abs().max() > 0.019 and 0.0075 < w.std() < 0.0095
    assert not piece.up.weight.any() and not piece.up.bias.any() and not piece.down.bias.any()
    assert model.encoder.layer[0].output.dense.adapters["one"].down.out_features == 1
    with pytest.raises(peftlab.ConfigError, match=r"\(256 features\); use a reduction <= 256$"):
        adapters.add("zero", BC.pfeiffer(reduction=257))
