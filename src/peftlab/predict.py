"""Predictions for unlabelled text with a trained model (``peftlab predict``).

One output row per input row, in input order: ``{"label": name, "scores": {name: probability}}``
for classification (an integer class name is written as an integer, so labels read back as they
were written), ``{"value": v}`` for regression and ``{"generated": text}`` for causal-LM (greedy
decoding of up to ``max_new_tokens`` new tokens after the text).

Examples are batched by length (less padding) and the results put back in input order.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.data import Split, tokenize


def jsonl_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """One compact JSON object a line; a non-finite value (a diverged model) is written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return "".join(json.dumps(clean(r), ensure_ascii=False) + "\n" for r in rows).encode()


def _name(name: str) -> str | int:
    return int(name) if re.fullmatch(r"-?\d+", name) else name


@torch.no_grad()
def predict_split(model: nn.Module, tokenizer: Any, task: str, split: Split, labels: Sequence[str] | None,
                  batch_size: int = 32, max_length: int = 128, max_new_tokens: int = 32,
                  advance: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Predictions for every row of ``split``; ``advance(n)`` is called after each batch of ``n``."""
    model.eval()
    if task == "causal-lm":
        return _generate(model, tokenizer, split, batch_size, max_length, max_new_tokens, advance)
    from transformers import DataCollatorWithPadding

    encoded, _ = tokenize(split, tokenizer, task, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = [{} for _ in order]
    names = [_name(n) for n in labels] if labels is not None else None
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = collate([{k: v for k, v in encoded[i].items() if k != "labels"} for i in index])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if task == "regression":
            for i, value in zip(index, logits[:, 0].tolist()):
                out[i] = {"value": value}
        else:
            probs = logits.softmax(-1)
            classes = names or list(range(probs.shape[1]))
            for i, p in zip(index, probs.tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                out[i] = {"label": classes[best], "scores": {str(c): s for c, s in zip(classes, p)}}
        if advance is not None:
            advance(len(index))
    return out


def _generate(model: nn.Module, tokenizer: Any, split: Split, batch_size: int, max_length: int,
              max_new_tokens: int, advance: Callable[[int], None] | None) -> list[dict[str, Any]]:
    """Greedy continuations. Prompts are padded and cut on the left, so every prompt ends right
    where generation starts (a prompt longer than ``max_length`` keeps its end)."""
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    device = next(model.parameters()).device
    texts = [r["text"] for r in split.rows]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[dict[str, Any]] = [{} for _ in texts]
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in index], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            batch.pop("token_type_ids", None)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            new = generated[:, batch["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = {"generated": text}
            if advance is not None:
                advance(len(index))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return out
