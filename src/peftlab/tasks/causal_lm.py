"""Causal language modelling: the model learns to continue each text, up to its end.

The head is the model's own (``AutoModelForCausalLM``): pretrained, so nothing but the adapter is
trained. Each text ends with the tokenizer's eos token, so that the model learns where a text
stops. The loss is the mean token cross-entropy; it is the metric, reported with its perplexity.
``predict`` continues each text greedily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.data import Encoded, Split, text_batches
from peftlab.tasks import ModelSpec, PredictOptions, Task


def _model(spec: ModelSpec) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.source, config=spec.config)


def tokenize(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Each text ends with the tokenizer's eos token (added where the tokenizer does not add it
    itself). A text cut at ``max_length`` loses it: it did not end there."""
    eos = tokenizer.eos_token_id
    features, truncated = [], 0
    for texts, _, _ in text_batches(split.rows):
        for ids in tokenizer(texts, verbose=False)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            truncated += len(ids) > max_length
            features.append({"input_ids": ids[:max_length]})
    return Encoded(features), truncated


@dataclasses.dataclass(frozen=True)
class CausalLMCollator:
    """Pads causal-LM examples; ``labels`` are the input ids with the *padded positions* set to
    -100. Padding is found by position, not by token id: many tokenizers pad with their eos
    token, and masking by id would hide every eos from the loss, so the model never learns to
    stop (transformers' ``DataCollatorForLanguageModeling`` does that)."""

    pad_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            where = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[i, where] = torch.tensor(f["input_ids"])
            mask[i, where] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def collator(tokenizer: Any, model: nn.Module | None = None) -> CausalLMCollator:
    return CausalLMCollator(tokenizer.pad_token_id, tokenizer.padding_side)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
             options: PredictOptions, advance: Callable[[int], None] | None = None
             ) -> list[dict[str, Any]]:
    """``{"generated": text}`` per row: greedy continuations of up to ``max_new_tokens`` tokens.
    Prompts are padded and cut on the left, so every prompt ends right where generation starts
    (a prompt longer than ``max_length`` keeps its end)."""
    model.eval()
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    device = next(model.parameters()).device
    texts = [r["text"] for r in split.rows]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[dict[str, Any]] = [{} for _ in texts]
    try:
        for start in range(0, len(order), options.batch_size):
            index = order[start:start + options.batch_size]
            batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True,
                              truncation=True, max_length=options.max_length).to(device)
            batch.pop("token_type_ids", None)
            generated = model.generate(**batch, max_new_tokens=options.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            new = generated[:, batch["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = {"generated": text}
            if advance is not None:
                advance(len(index))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return out


TASKS = (
    Task(name="causal-lm", about="texts -> a language model that continues them",
         primary="perplexity", greater_is_better=False, model=_model, heads=lambda model: (),
         tokenize=tokenize, collator=collator, predict=generate, labelled="text",
         architectures=("ForCausalLM", "LMHeadModel")),
)
