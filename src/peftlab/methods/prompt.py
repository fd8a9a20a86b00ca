"""Prompt tuning: learned virtual tokens prepended to the input (Lester et al. 2021, arXiv 2104.08691).

    h⁰ = [P ; E(x)]        P ∈ ℝ^{n×d} trained, the whole model frozen

``n`` virtual token embeddings go in front of the input embeddings; the attention mask, token
type ids (0 for the prompt), position ids and per-token labels (-100 for the prompt) are
extended to match. Parameters: ``n·d`` (20 virtual tokens on MiniLM, d = 384: 7,680). The
prompt runs at the model's input, before any layer, so it works for encoders, decoder-only
models (``generate`` included: the prompt is in the cache after the first step) and on the
encoder of encoder-decoder models, with no change to the model's code: see
:mod:`peftlab.sequence` for how it attaches.

Outputs follow HF peft's layout exactly (so that the logits equal peft's): per-token outputs
have ``n`` more positions, the virtual ones first. Classification heads read what they expect:
BERT-style heads the pooled output of position 0 (after prepending, the first virtual token, whose
state the pooler and classifier are trained on, as in peft); peftlab's mean-pooling head the mean
over every unmasked position (the prompt included); decoders' last-token heads (``score``) the
last position, which is the last real token because the prompt's padding goes on the left and a
right-padded batch is refused (without ``input_ids`` those heads cannot find the last real token).

Initialisation (``init``): ``"random"``: normal with the input embeddings' own standard
deviation, so that the prompt starts on the scale of real tokens (peft's ``RANDOM`` draws N(0,1),
tens of times larger than the embeddings of BERT-like models); ``"vocab"``: embeddings of tokens
drawn from the vocabulary (the paper's "sampled vocab"); ``"text"``: the embeddings of
``init_text``'s tokens, repeated or cut to ``n`` (the paper's class-label init generalised). The
tokenizer is ``tokenizer`` or the model's own folder (``config._name_or_path``).

Not mergeable: a prompt adds positions to the sequence, which no weight can hold.

The learning rate: prompt tuning needs far larger rates than weight methods. Lester et al. use
0.3 with Adafactor on T5; with AdamW on BERT-sized encoders, 3e-2 is the usual choice (P-tuning v2
reports 5e-3 to 1e-2 for its prompt baseline; peft's examples use 3e-2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.interop.codec import Expected, Fields, PeftCodec, Shapes, Tensors, get
from peftlab.methods import Method, Preset
from peftlab.sequence import SequencePiece, embedding_table, model_type

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter
    from peftlab.layer import Piece


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """``num_virtual_tokens`` learned input embeddings; ``init``: how they start (see the module
    docstring); ``init_text``: the text for ``init="text"``; ``tokenizer``: where to load the
    tokenizer for it (default: the model's folder)."""

    method = "prompt"
    mergeable = False
    unmergeable_because = "a prompt adds virtual tokens to the sequence, which no weight can hold"

    num_virtual_tokens: int = 20
    init: Literal["random", "text", "vocab"] = "random"
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.init == "text" and not self.init_text:
            raise ConfigError('init="text" needs init_text (the text whose tokens start the prompt)')
        if self.init != "text" and (self.init_text is not None or self.tokenizer is not None):
            raise ConfigError(f'init_text and tokenizer are read only with init="text", not {self.init!r}')


class Prompt(SequencePiece):
    """``prompt_embeddings [n, d]``, prepended to the input embeddings."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.num_virtual_tokens = embeddings.shape[0]
        self.prompt_embeddings = nn.Parameter(embeddings.detach().clone().float())

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings


def _text_ids(config: PromptTuningConfig, model: nn.Module) -> list[int]:
    from transformers import AutoTokenizer

    source = config.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ConfigError('init="text" needs a tokenizer: pass tokenizer=<folder or name> (this model '
                          "was not loaded from a folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)  # never trust_remote_code
    except Exception as e:  # transformers raises OSError, ValueError, ... for a missing tokenizer
        raise ConfigError(f"cannot load the tokenizer for init_text from {source!r}: {e}") from None
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} has no tokens")
    return (ids * math.ceil(config.num_virtual_tokens / len(ids)))[: config.num_virtual_tokens]


def sequence(config: PromptTuningConfig, model: nn.Module) -> Prompt:
    embeddings = embedding_table(model)
    weight = embeddings.weight.detach()
    n = config.num_virtual_tokens
    if config.init == "random":
        start = torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()
    else:
        if config.init == "vocab":
            ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
        else:
            ids = torch.tensor(_text_ids(config, model), device=weight.device)
            if int(ids.max()) >= weight.shape[0]:
                raise ConfigError(f"the tokenizer gives token ids up to {int(ids.max())}, but the model "
                                  f"has {weight.shape[0]} embeddings: wrong tokenizer for this model")
        with torch.no_grad():
            start = embeddings(ids)
    return Prompt(start)


# ---- peft's format ----------------------------------------------------------------------------
class PromptTuningPeft(PeftCodec):
    """peft's ``PROMPT_TUNING``: one tensor ``prompt_embeddings [n·s, d]`` (``s``:
    ``num_transformer_submodules``). With ``s = 2`` (peft's default for seq2seq models) peft
    allocates a second block for the decoder but its prompt tuning never reads it (only the first
    ``n`` rows go in front of the encoder's input): import takes the first ``n`` rows and export
    writes ``s = 1``, so that the parameter counts are equal."""

    peft_type = "PROMPT_TUNING"
    sequence = True
    config_keys = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                             "num_attention_heads", "num_layers", "prompt_tuning_init",
                             "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"})
    suffixes = ()
    key = "prompt_embeddings"

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        piece = next(iter(adapter.pieces.values()))
        n, d = piece.prompt_embeddings.shape
        fields = {"peft_type": self.peft_type, "num_virtual_tokens": n, "token_dim": d,
                  "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
        return fields, {self.key: piece.prompt_embeddings}

    def sequence_config(self, data: Mapping[str, Any], model: nn.Module,
                        tensor_shapes: Shapes) -> tuple[PromptTuningConfig, Expected]:
        n = get(data, "num_virtual_tokens", int, None)
        if n is None or n < 1:
            raise ConfigError("num_virtual_tokens must be a positive integer")
        submodules = get(data, "num_transformer_submodules", int, 1)
        if submodules not in (1, 2):
            raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {submodules}")
        d = embedding_table(model).weight.shape[1]
        token_dim = get(data, "token_dim", int, d)
        if token_dim != d:
            raise ConfigError(f"token_dim {token_dim} differs from this {model_type(model)!r} model's "
                              f"embedding width {d}")
        return PromptTuningConfig(num_virtual_tokens=n), {self.key: (n * submodules, d)}

    def load_sequence(self, piece: Piece, tensors: Mapping[str, torch.Tensor],
                      data: Mapping[str, Any]) -> None:
        with torch.no_grad():
            piece.prompt_embeddings.copy_(tensors[self.key][: piece.num_virtual_tokens])


METHOD = Method(
    PromptTuningConfig, None, sequence=sequence, peft=PromptTuningPeft(),
    # lr and quality: see the module docstring; quality: prompt tuning trails full fine-tuning
    # by several points below ~1B parameters (Lester et al. Fig. 1; P-tuning v2 Table 1: -8 on
    # SuperGLUE with BERT-large).
    presets=(Preset("prompt-tuning", PromptTuningConfig, lr=3e-2, quality=-8.0,
                    about="20 learned virtual tokens in front of the input, not mergeable"),),
)
