"""Roles in a transformer block and where each architecture family keeps them.

Methods speak only about roles (``query``, ``ffn_down``, ...). A :class:`RoleMap` says, for one
architecture family, which modules play each role: a regular expression searched in the full module
name, and for fused projections (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``) which output features
belong to the role. Adding an architecture is adding a map to :data:`ROLE_MAPS`.

In mixture-of-experts models a role is also played by the routed experts' 3-D parameters (see
:mod:`peftlab.experts`), named ``<experts module>.<parameter>`` like ``mlp.experts.down_proj``;
a role's pattern is searched in those names too. ``experts_select`` picks the role's rows of each
expert's ``[out, in]`` matrix in a fused ``gate_up_proj``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from peftlab.errors import TargetError

ROLES: tuple[str, ...] = (
    "query", "key", "value", "attn_out", "ffn_up", "ffn_gate", "ffn_down",
    "cross_query", "cross_key", "cross_value", "cross_attn_out",
)

# Output-feature selector for a fused projection: (config, out_features) -> indices.
Selector = Callable[[Any, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Role:
    """Where one role lives: ``pattern`` is searched in module names (and in the names of 3-D
    expert parameters); ``select`` picks the role's output features when a matched Linear module is
    fused, ``experts_select`` the role's output rows of each expert when a matched expert parameter
    is (``None``: all of them). ``note`` is shown to users (summaries, ``peftlab inspect-model``).
    ``whole_fused`` marks a role that shares a whole fused module with other roles because its
    slice is unknown: targets naming several such roles act once on the whole module."""

    pattern: str
    select: Selector | None = None
    experts_select: Selector | None = None
    note: str | None = None
    whole_fused: bool = False


@dataclasses.dataclass(frozen=True)
class RoleMap:
    """Role name -> :class:`Role` (or a bare pattern string) for one architecture family.
    ``source`` says where the map came from (``"built-in"``, ``"inferred"``, ``"given"``);
    ``notes`` are remarks on the whole map (what inference left out and why)."""

    roles: Mapping[str, Role | str]
    source: str = "given"
    notes: tuple[str, ...] = ()

    def get(self, role: str) -> Role | None:
        r = self.roles.get(role)
        return Role(r) if isinstance(r, str) else r


def even_part(i: int, n: int) -> Selector:
    """The ``i``-th of ``n`` equal contiguous blocks of the output (GPT-2 ``c_attn``: q, k, v)."""

    def select(config: Any, out: int) -> torch.Tensor:
        size = out // n
        return torch.arange(i * size, (i + 1) * size)

    return select


def interleaved_part(i: int, n: int) -> Selector:
    """Every ``n``-th output from ``i`` on (gpt-oss's expert ``gate_up_proj``: gate, up, gate, ...)."""

    def select(config: Any, out: int) -> torch.Tensor:
        return torch.arange(i, out, n)

    return select


def gqa_part(which: str) -> Selector:
    """q, k or v block of a fused ``[q | k | v]`` projection with grouped-query heads (Phi-3)."""

    def select(config: Any, out: int) -> torch.Tensor:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // heads
        sizes = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
        start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[which]
        return torch.arange(start, start + sizes[which])

    return select


def per_head_part(i: int) -> Selector:
    """Slice ``i`` of a per-head interleaved ``[heads, 3, head_dim]`` projection (GPT-NeoX)."""

    def select(config: Any, out: int) -> torch.Tensor:
        heads = config.num_attention_heads
        return torch.arange(out).view(heads, 3, out // (3 * heads))[:, i, :].reshape(-1)

    return select


def latent_kv_part(which: str) -> Selector:
    """``key`` or ``value`` features of the ``kv_b_proj`` of DeepSeek's multi-head latent attention,
    whose output is split per head as ``[qk_nope_head_dim | v_head_dim]`` (``expand_kv`` in
    transformers' modeling_deepseek_v3). ``key`` is the non-rotary part of each head's key."""

    def select(config: Any, out: int) -> torch.Tensor:
        heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
        if out != heads * (nope + v):
            raise TargetError(f"kv_b_proj has {out} output features, not heads·(qk_nope_head_dim + "
                              f"v_head_dim) = {heads}·({nope} + {v}) as the config says")
        grid = torch.arange(out).view(heads, nope + v)
        return (grid[:, :nope] if which == "key" else grid[:, nope:]).reshape(-1)

    return select


_N = r"\.\d+\."  # a numbered block in the module path


def _bert_like(q: str, k: str, v: str) -> RoleMap:
    return RoleMap({
        "query": rf"{_N}attention\.self\.{q}$",
        "key": rf"{_N}attention\.self\.{k}$",
        "value": rf"{_N}attention\.self\.{v}$",
        "attn_out": rf"{_N}attention\.output\.dense$",
        "ffn_up": rf"{_N}intermediate\.dense$",
        "ffn_down": rf"{_N}output\.dense$",
        "cross_query": rf"{_N}crossattention\.self\.{q}$",
        "cross_key": rf"{_N}crossattention\.self\.{k}$",
        "cross_value": rf"{_N}crossattention\.self\.{v}$",
        "cross_attn_out": rf"{_N}crossattention\.output\.dense$",
    })


def _proj_style(attn: str, cross: str | None, out: str, up: str, down: str,
                gate: str | None = None) -> RoleMap:
    roles: dict[str, Role | str] = {
        "query": rf"{_N}{attn}\.q_proj$",
        "key": rf"{_N}{attn}\.k_proj$",
        "value": rf"{_N}{attn}\.v_proj$",
        "attn_out": rf"{_N}{attn}\.{out}$",
        "ffn_up": rf"{_N}{up}$",
        "ffn_down": rf"{_N}{down}$",
    }
    if gate:
        roles["ffn_gate"] = rf"{_N}{gate}$"
    if cross:
        roles.update({
            "cross_query": rf"{_N}{cross}\.q_proj$",
            "cross_key": rf"{_N}{cross}\.k_proj$",
            "cross_value": rf"{_N}{cross}\.v_proj$",
            "cross_attn_out": rf"{_N}{cross}\.{out}$",
        })
    return RoleMap(roles)


BERT = _bert_like("query", "key", "value")
DEBERTA_V2 = _bert_like("query_proj", "key_proj", "value_proj")
DISTILBERT = RoleMap({
    "query": rf"{_N}attention\.q_lin$", "key": rf"{_N}attention\.k_lin$",
    "value": rf"{_N}attention\.v_lin$", "attn_out": rf"{_N}attention\.out_lin$",
    "ffn_up": rf"{_N}ffn\.lin1$", "ffn_down": rf"{_N}ffn\.lin2$",
})
GPT2 = RoleMap({
    "query": Role(rf"{_N}attn\.c_attn$", even_part(0, 3)),
    "key": Role(rf"{_N}attn\.c_attn$", even_part(1, 3)),
    "value": Role(rf"{_N}attn\.c_attn$", even_part(2, 3)),
    "attn_out": rf"{_N}attn\.c_proj$",
    "ffn_up": rf"{_N}mlp\.c_fc$",
    "ffn_down": rf"{_N}mlp\.c_proj$",
})
LLAMA = _proj_style("self_attn", None, "o_proj", r"mlp\.up_proj", r"mlp\.down_proj", r"mlp\.gate_proj")
PHI3 = RoleMap({
    "query": Role(rf"{_N}self_attn\.qkv_proj$", gqa_part("q")),
    "key": Role(rf"{_N}self_attn\.qkv_proj$", gqa_part("k")),
    "value": Role(rf"{_N}self_attn\.qkv_proj$", gqa_part("v")),
    "attn_out": rf"{_N}self_attn\.o_proj$",
    "ffn_gate": Role(rf"{_N}mlp\.gate_up_proj$", even_part(0, 2)),
    "ffn_up": Role(rf"{_N}mlp\.gate_up_proj$", even_part(1, 2)),
    "ffn_down": rf"{_N}mlp\.down_proj$",
})
T5 = RoleMap({
    "query": rf"{_N}SelfAttention\.q$", "key": rf"{_N}SelfAttention\.k$",
    "value": rf"{_N}SelfAttention\.v$", "attn_out": rf"{_N}SelfAttention\.o$",
    "cross_query": rf"{_N}EncDecAttention\.q$", "cross_key": rf"{_N}EncDecAttention\.k$",
    "cross_value": rf"{_N}EncDecAttention\.v$", "cross_attn_out": rf"{_N}EncDecAttention\.o$",
    # T5 v1.0 has one ``wi``; gated variants (mT5, T5 v1.1) have ``wi_0`` (gate) and ``wi_1`` (up).
    "ffn_up": r"\.DenseReluDense\.wi(_1)?$",
    "ffn_gate": r"\.DenseReluDense\.wi_0$",
    "ffn_down": r"\.DenseReluDense\.wo$",
})
BART = _proj_style("self_attn", "encoder_attn", "out_proj", "fc1", "fc2")
OPT = _proj_style("self_attn", None, "out_proj", "fc1", "fc2")
GPT_NEOX = RoleMap({
    "query": Role(rf"{_N}attention\.query_key_value$", per_head_part(0)),
    "key": Role(rf"{_N}attention\.query_key_value$", per_head_part(1)),
    "value": Role(rf"{_N}attention\.query_key_value$", per_head_part(2)),
    "attn_out": rf"{_N}attention\.dense$",
    "ffn_up": rf"{_N}mlp\.dense_h_to_4h$",
    "ffn_down": rf"{_N}mlp\.dense_4h_to_h$",
})
# transformers 5 renamed ViT's modules; the alternatives cover 4.57 as well.
VIT = RoleMap({
    "query": rf"{_N}attention\.(q_proj|attention\.query)$",
    "key": rf"{_N}attention\.(k_proj|attention\.key)$",
    "value": rf"{_N}attention\.(v_proj|attention\.value)$",
    "attn_out": rf"{_N}attention\.(o_proj|output\.dense)$",
    "ffn_up": rf"{_N}(mlp\.fc1|intermediate\.dense)$",
    "ffn_down": rf"{_N}(mlp\.fc2|output\.dense)$",
})



def _moe(mlp: str, shared: str | None, interleaved: bool = False, attention: bool = True) -> RoleMap:
    """A LLaMA-style block whose FFN ``mlp`` holds routed experts (``mlp.experts.gate_up_proj`` with
    gate then up, or interleaved, and ``mlp.experts.down_proj``), optionally a shared expert of
    Linear layers ``mlp.<shared>.{gate,up,down}_proj``, and in dense layers of the same model
    (``first_k_dense_replace``, ``mlp_only_layers``) a plain ``mlp.{gate,up,down}_proj``. Each FFN
    role covers all of them. ``attention``: whether q/k/v are separate ``self_attn`` projections
    (DeepSeek's latent attention has not: see :data:`LATENT_ATTENTION`)."""
    part = interleaved_part if interleaved else even_part
    linear = rf"{mlp}\.(?:{shared}\.)?" if shared else rf"{mlp}\."

    def ffn(proj: str, expert_param: str, select: Selector | None) -> Role:
        return Role(rf"{_N}(?:{linear}{proj}|{mlp}\.experts\.{expert_param})$", experts_select=select)

    roles: dict[str, Role | str] = {
        "attn_out": rf"{_N}self_attn\.o_proj$",
        "ffn_gate": ffn("gate_proj", "gate_up_proj", part(0, 2)),
        "ffn_up": ffn("up_proj", "gate_up_proj", part(1, 2)),
        "ffn_down": ffn("down_proj", "down_proj", None),
    }
    if attention:
        roles.update({r: rf"{_N}self_attn\.{p}_proj$" for r, p in
                      (("query", "q"), ("key", "k"), ("value", "v"))})
    return RoleMap(roles)


MIXTRAL = _moe("mlp", None)  # also OLMoE, PhiMoE, Qwen3-MoE (and its dense mlp_only_layers)
QWEN2_MOE = _moe("mlp", "shared_expert")
# Multi-head latent attention: queries from q_b_proj (q_proj without q_lora_rank); keys and values
# from one kv_b_proj, per head [non-rotary key | value].
LATENT_ATTENTION: dict[str, Role | str] = {
    "query": rf"{_N}self_attn\.q_(?:b_)?proj$",
    "key": Role(rf"{_N}self_attn\.kv_b_proj$", latent_kv_part("key"),
                note="key: the non-rotary part of each head's key only (kv_b_proj); the rotary part "
                     "is one head shared by all, from kv_a_proj_with_mqa, and gets no role"),
    "value": Role(rf"{_N}self_attn\.kv_b_proj$", latent_kv_part("value")),
}
DEEPSEEK_V3 = RoleMap({**_moe("mlp", "shared_experts", attention=False).roles, **LATENT_ATTENTION})
GLM4_MOE = _moe("mlp", "shared_experts")  # also ERNIE-4.5-MoE
GPT_OSS = _moe("mlp", None, interleaved=True)
GRANITEMOE = _moe("block_sparse_moe", None)

ROLE_MAPS: Mapping[str, RoleMap] = {
    "bert": BERT, "roberta": BERT, "xlm-roberta": BERT, "camembert": BERT, "electra": BERT,
    "deberta-v2": DEBERTA_V2, "distilbert": DISTILBERT, "gpt2": GPT2,
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma": LLAMA,
    "gemma2": LLAMA, "gemma3_text": LLAMA, "phi3": PHI3, "t5": T5, "mt5": T5, "bart": BART,
    "mbart": BART, "opt": OPT, "gpt_neox": GPT_NEOX, "vit": VIT,
    # mixture of experts: the FFN roles reach the routed experts' 3-D parameters (peftlab.experts)
    "mixtral": MIXTRAL, "olmoe": MIXTRAL, "phimoe": MIXTRAL, "qwen3_moe": MIXTRAL,
    "qwen2_moe": QWEN2_MOE, "deepseek_v3": DEEPSEEK_V3, "glm4_moe": GLM4_MOE, "ernie4_5_moe": GLM4_MOE,
    "gpt_oss": GPT_OSS, "granitemoe": GRANITEMOE,
}


def role_map_for(model: torch.nn.Module) -> RoleMap:
    """The built-in role map for ``model.config.model_type``; for any other model, the map
    inferred from its structure (see :mod:`peftlab.infer`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type in ROLE_MAPS:
        return dataclasses.replace(ROLE_MAPS[model_type], source="built-in")
    from peftlab.infer import infer_role_map  # infer builds RoleMaps, so it imports this module

    return infer_role_map(model)
