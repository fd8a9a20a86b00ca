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

Under FSDP (``accelerate launch --use_fsdp``) ``save_model`` gathers the sharded adapter on every
process and the main process writes it (:mod:`peftlab.distributed`); loading a checkpoint into a
sharded model (resuming, ``load_best_model_at_end``) is refused rather than done wrong.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from peftlab.adapter_set import AdapterSet, attached
from peftlab.distributed import adapter_modules, fsdp_version, gathered
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
    model_wrapped: Any
    state: Any
    processing_class: Any
    push_to_hub: Any

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if fsdp_version(self.model_wrapped) is None:  # one process or DDP: Trainer calls _save
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]
            return
        # Under FSDP Trainer would write nothing (sharded state dict) or call _save with the
        # whole model's state gathered; the adapter alone is gathered, by every process.
        adapters, name = trained_adapter(self.model)
        with gathered(self.model_wrapped, adapter_modules(adapters, name)) as main:
            if main and self.args.should_save:
                self._write(output_dir, adapters, name)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        if self.args.should_save:
            self._write(output_dir, *trained_adapter(self.model))

    def _write(self, output_dir: str | None, adapters: AdapterSet, name: str) -> None:
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        os.makedirs(folder, exist_ok=True)
        write_files_into(folder, adapter_files(adapters, name, None))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._refuse_sharded("resume_from_checkpoint")
        adapters, name = trained_adapter(self.model if model is None else model)
        restore_adapter(adapters, name, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        self._refuse_sharded("load_best_model_at_end")
        adapters, name = trained_adapter(self.model)
        restore_adapter(adapters, name, Path(self.state.best_model_checkpoint))

    def _refuse_sharded(self, what: str) -> None:
        if fsdp_version(self.model_wrapped) is not None:
            raise AdapterStateError(f"adapter_checkpoints: {what} is not supported under FSDP yet (it "
                                    "would copy whole tensors into sharded parameters); use DDP")


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
