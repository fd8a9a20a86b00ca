"""Prefix tuning: learned keys and values in front of every attention layer's own (Li & Liang 2021,
arXiv 2101.00190; as P-tuning v2, Liu et al. 2022, arXiv 2110.07602, applies it to NLU).

    head(x) = softmax(q·[P_k ; K]ᵀ/√d)·[P_v ; V]     P_k, P_v ∈ ℝ^{n×d_kv} per layer, trained

Every layer gets ``n`` extra key and value rows; the real tokens attend to them and to each
other, and the frozen weights never change. Parameters: ``n · layers · 2 · d_kv`` (``d_kv``: key
heads × head width, smaller than the hidden size under grouped-query attention). With
``projection=h`` the prefix is reparameterised as in the papers, ``P = MLP(E)`` with ``E ∈ ℝ^{n×d_kv}``
and a two-layer tanh MLP of width ``h``, which steadies training; the MLP is used only while
training and is folded away when the adapter is saved (:meth:`peftlab.AdapterSet.save` writes
``P`` itself, with ``projection=False``), as in P-tuning v2. Trainer checkpoints keep the MLP, so
that a run resumes where it stopped.

How it attaches (see :mod:`peftlab.sequence`): the prefixes are written into a fresh
``DynamicCache`` through its public ``update(key, value, layer_idx)`` and passed as the model's
cache (``cache`` in transformers 5, ``past_key_values`` before), to the outermost transformers
model whose forward takes one; the attention mask is extended by ``n``. Every attention layer
that uses a cache then attends to the prefix without a line of model code copied: BERT-style
encoders (whose self-attention updates a cache when given one, and whose positions then start
after it), LLaMA-style decoders (``generate`` included: the prefix is the cache's start) and
T5's decoder (peft's layout: the decoder's self-attention gets the prefix; the encoder takes no
cache). After each forward, every layer's cache must have grown by the input's length; a model
whose attention ignores the cache raises :class:`peftlab.errors.TargetError` naming its model
type, and a model whose forward takes no cache is refused when the adapter is added.

Initialisation: N(0, 1), as peft and P-tuning v2's reference code (``nn.Embedding``'s default).
Not mergeable: the prefix adds attention positions, which no weight can hold.

Learning rate: P-tuning v2 searches 5e-3 to 1e-2 on BERT/RoBERTa; 1e-2 here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, TargetError
from peftlab.interop.codec import Expected, Fields, PeftCodec, Shapes, Tensors, get
from peftlab.methods import Method, Preset
from peftlab.sequence import SequencePiece, cache_owner, embedding_table, model_type

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter
    from peftlab.layer import Piece


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """``num_virtual_tokens`` key/value rows per layer; ``projection``: ``False``, or the hidden
    width of the reparameterisation MLP used while training."""

    method = "prefix"
    mergeable = False
    unmergeable_because = "a prefix adds attention positions, which no weight can hold"

    num_virtual_tokens: int = 20
    projection: bool | int = False

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.projection is True or (not isinstance(self.projection, bool) and self.projection < 1):
            raise ConfigError(f"projection must be false or the MLP's hidden width (a positive "
                              f"integer), got {self.projection!r}")


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head width) of the attention that takes the prefix: the
    decoder's self-attention on an encoder-decoder model."""
    config = getattr(model, "config", None)
    if config is None:
        raise TargetError(f"prefix tuning needs a transformers model with a config, not "
                          f"{type(model).__name__}")
    if not getattr(config, "is_encoder_decoder", False) and hasattr(config, "get_text_config"):
        # (an encoder-decoder config's decoder view renames fields: read the decoder's own names)
        config = config.get_text_config()

    def first(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    if getattr(config, "is_encoder_decoder", False):
        layers = first("num_decoder_layers", "decoder_layers", "num_layers", "num_hidden_layers")
        heads = first("decoder_attention_heads", "num_heads", "num_attention_heads")
    else:
        layers = first("num_hidden_layers", "num_layers", "n_layer")
        heads = first("num_attention_heads", "num_heads", "n_head")
    kv_heads = first("num_key_value_heads") or heads
    hidden = first("hidden_size", "d_model", "n_embd")
    head_dim = first("head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise TargetError(f"cannot read the attention's shape (layers, heads, head width) from this "
                          f"{model_type(model)!r} model's config; prefix tuning cannot size its prefix")
    return int(layers), int(kv_heads), int(head_dim)


class Prefix(SequencePiece):
    """Each layer's ``n`` key and value rows: ``prefix_embeddings [n, layers·2·d_kv]`` (peft's
    layout: per virtual token, layer by layer, key then value, head by head), or with a
    projection ``transform(embedding)``."""

    def __init__(self, n: int, shape: tuple[int, int, int], projection: int | bool,
                 encoder_decoder: bool = False) -> None:
        super().__init__()
        self.num_virtual_tokens = n
        self.shape = shape
        self.encoder_decoder = encoder_decoder  # the prefix is the decoder's (peft's layer order)
        layers, heads, head_dim = shape
        kv = heads * head_dim
        if projection:
            self.embedding = nn.Parameter(torch.randn(n, kv))
            self.transform = nn.Sequential(nn.Linear(kv, int(projection)), nn.Tanh(),
                                           nn.Linear(int(projection), layers * 2 * kv))
        else:
            self.prefix_embeddings = nn.Parameter(torch.randn(n, layers * 2 * kv))

    def flat(self) -> torch.Tensor:
        """``[n, layers·2·d_kv]``: the prefix as peft stores it."""
        if hasattr(self, "transform"):
            return self.transform(self.embedding)
        return self.prefix_embeddings

    def prefix(self) -> torch.Tensor:
        layers, heads, head_dim = self.shape
        n = self.num_virtual_tokens
        # [n, layers·2, heads, hd] -> [layers·2, heads, n, hd] -> [layers, 2, heads, n, hd]
        p = self.flat().view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        return p.reshape(layers, 2, heads, n, head_dim)


def sequence(config: PrefixTuningConfig, model: nn.Module) -> Prefix:
    if cache_owner(model) is None:
        raise TargetError(
            f"prefix tuning needs a model whose forward takes a key/value cache (the prefix goes "
            f"in through it); {type(model).__name__} (model_type {model_type(model)!r}) takes none. "
            "Use prompt tuning or LoRA for this architecture")
    weight = embedding_table(model).weight
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    return Prefix(config.num_virtual_tokens, attention_shape(model), config.projection,
                  encoder_decoder).to(weight.device)


def fold(adapter: Adapter) -> tuple[PrefixTuningConfig, dict[str, Piece]]:
    """The adapter as saved: the MLP's output as a plain prefix, ``projection=False``."""
    config: PrefixTuningConfig = adapter.config  # type: ignore[assignment]
    if not config.projection:
        return config, dict(adapter.pieces)
    folded = {}
    for module, piece in adapter.pieces.items():
        plain = Prefix(piece.num_virtual_tokens, piece.shape, False, piece.encoder_decoder)
        with torch.no_grad():
            plain.prefix_embeddings.copy_(piece.flat())
        folded[module] = plain
    return config.replace(projection=False), folded


# ---- peft's format ----------------------------------------------------------------------------
def peft_layers(layers: int) -> list[int]:
    """Which of a file's layers peft's encoder-decoder prefix tuning gives each decoder layer.

    With ``num_transformer_submodules=2`` (its seq2seq default, and the only layout its T5 runs
    with on transformers 5), peft duplicates the per-layer key/value list for the cross-attention
    and then cuts it into groups of four per layer, so decoder layer ``i`` reads the rows stored
    for layer ``2i mod layers`` (layers 0 and 1 of a 2-layer T5 both read layer 0)."""
    return [(2 * i) % layers for i in range(layers)]


class PrefixTuningPeft(PeftCodec):
    """peft's ``PREFIX_TUNING``: ``prompt_embeddings [n, layers·2·token_dim]``, the prefix itself
    (peft folds its projection when saving, too); ``token_dim / num_attention_heads`` is the head
    width, ``num_attention_heads`` the key/value heads. A file whose sizes do not match this
    model's attention is refused. On encoder-decoder models the layers are mapped as peft reads
    them (:func:`peft_layers`): import gives each decoder layer the rows peft gives it; export
    writes rows that peft reads back exactly, and refuses when peft's mapping cannot express
    the adapter (an even number of layers: two layers share one stored prefix)."""

    peft_type = "PREFIX_TUNING"
    sequence = True
    config_keys = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                             "num_attention_heads", "num_layers", "encoder_hidden_size",
                             "prefix_projection", "init_weights"})
    suffixes = ()
    key = "prompt_embeddings"

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        piece = next(iter(adapter.pieces.values()))
        layers, heads, head_dim = piece.shape
        flat = piece.flat().detach()
        fields = {"peft_type": self.peft_type, "num_virtual_tokens": piece.num_virtual_tokens,
                  "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
                  "num_transformer_submodules": 2 if piece.encoder_decoder else 1,
                  "prefix_projection": False, "encoder_hidden_size": heads * head_dim}
        if piece.encoder_decoder:
            per_layer = flat.view(flat.shape[0], layers, -1)
            stored = torch.zeros_like(per_layer)
            order = peft_layers(layers)
            for i, j in enumerate(order):
                if not torch.equal(per_layer[:, i], per_layer[:, order.index(j)]):
                    raise ConfigError(
                        f"peft's encoder-decoder prefix tuning gives decoder layer {i} the prefix it "
                        f"stores for layer {j}, which layer {order.index(j)} reads too (layer i reads "
                        f"2i mod {layers}); this adapter's layers {order.index(j)} and {i} differ, so "
                        "peft cannot hold it exactly. Keep it in peftlab's format (save)")
                stored[:, j] = per_layer[:, i]
            flat = stored.reshape(flat.shape)
        return fields, {self.key: flat}

    def sequence_config(self, data: Mapping[str, Any], model: nn.Module,
                        tensor_shapes: Shapes) -> tuple[PrefixTuningConfig, Expected]:
        n = get(data, "num_virtual_tokens", int, None)
        if n is None or n < 1:
            raise ConfigError("num_virtual_tokens must be a positive integer")
        layers, heads, head_dim = attention_shape(model)
        found = (get(data, "num_layers", int, layers), get(data, "num_attention_heads", int, heads),
                 get(data, "token_dim", int, heads * head_dim))
        if found != (layers, heads, heads * head_dim):
            raise ConfigError(f"the file's prefix is sized for (layers, key/value heads, token_dim) "
                              f"{found}; this {model_type(model)!r} model's attention has "
                              f"{(layers, heads, heads * head_dim)}")
        return PrefixTuningConfig(num_virtual_tokens=n), {self.key: (n, layers * 2 * heads * head_dim)}

    def load_sequence(self, piece: Piece, tensors: Mapping[str, torch.Tensor],
                      data: Mapping[str, Any]) -> None:
        flat = tensors[self.key]
        layers = piece.shape[0]
        if piece.encoder_decoder and get(data, "num_transformer_submodules", int, 2) == 2:
            flat = flat.view(flat.shape[0], layers, -1)[:, peft_layers(layers)].reshape(flat.shape)
        with torch.no_grad():
            piece.prefix_embeddings.copy_(flat)


METHOD = Method(
    PrefixTuningConfig, None, sequence=sequence, fold=fold, peft=PrefixTuningPeft(),
    # quality: P-tuning v2 matches fine-tuning within ~1 point on GLUE/SuperGLUE at 330M
    # parameters (Table 1) and trails by a few points on small models.
    presets=(Preset("prefix-tuning", PrefixTuningConfig, lr=1e-2, quality=-2.0,
                    about="20 learned key/value rows in every attention layer, not mergeable"),),
)
