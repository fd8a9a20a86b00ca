"""Tiny models of every architecture family peftlab maps, built from configs (no Hub)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
import transformers as T

# No test may reach the network, and the Arrow files that `datasets` makes from data files go to a
# temporary cache (set before anything imports datasets, which reads these at import).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
_DATASETS_CACHE = tempfile.mkdtemp(prefix="peftlab-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)

H, FF, V = 32, 64, 100

CONFIGS = {
    "bert": lambda: T.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=FF, vocab_size=V),
    "roberta": lambda: T.RobertaConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=FF, vocab_size=V),
    "xlm-roberta": lambda: T.XLMRobertaConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=FF, vocab_size=V),
    "distilbert": lambda: T.DistilBertConfig(dim=H, n_layers=2, n_heads=2, hidden_dim=FF, vocab_size=V),
    "electra": lambda: T.ElectraConfig(hidden_size=H, embedding_size=H, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=FF, vocab_size=V),
    "deberta-v2": lambda: T.DebertaV2Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=FF, vocab_size=V),
    "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=2, vocab_size=V),
    "llama": lambda: T.LlamaConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=FF, vocab_size=V),
    "mistral": lambda: T.MistralConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=FF, vocab_size=V),
    "qwen2": lambda: T.Qwen2Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=FF, vocab_size=V),
    "qwen3": lambda: T.Qwen3Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=FF, head_dim=16, vocab_size=V),
    "gemma": lambda: T.GemmaConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=FF, head_dim=16, vocab_size=V),
    "phi3": lambda: T.Phi3Config(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=FF, vocab_size=V,
                                 pad_token_id=0),
    "t5": lambda: T.T5Config(d_model=H, d_kv=16, d_ff=FF, num_layers=2, num_heads=2, vocab_size=V),
    "mt5": lambda: T.MT5Config(d_model=H, d_kv=16, d_ff=FF, num_layers=2, num_heads=2, vocab_size=V),
    "bart": lambda: T.BartConfig(d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                                 vocab_size=V),
    "opt": lambda: T.OPTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, ffn_dim=FF,
                               word_embed_proj_dim=H, vocab_size=V),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=FF, vocab_size=V),
    "vit": lambda: T.ViTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=FF, image_size=16, patch_size=8),
}
FAMILIES = tuple(CONFIGS)


BIAS_STD = 0.1


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny base model of ``family`` in eval mode.

    transformers initialises every bias to zero, which hides any bug that forgets one (an (IA)³
    merge that scales ``W`` but not ``b`` gives the right output while ``b = 0``). So every bias
    (projections and norms) is drawn from N(0, BIAS_STD²)."""
    torch.manual_seed(seed)
    model = T.AutoModel.from_config(CONFIGS[family]()).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
    return model


def tiny_inputs(family: str, batch: int = 2, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, V, (batch, length), generator=g)
    inputs = {"input_ids": ids}
    if family in ("t5", "mt5", "bart"):
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def randomize(params, scale: float = 0.1, seed: int = 2) -> None:
    """Move adapter parameters away from their init, so that tests cannot pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def bert():
    return tiny_model("bert")


def train_by_the_recipe(model, name, batches, lr, extras=(), rng_states=None, **forward):
    """peftlab's training recipe written out by hand, independently of ``peftlab.loop``: AdamW
    without weight decay, learning rate warmed up linearly over the first ceil(6%) of the steps
    (from zero) then decayed linearly to zero, gradients clipped to norm 1.0, the loss plus the
    fusion penalty. One step per batch; ``rng_states``: the random state to start each step from
    (dropout), as recorded where the batches were taken."""
    import math

    import peftlab

    adapters = peftlab.attach(model)
    adapters.activate(name)
    params = adapters.train(name, extras=tuple(extras))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = len(batches)
    warm = math.ceil(0.06 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: i / warm if i < warm else max(0.0, (total - i) / max(1, total - warm)))
    model.train()
    for i, batch in enumerate(batches):
        if rng_states is not None:
            torch.set_rng_state(rng_states[i])
        loss = model(**batch, **forward).loss + adapters.fusion_penalty(name)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
