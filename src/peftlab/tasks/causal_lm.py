"""Causal language modelling: the model learns to continue each text, up to its end; or, for
instruction tuning, the completion of each prompt, or the assistant's turns of each conversation.

The head is the model's own (``AutoModelForCausalLM``): pretrained, so nothing but the adapter is
trained. Rows are texts (``text``), prompt/completion pairs or chat ``messages``
(:mod:`peftlab.instruct` reads and renders the latter two, as TRL's SFT does). Each example ends
with the tokenizer's eos token, which the loss covers, so that the model learns where to stop. The
loss is the mean token cross-entropy over the learned tokens (a text's every token; a completion's
or the assistant's tokens); it is the metric, reported with its perplexity. ``predict`` continues
each text, or answers each prompt or conversation (with the chat template's generation prompt),
greedily, until eos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftlab import instruct
from peftlab.data import Encoded, Split, text_batches
from peftlab.tasks import ModelSpec, PredictOptions, Task, longest_first


def _model(spec: ModelSpec) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.source, config=spec.config)
    if getattr(model, "loss_type", "") is None:
        # transformers names a model's loss after its class; "GPT2LMHeadModel" matches no name,
        # so Trainer, not knowing the loss shifts the labels, would count each text's first token
        # as predicted and divide the summed loss by too many (GPT-2's loss and gradients came
        # out 5/6 of the true ones on 6-token texts). The loss itself falls back to this one.
        model.loss_type = "ForCausalLM"
    return model


def tokenize(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Each text ends with the tokenizer's eos token (added where the tokenizer does not add it
    itself). A text cut at ``max_length`` loses it: it did not end there. Instruction rows carry a
    ``loss_mask`` per example (:func:`peftlab.instruct.encode`)."""
    if isinstance(split.rows, instruct.InstructRows):
        return instruct.encode(split, tokenizer, max_length)
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
    stop (transformers' ``DataCollatorForLanguageModeling`` does that). An example's own
    ``loss_mask`` (instruction rows: 1 on the completion or the assistant's tokens and their eos)
    sets the tokens it does not learn to -100 too; without one, every token is learned."""

    pad_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        learned = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            where = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            ids[i, where] = torch.tensor(f["input_ids"])
            mask[i, where] = 1
            learned[i, where] = torch.tensor(f["loss_mask"]) if "loss_mask" in f else 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(learned == 0, -100)}


def collator(tokenizer: Any, model: nn.Module | None = None) -> CausalLMCollator:
    return CausalLMCollator(tokenizer.pad_token_id, tokenizer.padding_side)


def generate(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
             options: PredictOptions, advance: Callable[[int], None] | None = None
             ) -> list[dict[str, Any]]:
    """``{"generated": text}`` per row: greedy continuations of up to ``max_new_tokens`` tokens,
    stopping at eos. A text is continued; a prompt or a conversation (without its final assistant
    turn) is answered (:func:`peftlab.instruct.prompt_ids`). A prompt longer than ``max_length``
    keeps its end, so that it still ends right where generation starts."""
    if isinstance(split.rows, instruct.InstructRows):
        prompts = [ids[-options.max_length:] for ids in instruct.prompt_ids(split.rows, tokenizer)]
    else:
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"
        try:
            prompts = [ids for texts, _, _ in text_batches(split.rows) for ids in tokenizer(
                texts, truncation=True, max_length=options.max_length, verbose=False)["input_ids"]]
        finally:
            tokenizer.truncation_side = side
    return [{"generated": text} for text in continue_ids(model, tokenizer, prompts, options, advance)]


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens that end generation: the model's eos ids and the tokenizer's eos (which training
    appends to every example)."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    ids = [] if found is None else [found] if isinstance(found, int) else list(found)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def continue_ids(model: nn.Module, tokenizer: Any, prompts: list[list[int]], options: PredictOptions,
                 advance: Callable[[int], None] | None = None) -> list[str]:
    """The decoded greedy continuation of each token list, batched longest first and padded on the
    left, so that every prompt ends right where generation starts."""
    model.eval()
    device = next(model.parameters()).device
    out = [""] * len(prompts)
    stop = _stop_ids(model, tokenizer)
    for index in longest_first([len(p) for p in prompts], options.batch_size, advance):
        longest = max(len(prompts[i]) for i in index)
        ids = torch.full((len(index), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(index):
            n = len(prompts[i])
            if n:
                ids[row, longest - n:] = torch.tensor(prompts[i])
                mask[row, longest - n:] = 1
        with options.routed(model, index):  # greedy: every step keeps the batch's rows in order
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=options.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stop or None)
        for i, text in zip(index, tokenizer.batch_decode(generated[:, longest:], skip_special_tokens=True)):
            out[i] = text
    return out


TASKS = (
    Task(name="causal-lm", about="texts -> a language model that continues them",
         primary="perplexity", greater_is_better=False, model=_model, heads=lambda model: (),
         tokenize=tokenize, collator=collator, predict=generate, labelled="text", load=instruct.load,
         data_options=("chat_template", "loss_on"),
         architectures=("ForCausalLM", "LMHeadModel"), routes=True,
         recognizes=lambda names: {"prompt", "completion"} <= names or "messages" in names),
)
