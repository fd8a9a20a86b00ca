"""Adapter arithmetic (``AdapterSet.combine``, ``peftlab combine``) checked against the real HF peft.

The sources are peft LoRA / (IA)³ adapters with random non-zero factors, saved by peft and imported
into peftlab; peft's ``add_weighted_adapter`` and peftlab's ``combine`` then run with the same
weights and options, and every module's update ``ΔW`` (and the logits) must agree. DARE's random
masks are made comparable by giving peft's ``random_pruning`` the same seeded generator.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_cli import _save_bert, _sentiment
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, num_labels=3, initializer_range=0.2)
    return BertForSequenceClassification(config).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomize(model: torch.nn.Module, key: str, around: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_(around + 0.3 * torch.randn(p.shape, generator=g))


# Three LoRA sources: two of rank 4 with different alphas, one of rank 2 (for cat and svd).
LORA = {
    "t1": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "t2": dict(r=4, lora_alpha=3, target_modules=["query", "value"]),
    "t3": dict(r=2, lora_alpha=5, target_modules=["query", "value"]),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(peft model, peftlab model, its AdapterSet, base) holding the same three LoRA adapters."""
    root = tmp_path_factory.mktemp("arith")
    base = tiny_bert()
    pm = None
    for name, kw in LORA.items():
        config = peft.LoraConfig(**kw)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    for i, name in enumerate(LORA):
        _randomize(pm, f"lora_A.{name}.", 0.0, 10 + i)
        _randomize(pm, f"lora_B.{name}.", 0.0, 20 + i)
    pm.save_pretrained(root)
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    for name in LORA:
        adapters.import_peft(root / name, name)
    return pm.eval(), model, adapters, base


def peft_deltas(pm, name: str) -> dict[str, torch.Tensor]:
    """Module -> peft's ``ΔW`` of adapter ``name`` as ``[out, in]``."""
    out = {}
    for module_name, m in pm.named_modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            delta = m.get_delta_weight(name)
            out[module_name.removeprefix("base_model.model.")] = delta.T if m.fan_in_fan_out else delta
    return out


def ours(adapters, name: str) -> dict[str, torch.Tensor]:
    return {m: p.delta_weight().detach() for m, p in adapters[name].pieces.items()}


def assert_same_deltas(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol=1e-6) -> None:
    assert mine.keys() == theirs.keys()
    scale = max(float(t.abs().max()) for t in theirs.values())
    assert scale > 0.1, "the combined update is (near) zero: the comparison would prove nothing"
    for m in theirs:
        assert torch.allclose(mine[m], theirs[m], rtol=0, atol=tol * scale), m


_COUNT = iter(range(10**6))


def both(pair, sources, weights, how, **options):
    """Combine in peft and in peftlab under one fresh name; returns (peftlab's, peft's) ΔW."""
    pm, _, adapters, _ = pair
    name = f"c{next(_COUNT)}"
    peft_options = {k: v for k, v in options.items() if k != "seed"}
    pm.add_weighted_adapter(list(sources), list(weights), name, combination_type=how, **peft_options)
    adapters.combine(name, sources, weights, how, **options)
    return ours(adapters, name), peft_deltas(pm, name), name


@pytest.mark.parametrize("how, options", [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties", {"density": 1.0}),
    ("ties_svd", {"density": 0.4}),
])
@pytest.mark.parametrize("weights", [(0.7, 0.5), (1.3, -0.6)])
def test_deterministic_ways_match_peft(pair, how, options, weights):
    mine, theirs, _ = both(pair, ["t1", "t2"], weights, how, **options)
    assert_same_deltas(mine, theirs)


@pytest.mark.parametrize("how, options", [("cat", {}), ("svd", {}), ("svd", {"svd_rank": 5}),
                                          ("dare_linear_svd", {"density": 0.6, "seed": 3})])
def test_different_ranks_combine_with_cat_and_svd(pair, how, options):
    _, _, adapters, _ = pair
    if "seed" in options:
        mine, theirs = _with_peft_draws(pair, ["t1", "t3"], [0.5, 0.8], how, options)
    else:
        mine, theirs, name = both(pair, ["t1", "t3"], [0.5, 0.8], how, **options)
        expected_rank = {"cat": 6, "svd": options.get("svd_rank", 4)}[how]
        assert adapters[name].config.r == expected_rank == adapters[name].config.alpha
    assert_same_deltas(mine, theirs)


def test_cat_is_the_exact_weighted_sum_and_linear_is_not(pair):
    _, _, adapters, _ = pair
    src = [ours(adapters, n) for n in ("t1", "t2")]
    exact = {m: 0.7 * src[0][m] - 0.4 * src[1][m] for m in src[0]}
    cat, _, _ = both(pair, ["t1", "t2"], [0.7, -0.4], "cat")
    linear, _, _ = both(pair, ["t1", "t2"], [0.7, -0.4], "linear")
    for m in exact:
        assert torch.allclose(cat[m], exact[m], atol=1e-6)
        assert (linear[m] - exact[m]).abs().max() > 1e-2  # peft's cross terms B_i·A_j


def test_one_source_is_combined_as_asked(pair):
    """peft turns any way into linear for one adapter; peftlab does what was asked: linear scales
    ΔW by w, and TIES with density 0.5 keeps half of each factor's entries."""
    _, _, adapters, _ = pair
    src = ours(adapters, "t1")
    scaled = ours(adapters, adapters.combine("one-lin", ["t1"], [0.3], "linear"))
    for m in src:
        assert torch.allclose(scaled[m], 0.3 * src[m], atol=1e-6)
    adapters.combine("one-ties", ["t1"], [1.0], "ties", density=0.5)
    for piece in adapters["one-ties"].pieces.values():
        assert (piece.lora_A != 0).float().mean() == 0.5 and (piece.lora_B != 0).float().mean() == 0.5


def test_combined_logits_match_peft(pair):
    pm, model, adapters, base = pair
    _, _, name = both(pair, ["t1", "t2", "t3"], [0.6, 0.3, 0.5], "svd", svd_rank=4)
    adapters.activate(name)
    pm.set_adapter(name)
    mine, theirs = logits(model), logits(pm)
    assert (mine - logits(base)).abs().max() > 1e-3
    assert (mine - theirs).abs().max() < 1e-5


# ---- DARE -------------------------------------------------------------------------------------
def _with_peft_draws(pair, sources, weights, how, options):
    """peft run with its Bernoulli masks drawn from ``Generator().manual_seed(seed)``, as ours."""
    generator = torch.Generator().manual_seed(options["seed"])
    original = merge_utils.random_pruning

    def seeded(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
        return tensor * mask / density if rescale else tensor * mask

    merge_utils.random_pruning = seeded
    try:
        mine, theirs, _ = both(pair, sources, weights, how, **options)
    finally:
        merge_utils.random_pruning = original
    return mine, theirs


@pytest.mark.parametrize("how, options", [
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("dare_ties_svd", {"density": 0.5, "svd_rank": 3}),
])
def test_dare_draws_the_same_masks_as_peft_given_a_seed(pair, how, options):
    mine, theirs = _with_peft_draws(pair, ["t1", "t2"], [0.9, -0.5], how, {**options, "seed": 11})
    assert_same_deltas(mine, theirs)


def test_dare_is_deterministic_per_seed_and_varies_across_seeds(pair):
    _, _, adapters, _ = pair
    a = ours(adapters, adapters.combine("dare-a", ["t1", "t2"], [1, 1], "dare_ties", density=0.5, seed=4))
    b = ours(adapters, adapters.combine("dare-b", ["t1", "t2"], [1, 1], "dare_ties", density=0.5, seed=4))
    c = ours(adapters, adapters.combine("dare-c", ["t1", "t2"], [1, 1], "dare_ties", density=0.5, seed=5))
    for m in a:
        assert torch.equal(a[m], b[m])
        assert not torch.equal(a[m], c[m])


def test_dare_linear_has_peft_linear_as_its_expectation(pair):
    """Drop-and-rescale keeps the expectation: the mean over seeds of dare_linear's A and B (drawn
    independently) is peft's linear A and B, so the mean ΔW converges to linear's ΔW; without the
    1/density rescale it would converge to density²·ΔW instead."""
    pm, _, adapters, _ = pair
    module = next(iter(adapters["t1"].pieces))
    sums_a = sums_b = 0
    n = 400
    for seed in range(n):
        name = adapters.combine(f"dl{seed}", ["t1", "t2"], [0.8, 0.4], "dare_linear", density=0.5, seed=seed)
        piece = adapters[name].pieces[module]
        sums_a, sums_b = sums_a + piece.lora_A.detach(), sums_b + piece.lora_B.detach()
        adapters.remove(name)
    mean_delta = (sums_b / n) @ (sums_a / n)
    pm.add_weighted_adapter(["t1", "t2"], [0.8, 0.4], "lin-ref", combination_type="linear")
    reference = peft_deltas(pm, "lin-ref")[module]
    error = (mean_delta - reference).abs().max() / reference.abs().max()
    assert error < 0.1
    assert (0.25 * reference - reference).abs().max() / reference.abs().max() > 0.5  # the test can fail


# ---- (IA)³ ------------------------------------------------------------------------------------
def test_ia3_linear_matches_peft(tmp_path):
    base = tiny_bert()
    config = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config), adapter_name="s1")
    pm.add_adapter("s2", peft.IA3Config(**config))
    _randomize(pm, "ia3_l.s1", 1.0, 1)
    _randomize(pm, "ia3_l.s2", 1.0, 2)
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.import_peft(tmp_path / "s1", "s1")
    adapters.import_peft(tmp_path / "s2", "s2")
    pm.add_weighted_adapter(["s1", "s2"], [0.6, 0.4], "mix")
    adapters.combine("mix", ["s1", "s2"], [0.6, 0.4])
    assert adapters["mix"].config == adapters["s1"].config
    theirs = {n.removeprefix("base_model.model."): m.ia3_l["mix"].detach().reshape(-1)
              for n, m in pm.named_modules() if hasattr(m, "ia3_l") and "mix" in m.ia3_l}
    mine = {m: p.ia3_l.detach() for m, p in adapters["mix"].pieces.items()}
    assert mine.keys() == theirs.keys()
    for m in mine:
        assert torch.allclose(mine[m], theirs[m], atol=1e-6)
    adapters.activate("mix")
    pm.set_adapter("mix")
    assert (logits(model) - logits(base)).abs().max() > 1e-3
    assert (logits(model) - logits(pm)).abs().max() < 1e-5
    with pytest.raises(peftlab.ConfigError, match=r"how='linear' only"):
        adapters.combine("bad", ["s1", "s2"], [0.5, 0.5], "ties", density=0.5)


# ---- fused projections (GPT-2 c_attn) -----------------------------------------------------------
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                      initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """peftlab LoRAs on query+value of c_attn (two roles of one fused module, different ranks) and
    the same adapters exported to peft and loaded into one peft model."""
    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    for i, (name, r) in enumerate((("g1", 4), ("g2", 4), ("g3", 2))):
        adapters.add(name, peftlab.LoRAConfig(r=r, alpha=2.0 * r + i, targets=("query", "value", "ffn_down")))
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for p in adapters.parameters(name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        adapters.export_peft(name, root / name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / "g1", adapter_name="g1")
    for name in ("g2", "g3"):
        pm.load_adapter(root / name, adapter_name=name)
    return pm.eval(), model, adapters, base


@pytest.mark.parametrize("how, options", [
    ("linear", {}), ("cat", {}), ("ties", {"density": 0.5}), ("ties", {"density": 0.2}),
    # peft's default svd rank is the largest rank in the exported files: parts·r = 8 of c_attn
    # (rank_pattern) for every module; peftlab's is the sources' r. Given explicitly, ffn_down
    # matches; c_attn is factorised per role (checked below).
    ("svd", {"svd_rank": 8}),
])
def test_fused_projection_matches_peft_on_the_exported_adapters(gpt2_pair, how, options):
    mine, theirs, name = both(gpt2_pair, ["g1", "g2"], [0.8, -0.5], how, **options)
    if how == "svd":
        mine = {m: t for m, t in mine.items() if "c_attn" not in m}
        theirs = {m: t for m, t in theirs.items() if "c_attn" not in m}
    assert_same_deltas(mine, theirs)
    adapters = gpt2_pair[2]
    assert [s.roles for s in adapters[name].sites] == [s.roles for s in adapters["g1"].sites]


def test_fused_projection_dare_matches_peft(gpt2_pair):
    mine, theirs = _with_peft_draws(gpt2_pair, ["g1", "g2"], [0.8, 0.5], "dare_ties",
                                    {"density": 0.5, "seed": 2})
    assert_same_deltas(mine, theirs)


def test_fused_projection_svd_factorises_each_role_exactly(gpt2_pair):
    """Per role at rank 6 = 4 + 2 the sum of a rank-4 and a rank-2 update is kept exactly; the
    untargeted key rows of c_attn stay zero."""
    _, _, adapters, _ = gpt2_pair
    name = adapters.combine("g-svd", ["g1", "g3"], [0.7, 0.9], "svd", svd_rank=6)
    src = [ours(adapters, n) for n in ("g1", "g3")]
    mine = ours(adapters, name)
    for m in mine:
        assert torch.allclose(mine[m], 0.7 * src[0][m] + 0.9 * src[1][m], atol=1e-5)
    c_attn = next(m for m in mine if "c_attn" in m)
    assert mine[c_attn][32:64].abs().max() == 0  # GPT-2's c_attn rows are q, k, v in thirds


# ---- the combined adapter is an ordinary adapter ------------------------------------------------
def test_combined_adapter_saves_loads_merges_and_exports(pair, tmp_path):
    _, model, adapters, base = pair
    name = adapters.combine("rt", ["t1", "t2"], [0.6, 0.6], "ties", density=0.5)
    assert name == "rt" and "rt" not in adapters.active  # inactive like a new adapter
    adapters.activate("rt")
    before = logits(model)
    assert (before - logits(base)).abs().max() > 1e-3
    adapters.save("rt", tmp_path / "rt")
    fresh = copy.deepcopy(base)
    loaded = peftlab.attach(fresh)
    assert loaded.load(tmp_path / "rt") == "rt"
    loaded.activate("rt")
    assert torch.allclose(logits(fresh), before, atol=1e-6)
    adapters.merge("rt")
    assert torch.allclose(logits(model), before, atol=1e-5)
    adapters.unmerge("rt")
    out = adapters.export_peft("rt", tmp_path / "peft")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    assert (logits(in_peft.eval()) - before).abs().max() < 1e-5
    adapters.activate()


def test_rslora_sources_keep_scale_one_where_peft_scales_by_sqrt_r(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    for i, name in enumerate(("a", "b")):
        adapters.add(name, peftlab.LoRAConfig(r=4, alpha=8, rslora=True))
        _randomize(model, f"adapters.{name}.lora", 0.0, 40 + i)
        adapters.export_peft(name, tmp_path / name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "cat", combination_type="cat")
    adapters.combine("cat", ["a", "b"], [0.5, 0.5], "cat")
    assert adapters["cat"].config.rslora is False
    src = [ours(adapters, n) for n in ("a", "b")]
    mine, theirs = ours(adapters, "cat"), peft_deltas(pm, "cat")
    for m in mine:
        assert torch.allclose(mine[m], 0.5 * src[0][m] + 0.5 * src[1][m], atol=1e-6)
        assert torch.allclose(theirs[m], math.sqrt(8) * mine[m], atol=1e-5)  # peft: alpha=r, rsLoRA


# ---- refusals: clear errors, the model untouched -------------------------------------------------
@pytest.fixture
def mixed(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    adapters.add("l4", peftlab.LoRAConfig(r=4))
    adapters.add("l4b", peftlab.LoRAConfig(r=4))
    adapters.add("l2", peftlab.LoRAConfig(r=2))
    adapters.add("ffn", peftlab.LoRAConfig(r=4, targets=("ffn_down",)))
    adapters.add("ia3", peftlab.IA3Config())
    adapters.add("pf", peftlab.BottleneckConfig.pfeiffer())
    adapters.add("merged", peftlab.LoRAConfig(r=4))
    adapters.activate("merged")
    adapters.merge("merged")
    return adapters


@pytest.mark.parametrize("sources, weights, how, options, error, message", [
    (["l4", "l4b"], [1, 1], "average", {}, peftlab.ConfigError, "not a way"),
    (["l4", "l4b"], [1], "linear", {}, peftlab.ConfigError, "1 weight"),
    (["l4", "l4b"], "11", "linear", {}, peftlab.ConfigError, "list of numbers"),
    (["l4", "l4b"], [1, float("nan")], "linear", {}, peftlab.ConfigError, "finite"),
    (["l4", "l4b"], [1, True], "linear", {}, peftlab.ConfigError, "finite"),
    (["l4", "l4b"], [1, 1], "ties", {}, peftlab.ConfigError, "needs density"),
    (["l4", "l4b"], [1, 1], "dare_ties", {"density": 0.0}, peftlab.ConfigError, "needs density"),
    (["l4", "l4b"], [1, 1], "ties", {"density": 1.5}, peftlab.ConfigError, "needs density"),
    (["l4", "l4b"], [1, 1], "linear", {"density": 0.5}, peftlab.ConfigError, "does not apply"),
    (["l4", "l4b"], [1, 1], "ties", {"density": 0.5, "seed": 1}, peftlab.ConfigError, "seed does not"),
    (["l4", "l4b"], [1, 1], "ties", {"density": 0.5, "majority_sign_method": "mean"},
     peftlab.ConfigError, "majority_sign_method"),
    (["l4", "l4b"], [1, 1], "svd", {"svd_rank": 0}, peftlab.ConfigError, "svd_rank"),
    (["l4", "l4b"], [1, 1], "svd", {"svd_clamp": 2.0}, peftlab.ConfigError, "svd_clamp"),
    (["l4", "l2"], [1, 1], "ties", {"density": 0.5}, peftlab.ConfigError, "ranks must be equal"),
    (["l4", "ffn"], [1, 1], "cat", {}, peftlab.ConfigError, "different sites"),
    (["l4", "ia3"], [1, 1], "linear", {}, peftlab.ConfigError, "mix methods"),
    (["l4", "pf"], [1, 1], "linear", {}, peftlab.ConfigError, "only LoRA and"),
    (["l4", "merged"], [1, 1], "linear", {}, peftlab.AdapterStateError, "merged"),
    (["l4", "l4"], [1, 1], "linear", {}, peftlab.AdapterNameError, "twice"),
    (["l4", "nope"], [1, 1], "linear", {}, peftlab.AdapterNameError, "no adapter named"),
    ([], [], "linear", {}, peftlab.ConfigError, "non-empty"),
    ("l4", [1], "linear", {}, peftlab.ConfigError, "list of adapter names"),
])
def test_bad_requests_are_refused_before_the_model_changes(mixed, sources, weights, how, options, error,
                                                           message):
    adapters = mixed
    names, layers = adapters.names, [n for n, _ in adapters.layers()]
    with pytest.raises(error, match=message):
        adapters.combine("new", sources, weights, how, **options)
    assert adapters.names == names and [n for n, _ in adapters.layers()] == layers


def test_new_name_is_checked(mixed):
    with pytest.raises(peftlab.AdapterNameError, match="exists"):
        mixed.combine("l2", ["l4", "l4b"], [1, 1])
    with pytest.raises(peftlab.AdapterNameError, match="invalid"):
        mixed.combine("a/b", ["l4", "l4b"], [1, 1])
    with pytest.raises(peftlab.AdapterNameError, match="invalid adapter name 'cat-0.5'"):
        mixed.combine("cat-0.5", ["l4", "l4b"], [1, 1], "cat")
    assert "cat-0.5" not in mixed


def test_lora_on_routed_experts_is_refused():
    import transformers as T

    moe = T.AutoModelForCausalLM.from_config(T.Qwen2MoeConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, vocab_size=100))
    adapters = peftlab.attach(moe)
    for name in ("e1", "e2"):
        adapters.add(name, peftlab.LoRAConfig(r=2, targets=("ffn_down",)))
    with pytest.raises(peftlab.ConfigError, match="routed experts"):
        adapters.combine("e", ["e1", "e2"], [0.5, 0.5], "cat")
    assert adapters.names == ("e1", "e2")


# ---- the command line ---------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, data = _save_bert(root / "bert"), _sentiment(root / "data")
    for name, lr in (("one", "5e-3"), ("two", "2e-3")):
        result = runner.invoke(app, ["train", "--model", str(model), "--data", str(data), "--out",
                                     str(root / name), "--epochs", "1", "--batch-size", "8",
                                     "--max-length", "16", "--lr", lr, "--quiet"])
        assert result.exit_code == 0, result.output
    return root, model


def test_cli_combine_writes_a_loadable_adapter_with_the_chosen_head(cli_runs):
    root, model = cli_runs
    out = root / "combined"
    result = runner.invoke(app, ["combine", "--model", str(model), "--adapter", str(root / "one"),
                                 "--adapter", str(root / "two" / "adapter"), "--weights", "0.5,0.5",
                                 "--how", "ties", "--density", "0.5", "--head-from", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["name"] == "combined"
    assert config["extras"] == json.loads(
        (root / "two" / "adapter" / "adapter_config.json").read_text())["extras"]
    assert "ties" in (out / "README.md").read_text()
    # the result is an ordinary adapter: inspect and eval read it
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0
    evaluated = runner.invoke(app, ["eval", "--model", str(model), "--adapter", str(out),
                                    "--data", str(root / "data")])
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.parametrize("extra, message", [
    (["--weights", "0.5", "--how", "linear"], "1 weight"),
    (["--weights", "a,b", "--how", "linear"], "comma-separated numbers"),
    (["--weights", "0.5,0.5", "--how", "ties"], "needs density"),
    (["--weights", "0.5,0.5", "--how", "mean"], "not a way"),
    (["--weights", "0.5,0.5", "--how", "linear"], "different task heads"),
    (["--weights", "0.5,0.5", "--how", "linear", "--head-from", "3"], "head-from"),
])
def test_cli_combine_bad_input_exits_2_and_writes_nothing(cli_runs, extra, message):
    root, model = cli_runs
    out = root / "never"
    result = runner.invoke(app, ["combine", "--model", str(model), "--adapter", str(root / "one"),
                                 "--adapter", str(root / "two"), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_cli_combine_refuses_a_missing_adapter(cli_runs):
    root, model = cli_runs
    result = runner.invoke(app, ["combine", "--model", str(model), "--adapter", str(root / "one"),
                                 "--adapter", str(Path(root / "missing")), "--weights", "1,1",
                                 "--out", str(root / "never2")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (root / "never2").exists()
