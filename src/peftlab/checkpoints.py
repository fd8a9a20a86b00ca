"""HF ``Trainer`` checkpoints that hold the adapter being trained, not the whole model.

A plain ``Trainer`` saves ``model.save_pretrained`` at each checkpoint: for an adapted model
that would be the full model (91 MB for MiniLM against a 0.3 MB adapter), with the wrapped
projections under other names. peftlab refuses that (see :func:`peftlab.adapter_set.attach`),
and one line gives the Trainer adapter-sized checkpoints instead::

    trainer = peftlab.adapter_checkpoints(Trainer(model=model, args=args, ...))

Each checkpoint (and ``trainer.save_model(dir)``) then holds ``adapter_config.json`` and
``adapter_model.safetensors`` of the trained adapter plus the modules trained along with it
(``adapters.train(name, extras=...)``): an adapter directory that ``adapters.load`` reads.
``trainer.train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy those tensors
back into the adapter after checking that they are the same adapter. This works for any
``Trainer`` subclass (``Seq2SeqTrainer``, TRL's trainers), as peft's models do; it relies on the
Trainer's ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` hooks, the ones
transformers itself branches on for peft models.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from peftlab.adapter_set import AdapterSet, attached
from peftlab.errors import AdapterStateError
from peftlab.io import adapter_files, restore_adapter, write_files_into

TrainerT = TypeVar("TrainerT")


def trained_adapter(model: nn.Module) -> tuple[AdapterSet, str]:
    """The attached set of ``model`` (unwrapped from DDP and the like) and the one adapter whose
    parameters are being trained."""
    while isinstance(getattr(model, "module", None), nn.Module) and attached(model) is None:
        model = model.module  # DDP / DataParallel wrappers
    adapters = attached(model)
    if adapters is None:
        raise AdapterStateError("adapter_checkpoints: the Trainer's model has no adapters; "
                                "attach one with peftlab.attach(model).add(...)")
    training = [n for n in adapters.names if any(p.requires_grad for p in adapters.parameters(n))]
    if len(training) != 1:
        raise AdapterStateError(
            f"adapter_checkpoints: {len(training)} adapters are trainable ({training}); call "
            "adapters.train(name) for the one adapter this Trainer trains")
    return adapters, training[0]


class AdapterCheckpoints:
    """Mixed in before a ``Trainer`` class by :func:`adapter_checkpoints`."""

    args: Any
    model: Any
    state: Any
    processing_class: Any

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        os.makedirs(folder, exist_ok=True)
        adapters, name = trained_adapter(self.model)
        write_files_into(folder, adapter_files(adapters, name, None))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapters, name = trained_adapter(self.model if model is None else model)
        restore_adapter(adapters, name, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        adapters, name = trained_adapter(self.model)
        restore_adapter(adapters, name, Path(self.state.best_model_checkpoint))


@functools.cache
def with_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` with adapter checkpoints: ``AdapterCheckpoints`` mixed in before it."""
    return type(f"Adapter{trainer_class.__name__}", (AdapterCheckpoints, trainer_class), {})


def adapter_checkpoints(trainer: TrainerT) -> TrainerT:
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass) checkpoint, save and resume only
    the adapter it trains; returns the same object."""
    if not isinstance(trainer, AdapterCheckpoints):
        trainer.__class__ = with_checkpoints(type(trainer))
    return trainer
