"""Sequence classification and regression: a text (or a text pair) in, one label out.

The head is transformers' ``AutoModelForSequenceClassification`` (the [CLS] token through the
model's pooler, where it has one), or :class:`peftlab.heads.MeanPoolClassifier` when the model
folder declares mean pooling or ``--pooling mean`` asks for it. The new head, and a BERT-family
pooler that feeds only it, are trained and saved with the adapter.

Classification is judged by accuracy (also F1 and Matthews correlation); regression by Pearson
correlation (also Spearman and MSE). ``predict`` gives the class name with every class's
probability, or the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from peftlab.data import Split, tokenize_texts
from peftlab.errors import UsageError
from peftlab.heads import HEAD_CONFIG, HEAD_FILE, MeanPoolClassifier
from peftlab.metrics import classification_metrics, regression_metrics
from peftlab.tasks import ModelSpec, PredictOptions, Task, longest_first


def _model(spec: ModelSpec, regression: bool) -> nn.Module:
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = spec.config
    config.num_labels = spec.num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    if spec.labels is not None and not regression:
        if len(spec.labels) != spec.num_labels:
            raise UsageError(f"{len(spec.labels)} class names for a head of {spec.num_labels} classes")
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {name: i for i, name in enumerate(spec.labels)}
    folder = spec.folder
    if spec.pooling != "mean":
        if folder is not None and (folder / HEAD_CONFIG).is_file():
            raise UsageError(f"{spec.source} holds a mean-pooling classifier (peftlab_head.json); it "
                             "cannot be read with --pooling cls")
        # A head with other classes than the saved one is replaced.
        return AutoModelForSequenceClassification.from_pretrained(
            spec.source, config=config, ignore_mismatched_sizes=True)
    model = MeanPoolClassifier(AutoModel.from_pretrained(spec.source, config=config), spec.num_labels)
    if folder is not None and (folder / HEAD_FILE).is_file():
        model.load_head(folder)
    return model


def heads(model: nn.Module) -> tuple[str, ...]:
    """The task head, trained and saved with the adapter: top-level children with parameters
    other than the base model (``classifier``, ``score``, ``classification_head`` ...), plus the
    base model's ``pooler`` where there is one (BERT family). The pooler (dense + tanh over the
    first token) feeds only the classifier; training it makes the head the two-layer head that
    AdapterHub uses. Pretrained poolers are often not tuned for classification (sentence-embedding
    models such as all-MiniLM never trained theirs): on the demo set LoRA reaches 85% with it
    trained and 78% without."""
    if isinstance(model, MeanPoolClassifier):
        return ("classifier",)
    prefix = getattr(model, "base_model_prefix", "")
    found = [name for name, child in model.named_children()
             if name != prefix and any(True for _ in child.parameters())]
    base = getattr(model, prefix, None) if prefix else None
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        found.insert(0, f"{prefix}.pooler")
    return tuple(found)


def collator(tokenizer: Any, model: nn.Module | None = None) -> Callable[..., Any]:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def _name(name: str) -> str | int:
    """An integer class name is written as an integer, so labels read back as they were written."""
    return int(name) if re.fullmatch(r"-?\d+", name) else name


@torch.no_grad()
def _outputs(model: nn.Module, tokenizer: Any, split: Split, options: PredictOptions,
             advance: Callable[[int], None] | None) -> tuple[list[int], torch.Tensor]:
    """The model's logits for every row, batched longest first; with the row order they are in."""
    encoded, _ = tokenize_texts(split, tokenizer, options.max_length)
    collate = collator(tokenizer)
    device = next(model.parameters()).device
    order: list[int] = []
    parts = []
    for index in longest_first(encoded.lengths(), options.batch_size, advance):
        batch = collate([{k: v for k, v in encoded[i].items() if k != "labels"} for i in index])
        with options.routed(model, index):
            parts.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
        order.extend(index)
    return order, torch.cat(parts) if parts else torch.zeros(0, 1)


def predict_classes(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
                    options: PredictOptions, advance: Callable[[int], None] | None = None
                    ) -> list[dict[str, Any]]:
    """``{"label": name, "scores": {name: probability}}`` per row, in input order."""
    model.eval()
    order, logits = _outputs(model, tokenizer, split, options, advance)
    probs = logits.softmax(-1)
    out: list[dict[str, Any]] = [{} for _ in order]
    for i, p in zip(order, probs.tolist()):
        names = options.labels_of(i, labels)  # the row's adapter's names, under routing
        classes = [_name(n) for n in names] if names is not None else list(range(len(p)))
        best = max(range(len(p)), key=p.__getitem__)
        out[i] = {"label": classes[best], "scores": {str(c): s for c, s in zip(classes, p)}}
    return out


def predict_values(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
                   options: PredictOptions, advance: Callable[[int], None] | None = None
                   ) -> list[dict[str, Any]]:
    """``{"value": v}`` per row, in input order."""
    model.eval()
    order, logits = _outputs(model, tokenizer, split, options, advance)
    out: list[dict[str, Any]] = [{} for _ in order]
    for i, value in zip(order, logits[:, 0].tolist()):
        out[i] = {"value": value}
    return out


def _classes(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    return classification_metrics(labels, np.asarray(logits).argmax(-1), np.asarray(logits).shape[-1])


def _values(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    return regression_metrics(labels, np.asarray(logits).reshape(-1))


TASKS = (
    Task(name="classification", about="a text or text pair -> one of K classes",
         primary="accuracy", greater_is_better=True,
         model=lambda spec: _model(spec, regression=False), heads=heads,
         tokenize=tokenize_texts, collator=collator, predict=predict_classes,
         metrics=_classes, predicted=lambda logits: np.asarray(logits).argmax(-1),
         architectures=("ForSequenceClassification",), routes=True),
    Task(name="regression", about="a text or text pair -> one number",
         primary="pearson", greater_is_better=True,
         model=lambda spec: _model(spec, regression=True), heads=heads,
         tokenize=tokenize_texts, collator=collator, predict=predict_values,
         metrics=_values, predicted=lambda logits: np.asarray(logits).reshape(-1), labelled="value",
         architectures=("ForSequenceClassification",), routes=True),
)
