"""LoHa and LoKr: the math, zero init, dropouts, merging, files, the command line, and parity with
HF peft (parameter counts, and equal logits both ways through peft's format).

Every comparison with peft uses randomised adapter weights, and first checks that the adapter
really changes the logits: a fresh adapter is a no-op, which would make any layout look right.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import randomize, tiny_inputs, tiny_model
from test_cli import _ok, _save_bert, _sentiment, _train
from test_interop_peft import (
    LLAMA_MODULES,
    LLAMA_ROLES,
    import_into_copy,
    logits,
    peft_saved,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import peftlab
from peftlab.errors import AdapterLoadError, ConfigError, TargetError
from peftlab.methods.lokr import factorization

peft = pytest.importorskip("peft")

TOL = 1e-5
LoHa, LoKr = peftlab.LoHaConfig, peftlab.LoKrConfig


def adapted(model: nn.Module, config, name: str = "a", scale: float = 0.3) -> peftlab.AdapterSet:
    """``model`` with adapter ``name`` of ``config`` attached, active and randomised."""
    adapters = peftlab.attach(model)
    adapters.add(name, config)
    adapters.activate(name)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.copy_(scale * torch.randn_like(p))
    return adapters


class TwoLinear(nn.Module):
    """Odd sizes, so that LoKr's factorisation is not symmetric: 35 = 5·7 in, 21 = 3·7 out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(35, 21)
        self.out = nn.Linear(21, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))


# ---- the math ----------------------------------------------------------------------------------
def test_loha_output_is_the_literal_formula():
    model = TwoLinear()
    adapters = adapted(model, LoHa(r=3, alpha=5, targets=(r"^proj$",)))
    layer, x = model.proj, torch.randn(2, 4, 35)
    p = layer.adapters["a"]
    delta = (p.hada_w1_a @ p.hada_w1_b) * (p.hada_w2_a @ p.hada_w2_b) * (5 / 3)
    expected = x @ (layer.base.weight + delta).t() + layer.base.bias
    assert adapters.summary()["a"].parameters == 2 * 3 * (35 + 21)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_loha_backward_recomputes_the_products_and_matches_plain_autograd():
    torch.manual_seed(0)
    factors = [torch.randn(6, 3, dtype=torch.double, requires_grad=True),
               torch.randn(3, 5, dtype=torch.double, requires_grad=True),
               torch.randn(6, 3, dtype=torch.double, requires_grad=True),
               torch.randn(3, 5, dtype=torch.double, requires_grad=True)]
    from peftlab.methods.loha import _Hadamard

    assert torch.autograd.gradcheck(lambda *f: _Hadamard.apply(*f, 0.7), factors)


@pytest.mark.parametrize("config", [
    LoKr(r=1, targets=(r"^proj$",)),  # W1 full [3, 5], W2 low-rank [7, 1]·[1, 7]
    LoKr(r=4, alpha=2, targets=(r"^proj$",)),  # both full: r ≥ max(7, 7)/2
    LoKr(r=1, decompose_both=True, targets=(r"^proj$",)),  # W1 full anyway: r ≥ max(3, 5)/2
    LoKr(r=2, decompose_factor=7, targets=(r"^proj$",)),  # (7, 3) x (7, 5): the factor comes first
], ids=["w2-low-rank", "both-full", "decompose-both", "factor-7"])
def test_lokr_output_is_the_kronecker_formula(config):
    """peftlab never builds ΔW in forward (vec(W1·X·W2ᵀ)); the result equals x·(s·W1 ⊗ W2)ᵀ."""
    model = TwoLinear()
    adapted(model, config)
    layer, x = model.proj, torch.randn(2, 4, 35)
    w1, w2 = layer.adapters["a"].factors()
    delta = torch.kron(w1, w2) * (config.alpha / config.r)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + delta).t() + layer.base.bias,
                               atol=1e-6, rtol=1e-5)


def test_lokr_structured_backward_matches_plain_autograd():
    from peftlab.methods.lokr import _KronLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 35, dtype=torch.double, requires_grad=True)
    w1 = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    w2 = torch.randn(7, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _KronLinear.apply(*t, 0.7), (x, w1, w2))
    plain = x @ (torch.kron(w1, w2) * 0.7).t()
    torch.testing.assert_close(_KronLinear.apply(x, w1, w2, 0.7), plain)


def test_lokr_factors_follow_peft_shapes_on_a_bert_layer():
    model = tiny_model("bert", seed=0)  # 32 -> 32 and 32 -> 64 / 64 -> 32
    adapters = peftlab.attach(model)
    adapters.add("a", LoKr(r=1, targets=("query", "ffn_up")))
    pieces = adapters["a"].pieces
    assert factorization(32) == (4, 8) and factorization(64) == (8, 8)
    query, up = (next(p for m, p in pieces.items() if m.endswith(end))
                 for end in ("0.attention.self.query", "0.intermediate.dense"))
    shapes = {n: tuple(t.shape) for n, t in query.named_parameters()}
    assert shapes == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    assert {n: tuple(t.shape) for n, t in up.named_parameters()} == {
        "lokr_w1": (8, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}


def test_factorization_is_peft_s_for_every_dimension_and_factor():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            expected = peft_factorization(dimension, factor)
            assert factorization(dimension, factor) == expected, (dimension, factor)


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("factor", [-1, 4])
def test_lokr_parameter_shapes_are_peft_s_across_ranks_and_sizes(decompose_both, factor):
    for out_f, in_f in ((32, 32), (64, 32), (96, 48), (20, 24)):
        for r in (1, 2, 3, 4, 6, 8, 16, 24):
            base = nn.Sequential()
            base.add_module("proj", nn.Linear(in_f, out_f))
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(
                r=r, target_modules=["proj"], decompose_both=decompose_both, decompose_factor=factor))
            expected = {n.rsplit(".", 2)[-2]: tuple(t.shape) for n, t in theirs.named_parameters()
                        if ".lokr_" in n}
            adapters = peftlab.attach(base, role_map=None)
            adapters.add("a", LoKr(r=r, targets=("^proj$",), decompose_both=decompose_both,
                                   decompose_factor=factor))
            piece = adapters["a"].pieces["proj"]
            assert {n: tuple(t.shape) for n, t in piece.named_parameters()} == expected, (out_f, in_f, r)


@pytest.mark.parametrize("config, zero", [
    (LoHa(r=16, targets=("^proj$",)), ("hada_w2_b",)),
    (LoKr(r=64, targets=("^proj$",), decompose_both=True, decompose_factor=4), ("lokr_w1", "lokr_w1_a")),
], ids=["loha", "lokr"])
def test_a_new_adapter_starts_like_peft_one_factor_zero_the_rest_kaiming_uniform(config, zero):
    """Kaiming-uniform with a = √5 draws from ±1/√fan_in: with thousands of draws the largest
    magnitude comes within 3% of that bound and never passes it."""
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(256, 256))
    adapters = peftlab.attach(base, role_map=None)
    adapters.add("a", config)
    for name, p in adapters["a"].pieces["proj"].named_parameters():
        if name in zero:
            assert not p.any(), name
            continue
        bound = 1 / p.shape[1] ** 0.5
        assert p.numel() >= 1024 and 0.97 * bound < float(p.abs().max()) <= bound, name


def test_the_largest_rank_is_allowed():
    assert LoHa(r=65536).r == LoKr(r=65536).r == 65536


@pytest.mark.parametrize("config", [LoHa(targets=("query", "value", "ffn_down")),
                                    LoKr(targets=("query", "value", "ffn_down")),
                                    LoKr(r=1, decompose_both=True, targets=("query", "value", "ffn_down"))],
                         ids=["loha", "lokr", "lokr-both"])
def test_a_new_adapter_leaves_the_model_unchanged_and_can_learn(config):
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    before = model(**inputs).last_hidden_state
    adapters = peftlab.attach(model)
    adapters.add("a", config)
    adapters.activate("a")
    adapters.train("a")
    out = model(**inputs).last_hidden_state
    assert torch.equal(out, before)
    out.square().sum().backward()
    # the zero factor gets a gradient, so training moves away from the no-op
    piece = adapters["a"].pieces["encoder.layer.0.attention.self.query"]
    grads = {n: p.grad.abs().max().item() for n, p in piece.named_parameters()}
    zero = "hada_w2_b" if config.method == "loha" else ("lokr_w1_a" if "lokr_w1_a" in grads else "lokr_w1")
    assert grads[zero] > 0


# ---- dropouts (training only, as peft) ------------------------------------------------------------
@pytest.mark.parametrize("config, rescale", [
    (LoHa(r=2, rank_dropout=0.5, targets=(r"^proj$",)), True),  # LoHa always rescales
    (LoKr(r=2, rank_dropout=0.5, targets=(r"^proj$",)), False),
    (LoKr(r=2, rank_dropout=0.5, rank_dropout_scale=True, targets=(r"^proj$",)), True),
], ids=["loha", "lokr", "lokr-scaled"])
def test_rank_dropout_drops_output_rows_of_the_update_in_training_only(config, rescale):
    model = TwoLinear()
    adapted(model, config)
    layer, x = model.proj, torch.randn(3, 35)
    piece = layer.adapters["a"]
    base = layer.base(x)
    delta = x @ piece.delta_weight().t()
    model.eval()
    torch.testing.assert_close(layer(x), base + delta)  # eval: the whole update, every time

    model.train()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    keep = (torch.rand(21) > 0.5).float()
    assert 0 < keep.sum() < 21
    factor = 1 / keep.mean() if rescale else 1.0
    torch.testing.assert_close(out, base + delta * keep * factor)


def test_module_dropout_skips_the_whole_update_in_training_only():
    model = TwoLinear()
    adapted(model, LoKr(r=2, module_dropout=0.999, targets=(r"^proj$",)))
    x = torch.randn(3, 35)
    model.train()
    torch.testing.assert_close(model.proj(x), model.proj.base(x))
    model.eval()
    assert (model.proj(x) - model.proj.base(x)).abs().max() > 1e-3


# ---- merging, files, routing --------------------------------------------------------------------
@pytest.mark.parametrize("config", [LoHa(r=4, alpha=8, targets=("query", "value", "ffn_up")),
                                    LoKr(r=2, decompose_both=True, targets=("query", "value", "ffn_up"))],
                         ids=["loha", "lokr"])
def test_merge_unmerge_save_load_round_trip(config, tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(**inputs).last_hidden_state
    adapters = adapted(model, config)
    out = model(**inputs).last_hidden_state
    assert (out - base).abs().max() > 1e-3

    adapters.save("a", tmp_path / "a")
    fresh = tiny_model("llama")
    loaded = peftlab.attach(fresh)
    loaded.activate(loaded.load(tmp_path / "a"))
    assert torch.equal(fresh(**inputs).last_hidden_state, out)

    adapters.merge("a")
    torch.testing.assert_close(model(**inputs).last_hidden_state, out, atol=1e-5, rtol=1e-5)
    adapters.unmerge("a")
    torch.testing.assert_close(model(**inputs).last_hidden_state, out, atol=1e-6, rtol=1e-6)
    peftlab.detach(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)


def test_gpt2_conv1d_modules_adapt_whole_and_merge_exactly():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    adapters = adapted(model, LoKr(r=2, targets=(r"c_attn$", r"mlp\.c_proj$")))
    out = model(**inputs).last_hidden_state
    adapters.merge("a")
    torch.testing.assert_close(model(**inputs).last_hidden_state, out, atol=1e-5, rtol=1e-5)


def test_routing_runs_each_example_with_its_own_adapter():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", batch=3)
    adapters = adapted(model, LoHa(r=2), name="loha")
    adapters.add("lokr", LoKr(r=2))
    randomize(adapters.parameters("lokr"), scale=0.3)
    singles = {}
    for name in ("loha", "lokr", None):
        adapters.activate(*([name] if name else []))
        singles[name] = model(**inputs).last_hidden_state
    with torch.no_grad(), adapters.route(["loha", None, "lokr"]):
        routed = model(**inputs).last_hidden_state
    for i, name in enumerate(["loha", None, "lokr"]):
        torch.testing.assert_close(routed[i], singles[name][i], atol=1e-6, rtol=1e-5)


# ---- parity with HF peft: parameter counts ------------------------------------------------------
def peft_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "hada_" in n or "lokr_" in n)


BERT_QV = ["query", "value"]
# (ours, peft's) with equal settings; targets: query/value on BERT, every projection on LLaMA
COUNT_CASES = {
    "loha-r2": (LoHa(r=2), peft.LoHaConfig, dict(r=2)),
    "loha-r8": (LoHa(), peft.LoHaConfig, dict()),
    "lokr": (LoKr(), peft.LoKrConfig, dict()),
    "lokr-r1": (LoKr(r=1), peft.LoKrConfig, dict(r=1)),
    "lokr-both": (LoKr(r=1, decompose_both=True), peft.LoKrConfig, dict(r=1, decompose_both=True)),
    "lokr-f4": (LoKr(r=2, decompose_factor=4), peft.LoKrConfig, dict(r=2, decompose_factor=4)),
    "lokr-f16-both": (LoKr(r=1, decompose_factor=16, decompose_both=True), peft.LoKrConfig,
                      dict(r=1, decompose_factor=16, decompose_both=True)),
}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("case", COUNT_CASES)
def test_parameter_counts_equal_peft(family, case):
    ours, theirs, kwargs = COUNT_CASES[case]
    model = tiny_bert() if family == "bert" else tiny_llama()
    roles, modules = (tuple(BERT_QV), BERT_QV) if family == "bert" else (LLAMA_ROLES, LLAMA_MODULES)
    theirs_model = peft.get_peft_model(copy.deepcopy(model), theirs(target_modules=modules, **kwargs))
    adapters = peftlab.attach(model)
    adapters.add("a", ours.replace(targets=roles))
    assert adapters.summary()["a"].parameters == peft_count(theirs_model)


def test_bert_base_sized_counts_equal_peft():
    """bert-base's 768 -> 768 query/value: LoHa r=8 is 2·8·1536 per matrix; LoKr splits 768 = 24·32."""
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                 intermediate_size=64, vocab_size=10))
    for ours, theirs, per_matrix in [(LoHa(), peft.LoHaConfig(target_modules=BERT_QV), 24_576),
                                     (LoKr(), peft.LoKrConfig(target_modules=BERT_QV), 1_088)]:
        counted = peft_count(peft.get_peft_model(copy.deepcopy(model), theirs))
        adapters = peftlab.attach(copy.deepcopy(model))
        adapters.add("a", ours)
        assert adapters.summary()["a"].parameters == counted == 2 * per_matrix


# ---- parity with HF peft: files, both ways ------------------------------------------------------
def randomize_peft(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn_like(p))


def assert_same_logits(theirs: nn.Module, ours: nn.Module, base: nn.Module) -> float:
    a, b = logits(ours), logits(theirs.eval())
    assert (a - logits(base)).abs().max() > 1e-3, "the adapter does not change the model"
    gap = (a - b).abs().max().item()
    assert gap <= TOL
    return gap


EXPORTS = [
    ("bert", LoHa(r=4, alpha=6, rank_dropout=0.1), ("classifier",)),
    ("bert", LoKr(r=2, alpha=3, module_dropout=0.1), ("classifier",)),
    ("bert", LoKr(r=1, decompose_both=True, decompose_factor=2, rank_dropout_scale=True), ()),
    ("llama", LoHa(r=2, alpha=8, targets=LLAMA_ROLES), ()),
    ("llama", LoKr(r=4, alpha=2.5, targets=LLAMA_ROLES), ()),
]


@pytest.mark.parametrize("family, config, extras", EXPORTS,
                         ids=["bert-loha", "bert-lokr", "bert-lokr-both", "llama-loha", "llama-lokr"])
def test_export_loads_in_peft_with_equal_logits(family, config, extras, tmp_path):
    base = tiny_bert() if family == "bert" else tiny_llama()
    model = copy.deepcopy(base)
    adapters = adapted(model, config)
    if extras:
        randomize(adapters.train("a", extras=extras), scale=0.3)
    model.eval()

    out = adapters.export_peft("a", tmp_path / "peft")
    written = json.loads((out / "adapter_config.json").read_text())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)

    assert written["peft_type"] == config.method.upper() and written["r"] == config.r
    assert "fan_in_fan_out" not in written  # peft's LyCORIS configs have no such field
    assert peft_count(loaded) == adapters.summary()["a"].parameters
    assert_same_logits(loaded, model, base)


@pytest.mark.parametrize("family, config", [
    ("bert", peft.LoHaConfig(r=4, alpha=16, target_modules=BERT_QV, task_type="SEQ_CLS")),
    ("bert", peft.LoKrConfig(r=2, alpha=4, target_modules=BERT_QV, task_type="SEQ_CLS")),
    ("llama", peft.LoHaConfig(r=2, target_modules=LLAMA_MODULES, rank_dropout=0.2, module_dropout=0.1)),
    ("llama", peft.LoKrConfig(r=1, decompose_both=True, target_modules=LLAMA_MODULES)),
    ("llama", peft.LoKrConfig(r=8, decompose_factor=4, target_modules=LLAMA_MODULES)),
], ids=["bert-loha", "bert-lokr", "llama-loha", "llama-lokr-both", "llama-lokr-f4"])
def test_peft_saved_adapter_imports_with_equal_logits(family, config, tmp_path):
    base = tiny_bert() if family == "bert" else tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "from_peft")

    model, adapters = import_into_copy(base, tmp_path / "from_peft")

    imported = adapters.config("imported")
    assert imported.method == config.peft_type.value.lower() and imported.r == config.r
    assert imported.rank_dropout == config.rank_dropout
    assert adapters.summary()["imported"].parameters == peft_count(theirs)
    assert_same_logits(theirs, model, base)
    if family == "bert":
        assert adapters["imported"].extras == ("classifier",)


def test_imported_adapter_merges_and_saves_in_peftlab_format(tmp_path):
    base = tiny_llama()
    theirs, path = peft_saved(base, peft.LoKrConfig(r=2, target_modules=LLAMA_MODULES), tmp_path)
    randomize_peft(theirs)
    theirs.save_pretrained(path)
    model, adapters = import_into_copy(base, path)
    out = logits(model)
    adapters.save("imported", tmp_path / "own")
    adapters.merge("imported")
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=1e-5)
    theirs.merge_adapter()
    torch.testing.assert_close(logits(theirs), out, atol=1e-5, rtol=1e-5)


# ---- refusals ------------------------------------------------------------------------------------
def test_roles_on_a_fused_projection_are_refused_with_the_way_out():
    model = tiny_gpt2()
    adapters = peftlab.attach(model)
    for config, piece in ((LoHa(), "LoHa"), (LoKr(), "LoKr")):  # query, value: slices of c_attn
        with pytest.raises(TargetError) as refused:
            adapters.add("a", config)
        assert str(refused.value) == (
            f"{piece} updates a whole weight matrix, but targets ['query', 'value'] select only some output "
            "features of the fused projection 'transformer.h.0.attn.c_attn'. Target the module by name to "
            "adapt all of it, e.g. targets=(r'c_attn$',), or use LoRA, which adapts each role's slice")
    adapters.add("a", LoHa(targets=(r"c_attn$",)))  # the whole module is fine
    assert len(adapters["a"].sites) == 2


def test_export_of_conv1d_modules_is_refused(tmp_path):
    model = tiny_gpt2()
    adapters = adapted(model, LoHa(targets=(r"c_attn$",)))
    with pytest.raises(ConfigError, match=re.escape(
            "loha adapter acts on transformers Conv1D modules (transformer.h.0.attn.c_attn, ...), "
            "which peft's LOHA cannot adapt (it takes nn.Linear only); keep it in peftlab's format "
            "(save), or merge it into the weights")):
        adapters.export_peft("a", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_routed_experts_are_refused():
    import transformers as T

    model = T.MixtralForCausalLM(T.MixtralConfig(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    adapters = peftlab.attach(model)
    with pytest.raises(TargetError, match="routed experts"):
        adapters.add("a", LoKr(targets=("ffn_down",)))


@pytest.mark.parametrize("config, message", [
    (dict(r=0), "r must be between"),
    (dict(r=65537), r"^r must be between 1 and 65536, got 65537$"),
    (dict(rank_dropout=1.0), "rank_dropout must be in"),
    (dict(module_dropout=-0.1), "module_dropout must be in"),
    (dict(decompose_factor=0), "decompose_factor must be -1"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        LoKr(**config)
    if "decompose_factor" not in config:
        with pytest.raises(ConfigError, match=message):
            LoHa(**config)


@pytest.mark.parametrize("patterns, pairs", [
    ({"rank_pattern": {"value": 2}}, "[(2, 4.0), (4, 4.0)]"),
    ({"alpha_pattern": {"value": 2}}, "[(4, 2.0), (4, 4.0)]"),
])
def test_peft_files_with_per_module_ranks_or_alphas_are_refused(tmp_path, patterns, pairs):
    base = tiny_bert()
    config = peft.LoHaConfig(r=4, alpha=4, target_modules=BERT_QV, **patterns)
    _, path = peft_saved(base, config, tmp_path)
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    with pytest.raises(AdapterLoadError) as refused:
        adapters.import_peft(path, name="x")
    assert str(refused.value).endswith(
        f"its modules have different (rank, alpha) pairs {pairs} through rank_pattern/alpha_pattern; "
        "a peftlab LOHA adapter has one rank and one alpha, so it cannot be imported as one adapter")
    assert "x" not in adapters


def test_patterns_that_give_every_module_the_same_pair_import_as_that_pair(tmp_path):
    base = tiny_bert()
    config = peft.LoHaConfig(r=4, alpha=4, target_modules=BERT_QV, rank_pattern={"query": 2, "value": 2},
                             alpha_pattern={"query": 3, "value": 3})
    theirs, path = peft_saved(base, config, tmp_path)
    adapters = peftlab.attach(copy.deepcopy(base))
    adapters.import_peft(path, name="x")
    assert (adapters["x"].config.r, adapters["x"].config.alpha) == (2, 3.0)


def test_peft_file_whose_shapes_disagree_with_its_config_is_refused(tmp_path):
    base = tiny_bert()
    _, path = peft_saved(base, peft.LoKrConfig(r=1, target_modules=BERT_QV), tmp_path)
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "r": 8}))  # W2 would be full
    with pytest.raises(AdapterLoadError):
        peftlab.attach(copy.deepcopy(base)).import_peft(path, name="x")


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris_cli")
    return {"root": root, "bert": _save_bert(root / "bert"), "data": _sentiment(root / "data")}


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_cli_trains_merges_and_exports(work, method):
    out = work["root"] / method
    _ok(_train(work, out, "--lr", "1e-2", "--set", "r=4", method=method))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["lr"] == 1e-2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == method and config["config"]["r"] == 4

    from test_cli import app, runner

    _ok(runner.invoke(app, ["merge", "--adapter", str(out), "--out", str(out / "merged")]))
    _ok(runner.invoke(app, ["export", "--adapter", str(out / "adapter"), "--format", "peft",
                            "--out", str(out / "peft")]))
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == method.upper()


def test_presets_are_listed_with_their_rates():
    from peftlab.train import default_lr, method_names

    assert {"loha", "lokr"} <= set(method_names())
    assert default_lr("loha") == default_lr("lokr") == 5e-4


@pytest.mark.parametrize("config", [LoHa(), LoKr(r=1, decompose_both=True)], ids=["loha", "lokr"])
def test_a_training_step_runs_under_autocast_and_in_bfloat16(config):
    for model, autocast in ((tiny_model("bert"), True), (tiny_model("bert").to(torch.bfloat16), False)):
        adapters = peftlab.attach(model)
        adapters.add("a", config)
        adapters.activate("a")
        trainable = adapters.train("a")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**tiny_inputs("bert")).last_hidden_state
        out.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == p.dtype for p in trainable)
        assert any(p.grad.abs().sum() > 0 for p in trainable)
