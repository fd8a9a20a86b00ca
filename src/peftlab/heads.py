"""Classification heads that fit the backbone: the pooling a model was trained with.

transformers' ``AutoModelForSequenceClassification`` reads one position ([CLS], through the
model's pooler where it has one). Sentence-embedding models were trained to be read another way:
all-MiniLM-L6-v2's folder declares mean pooling (sentence-transformers' ``1_Pooling/config.json``)
and its pooler was never trained, which costs 7 points on the demo set (85.4 vs 78.1). So:

* ``pooling="auto"`` (the default) uses what the model folder declares, else [CLS] + pooler;
* ``"mean"``: :class:`MeanPoolClassifier`, the backbone (``AutoModel``) with dropout and a linear
  classifier over the attention-masked mean of the last hidden states;
* ``"cls"``: transformers' own classification model.

Plain transformers has no class for a mean-pooled classifier, so a model with this head cannot
be merged into a plain ``from_pretrained`` model or exported to peft's format: peftlab says so
instead of writing a model that would classify differently. A fully fine-tuned one is saved as
the backbone's ``save_pretrained`` folder plus :data:`HEAD_FILE` and :data:`HEAD_CONFIG`, which
:func:`peftlab.train.load_model` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peftlab.errors import UsageError

POOLINGS = ("auto", "cls", "mean")
HEAD_FILE = "peftlab_head.safetensors"
HEAD_CONFIG = "peftlab_head.json"


def declared_pooling(folder: str | Path) -> str | None:
    """The pooling a sentence-transformers model folder declares (``"mean"`` or ``"cls"``), or
    ``None`` when it declares none, or one peftlab does not implement (max, mean-sqrt-len)."""
    path = Path(folder)
    head = path / HEAD_CONFIG
    if head.is_file():
        return json.loads(head.read_text()).get("pooling")
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((path / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    modes = {k for k, v in config.items() if k.startswith("pooling_mode_") and v is True}
    if modes == {"pooling_mode_mean_tokens"}:
        return "mean"
    if modes == {"pooling_mode_cls_token"}:
        return "cls"
    return None


def resolve_pooling(asked: str, folder: str | Path | None) -> str:
    """``asked`` (auto, cls, mean) made definite for the model in ``folder``."""
    if asked not in POOLINGS:
        raise UsageError(f"--pooling {asked!r}: choose one of {', '.join(POOLINGS)}")
    if asked != "auto":
        return asked
    return (declared_pooling(folder) if folder is not None else None) or "cls"


class MeanPoolClassifier(nn.Module):
    """``classifier(dropout(mean of the backbone's last hidden states over real tokens))``, with
    cross-entropy (classification) or mean squared error (one output: regression)."""

    pooling = "mean"

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        self.config = config
        p = getattr(config, "classifier_dropout", None)
        p = p if p is not None else getattr(config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(p)
        ref = next(backbone.parameters())
        self.classifier = nn.Linear(config.hidden_size, num_labels).to(ref.device, ref.dtype)
        self.num_labels = num_labels

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **inputs: Any) -> SequenceClassifierOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs)[0]
        mask = (torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None
                else attention_mask).to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype)) if self.num_labels == 1
                    else F.cross_entropy(logits, labels))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_head(self, folder: Path) -> None:
        """The backbone as a plain model folder, plus the head's weights and description."""
        from safetensors.torch import save_file

        self.backbone.save_pretrained(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()},
                  str(folder / HEAD_FILE))
        head = {"pooling": self.pooling, "num_labels": self.num_labels}
        (folder / HEAD_CONFIG).write_text(json.dumps(head))

    def load_head(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.classifier.load_state_dict(load_file(str(folder / HEAD_FILE)))


def pooling_of(model: nn.Module) -> str:
    """The pooling a classification model uses."""
    return getattr(model, "pooling", "cls")


def label_names(model: nn.Module) -> list[str] | None:
    """A classifier's class names in id order (its config's ``id2label``); ``None`` for models
    that are not classifiers (regression heads, language models). A classifier is a model of a
    task with classes (:mod:`peftlab.tasks`: sequence classification, token classification ...)."""
    from peftlab.tasks import REGISTRY

    config = getattr(model, "config", None)
    endings = tuple(e for task in REGISTRY.values() if task.labelled == "class" for e in task.architectures)
    is_classifier = isinstance(model, MeanPoolClassifier) or type(model).__name__.endswith(endings)
    n = getattr(config, "num_labels", 0)
    if not is_classifier or n < 2 or getattr(config, "problem_type", None) == "regression":
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]


def set_label_names(model: nn.Module, names: list[str]) -> None:
    """Name a classifier's classes, so that ``save_pretrained`` (and a merged model) carries them."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def check_label_names(value: Any, where: str) -> list[str]:
    """``id2label`` as recorded in a file (keys "0".."K-1", distinct string names) as a list."""
    if not isinstance(value, dict) or not value:
        raise UsageError(f"{where}: id2label must be an object mapping class ids to names")
    keys = sorted(value, key=lambda k: int(k) if str(k).isdigit() else -1)
    names = [value[k] for k in keys]
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))] or not all(
            isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise UsageError(f"{where}: id2label must map the class ids 0..K-1 to distinct names")
    return names

