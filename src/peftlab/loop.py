"""peftlab's plain training loop: one adapter (or fusion) of a model in memory, on given batches.

``peftlab train`` runs on HF ``Trainer`` (:mod:`peftlab.train`) because a run from files needs
what Trainer brings: data-parallel processes, checkpoints and ``--resume``, evaluation and early
stopping. Training a model already in memory on batches in hand needs none of that, so the
fusion stage of ``peftlab compare`` and both stages of :mod:`peftlab.multitask` share this loop,
with ``peftlab train``'s recipe: AdamW without weight decay, a linear warm-up over the first 6%
of the steps then linear decay to zero (transformers' schedule, as Trainer uses it), gradient
clipping at norm 1.0; a NaN or infinite loss stops training with :class:`NonFiniteLossError`
before it updates anything. A fusion's loss includes its ``V ≈ I`` penalty.
:mod:`peftlab.measure` times :func:`step`, the update that every step of this loop makes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.adapter_set import attach
from peftlab.errors import NonFiniteLossError

#: Share of the steps spent warming the learning rate up from zero (``peftlab train --warmup``).
WARMUP = 0.06
#: Gradient norm clipped to (``peftlab train --max-grad-norm``).
MAX_GRAD_NORM = 1.0

Batch = Mapping[str, Any]


def adapter_loss(model: nn.Module, name: str | None, batch: Batch, **forward: Any) -> torch.Tensor:
    """The training loss of adapter ``name`` (``None``: full fine-tuning) on ``batch``: the
    model's loss, plus the fusion's penalty when ``name`` is a fusion. ``forward``: more keyword
    arguments for the model (a :class:`~peftlab.multitask.MultiTaskModel`'s ``head``)."""
    loss = model(**batch, **forward).loss
    if name is not None:
        adapters = attach(model)
        if adapters[name].members:
            loss = loss + adapters.fusion_penalty(name)
    return loss


def step(loss_of: Callable[[], torch.Tensor], params: Sequence[nn.Parameter],
         optimizer: torch.optim.Optimizer, schedule: Any = None,
         max_grad_norm: float = MAX_GRAD_NORM, number: int = 0) -> torch.Tensor:
    """One update: the loss, its backward pass, clipping, the optimizer's and the schedule's
    step. A non-finite loss raises :class:`NonFiniteLossError` (naming step ``number``) before
    anything changes. Returns the loss, detached."""
    loss = loss_of()
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"training loss is {loss.detach().float().mean().item()} at step {number}",
                                 number)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def fit(model: nn.Module, name: str, batches: Iterable[Batch], steps: int, lr: float,
        extras: Sequence[str] = (), **forward: Any) -> list[float]:
    """Train adapter (or fusion) ``name`` of ``model`` and its ``extras`` (a task head) for
    ``steps`` updates, everything else frozen; ``batches`` (dicts of model inputs with
    ``labels``) is iterated again as often as needed, and each batch's tensors are moved to the
    model's device. Leaves ``name`` active and the model in eval mode; returns each step's loss."""
    from transformers import get_linear_schedule_with_warmup

    adapters = attach(model)
    adapters.activate(name)
    params = adapters.train(name, extras=tuple(extras))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP * steps), steps)
    device = params[0].device if params else torch.device("cpu")
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)  # gradients left by earlier backward passes
    model.train()
    try:
        while len(losses) < steps:
            before = len(losses)
            for batch in batches:
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss_of = functools.partial(adapter_loss, model, name, moved, **forward)
                loss = step(loss_of, params, optimizer, schedule, number=len(losses) + 1)
                losses.append(loss.item())
                if len(losses) >= steps:
                    break
            if len(losses) == before:  # no batches at all
                break
    finally:
        model.eval()
    return losses
