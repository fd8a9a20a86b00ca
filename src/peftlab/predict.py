"""Predictions for unlabelled text with a trained model (``peftlab predict``).

One output row per input row, in input order: ``{"label": name, "scores": {name: probability}}``
for classification (an integer class name is written as an integer, so labels read back as they
were written), ``{"value": v}`` for regression, ``{"generated": text}`` for causal-LM (greedy
decoding of up to ``max_new_tokens`` new tokens after the text), the same for seq2seq (the output
text) and ``{"tokens": [...], "tags": [...], "scores": [...]}`` for token classification (a tag
per word).

Examples are batched by length (less padding) and the results put back in input order. With
:class:`RowRouting`, rows of one call run different adapters in the same forward (per-example
routing, :meth:`peftlab.AdapterSet.route`): ``peftlab serve`` batches its requests this way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.data import Split
from peftlab.errors import UsageError
from peftlab.tasks import RowRouting

__all__ = ["RowRouting", "jsonl_bytes", "predict_split"]


def jsonl_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """One compact JSON object a line; a non-finite value (a diverged model) is written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return "".join(json.dumps(clean(r), ensure_ascii=False) + "\n" for r in rows).encode()


def predict_split(model: nn.Module, tokenizer: Any, task: str, split: Split, labels: Sequence[str] | None,
                  batch_size: int = 32, max_length: int = 128, max_new_tokens: int = 32,
                  advance: Callable[[int], None] | None = None,
                  routing: RowRouting | None = None) -> list[dict[str, Any]]:
    """Predictions for every row of ``split`` by ``task``'s rule (:mod:`peftlab.tasks`);
    ``advance(n)`` is called after each batch of ``n``. ``routing``: each row's adapter, rows for
    different adapters sharing forwards (``peftlab serve``)."""
    from peftlab.tasks import PredictOptions, task_for

    rule = task_for(task)
    if routing is not None and not rule.routes:
        raise UsageError(f"{task} predictions cannot run each row with its own adapter; predict "
                         "each adapter's rows separately")
    if routing is not None and len(routing.adapters) != len(split.rows):
        raise UsageError(f"routing names {len(routing.adapters)} adapters for {len(split.rows)} rows")
    options = PredictOptions(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                             routing=routing)
    return rule.predict(model, tokenizer, split, labels, options, advance)


def greedy(max_new_tokens: int) -> dict[str, Any]:
    """``generate``'s arguments for greedy decoding of up to ``max_new_tokens`` tokens, whatever the
    model's generation config says: sampling would make evaluations differ from run to run, and
    beams (BART-CNN's config has 4) from ``predict``'s outputs."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}


def decode_ids(tokenizer: Any, ids: Any) -> list[str]:
    """Token id rows as texts, special tokens dropped; -100 (a label's or an output's padding,
    as Trainer pads) is read as the pad token."""
    ids = torch.as_tensor(ids)
    ids = ids.masked_fill(ids < 0, tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


@torch.no_grad()
def generated_texts(model: nn.Module, tokenizer: Any, inputs: dict[str, torch.Tensor],
                    max_new_tokens: int) -> list[str]:
    """Greedy outputs of up to ``max_new_tokens`` tokens for a padded batch of ``inputs`` (its
    ``input_ids`` and ``attention_mask``; labels and decoder inputs are not given to ``generate``).
    A decoder-only model's output starts with its input, which is cut off."""
    given = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    out = model.generate(**given, **greedy(max_new_tokens), pad_token_id=tokenizer.pad_token_id)
    if not getattr(model.config, "is_encoder_decoder", False):
        out = out[:, given["input_ids"].shape[1]:]
    return decode_ids(tokenizer, out)
