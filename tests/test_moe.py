"""Mixture-of-experts FFNs: LoRA and (IA)³ on the routed experts' 3-D parameters, per expert.

The reference for LoRA is HF peft's ``target_parameters`` (``lora.ParamWrapper``): same trainable
parameter counts, and the same logits both ways through its file format. Formulas are checked
against weights built by hand, expert by expert, from the adapter's tensors. Every comparison uses
randomised adapter tensors and first checks that the adapter changes the logits.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import warnings

import pytest
import torch
import transformers as T

import peftlab
from peftlab.errors import AdapterLoadError, AdapterStateError, ConfigError, TargetError
from peftlab.experts import AdaptedExperts
from peftlab.sites import find_sites

peft = pytest.importorskip("peft")

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, initializer_range=0.2)
CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                       **SMALL),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, num_experts=4,
                                          num_experts_per_tok=2, **SMALL),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2, head_dim=8, **SMALL),
    # transposed [E, in, out] experts with biases and interleaved gate/up
    "gpt_oss": lambda: T.GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                      head_dim=8, **SMALL),
    "olmoe": lambda: T.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                   pad_token_id=0, eos_token_id=1, **SMALL),
    "phimoe": lambda: T.PhimoeConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                     **SMALL),
    "granitemoe": lambda: T.GraniteMoeConfig(intermediate_size=16, num_local_experts=4,
                                             num_experts_per_tok=2, **SMALL),
    # first layer dense, then shared + routed experts
    "deepseek_v3": lambda: T.DeepseekV3Config(intermediate_size=24, moe_intermediate_size=16,
                                              n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                              topk_group=1,
                                              first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                              **{**SMALL, "num_key_value_heads": 4}),  # MLA: kv = heads
    "glm4_moe": lambda: T.Glm4MoeConfig(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4,
                                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                                        topk_group=1, head_dim=8, **SMALL),
    # two shared experts: 2·12 wide, not 32 (a square [32 -> 32] FFN's direction can't be inferred)
    "ernie4_5_moe": lambda: T.Ernie4_5_MoeConfig(intermediate_size=24, moe_intermediate_size=12,
                                                 moe_num_experts=4, moe_k=2, **SMALL),
}
PARITY = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
FFN = ("ffn_gate", "ffn_up", "ffn_down")
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*target_modules.*")
        yield


def tiny(family: str) -> torch.nn.Module:
    """A fresh copy of a tiny randomly initialised causal LM of ``family``."""
    if family not in _CACHE:
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
        with torch.no_grad():  # gpt-oss's expert biases start at zero: give (IA)³ something to scale
            for name, p in model.named_parameters():
                if name.endswith("_proj_bias"):
                    p.normal_(0, 0.2)
        _CACHE[family] = model
    return copy.deepcopy(_CACHE[family])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(params, around: float = 0.0, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(around + 0.3 * torch.randn(p.shape, generator=g))


def adapted(family: str, config, name: str = "x", around: float = 0.0):
    model = tiny(family)
    adapters = peftlab.attach(model)
    adapters.add(name, config)
    adapters.activate(name)
    randomize(adapters.parameters(name), around)
    return model, adapters


def experts_of(model, layer: int = 0):
    experts = model.model.layers[layer].mlp.experts
    return experts.base if isinstance(experts, AdaptedExperts) else experts


def ffn_linear(model: torch.nn.Module) -> list[str]:
    """The FFN Linear modules (shared experts, dense layers) as peft's target_modules."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and re.search(r"mlp\.(shared_experts?\.)?(gate|up|down)_proj$", n)]


def expert_names(model: torch.nn.Module, params=("gate_up_proj", "down_proj")) -> list[str]:
    return [f"{n}.{p}" for n, m in model.named_modules() if n.endswith(".experts") for p in params]


# ---- roles reach the routed experts; counts equal peft's ------------------------------------------
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_ffn_roles_reach_routed_experts_with_peft_counts(family):
    model = tiny(family)
    linear = ffn_linear(model)
    adapters = peftlab.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftlab.PartialTargetWarning)  # the roles cover everything
        adapters.add("x", peftlab.LoRAConfig(r=2, targets=FFN))
    sites = {s.module: s for s in adapters["x"].sites}
    experts = expert_names(model)
    assert experts and set(experts) <= set(sites)
    assert set(sites) == set(experts) | set(linear)
    assert all(sites[e].num_experts == 4 for e in experts)
    peft_model = peft.get_peft_model(tiny(family), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    # The Linear FFN layers are counted separately: on these model types peft rewrites Linear
    # gate/up/down targets onto the experts (see test_export_refuses_what_peft_would_retarget).
    linear_count = sum(2 * (s.in_features + s.out_features) for s in sites.values() if s.num_experts is None)
    assert adapters.summary()["x"].parameters == trainable + linear_count
    if family in PARITY:  # no rewriting: one peft config for the whole adapter
        peft_model = peft.get_peft_model(tiny(family), peft.LoraConfig(
            r=2, target_modules=linear, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        assert adapters.summary()["x"].parameters == peft_model.get_nb_trainable_parameters()[0]
    # each role alone: the half of gate_up_proj it owns, r per expert
    for role in ("query", "attn_out", *FFN):
        if adapters.role_map.get(role) is not None:
            adapters.add(role, peftlab.LoRAConfig(r=2, targets=(role,)))
            assert adapters[role].sites


def test_one_role_of_gate_up_proj_is_half_of_it():
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=("ffn_up",)))
    piece = adapters["x"].pieces["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(piece.lora_A.shape) == (4 * 2, 32) and tuple(piece.lora_B.shape) == (24, 2 * 4)
    delta = piece.delta_weight()
    assert delta[:, :24].abs().max() == 0 and delta[:, 24:].abs().max() > 0  # gate rows untouched


# ---- forward = the formula, computed by hand expert by expert -------------------------------------
def hand_lora(piece, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[E, out, in] update from the raw tensors: A_e = lora_A[e·r:(e+1)·r], B_e = lora_B[:, e::E]."""
    e, r = piece.num_experts, piece.rank
    out = []
    for i in range(e):
        a = piece.lora_A[i * r:(i + 1) * r]
        b = piece.lora_B[:, i::e]
        full = torch.zeros(piece.out_features, r) if rows is not None else None
        if full is not None:
            full[rows] = b
            b = full
        out.append(piece.scaling * b @ a)
    return torch.stack(out)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_lora_forward_equals_per_expert_formula(family):
    model, adapters = adapted(family, peftlab.LoRAConfig(r=3, alpha=5, targets=FFN))
    ours = logits(model)
    expected = tiny(family)
    with torch.no_grad():
        for layer in range(2):
            ex = experts_of(expected, layer)
            for param in ("gate_up_proj", "down_proj"):
                piece = adapters["x"].pieces[f"model.layers.{layer}.mlp.experts.{param}"]
                getattr(ex, param).add_(hand_lora(piece))
            if family == "qwen2_moe":
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    p = adapters["x"].pieces[f"model.layers.{layer}.mlp.shared_expert.{proj}"]
                    getattr(expected.model.layers[layer].mlp.shared_expert, proj).weight.add_(
                        p.scaling * p.lora_B @ p.lora_A)
    assert (ours - logits(tiny(family))).abs().max() > 1e-2
    assert (ours - logits(expected)).abs().max() <= TOL


def test_transposed_experts_interleaved_up_and_biases():
    """gpt-oss: experts stored [E, in, out], gate/up interleaved, a bias per expert. LoRA on the up
    rows only, (IA)³ on the up outputs (bias scaled too) and on the down projection's input."""
    model, adapters = adapted("gpt_oss", peftlab.LoRAConfig(r=2, targets=("ffn_up",)))
    adapters.add("s", peftlab.IA3Config(targets=("ffn_up", "ffn_down"), scale_input=("ffn_down",)))
    randomize(adapters.parameters("s"), around=1.0, seed=5)
    adapters.activate("x", "s")
    ours = logits(model)
    expected = tiny("gpt_oss")
    with torch.no_grad():
        for layer in range(2):
            ex, name = experts_of(expected, layer), f"model.layers.{layer}.mlp.experts"
            up_rows = torch.arange(1, 32, 2)
            lora = adapters["x"].pieces[f"{name}.gate_up_proj"]
            up = adapters["s"].pieces[f"{name}.gate_up_proj"]
            down = adapters["s"].pieces[f"{name}.down_proj"]
            l_out = torch.ones(4, 32)
            l_out[:, up_rows] = up.ia3_l
            w = ex.gate_up_proj.transpose(1, 2) * l_out[:, :, None] + hand_lora(lora, up_rows)  # [E, out, in]
            ex.gate_up_proj.copy_(w.transpose(1, 2))
            ex.gate_up_proj_bias.mul_(l_out)
            ex.down_proj.mul_(down.ia3_l[:, :, None])  # [E, in, out]: input rows scaled
    assert (ours - logits(tiny("gpt_oss"))).abs().max() > 1e-2
    assert (ours - logits(expected)).abs().max() <= TOL


def test_ia3_and_two_loras_compose_like_a_linear_layer():
    """W' = diag(l_out)·W·diag(l_in) + Σ s·B·A·diag(l_in), the same rule AdaptedLayer follows."""
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=("ffn_down",)))
    adapters.add("y", peftlab.LoRAConfig(r=1, alpha=3, targets=("ffn_down",)))
    adapters.add("s", peftlab.IA3Config(targets=("ffn_down",)))  # per expert, on the input (l_ff)
    randomize(adapters.parameters("y"), seed=4)
    randomize(adapters.parameters("s"), around=1.0, seed=5)
    adapters.activate("x", "s", "y")
    assert adapters.summary()["s"].parameters == 2 * 4 * 24  # E·ffn per layer
    expected = tiny("mixtral")
    with torch.no_grad():
        for layer in range(2):
            key = f"model.layers.{layer}.mlp.experts.down_proj"
            l_in = adapters["s"].pieces[key].ia3_l[:, None, :]
            ex = experts_of(expected, layer)
            delta = hand_lora(adapters["x"].pieces[key]) + hand_lora(adapters["y"].pieces[key])
            ex.down_proj.copy_((ex.down_proj + delta) * l_in)
    assert (logits(model) - logits(expected)).abs().max() <= TOL


# ---- HF peft's format, both ways ------------------------------------------------------------------
@pytest.mark.parametrize("family", PARITY)
@pytest.mark.parametrize("targets", [("query", *FFN), ("ffn_down",)])
def test_export_to_peft_gives_peft_the_same_logits(family, targets, tmp_path):
    model, adapters = adapted(family, peftlab.LoRAConfig(r=2, alpha=6, targets=targets))
    adapters.export_peft("x", tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [s.module for s in adapters["x"].sites if s.num_experts]
    peft_model = peft.PeftModel.from_pretrained(tiny(family), tmp_path / "p", is_trainable=True).eval()
    assert peft_model.get_nb_trainable_parameters()[0] == adapters.summary()["x"].parameters
    ours = logits(model)
    assert (ours - logits(tiny(family))).abs().max() > 1e-2
    assert (ours - logits(peft_model)).abs().max() <= TOL


@pytest.mark.parametrize("family", PARITY)
def test_import_from_peft_gives_peft_logits(family, tmp_path):
    base = tiny(family)
    peft_model = peft.get_peft_model(tiny(family), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", *ffn_linear(base)],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n])
    peft_model.save_pretrained(tmp_path / "p")
    adapters = peftlab.attach(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftlab.PartialTargetWarning)
        adapters.import_peft(tmp_path / "p", "x")
    adapters.activate("x")
    assert adapters.summary()["x"].parameters == peft_model.get_nb_trainable_parameters()[0]
    ours = logits(base)
    assert (ours - logits(tiny(family))).abs().max() > 1e-2
    assert (ours - logits(peft_model.eval())).abs().max() <= TOL


def test_import_one_expert_parameter_and_refusals(tmp_path):
    peft_model = peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["model.layers.1.mlp.experts.gate_up_proj"]))
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n])
    peft_model.save_pretrained(tmp_path / "p")
    model = tiny("mixtral")
    adapters = peftlab.attach(model)
    adapters.import_peft(tmp_path / "p", "x")
    adapters.activate("x")
    assert [s.module for s in adapters["x"].sites] == ["model.layers.1.mlp.experts.gate_up_proj"]
    assert (logits(model) - logits(peft_model.eval())).abs().max() <= TOL
    # target_parameters reaching something that is not an expert parameter
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(
        {**config, "target_parameters": [*config["target_parameters"], "self_attn.q_proj.weight"]}))
    with pytest.raises(AdapterLoadError, match="not routed experts"):
        peftlab.attach(tiny("mixtral")).import_peft(tmp_path / "p", "y")
    # a second expert parameter listed, so peft's nesting (and its keys) would differ
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(
        {**config, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}))
    with pytest.raises(AdapterLoadError):
        peftlab.attach(tiny("mixtral")).import_peft(tmp_path / "p", "y")


def test_export_refuses_what_peft_would_retarget(tmp_path):
    """peft rewrites the LoRA config of DeepSeek-V3-like models on load (transformers-4 names
    ``down_proj`` etc. become the routed experts' parameters), so a LoRA on the shared experts'
    Linear layers would land on the routed experts: refused. The experts alone export exactly."""
    model, adapters = adapted("deepseek_v3", peftlab.LoRAConfig(r=2, targets=FFN))
    with pytest.raises(ConfigError, match="peft cannot hold"):
        adapters.export_peft("x", tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.warns(peftlab.PartialTargetWarning):
        adapters.add("e", peftlab.LoRAConfig(r=2, targets=(r"mlp\.experts\.(gate_up|down)_proj$",)))
    randomize(adapters.parameters("e"))
    adapters.activate("e")
    adapters.export_peft("e", tmp_path / "e")
    peft_model = peft.PeftModel.from_pretrained(tiny("deepseek_v3"), tmp_path / "e").eval()
    assert (logits(model) - logits(tiny("deepseek_v3"))).abs().max() > 1e-2
    assert (logits(model) - logits(peft_model)).abs().max() <= TOL


def test_ia3_on_experts_refuses_export(tmp_path):
    _, adapters = adapted("mixtral", peftlab.IA3Config(targets=("ffn_down",)), around=1.0)
    with pytest.raises(ConfigError, match="target_parameters"):
        adapters.export_peft("x", tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ---- merge, files, training ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # gpt-oss: transposed, with biases
def test_merge_unmerge_round_trip(family):
    model, adapters = adapted(family, peftlab.LoRAConfig(r=2, targets=FFN))
    adapters.add("s", peftlab.IA3Config(targets=("ffn_down", "ffn_up"), scale_input=("ffn_down",)))
    randomize(adapters.parameters("s"), around=1.0, seed=5)
    original = {k: v.clone() for k, v in tiny(family).state_dict().items()}
    kept = {k: v for k, v in original.items() if ".0.mlp.experts." in k}
    for names in (("x",), ("s",)):
        adapters.activate(*names)
        before = logits(model)
        adapters.merge(names[0])
        ex = experts_of(model)
        assert not torch.equal(ex.down_proj, original["model.layers.0.mlp.experts.down_proj"])
        if names == ("s",) and family == "gpt_oss":  # (IA)³ on the up outputs scales their bias
            bias = original["model.layers.0.mlp.experts.gate_up_proj_bias"]
            assert not torch.equal(ex.gate_up_proj_bias, bias)
        assert (logits(model) - before).abs().max() <= TOL
        adapters.unmerge(names[0])
        assert (logits(model) - before).abs().max() <= TOL
        for key, value in kept.items():
            assert torch.allclose(getattr(ex, key.rsplit(".", 1)[1]), value, atol=1e-6), key
    # merge and unload: the plain model computes what the adapter did
    adapters.activate("x")
    before = logits(model)
    adapters.merge("x")
    peftlab.detach(model, keep_merged=True)
    assert not isinstance(model.model.layers[0].mlp.experts, AdaptedExperts)
    assert set(model.state_dict()) == set(original)
    assert (logits(model) - before).abs().max() <= TOL


def test_an_expert_parameter_unmerges_only_in_reverse_order():
    """The expert parameter's own guard (the adapter set checks the order first, so only a direct
    call reaches it) names what must come out first."""
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=("ffn_down",)))
    for name in ("y", "z"):
        adapters.add(name, peftlab.LoRAConfig(r=2, targets=("ffn_down",)))
        randomize(adapters.parameters(name), seed=len(name))
    adapters.activate("x", "y", "z")
    for name in ("x", "y", "z"):
        adapters.merge(name)
    layer = model.model.layers[0].mlp.experts.down_proj
    with pytest.raises(AdapterStateError,
                       match=r"^adapter 'y' must be unmerged after \['z'\] \(reverse order\)$"):
        layer.unmerge("y")
    with pytest.raises(AdapterStateError, match="^adapter 'w' is not merged here$"):
        layer.unmerge("w")
    assert layer.merged == ["x", "y", "z"]


def test_save_load_round_trip(tmp_path):
    model, adapters = adapted("qwen3_moe", peftlab.LoRAConfig(r=2, targets=("query", *FFN)))
    adapters.add("s", peftlab.IA3Config(targets=("ffn_down",)))
    randomize(adapters.parameters("s"), around=1.0)
    adapters.activate("x", "s")
    adapters.save("x", tmp_path / "x")
    adapters.save("s", tmp_path / "s")
    fresh = tiny("qwen3_moe")
    again = peftlab.attach(fresh)
    assert again.load(tmp_path / "x") == "x" and again.load(tmp_path / "s") == "s"
    again.activate("x", "s")
    assert (logits(fresh) - logits(tiny("qwen3_moe"))).abs().max() > 1e-2
    assert (logits(fresh) - logits(model)).abs().max() <= TOL
    # a file whose expert tensor has the wrong shape is refused before the model changes
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "x" / "adapter_model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj.lora_A"
    weights[key] = weights[key][:-1]
    save_file(weights, tmp_path / "x" / "adapter_model.safetensors")
    other = tiny("qwen3_moe")
    with pytest.raises(AdapterLoadError, match="shape"):
        peftlab.attach(other).load(tmp_path / "x")
    assert not isinstance(other.model.layers[0].mlp.experts, AdaptedExperts)


def test_backward_reaches_only_the_adapter():
    model, adapters = adapted("qwen2_moe", peftlab.LoRAConfig(r=2, targets=FFN))
    adapters.add("s", peftlab.IA3Config(targets=("ffn_down",)))
    adapters.activate("x", "s")
    model.train()
    params = adapters.train("x")
    model(input_ids=IDS, labels=IDS).loss.backward()
    own = {id(p) for p in params}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    # every expert's A and B get a gradient (the batch routes tokens to all 4 of them)
    for piece in adapters["x"].pieces.values():
        if getattr(piece, "num_experts", None):
            a, b, _ = piece.factors()
            assert (piece.lora_A.grad.view_as(a).abs().sum((1, 2)) > 0).all()
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)


def test_remove_and_detach_restore_the_original_modules():
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=("ffn_down",)))
    adapters.add("y", peftlab.LoRAConfig(r=2, targets=("ffn_gate",)))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, AdaptedExperts)
    adapters.remove("x")
    assert isinstance(model.model.layers[0].mlp.experts, AdaptedExperts)
    adapters.remove("y")
    assert model.model.layers[0].mlp.experts is experts.base
    adapters.add("z", peftlab.LoRAConfig(r=2, targets=FFN))
    peftlab.detach(model)
    assert set(model.state_dict()) == set(tiny("mixtral").state_dict())


# ---- reported and refused -------------------------------------------------------------------------
def test_partial_role_is_warned_and_shown_in_summary():
    model = tiny("qwen2_moe")
    adapters = peftlab.attach(model)
    with pytest.warns(peftlab.PartialTargetWarning, match=r"'ffn_down'.*experts\.down_proj"):
        adapters.add("shared_only", peftlab.LoRAConfig(targets=(r"shared_expert\.down_proj$",)))
    assert adapters.summary()["shared_only"].notes and "ffn_down" in str(adapters.summary())
    with pytest.warns(peftlab.PartialTargetWarning) as record:
        adapters.add("routed", peftlab.LoRAConfig(targets=(r"experts\.gate_up_proj$",)))
    assert {re.search(r"role '(\w+)'.*'(\S+)' while", str(w.message)).groups() for w in record} == {
        ("ffn_gate", "model.layers.0.mlp.shared_expert.gate_proj"),
        ("ffn_up", "model.layers.0.mlp.shared_expert.up_proj")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftlab.PartialTargetWarning)
        adapters.add("role", peftlab.LoRAConfig(targets=("ffn_down",)))
        adapters.add("both", peftlab.LoRAConfig(targets=("down_proj$",)))  # reaches shared and routed
        adapters.add("gate", peftlab.LoRAConfig(targets=("ffn_gate",)))  # its half of gate_up_proj
        adapters.add("layer0", peftlab.LoRAConfig(targets=(r"\.0\.mlp\.(shared_expert|experts)\.down",)))
    assert {s.module for s in adapters["both"].sites} == {s.module for s in adapters["role"].sites}
    assert not adapters.summary()["role"].notes


def test_methods_that_cannot_act_on_experts_refuse():
    adapters = peftlab.attach(tiny("mixtral"))
    with pytest.raises(TargetError, match="routed experts"):
        adapters.add("b", peftlab.BottleneckConfig(placement=("ffn_down",)))
    with pytest.raises(ConfigError, match="dropout"):
        adapters.add("d", peftlab.LoRAConfig(dropout=0.1, targets=("ffn_down",)))
    adapters.add("x", peftlab.LoRAConfig(targets=("query", "ffn_down")))
    with pytest.raises(TargetError, match="routed experts"):
        adapters.add_fusion("f", ["x"])
    assert adapters.names == ("x",)


def test_routing_works_when_experts_agree_and_refuses_otherwise():
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=("query", "ffn_down")))
    adapters.add("q", peftlab.LoRAConfig(r=2, targets=("query",)))
    randomize(adapters.parameters("q"), seed=7)
    adapters.activate("x", "q")
    both = logits(model)
    with adapters.route([("x", "q"), ("x", "q")]):
        assert (logits(model) - both).abs().max() <= TOL
    with adapters.route([("x", "q"), "x"]):  # differ on attention only
        routed = logits(model)
    adapters.activate("x")
    assert (routed[1] - logits(model)[1]).abs().max() <= TOL
    with pytest.raises(AdapterStateError) as refused:
        with adapters.route(["x", "q"]):
            pass
    assert str(refused.value) == (
        "this route gives examples different adapters on the routed experts MixtralExperts.down_proj "
        "(['x'] act there): the experts see a flat list of tokens, not examples, so per-example "
        "routing cannot reach them. Route only adapters that do not act on the experts differently "
        "per example, or run the groups as separate batches")


def test_threads_see_their_own_weights():
    """The forward never swaps the experts' parameters in place, so a thread running the base
    model (routed to no adapter) and one running the adapter do not disturb each other."""
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=FFN))
    plain, with_adapter = logits(tiny("mixtral")), logits(model)
    errors = []

    def run(route, expected):
        try:
            for _ in range(5):
                with adapters.route(route):
                    got = logits(model)
                assert (got - expected).abs().max() <= TOL
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=([None, None], plain)),
               threading.Thread(target=run, args=(["x", "x"], with_adapter))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_thread_that_never_routed_runs_the_active_adapter():
    model, adapters = adapted("mixtral", peftlab.LoRAConfig(r=2, targets=FFN))
    expected, got = logits(model), []
    thread = threading.Thread(target=lambda: got.append(logits(model)))
    thread.start()
    thread.join()
    assert got and (got[0] - expected).abs().max() <= TOL


# ---- inferred maps find the experts as the built-in maps do ---------------------------------------
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_inferred_map_selects_what_the_built_in_moe_map_selects(family):
    """Without the built-in map, inference from the structure gives every role of the built-in
    MoE map the same sites and, on fused gate_up_proj experts (halves, or gpt-oss's interleaved
    ones) and DeepSeek's latent-attention kv_b_proj, the same output features."""
    from peftlab.infer import infer_role_map
    from peftlab.roles import ROLE_MAPS

    model = tiny(family)
    built_in, inferred = ROLE_MAPS[family], infer_role_map(model)
    assert inferred.source == "inferred"
    compared = set()
    for role in built_in.roles:
        expected = find_sites(model, (role,), built_in)
        got = find_sites(model, (role,), inferred)
        assert [s.module for s in got] == [s.module for s in expected], role
        for a, b in zip(got, expected):
            assert a.num_experts == b.num_experts
            if b.out_index is None:
                assert a.out_index is None, (role, a.module)
            else:
                assert torch.equal(a.out_index, b.out_index), (role, a.module)
        compared.add(role)
    assert set(FFN) <= compared and "ffn_gate" in inferred.roles
    sites = find_sites(model, FFN, inferred)
    assert any(s.num_experts == 4 for s in sites)
    gate_up = [s for s in sites if s.module.endswith("experts.gate_up_proj")]
    assert gate_up and all(s.roles == ("ffn_gate", "ffn_up") for s in gate_up)
    if family == "gpt_oss":  # interleaved, as transformers' is_concatenated=False says
        assert gate_up[0].parts[0].index.tolist() == list(range(0, 32, 2))
    elif family != "deepseek_v3":
        out = gate_up[0].out_features
        assert gate_up[0].parts[0].index.tolist() == list(range(out // 2))


def test_layouts_are_read_through_the_wrapper_and_only_from_a_gated_experts_module():
    """Inferring roles on a model whose experts are already adapted finds the same gate and up
    rows; a module that marks no gate has no gate/up layout, whatever else it says."""
    from peftlab.experts import gate_up_layout
    from peftlab.infer import infer_role_map

    assert gate_up_layout(experts_of(tiny("gpt_oss"))) == "interleaved"
    model = tiny("mixtral")
    before = find_sites(model, ("ffn_gate", "ffn_up"), infer_role_map(model))
    peftlab.attach(model).add("x", peftlab.LoRAConfig(targets=FFN))
    wrapped = model.model.layers[0].mlp.experts
    assert isinstance(wrapped, AdaptedExperts) and gate_up_layout(wrapped) == "concatenated"
    after = find_sites(model, ("ffn_gate", "ffn_up"), infer_role_map(model))
    assert [(s.module, s.out_index.tolist()) for s in after] == [
        (s.module, s.out_index.tolist()) for s in before]

    class Ungated(torch.nn.Module):  # experts marks, but no gate: nothing to split
        is_transposed, has_gate, is_concatenated = False, False, True

        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Parameter(torch.zeros(2, 8, 4))

    assert gate_up_layout(Ungated()) is None


def test_experts_without_a_gate_up_layout_flag_are_targeted_whole_and_said_so():
    """An experts module that does not say how gate and up are laid out: ffn_up on the whole
    gate_up_proj with a note, no ffn_gate on it (never a guessed half)."""
    from peftlab.infer import infer_role_map

    model = tiny("mixtral")
    for m in model.modules():
        if "is_concatenated" in vars(m):
            del m.is_concatenated
    role_map = infer_role_map(model)
    assert "ffn_gate" not in role_map.roles
    sites = find_sites(model, ("ffn_up",), role_map)
    assert [s.module for s in sites] == expert_names(model, ("gate_up_proj",))
    assert all(s.out_index is None for s in sites)
    assert "does not say how gate and up are laid out" in role_map.get("ffn_up").note
    assert [s.module for s in find_sites(model, ("ffn_down",), role_map)] == expert_names(
        model, ("down_proj",))


def test_inferred_expert_roles_train_on_a_model_without_a_built_in_map():
    """FlexOLMo has no built-in map: LoRA() and IA3() by roles reach the routed experts."""
    from peftlab.roles import ROLE_MAPS

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.FlexOlmoConfig(
        intermediate_size=16, num_experts=4, num_experts_per_tok=2, pad_token_id=0, **SMALL))
    assert model.config.model_type not in ROLE_MAPS
    before = logits(model)
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.add("ia3", peftlab.IA3Config())
    assert adapters.role_map.source == "inferred"
    ia3 = {s.module: s for s in adapters["ia3"].sites}
    assert set(expert_names(model, ("down_proj",))) <= set(ia3)
    assert all(ia3[e].num_experts == 4 for e in expert_names(model, ("down_proj",)))
    adapters.activate("lora", "ia3")
    randomize(adapters.parameters("lora") + adapters.parameters("ia3"), around=0.0)
    for p in adapters.parameters("ia3"):
        p.data.add_(1.0)
    assert (logits(model) - before).abs().max() > 1e-3
    for name in ("lora", "ia3"):
        for p in adapters.parameters(name):
            p.requires_grad_(True)
    model(input_ids=IDS).logits.square().mean().backward()
    expert_grads = [adapters["ia3"].pieces[e].ia3_l.grad for e in expert_names(model, ("down_proj",))]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in expert_grads)
