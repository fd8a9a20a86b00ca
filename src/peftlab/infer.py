"""Role maps inferred from a model's structure, for models without a built-in map.

Only linear layers inside numbered (repeated) blocks can get a role, so embeddings, patch and
feature projections, poolers and heads never do. Inside a block:

- an *attention scope* is a submodule whose name says attention (``attn``, ``attention``,
  ``SelfAttention``, ``EncDecAttention``, ``mixer`` ...; ``cross``/``encdec``/``encoder_attn``
  make it cross-attention). Its direct projections (also under ``self``/``output``, as in BERT)
  are named by their leaf: ``q``/``q_proj``/``query``... -> query, and so on; the output
  projection must map back to the width the query reads (``[hidden -> hidden]``);
- the *feed-forward* layers are the others whose names say MLP (``mlp``, ``ffn``, ``fc1``,
  ``intermediate``/``output`` ...), paired by shape: ``[hidden -> inter]`` (up, gate) with
  ``[inter -> hidden]`` (down), or ``[hidden -> 2·inter]`` for a fused gate+up;
- routed experts stored as 3-D parameters in a module that transformers marks with its layout
  (``is_transposed``/``has_gate``/``is_concatenated``, see :mod:`peftlab.experts`) play the FFN
  roles, as in the built-in mixture-of-experts maps: ``down_proj`` is ``ffn_down``, ``up_proj``
  ``ffn_up``, and ``gate_up_proj`` holds ``ffn_gate`` and ``ffn_up`` as halves (``[gate | up]``)
  or interleaved, as the module's ``is_concatenated`` flag says (without the flag: ``ffn_up`` on
  all of it, with a note). Routed experts kept as numbered Linear layers (``experts.N``) are
  left alone: one role per expert is not what a user means.

Fused projections (``query_key_value``, ``c_attn``, ``Wqkv``, ``qkv_proj``; ``gate_up_proj``) hold
several roles. Their layout cannot be read from the weights, only from the modeling code, so the
layouts peftlab knows are listed below by the class that splits the output; the sizes come from
the attention module or the config (heads, kv-heads, head_dim) and must add up to the module's
output. Multi-head latent attention (DeepSeek-V2/V3 and the models built on it) keeps keys and
values in one ``kv_b_proj`` that its attention module splits in ``expand_kv``; its layout is
read by running that method on a stand-in whose ``kv_b_proj`` outputs the feature numbers, so
``key`` (the non-rotary part of each head's key) and ``value`` are the features the model itself
uses as such. Any other fused module is targeted whole, and the role's note says so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftlab.errors import TargetError
from peftlab.experts import AdaptedExperts, ExpertParam, expert_parameters, gate_up_layout
from peftlab.roles import Role, RoleMap
from peftlab.sites import candidates, linear_modules

# ---- names -----------------------------------------------------------------------------------
_ATTENTION = re.compile(r"attn|attention|(^|_)att($|_)|^mixer$")
_MIXER = re.compile(r"^mixer$")  # attention in some hybrids, a state-space layer in others
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder_attn")
_EXPERTS = re.compile(r"^(experts|local_experts)$")
# A feed-forward layer says so somewhere in its path (block-relative, lower case).
_MLP = re.compile(r"mlp|ffn|feed_?forward|^ff$|intermediate|^output$|dense_?relu|^fc|^c_fc$|^c_proj$"
                  r"|^wi(_\d)?$|^wo$|^w[123]$|up|down|gate|^lin[12]$|4h|shared_expert|^layer_[12]$"
                  r"|_linear$|^w_(in|out)$|^dense[12]?$")
_ROUTER = re.compile(r"router|^gate$|classifier")
_QUERY = {"q", "q_proj", "query", "q_lin", "wq", "query_proj", "project_q", "q_attn", "q_b_proj",
          "q_head"}
_KEY = {"k", "k_proj", "key", "k_lin", "wk", "key_proj", "project_k", "k_head"}
_VALUE = {"v", "v_proj", "value", "v_lin", "wv", "value_proj", "project_v", "v_head"}
_QKV = {"qkv", "qkv_proj", "query_key_value", "wqkv", "c_attn", "in_proj", "to_qkv"}
_KV = {"kv_proj", "kv", "kv_b_proj", "wkv", "to_kv"}
_OUT = {"o", "o_proj", "out_proj", "out_lin", "wo", "dense", "output", "attention_out", "c_proj",
        "proj", "out", "to_out", "dense_output", "post_proj"}
_GATE = re.compile(r"gate|^wi_0$|^w1$")
_UP = re.compile(r"up|^wi_1$|^w3$")
_WRAPPER = "linear"  # ``q_proj.linear``: a wrapper module around the real projection


# ---- fused layouts, read from transformers' modeling code -------------------------------------
# Keyed by "<modeling file>.<class>" of the module that owns the fused linear and splits its output.
#   contiguous: [q | k | v] with heads·hd, kv·hd, kv·hd features
#   per_head:   [heads, 3, hd] (q, k, v interleaved per head)
#   grouped:    [kv, heads/kv + 2, hd] (per kv group: its query heads, then k, then v)
_QKV_LAYOUTS: dict[str, str | Callable[[nn.Module], str]] = {
    "modeling_gpt2.GPT2Attention": "contiguous",
    "modeling_openai.Attention": "contiguous",
    "modeling_gpt_bigcode.GPTBigCodeAttention": lambda m: "contiguous" if m.multi_query else "per_head",
    "modeling_bloom.BloomAttention": "per_head",
    "modeling_persimmon.PersimmonAttention": "per_head",
    "modeling_gpt_neox.GPTNeoXAttention": "per_head",
    "modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention": "per_head",
    "modeling_deberta.DisentangledSelfAttention": "per_head",
    "modeling_minimax.MiniMaxLightningAttention": "per_head",
    "modeling_modernbert.ModernBertAttention": "contiguous",
    "modeling_mpt.MptAttention": "contiguous",
    "modeling_dbrx.DbrxAttention": "contiguous",
    "modeling_phi3.Phi3Attention": "contiguous",
    "modeling_phi4_multimodal.Phi4MultimodalAttention": "contiguous",
    "modeling_falcon.FalconAttention": lambda m: (
        "grouped" if m.new_decoder_architecture else "contiguous" if m.multi_query else "per_head"),
}
# Fused key+value ([k | v]) and gate+up projections: which half is which.
_KV_LAYOUTS = {"modeling_jetmoe.JetMoeAttention": "contiguous"}
_GATE_UP_LAYOUTS = {
    "modeling_phi3.Phi3MLP": "gate_up",
    "modeling_phi4_multimodal.Phi4MultimodalMLP": "gate_up",
    "modeling_glm.GlmMLP": "gate_up",
    "modeling_glm4.Glm4MLP": "gate_up",
    "modeling_phi4_multimodal.Phi4MultimodalAudioMLP": "up_gate",
    "modeling_modernbert.ModernBertMLP": "up_gate",
    "modeling_modernbert_decoder.ModernBertDecoderMLP": "up_gate",
}


@dataclasses.dataclass(frozen=True)
class _Linear:
    name: str
    path: tuple[str, ...]  # the block list's name, then block-relative; lower case, no wrapper
    block: str  # up to the innermost numbered part
    outer: str  # up to the outermost one
    in_f: int
    out_f: int
    experts: bool = False  # a 3-D routed-expert parameter (features per expert)


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
    """A selector with fixed output features, checked against the module it is applied to."""

    index: torch.Tensor
    out: int
    describe: str

    def __call__(self, config: Any, out: int) -> torch.Tensor:
        if out != self.out:
            raise TargetError(f"inferred slice {self.describe} is for {self.out} output features, "
                              f"the module has {out}")
        return self.index


@dataclasses.dataclass
class _Found:
    """Role -> (module name, selector or None) collected while walking the blocks."""

    parts: dict[str, list[tuple[_Linear, Slice | None]]] = dataclasses.field(default_factory=dict)
    whole: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> why it is whole
    role_notes: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> remark
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, role: str, lin: _Linear, select: Slice | None = None, whole: str | None = None):
        self.parts.setdefault(role, []).append((lin, select))
        if whole:
            self.whole[role] = whole


@dataclasses.dataclass(frozen=True, eq=False)
class BySize:
    """A role's selector when its modules differ: by output size, a slice or ``None`` (all)."""

    slices: dict[int, Slice | None]

    def __call__(self, config: Any, out: int) -> torch.Tensor | None:
        if out not in self.slices:
            raise TargetError(f"no inferred slice for a module with {out} output features")
        select = self.slices[out]
        return None if select is None else select(config, out)


def infer_role_map(model: nn.Module) -> RoleMap:
    """The roles of ``model``'s linear layers, read from its structure (see the module doc)."""
    modules = dict(model.named_modules())
    linears, experts = _block_linears(model)
    found = _Found()
    if experts:
        found.notes.append(f"routed experts kept as Linear layers get no role ({len(experts)} "
                           f"expert projections such as "
                           f"{_collapse(experts[0])}); target them with a module-name regex")
    blocks: dict[str, list[_Linear]] = {}
    for lin in linears:
        blocks.setdefault(lin.block, []).append(lin)
    config = getattr(model, "config", None)
    # Attention first: the width its queries read is the residual width of the whole block
    # (T5 keeps attention and FFN in sibling sub-blocks), which says which way an FFN pair goes.
    in_attention: set[str] = set()
    widths: dict[str, set[int]] = {}
    hidden = _config_widths(config)
    for members in blocks.values():
        names, width = _attention_roles(members, modules, config, hidden, found)
        in_attention |= names
        widths.setdefault(members[0].outer, set()).update(width)
    for members in blocks.values():
        ffn = [m for m in members if m.name not in in_attention]
        _ffn_roles(ffn, widths.get(members[0].outer) or hidden, modules, found)
    _expert_roles(model, modules, found)
    all_names = list(candidates(model))
    roles = {role: _role(role, parts, found.whole.get(role) or found.role_notes.get(role),
                         found.whole.get(role) is not None, all_names, found.notes)
             for role, parts in found.parts.items()}
    if not roles:
        found.notes.append("no roles found: no numbered block has attention projections "
                           "(q/k/v) or a feed-forward pair [hidden -> inter -> hidden]")
    return RoleMap(roles, source="inferred", notes=tuple(dict.fromkeys(found.notes)))


# ---- blocks ------------------------------------------------------------------------------------
def _block_linears(model: nn.Module) -> tuple[list[_Linear], list[str]]:
    """Linear layers inside numbered blocks, and the routed-expert layers left out."""
    out: list[_Linear] = []
    experts: list[str] = []
    for name, module in linear_modules(model):
        parts = name.split(".")
        numbered = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
        if not numbered:
            continue  # embeddings, poolers, heads: outside the repeated blocks
        if any(_EXPERTS.match(parts[i - 1].lower()) for i in numbered if i > 0):
            experts.append(name)
            continue
        last = numbered[-1]
        # The path starts with the block list's own name: XLM keeps its attention blocks in
        # ``attentions.N`` and its feed-forward blocks in ``ffns.N``.
        path = [p.lower() for p in parts[last - 1:last] + parts[last + 1:]]
        if len(path) > 1 and path[-1] == _WRAPPER:
            path = path[:-1]
        w = module.weight
        in_f, out_f = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else tuple(w.shape)
        out.append(_Linear(name, tuple(path), ".".join(parts[:last + 1]),
                           ".".join(parts[:numbered[0] + 1]), int(in_f), int(out_f)))
    return out, experts


# ---- attention ---------------------------------------------------------------------------------
def _attention_roles(members: list[_Linear], modules: dict[str, nn.Module], config: Any,
                     hidden: set[int], found: _Found) -> tuple[set[str], set[int]]:
    """Give attention roles within one block; returns the names of the linears inside the
    attention scopes found (they are not feed-forward layers) and the widths queries read."""
    # A module holding both a query and a key projection is attention whatever its name
    # (RecurrentGemma's ``temporal_block``).
    leaves: dict[tuple[str, ...], set[str]] = {}
    for lin in members:
        leaves.setdefault(lin.path[:-1], set()).add(lin.path[-1])
    qk = {parent for parent, names in leaves.items() if names & _QUERY and names & _KEY and parent}
    scopes: dict[tuple[str, ...], list[_Linear]] = {}
    for lin in members:
        # The outermost attention-named module inside the block, else the block list's name.
        at = next((i for i, p in enumerate(lin.path[:-1]) if i and _ATTENTION.search(p)),
                  0 if len(lin.path) > 1 and _ATTENTION.search(lin.path[0]) else None)
        if at is not None:
            scopes.setdefault(lin.path[:at + 1], []).append(lin)
        elif lin.path[:-1] in qk:
            scopes.setdefault(lin.path[:-1], []).append(lin)
    attention: set[str] = set()
    widths: set[int] = set()
    for scope, lins in scopes.items():
        prefix = "cross_" if any(_CROSS.search(p) for p in scope) else ""
        direct = [lin for lin in lins if _direct(lin.path[len(scope):])]
        by_leaf = {lin: lin.path[-1] for lin in direct}
        q = [lin for lin, leaf in by_leaf.items() if leaf in _QUERY]
        k = [lin for lin, leaf in by_leaf.items() if leaf in _KEY]
        v = [lin for lin, leaf in by_leaf.items() if leaf in _VALUE]
        qkv = [lin for lin, leaf in by_leaf.items() if leaf in _QKV]
        kv = [lin for lin, leaf in by_leaf.items() if leaf in _KV]
        if not (q or (qkv and not _MIXER.match(scope[-1]))):
            continue  # not attention we understand (RWKV time mixing, state-space mixers)
        width = (q or qkv)[0].in_f
        if hidden and width not in hidden:  # a low-rank query (DeepSeek's q_b_proj) reads less
            width = next((lin.in_f for lin in direct if lin.in_f in hidden), width)
        if not prefix:  # cross-attention keys may read another width (the encoder's)
            widths.add(width)
        for lin in q:
            found.add(prefix + "query", lin)
        for lin in k:
            found.add(prefix + "key", lin)
        for lin in v:
            found.add(prefix + "value", lin)
        for lin in qkv:
            _fused(lin, ("query", "key", "value"), _QKV_LAYOUTS, modules, config, prefix, found)
        if not (k or v):
            for lin in kv:
                if not _latent_kv(lin, modules, prefix, found):
                    _fused(lin, ("key", "value"), _KV_LAYOUTS, modules, config, prefix, found)
        outs = [lin for lin, leaf in by_leaf.items() if leaf in _OUT and lin.out_f == width]
        for lin in outs[:1]:  # the first such module in order is the output projection
            found.add(prefix + "attn_out", lin)
        attention.update(lin.name for lin in lins)
    return attention, widths


def _direct(rest: tuple[str, ...]) -> bool:
    """A projection of the attention itself: its leaf, or under ``self``/``output``/an inner
    attention module (BERT's ``attention.self.query``), not a helper such as an indexer."""
    return all(p in ("self", "output") or _ATTENTION.search(p) for p in rest[:-1])


def _owner_key(name: str, modules: dict[str, nn.Module]) -> tuple[str, nn.Module]:
    owner = modules[name.rpartition(".")[0]]
    return f"{type(owner).__module__.rpartition('.')[2]}.{type(owner).__name__}", owner


def _fused(lin: _Linear, roles: tuple[str, ...], layouts: dict[str, Any],
           modules: dict[str, nn.Module], config: Any, prefix: str, found: _Found) -> None:
    """Slices of a fused q/k/v (or k/v) projection, or the whole module with a note."""
    key, owner = _owner_key(lin.name, modules)
    layout = layouts.get(key)
    layout = layout(owner) if callable(layout) else layout
    slices = _qkv_slices(layout, roles, lin.out_f, owner, config) if layout else None
    if slices is not None:
        for role, select in zip(roles, slices):
            found.add(prefix + role, lin, select)
        return
    why = (f"sizes from the config do not add up to {lin.out_f} features" if layout
           else f"its layout ({key}) is not one peftlab knows")
    for role in roles:
        found.add(prefix + role, lin, None, whole=f"{'/'.join(roles)}: whole fused module "
                  f"{_collapse(lin.name)} (slices unknown: {why})")


class _FeatureNumbers(nn.Module):
    """Stands in for a projection with ``out`` outputs: every output is its feature number."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.out, dtype=torch.float32).expand(*x.shape[:-1], self.out)


def _latent_kv(lin: _Linear, modules: dict[str, nn.Module], prefix: str, found: _Found) -> bool:
    """Key and value slices of a multi-head latent attention ``kv_b_proj``, read from the model's
    own ``expand_kv``; ``False`` when the owner is not such an attention (the caller goes on),
    the whole module with a note when the method does not give a clean split."""
    owner = modules[lin.name.rpartition(".")[0]]
    expand = getattr(type(owner), "expand_kv", None)
    rope = getattr(owner, "qk_rope_head_dim", None)
    leaf = lin.name.rpartition(".")[2]
    if not callable(expand) or not isinstance(rope, int) or leaf not in owner._modules:
        return False
    slices = _latent_kv_slices(owner, expand, leaf, lin, rope)
    if slices is None:
        key, _ = _owner_key(lin.name, modules)
        for role in ("key", "value"):
            found.add(prefix + role, lin, None, whole=f"key/value: whole fused module "
                      f"{_collapse(lin.name)} (slices unknown: {key}.expand_kv does not split "
                      "its output into key and value features)")
        return True
    key, value = slices
    found.add(prefix + "key", lin, key)
    found.add(prefix + "value", lin, value)
    found.role_notes[prefix + "key"] = (
        f"key: the non-rotary part of each head's key only ({_collapse(lin.name)}, latent "
        "attention); the rotary part is one head shared by all, computed before it, and gets no role")
    return True


def _latent_kv_slices(owner: nn.Module, expand: Callable, leaf: str, lin: _Linear,
                      rope: int) -> tuple[Slice, Slice] | None:
    """Run ``owner.expand_kv`` on a shallow stand-in of ``owner`` whose ``leaf`` projection
    outputs its feature numbers (the rotary key part is -1): the key and value states then say
    which features of the projection the model uses as which."""
    out = lin.out_f
    proxy = object.__new__(type(owner))
    proxy.__dict__.update(owner.__dict__)
    proxy.__dict__["_modules"] = {**owner._modules, leaf: _FeatureNumbers(out)}
    try:
        with torch.no_grad():
            key, value = expand(proxy, torch.zeros(1, 1, 1, lin.in_f),
                                torch.full((1, 1, 1, rope), -1.0))
    except Exception:  # noqa: BLE001 - any failure means the layout is not known
        return None
    key = key.reshape(-1)
    key = key[key >= 0]
    value = value.reshape(-1)
    both = torch.cat([key, value])
    if (len(both) != out or not torch.equal(both.sort().values, torch.arange(out, dtype=both.dtype))
            or len(key) == 0 or len(value) == 0):
        return None
    return (Slice(key.long(), out, f"non-rotary key features of {out} (per head)"),
            Slice(value.long(), out, f"value features of {out} (per head)"))


def _heads(owner: nn.Module, config: Any) -> tuple[int, int, int] | None:
    """(heads, kv-heads, head_dim) from the attention module, else from the config."""
    def first(*names: str) -> int | None:
        for source in (owner, config, getattr(owner, "config", None)):
            for n in names:
                v = getattr(source, n, None) if source is not None else None
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        return None

    heads = first("num_heads", "num_attention_heads", "n_head", "n_heads")
    if heads is None:
        return None
    kv = first("num_kv_heads", "num_key_value_heads", "kv_heads", "n_kv_heads") or heads
    hidden = first("hidden_size", "embed_dim", "d_model", "n_embd")
    hd = first("head_dim", "head_size", "attention_head_size") or (hidden // heads if hidden else None)
    return (heads, kv, hd) if hd else None


def _qkv_slices(layout: str, roles: tuple[str, ...], out: int, owner: nn.Module,
                config: Any) -> list[Slice] | None:
    sizes = _heads(owner, config)
    if sizes is None:
        return None
    heads, kv, hd = sizes
    if layout == "contiguous" and len(roles) == 3 and out == heads * hd + 2 * kv * hd:
        q, k = heads * hd, kv * hd
        bounds = [(0, q), (q, q + k), (q + k, q + 2 * k)]
        return [Slice(torch.arange(a, b), out, f"[{a}:{b}] of {out}") for a, b in bounds]
    if layout == "contiguous" and len(roles) == 2 and out % 2 == 0:
        half = out // 2
        return [Slice(torch.arange(a, b), out, f"[{a}:{b}] of {out}")
                for a, b in ((0, half), (half, out))]
    if layout == "per_head" and out == 3 * heads * hd:
        grid = torch.arange(out).view(heads, 3, hd)
        return [Slice(grid[:, i].reshape(-1), out, f"per head part {i} of [heads, 3, head_dim]")
                for i in range(3)]
    if layout == "grouped" and heads % kv == 0 and out == (heads + 2 * kv) * hd:
        grid = torch.arange(out).view(kv, heads // kv + 2, hd)
        parts = [grid[:, :-2], grid[:, -2], grid[:, -1]]
        names = ("query heads", "key", "value")
        return [Slice(p.reshape(-1), out, f"{n} of each kv group") for p, n in zip(parts, names)]
    return None


# ---- feed-forward ------------------------------------------------------------------------------
def _config_widths(config: Any) -> set[int]:
    """Hidden sizes in the config and its sub-configs, for blocks without attention."""
    found: set[int] = set()
    configs = [config] + [v for v in vars(config).values() if hasattr(v, "to_dict")] if config else []
    for c in configs:
        for name in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"):
            v = getattr(c, name, None)
            if isinstance(v, int) and not isinstance(v, bool):
                found.add(v)
    return found


def _ffn_roles(members: list[_Linear], widths: set[int], modules: dict[str, nn.Module],
               found: _Found) -> None:
    """ffn_up/ffn_gate/ffn_down in one block, by shape: [d -> m] (or [d -> 2m]) and [m -> d],
    where d, the residual width, is one of ``widths``."""
    lins = [lin for lin in members if any(_MLP.search(p) for p in lin.path)
            and not _ROUTER.search(lin.path[-1])]
    for down in lins:
        if down.out_f not in widths or down.in_f in widths:
            continue
        ups = [u for u in lins if u is not down and u.in_f == down.out_f
               and u.out_f in (down.in_f, 2 * down.in_f)]
        # Siblings first: a shared expert's up projection belongs to its own down projection.
        # BERT keeps them apart (``intermediate.dense``, ``output.dense``), hence the fallback.
        ups = [u for u in ups if u.path[:-1] == down.path[:-1]] or ups
        if not ups:
            continue
        found.add("ffn_down", down)
        plain = [u for u in ups if u.out_f == down.in_f]
        if len(plain) == 2:
            _gate_and_up(plain, found)
        elif plain:
            for u in plain:
                found.add("ffn_up", u)
        else:  # only [d -> 2m]: a fused gate+up projection
            for u in ups:
                _gate_up(u, modules, found)


def _gate_and_up(pair: list[_Linear], found: _Found) -> None:
    """Two [d -> m] projections: a gate and an up projection, told apart by name."""
    gate = [u for u in pair if _GATE.search(u.path[-1])]
    up = [u for u in pair if _UP.search(u.path[-1]) and u not in gate]
    if len(gate) == 1 and len(up) == 1:
        found.add("ffn_gate", gate[0])
        found.add("ffn_up", up[0])
        return
    for u in pair:
        found.add("ffn_up", u, None)
    found.notes.append(f"ffn_up: covers both {_collapse(pair[0].name)} and {_collapse(pair[1].name)} "
                       "(their names do not say which one is the gate)")


def _gate_up(lin: _Linear, modules: dict[str, nn.Module], found: _Found) -> None:
    key, _ = _owner_key(lin.name, modules)
    order = _GATE_UP_LAYOUTS.get(key)
    if order is None:
        found.add("ffn_up", lin, None,
                  whole=f"ffn_up: whole fused gate+up module {_collapse(lin.name)} (which half is "
                        f"the gate is not known for {key}; ffn_gate does not cover it)")
        return
    half, out = lin.out_f // 2, lin.out_f
    first, second = (Slice(torch.arange(0, half), out, f"[0:{half}] of {out}"),
                     Slice(torch.arange(half, out), out, f"[{half}:{out}] of {out}"))
    gate, up = (first, second) if order == "gate_up" else (second, first)
    found.add("ffn_gate", lin, gate)
    found.add("ffn_up", lin, up)


# ---- routed experts ----------------------------------------------------------------------------
def _expert_roles(model: nn.Module, modules: dict[str, nn.Module], found: _Found) -> None:
    """FFN roles of the 3-D routed-expert parameters inside numbered blocks (see the module doc)."""
    for name, info in expert_parameters(model):
        owner_name, _, param = name.rpartition(".")
        parts = owner_name.split(".")
        numbered = [i for i, p in enumerate(parts) if p.isdigit()]
        if not numbered:
            continue
        owner = modules[owner_name]
        lin = _expert_linear(name, parts, numbered, param, info)
        base = owner.base if isinstance(owner, AdaptedExperts) else owner
        has_gate = bool(getattr(base, "has_gate", False))
        if param == "down_proj":
            found.add("ffn_down", lin)
        elif param == "up_proj" and not has_gate:
            found.add("ffn_up", lin)
        elif param == "gate_up_proj" and has_gate:
            layout = gate_up_layout(owner)
            out = info.out_features
            if layout is None or out % 2:
                found.add("ffn_up", lin, None, whole=f"ffn_up: whole expert gate+up parameter "
                          f"{_collapse(name)} (its module does not say how gate and up are laid "
                          "out; ffn_gate does not cover it)")
                continue
            if layout == "concatenated":
                half = out // 2
                gate = Slice(torch.arange(0, half), out, f"[0:{half}] of {out}")
                up = Slice(torch.arange(half, out), out, f"[{half}:{out}] of {out}")
            else:
                gate = Slice(torch.arange(0, out, 2), out, f"even features of {out}")
                up = Slice(torch.arange(1, out, 2), out, f"odd features of {out}")
            found.add("ffn_gate", lin, gate)
            found.add("ffn_up", lin, up)
        else:
            found.notes.append(f"expert parameter {_collapse(name)} gets no role (not one of "
                               "transformers' gate_up_proj/up_proj/down_proj)")


def _expert_linear(name: str, parts: list[str], numbered: list[int], param: str,
                   info: ExpertParam) -> _Linear:
    last = numbered[-1]
    path = tuple(p.lower() for p in parts[last - 1:last] + parts[last + 1:] + [param])
    return _Linear(name, path, ".".join(parts[:last + 1]), ".".join(parts[:numbered[0] + 1]),
                   info.in_features, info.out_features, experts=True)


# ---- patterns ----------------------------------------------------------------------------------
def _collapse(name: str) -> str:
    """A module name with its block numbers as ``N`` (the last part, a layer's own name, kept)."""
    parts = name.split(".")
    return ".".join("N" if p.isdigit() and i < len(parts) - 1 else p for i, p in enumerate(parts))


def _role(role: str, parts: list[tuple[_Linear, Slice | None]], note: str | None, whole: bool,
          all_names: list[str], notes: list[str]) -> Role:
    """One :class:`Role` for all modules (and expert parameters) found for ``role``. Modules of
    different sizes may need different slices (a fused projection in the text model, separate
    ones in a vision tower), so the selector goes by the module's output size; Linear modules
    and expert parameters have a selector each."""
    by_out: dict[bool, dict[int, Slice | None]] = {False: {}, True: {}}
    names: list[str] = []
    def kind(select: Slice | None) -> str | None:
        return None if select is None else select.describe

    for lin, select in parts:
        sizes = by_out[lin.experts]
        if lin.out_f in sizes and kind(sizes[lin.out_f]) != kind(select):
            notes.append(f"{role}: not targeted at {_collapse(lin.name)} (another module of "
                         f"the same size needs another slice); use a module-name regex there")
            continue
        sizes.setdefault(lin.out_f, select)
        if lin.name not in names:
            names.append(lin.name)
    select, experts_select = (BySize(sizes) if any(s is not None for s in sizes.values()) else None
                              for sizes in (by_out[False], by_out[True]))
    return Role(_pattern(names, all_names), select, experts_select, note=note,
                whole_fused=whole and role.removeprefix("cross_") in ("query", "key", "value"))


def _pattern(names: list[str], all_names: list[str]) -> str:
    """An anchored regex that matches exactly ``names`` among ``all_names``: block numbers
    generalised to ``\\d+`` when that matches no other module, else the exact names."""
    def key(name: str) -> str:
        parts = name.split(".")
        return r"\.".join(r"\d+" if p.isdigit() and i < len(parts) - 1 else re.escape(p)
                          for i, p in enumerate(parts))

    general = "^(?:" + "|".join(dict.fromkeys(key(n) for n in names)) + ")$"
    if {n for n in all_names if re.search(general, n)} == set(names):
        return general
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
