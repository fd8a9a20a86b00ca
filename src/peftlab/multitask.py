"""Multi-task learning with AdapterFusion's two stages (Pfeiffer et al. 2021, arXiv 2005.00247).

Stage 1 trains one adapter per task (any method); stage 2 freezes them and trains a fusion of
them (:mod:`peftlab.methods.fusion`) on the target task::

    model = MultiTaskModel(AutoModel.from_pretrained(...), heads={"sst2": 2, "rte": 2, "mrpc": 2})
    result = train_fusion(model, {"sst2": sst2_batches, "rte": rte_batches, "mrpc": mrpc_batches},
                          target="rte", adapter_config=peftlab.BottleneckConfig.pfeiffer())
    adapters = peftlab.attach(model)
    adapters.save("sst2", "out/sst2")           # the adapter and its head, heads.sst2
    adapters.save(result.fusion, "out/fusion")  # the fusion and its head; records its members

Heads: one classification head per adapter, named like it, in ``model.heads`` (a ModuleDict
over one shared backbone). Each head is trained with its adapter (``extras=("heads.<name>",)``)
and saved in the adapter's file, so loading an adapter brings its head back; the fusion gets
its own head (a copy of the target task's stage-1 head to start from), so stage 2 never changes
what the stage-1 adapters predict. One model serves all tasks: ``out.logits[name]`` holds every
head's scores, which is what per-example routing needs (``with adapters.route([...])``: example
``i`` reads ``out.logits[route[i]][i]``).

Both stages train with :func:`peftlab.loop.fit`, the loop of ``peftlab compare``'s fusion stage
too (AdamW without weight decay, 6% warm-up then linear decay, clipping at 1.0; no evaluation);
for more, train each stage with your own loop using ``adapters.train(name, extras=...)`` and
``adapters.fusion_penalty``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sized
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.adapter_set import attach
from peftlab.config import AdapterConfig
from peftlab.errors import AdapterNameError, ConfigError
from peftlab.loop import fit
from peftlab.methods.fusion import FusionConfig

Pooling = Literal["mean", "first", "last"]
Batches = Iterable[Mapping[str, Any]]


@dataclasses.dataclass
class MultiTaskOutput:
    """``logits`` of every head by name; ``loss`` of the head asked for, when labels were given."""

    logits: dict[str, torch.Tensor]
    pooled: torch.Tensor
    loss: torch.Tensor | None = None


class MultiTaskModel(nn.Module):
    """A backbone (an encoder or decoder ``AutoModel`` without a head) and one linear head per
    adapter. ``pooling``: the mean of the non-padding tokens, the first token (BERT's [CLS]), or
    the last non-padding token (decoders; right padding). A head with one label is a regression
    head (MSE loss), others classify (cross-entropy)."""

    def __init__(self, backbone: nn.Module, heads: Mapping[str, int], pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "first", "last"):
            raise ConfigError(f"pooling must be 'mean', 'first' or 'last', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.heads = nn.ModuleDict()
        for name, num_labels in heads.items():
            self.add_head(name, num_labels)

    @property
    def config(self) -> Any:
        """The backbone's config (peftlab finds the roles through its ``model_type``)."""
        return self.backbone.config

    def add_head(self, name: str, num_labels: int = 2, like: str | None = None) -> None:
        """A new head ``name``; ``like``: start as a copy of that head (same number of labels)."""
        if not name or "." in name or name in self.heads:
            raise AdapterNameError(f"head {name!r} exists or is not a valid name (no '.')")
        if like is not None:
            num_labels = self.heads[like].out_features
        ref = next(self.backbone.parameters())
        head = nn.Linear(self.config.hidden_size, num_labels).to(ref.device, ref.dtype)
        if like is not None:
            head.load_state_dict(self.heads[like].state_dict())
        self.heads[name] = head.train(self.training)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, head: str | None = None,
                **inputs: Any) -> MultiTaskOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = self._pool(hidden, attention_mask)
        logits = {name: h(pooled) for name, h in self.heads.items()}
        if labels is None:
            return MultiTaskOutput(logits, pooled)
        if head not in self.heads:
            raise AdapterNameError(f"labels need head=<one of {list(self.heads)}>, got {head!r}")
        scores = logits[head]
        loss = (F.mse_loss(scores.squeeze(-1), labels.to(scores.dtype)) if scores.shape[-1] == 1
                else F.cross_entropy(scores, labels))
        return MultiTaskOutput(logits, pooled, loss)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "first":
            return hidden[:, 0]
        if mask is None:
            mask = hidden.new_ones(hidden.shape[:2])
        if self.pooling == "last":
            return hidden[torch.arange(hidden.shape[0]), mask.sum(1).long() - 1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def train_adapter(model: MultiTaskModel, name: str, batches: Batches, epochs: int = 1,
                  lr: float = 1e-3) -> list[float]:
    """Train adapter (or fusion) ``name`` and its head ``heads.<name>`` for ``epochs`` passes over
    ``batches`` (dicts of model inputs with ``labels``) with :func:`peftlab.loop.fit`; everything
    else stays frozen. Returns the losses. A fusion's loss includes its ``fusion_penalty``."""
    if not isinstance(batches, Sized):
        batches = list(batches)  # the schedule needs the number of steps; a generator runs once
    return fit(model, name, batches, epochs * len(batches), lr, extras=(f"heads.{name}",), head=name)


@dataclasses.dataclass(frozen=True)
class FusionResult:
    """The fusion's name and the training losses of every adapter trained, by name."""

    fusion: str
    losses: dict[str, list[float]]


def train_fusion(model: MultiTaskModel, tasks: Mapping[str, Batches], target: str,
                 adapter_config: AdapterConfig | Mapping[str, AdapterConfig] | None = None,
                 fusion_config: FusionConfig | None = None, fusion_name: str | None = None,
                 epochs: int = 1, lr: float = 1e-3, fusion_epochs: int | None = None,
                 fusion_lr: float = 5e-5) -> FusionResult:
    """Both stages. ``tasks``: task name -> training batches (re-iterable, e.g. a DataLoader);
    the task names are the adapter and head names. Stage 1 adds and trains an adapter per task
    from ``adapter_config`` (one for all, or one per task), skipping tasks that already have an
    adapter (e.g. loaded from disk). Stage 2 adds fusion ``fusion_name`` (default
    ``fusion-<target>``) of all tasks' adapters and trains it, with a head of its own, on
    ``tasks[target]``; the fusion is left active."""
    if target not in tasks:
        raise ConfigError(f"target {target!r} is not one of the tasks {list(tasks)}")
    headless = [t for t in tasks if t not in model.heads]
    if headless:
        raise ConfigError(f"tasks {headless} have no head; add them: model.add_head(name, num_labels)")
    adapters = attach(model)
    losses: dict[str, list[float]] = {}
    for task, batches in tasks.items():
        if task in adapters:
            continue
        config = adapter_config.get(task) if isinstance(adapter_config, Mapping) else adapter_config
        if config is None:
            raise ConfigError(f"task {task!r} has no adapter yet and no adapter_config to build one")
        adapters.add(task, config)
        losses[task] = train_adapter(model, task, batches, epochs, lr)
    name = fusion_name or f"fusion-{target}"
    if name not in model.heads:
        model.add_head(name, like=target)
    adapters.add_fusion(name, list(tasks), fusion_config)
    losses[name] = train_adapter(model, name, tasks[target],
                                 epochs if fusion_epochs is None else fusion_epochs, fusion_lr)
    return FusionResult(name, losses)
