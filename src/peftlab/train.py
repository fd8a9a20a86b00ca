"""Fine-tuning with any peftlab method on Hugging Face ``Trainer``.

Training runs on ``transformers.Trainer``, so ``torchrun --nproc_per_node N`` and
``accelerate launch`` give data-parallel training with no code change. ``batch_size`` is the
*global* batch: it is split across processes, so a run gives the same result on 1 or N processes.

Each method's default learning rate comes from its registry entry (:mod:`peftlab.methods`;
``peftlab methods`` lists them, and each method's file gives the source). Full fine-tuning uses
2e-5, from BERT's GLUE grid {2,3,4,5}e-5 (arXiv 1810.04805). ``--lr`` overrides, ``--lr auto``
searches (:mod:`peftlab.lr_search`).

These suit runs of several epochs. On very short runs a higher rate can pay off: LoRA on
MiniLM-L6 with 2,000 SST-2 examples for one epoch reached 76.8% at 5e-4 and 81.3% at 2e-3.

Other defaults: AdamW without weight decay, linear decay after a 6% linear warm-up, and gradient
clipping to norm 1.0 (``max_grad_norm``; 0 turns it off), so that one bad batch cannot blow up
the adapter. A NaN or infinite loss, or an update that makes a trainable parameter non-finite,
stops training with :class:`NonFiniteLossError` naming the step; checkpoints saved before it are
kept (a parameter check runs before every save, so no checkpoint holds non-finite values).

A run directory ``out`` holds ``run.json`` (the arguments), ``checkpoints/``, and at the end the
adapter (``adapter/``, peftlab format, classification head included) or the full model
(``model/``), ``metrics.json``, ``log.csv`` (one row per step) and ``loss.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from peftlab.adapter_set import attach
from peftlab.config import AdapterConfig, check_value, clip
from peftlab.data import DataSource, Split, TaskData, load_task, parse_split_names, tokenize
from peftlab.distributed import any_process, check_launch, local, save_adapter, summed
from peftlab.errors import ConfigError, DataError, NonFiniteLossError, UsageError
from peftlab.heads import MeanPoolClassifier, label_names, pooling_of, resolve_pooling
from peftlab.io import WEIGHTS_FILE, replacing_dir, write_atomic
from peftlab.loop import MAX_GRAD_NORM, WARMUP
from peftlab.measure import FULL
from peftlab.methods import preset, presets
from peftlab.metrics import perplexity
from peftlab.names import check_name
from peftlab.sequence import prompts_inputs
from peftlab.tasks import ModelSpec, Task, task_for

# ---- methods ----------------------------------------------------------------------------------
#: Full fine-tuning's default rate: BERT's GLUE grid {2,3,4,5}e-5 (arXiv 1810.04805).
FULL_LR = 2e-5


def method_names() -> list[str]:
    """Every method ``train`` takes: the registry's presets, then full fine-tuning."""
    return [*presets(), FULL]


def default_lr(method: str) -> float:
    """The method's default learning rate (its preset's, or :data:`FULL_LR`)."""
    return FULL_LR if method == FULL else preset(method)[1].lr


def method_config(method: str, sets: tuple[str, ...] | list[str] = ()) -> AdapterConfig | None:
    """The preset config of ``method`` with ``key=value`` overrides applied (``None`` for full
    fine-tuning). Values are converted to the field's type; unknown keys raise :class:`UsageError`."""
    if method == FULL:
        if sets:
            raise UsageError("--set does not apply to --method full (it has no adapter config)")
        return None
    config = preset(method)[1].make()
    hints = typing.get_type_hints(type(config))
    fields = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(f"--set {item!r}: write it as key=value, e.g. --set {fields[0]}=16")
        if key not in fields:
            raise UsageError(f"--set {key}: {method} has no setting {key!r}; its settings are "
                             f"{', '.join(fields)}")
        try:
            changes[key] = check_value(key, value.strip(), hints[key], text=True)
        except ConfigError as e:
            raise UsageError(f"--set {e}") from None
    try:
        return config.replace(**changes) if changes else config
    except ConfigError as e:
        raise UsageError(f"--set: {e}") from None


# ---- models -----------------------------------------------------------------------------------
def _quiet_transformers() -> None:
    """Hide transformers' info/warning chatter (e.g. about the new head, which we report)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(model_id: str, task: str, num_labels: int, pooling: str = "auto",
               labels: tuple[str, ...] | list[str] | None = None) -> tuple[nn.Module, Any, tuple[str, ...]]:
    """Model, tokenizer and the names of its task-head modules (trained and saved with the
    adapter). ``model_id`` is a local folder saved with ``save_pretrained`` or a Hub id; the head
    is ``task``'s (:mod:`peftlab.tasks`). ``pooling`` (auto, cls, mean) chooses a classification
    head's reading of the backbone (:mod:`peftlab.heads`; auto: what the model folder declares,
    else [CLS]). ``labels`` names a classifier's classes in id order: set as the config's
    ``id2label``/``label2id``, so that the adapter and a saved or merged model carry them."""
    from transformers import AutoConfig, AutoTokenizer

    spec_task = task_for(task)
    _quiet_transformers()
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model_id} is not a model folder (no config.json); pass a folder "
                             "written by save_pretrained, or a Hub model id")
        source = str(path)
    else:
        source = model_id
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UsageError(f"model {model_id!r} is neither a local model folder nor available from "
                         f"the Hub ({_first_line(e)}); pass a local model folder") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"no usable tokenizer in {model_id} ({_first_line(e)}); save one next to "
                         "the model with tokenizer.save_pretrained") from None
    folder = path if path.exists() else None
    spec = ModelSpec(source=source, folder=folder, config=config, num_labels=num_labels,
                     labels=None if labels is None else tuple(labels),
                     pooling=resolve_pooling(pooling, folder))
    try:
        model = spec_task.model(spec)
    except ValueError as e:
        raise UsageError(f"{model_id} ({config.model_type}) cannot be loaded for {task} "
                         f"({_first_line(e)})") from None
    except OSError as e:
        raise UsageError(f"{model_id} holds no readable weights ({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often lack a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, spec_task.heads(model)


def task_head(model: nn.Module, task: str) -> tuple[str, ...]:
    """The modules of ``model`` trained and saved with an adapter for ``task``."""
    return task_for(task).heads(model)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ---- run directory ----------------------------------------------------------------------------
RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
# Arguments that must not change between a run and its --resume.
_RESUME_KEYS = ("model", "data", "method", "sets", "task", "epochs", "lr", "batch_size", "max_length",
                "seed", "max_train_samples", "max_eval_samples", "eval_every", "save_every",
                "max_grad_norm", "warmup", "name", "lr_search", "max_steps", "max_minutes", "patience",
                "pooling", "train_file", "validation_file", "data_config", "split_names", "text_column",
                "pair_column", "label_column", "labels", "chat_template", "loss_on", "select_metric")
# What runs from before those data options existed recorded, in effect.
_RESUME_DEFAULTS: dict[str, Any] = {"split_names": []}


def json_bytes(obj: Any) -> bytes:
    """Strict JSON (NaN and infinities become null) with a trailing newline."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return (json.dumps(clean(obj), indent=2, allow_nan=False) + "\n").encode()


def check_out_dir(out: Path, resume: bool, args: dict[str, Any]) -> None:
    """Refuse an output directory that holds anything but this run (nothing is written here)."""
    if resume:
        run_file = out / RUN_FILE
        if not run_file.is_file():
            raise UsageError(f"--resume: {out} holds no peftlab run (no {RUN_FILE}); drop --resume "
                             "to start a new run")
        try:
            previous = json.loads(run_file.read_text())["args"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"--resume: {run_file} is unreadable; start a new run in another "
                             "--out") from None
        diffs = [f"{k} ({previous.get(k, _RESUME_DEFAULTS.get(k))!r} -> {args.get(k)!r})"
                 for k in _RESUME_KEYS if previous.get(k, _RESUME_DEFAULTS.get(k)) != args.get(k)]
        if diffs:
            raise UsageError(f"--resume: arguments differ from the run in {out}: {', '.join(diffs)}; "
                             "repeat the original arguments or choose a new --out")
        return
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} is a file; choose a directory")
        if any(out.iterdir()):
            if (out / RUN_FILE).is_file():
                raise UsageError(f"--out {out} holds a previous run; add --resume to continue it, or "
                                 "choose a new --out")
            raise UsageError(f"--out {out} exists and is not empty; choose a new or empty directory")


def last_checkpoint(folder: Path, adapter_run: bool = True) -> Path | None:
    """The newest *complete* checkpoint: Trainer writes ``trainer_state.json`` last, so a
    checkpoint whose state file is missing or cut short was interrupted and is skipped."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.rpartition("-")[2]
        if suffix.isdigit() and p.is_dir():
            found.append((int(suffix), p))
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if adapter_run and not (p / WEIGHTS_FILE).is_file():
            continue
        return p
    return None


# ---- options ----------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainOptions:
    """Everything ``peftlab train`` takes; see the CLI help for each field."""

    model: str
    data: str | None  # folder, file, saved dataset or Hub name (None: train_file + validation_file)
    method: str
    out: Path
    sets: tuple[str, ...] = ()
    task: str = "auto"
    epochs: float = 3.0
    lr: float | None = None
    lr_search: bool = False  # choose the rate on held-out training data (peftlab.lr_search)
    batch_size: int = 16
    max_length: int | None = None  # default: 128, or the model's limit if smaller
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_every: int | None = None
    save_every: int | None = None
    max_grad_norm: float = MAX_GRAD_NORM
    warmup: float = WARMUP  # the share of the steps
    max_steps: int | None = None  # a budget in steps, whatever the epochs (equal-steps comparisons)
    max_minutes: float | None = None  # a budget in training wall time (equal-time comparisons)
    patience: int | None = None  # early stopping on held-out training data, in evaluations
    # The held-out metric that stops early and picks the checkpoint (default: the task's primary;
    # compare passes the metric it judges by, e.g. CoLA's Matthews, where accuracy sits at the
    # majority share long after the model has begun to tell the classes apart).
    select_metric: str | None = None
    pooling: str = "auto"  # a classification head's reading of the backbone (peftlab.heads)
    train_file: str | None = None  # instead of --data: a file (or saved Dataset) per split
    validation_file: str | None = None
    data_config: str | None = None  # a Hub dataset's config
    split_names: tuple[str, ...] = ()  # "validation=dev": a split read under another name
    text_column: str | None = None  # columns, where detection is not wanted (peftlab.data)
    pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str, ...] | None = None  # class names in id order (default: from the data)
    chat_template: str | None = None  # a Jinja chat template file for chat rows (default: the tokenizer's)
    loss_on: str | None = None  # instruction rows: the tokens the training loss covers (peftlab.instruct)
    group_by_length: bool = False
    name: str | None = None
    resume: bool = False
    checkpoints: bool = True
    quiet: bool = False

    def record(self) -> dict[str, Any]:
        """The arguments as JSON (model and data folders made absolute)."""
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["sets"] = list(self.sets)
        d["split_names"] = list(self.split_names)
        d["labels"] = None if self.labels is None else list(self.labels)
        for key in ("model", "data", "train_file", "validation_file", "chat_template"):
            if d[key] is not None and Path(d[key]).expanduser().exists():
                d[key] = str(Path(d[key]).expanduser().resolve())
        for key in ("resume", "checkpoints", "quiet", "out"):
            d.pop(key)
        return d

    def source(self) -> DataSource:
        """Where the data is, and which columns to read."""
        files = tuple((split, f) for split, f in (("train", self.train_file),
                                                   ("validation", self.validation_file)) if f)
        if self.data is None and len(files) < 2:
            raise UsageError("pass --data (a folder, saved dataset or Hub name), or both --train-file "
                             "and --validation-file")
        try:
            names = parse_split_names(self.split_names)
        except DataError as e:
            raise UsageError(str(e)) from None
        return DataSource(data=self.data, files=files, config=self.data_config, split_names=names,
                          text_column=self.text_column, pair_column=self.pair_column,
                          label_column=self.label_column, chat_template=self.template_text(),
                          loss_on=self.loss_on)

    def template_text(self) -> str | None:
        """The text of the ``--chat-template`` file, if one is given."""
        from peftlab.instruct import read_chat_template

        return None if self.chat_template is None else read_chat_template(self.chat_template)

    def data_name(self) -> str:
        """A short name of the data, for plot titles."""
        return Path(self.data).name if self.data else Path(self.train_file or "data").stem

    def check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(math.isfinite(self.epochs) and self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        need(self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
             f"--lr must be positive, got {self.lr}")
        need(not (self.lr_search and self.lr is not None), "give --lr a rate or 'auto', not both")
        need(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        need(self.max_length is None or self.max_length > 1,
             f"--max-length must be at least 2, got {self.max_length}")
        for flag, v in (("--max-train-samples", self.max_train_samples),
                        ("--max-eval-samples", self.max_eval_samples),
                        ("--eval-every", self.eval_every), ("--save-every", self.save_every),
                        ("--max-steps", self.max_steps), ("--patience", self.patience)):
            need(v is None or v > 0, f"{flag} must be positive, got {v}")
        need(self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
             f"--max-minutes must be positive, got {self.max_minutes}")
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        from peftlab.instruct import check_loss_on

        check_loss_on(self.loss_on)


def world() -> tuple[int, int]:
    """(rank, number of processes) as set by torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---- the Trainer subclass ---------------------------------------------------------------------
def predicted_tokens(labels: torch.Tensor, prompted: bool = False) -> int:
    """How many tokens a causal language model's loss averages over: those with a label, after
    the shift by one (position 0 predicts nothing), or all of them behind a prompt
    (:func:`peftlab.sequence.prompts_inputs`)."""
    return int((labels if prompted else labels[..., 1:]).ne(-100).sum())


def _make_trainer_class(adapter_run: bool, generates: bool = False, token_mean: bool = False) -> type:
    from transformers import Seq2SeqTrainer, Trainer

    from peftlab.checkpoints import with_checkpoints

    base = Seq2SeqTrainer if generates else Trainer

    class PeftlabTrainer(with_checkpoints(base) if adapter_run else base):  # type: ignore[misc]
        """Trainer that stops on a non-finite loss; an adapter run checkpoints only the adapter
        and its head (:mod:`peftlab.checkpoints`), full fine-tuning the whole model. A task
        judged on generated text evaluates by generating (``Seq2SeqTrainer`` with
        ``predict_with_generate``), with ``generation``'s arguments to ``generate``. A language
        model's (``token_mean``) evaluation loss is the mean over all predicted tokens, not
        transformers' mean of batch means, which weighs a batch of short texts like one of long
        ones and so depends on the batch size."""

        generation: dict[str, Any] = {}
        _token_loss = [0.0, 0.0]  # this evaluation's summed token losses and token count
        _prompted = False  # whether a prompt puts virtual tokens before the texts evaluated

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            self._token_loss = [0.0, 0.0]
            self._prompted = token_mean and prompts_inputs(self.model)  # once per evaluation
            output = super().evaluation_loop(*args, **kwargs)
            if token_mean:
                total, count = summed(self._token_loss, self.args.device)
                key = f"{kwargs.get('metric_key_prefix', 'eval')}_loss"
                if count and key in output.metrics:
                    output.metrics[key] = total / count
            return output

        def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            loss, logits, labels = super().prediction_step(model, inputs, *args, **kwargs)
            if token_mean and loss is not None:
                n = predicted_tokens(inputs["labels"], self._prompted)
                self._token_loss = [self._token_loss[0] + float(loss) * n, self._token_loss[1] + n]
            return loss, logits, labels

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            return super().evaluate(*args, **{**self.generation, **kwargs})

        def _get_eval_sampler(self, eval_dataset: Any) -> Any:
            # In order: the eval sets are already longest first, and transformers' length-grouped
            # eval sampler (on with group_by_length) would shuffle them by the seed, so saved
            # predictions of different runs could not be paired example by example.
            from transformers.trainer_utils import has_length

            if eval_dataset is None or not has_length(eval_dataset) or self.args.world_size > 1:
                return super()._get_eval_sampler(eval_dataset)
            return torch.utils.data.SequentialSampler(eval_dataset)

        def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                if any_process(not bool(torch.isfinite(loss.detach()).all()), loss.device):
                    step = self.state.global_step + 1
                    raise NonFiniteLossError(
                        f"training loss is {loss.detach().float().mean().item()} at step {step} "
                        f"(epoch {self.state.epoch or 0:.2f})", step)
            return result

    return PeftlabTrainer


#: Evaluations on the held-out slice per run when early stopping picks the best checkpoint.
EVALUATIONS = 8
#: Early stopping never stops a run before this share of its planned steps.
MIN_FRACTION = 0.5


def _best_step(state: Any) -> int | None:
    best = getattr(state, "best_model_checkpoint", None)
    return int(best.rpartition("-")[2]) if best else None


def _budget_callbacks(opts: TrainOptions, task: Task, floor: float | None = None) -> list[Any]:
    """Early stopping after ``patience`` evaluations without improvement, and the wall-time
    budget: a method that stops learning, or runs out of time, stops spending. ``floor``: the
    held-out score of a constant prediction; a run that has not yet scored above it has not begun
    to learn, and is not stopped early (see :func:`constant_floor`)."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    class WallClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.deadline = time.perf_counter() + 60.0 * (opts.max_minutes or 0.0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.perf_counter() >= self.deadline:
                control.should_training_stop = True

    class EarlyStopping(EarlyStoppingCallback):
        """Stops after ``patience`` evaluations without improvement, but never in the first half
        of the planned steps: slow starters (LoRA's B begins at zero) must get the chance to
        learn before they are judged."""

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kw: Any) -> None:
            stopping = control.should_training_stop  # another budget may already have stopped it
            super().on_evaluate(args, state, control, metrics, **kw)
            early = state.global_step < MIN_FRACTION * state.max_steps
            if not stopping and (early or self.unmoved(state, metrics)):
                self.early_stopping_patience_counter = 0  # patience counts from the first move
                control.should_training_stop = False

        def unmoved(self, state: Any, metrics: dict[str, float]) -> bool:
            """Whether every held-out score so far is at or below the constant prediction's.
            CoLA with MiniLM sits at Matthews 0 for its first 200 steps, then learns (0.16 after
            375): judged like a run that stopped learning, it was stopped at the constant level."""
            metric, greater = selection(opts, task)
            value = metrics.get(f"eval_{metric}")
            if floor is None or not greater or value is None:
                return False
            best = value if state.best_metric is None else max(state.best_metric, value)
            return best <= floor + 1e-9

    out: list[Any] = []
    if opts.patience:
        out.append(EarlyStopping(early_stopping_patience=opts.patience))
    if opts.max_minutes:
        out.append(WallClock())
    return out


def _callbacks(trainable: list[nn.Parameter], console: Console, quiet: bool, primary: str) -> list[Any]:
    from transformers import TrainerCallback

    class FiniteParameters(TrainerCallback):
        """After each optimizer step (and so before any checkpoint) the trainable parameters must
        be finite: a NaN update would otherwise be saved as the 'last good' checkpoint."""

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            # FSDP2 replaces the parameters with sharded ones: read them from the model trained.
            params = trainable if model is None else [p for p in model.parameters() if p.requires_grad]
            bad = any(not bool(torch.isfinite(local(p)).all()) for p in params)
            if any_process(bad, params[0].device if params else None):
                raise NonFiniteLossError(
                    f"the update at step {state.global_step} made trainable parameters NaN or "
                    "infinite (gradient overflow)", state.global_step)

    class RichProgress(TrainerCallback):
        """One progress bar with step count, loss and ETA on the main process."""

        def __init__(self) -> None:
            self.progress: Any = None
            self.task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if quiet or not state.is_world_process_zero:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=console)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps,
                                               completed=state.global_step, loss="-")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.progress is not None and logs and "loss" in logs:
                self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                        **kw: Any) -> None:
            if self.progress is not None and metrics:
                shown = {k[5:]: v for k, v in metrics.items()
                         if k.startswith("eval_") and k[5:] in (primary, "loss")}
                self.progress.console.print(f"step {state.global_step}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in shown.items()))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return [FiniteParameters(), RichProgress()]


# ---- logs and plots ---------------------------------------------------------------------------
_LOG_FIRST = ("step", "epoch", "loss", "grad_norm", "learning_rate")


def log_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer's log history merged into one row per step (train and eval entries together)."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in history:
        if "train_runtime" in entry:
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        row.update({k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))})
    return [rows[s] for s in sorted(rows)]


def write_log_csv(path: Path, history: list[dict[str, Any]]) -> None:
    rows = log_rows(history)
    keys = list(_LOG_FIRST) + sorted({k for r in rows for k in r} - set(_LOG_FIRST))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def write_loss_plot(path: Path, history: list[dict[str, Any]], primary: str, title: str) -> None:
    """Training loss per step, and evaluation loss and metric at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log_rows(history)
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    metric = [(r["step"], r[f"eval_{primary}"]) for r in rows
              if isinstance(r.get(f"eval_{primary}"), (int, float))]
    if metric and primary != "perplexity":
        ax2 = ax.twinx()
        ax2.plot(*zip(*metric), "s--", color="tab:green", label=f"eval {primary}")
        ax2.set_ylabel(primary)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def save_model_atomic(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """The full model (and tokenizer) as folder ``path``, written atomically."""
    with replacing_dir(path) as tmp:
        if isinstance(model, MeanPoolClassifier):
            model.save_head(tmp)  # plain transformers has no mean-pooled classifier class
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


# ---- training ---------------------------------------------------------------------------------
def collator(tokenizer: Any, task: str) -> Callable[..., Any]:
    """Pads a batch of ``task``'s tokenised examples."""
    return task_for(task).collator(tokenizer, None)


def resolve_max_length(asked: int | None, model: nn.Module) -> int:
    """``asked``, checked against the model's position limit; by default 128 or that limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and limit > 1 else None
    if asked is None:
        return min(128, limit) if limit else 128
    if limit and asked > limit:
        raise UsageError(f"--max-length {asked} is longer than the model's {limit} positions")
    return asked


def _sampling(group_by_length: bool) -> dict[str, Any]:
    """TrainingArguments for random batches of similar length (less padding, faster steps).
    transformers 5 renamed the flag."""
    if not group_by_length:
        return {}
    import inspect

    from transformers import TrainingArguments

    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _has_accelerator() -> bool:
    return resolve_device("auto").type != "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """Where ``eval``, ``predict`` and ``serve`` run a model: ``auto`` is the accelerator torch
    finds (CUDA, XPU, MPS, ...), else the CPU; any other name (``cpu``, ``cuda``, ``cuda:1``) must
    exist on this machine."""
    if name == "auto":
        accel = getattr(torch, "accelerator", None)
        if accel is not None and accel.is_available():
            return torch.device(accel.current_accelerator())
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {clip(name, 60)}: not a device name; use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data, so nothing can run there: use auto, cpu or cuda")
    if device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ValueError) as e:  # AssertionError: a CPU-only torch
            raise UsageError(f"--device {name}: not usable here ({clip(str(e).splitlines()[0], 120)}); "
                             "use auto or cpu") from None
    return device


def _say(console: Console, quiet: bool, message: str) -> None:
    if not quiet and world()[0] == 0:
        console.print(message)


@dataclasses.dataclass
class _Model:
    """The model being trained, with what was attached to it."""

    model: nn.Module
    tokenizer: Any
    heads: tuple[str, ...]
    adapters: Any  # the AdapterSet, or None for full fine-tuning
    name: str
    summary: str

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def counts(self) -> dict[str, int | None]:
        """The parameter counts of metrics.json; taken before training, since FSDP1 leaves each
        process a shard of every parameter."""
        adapters = self.adapters
        return {"trainable_parameters": sum(p.numel() for p in self.trainable()),
                "adapter_parameters": None if adapters is None else adapters.summary()[self.name].parameters,
                "base_parameters": (sum(p.numel() for p in self.model.parameters()) if adapters is None
                                    else adapters.base_parameters())}


@dataclasses.dataclass
class _Sets:
    """The tokenised splits: training, final evaluation, and checkpoint selection (a slice held
    out from the training data under early stopping, else the evaluation set)."""

    train: Any
    eval: Any
    select: Any
    truncated: dict[str, int]
    held_out: bool
    left_out: dict[str, int] = dataclasses.field(default_factory=dict)  # rows with nothing left to learn
    floor: float | None = None  # the selection set's constant-prediction score (early stopping)


class _EvalOutputs:
    """Trainer's ``compute_metrics`` for a task; keeps the latest evaluation's predictions and
    labels, which are written for intervals (:mod:`peftlab.metrics`). A task judged on generated
    text gets the decoded outputs and labels, and keeps them as texts."""

    def __init__(self, task: Task, num_labels: int, names: tuple[str, ...] | None = None,
                 tokenizer: Any = None) -> None:
        self.task, self.num_labels, self.names, self.tokenizer = task, num_labels, names, tokenizer
        self.latest: dict[str, Any] = {}

    def __call__(self, pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        if self.task.text_metrics is not None:
            from peftlab.predict import decode_ids

            texts, references = decode_ids(self.tokenizer, logits), decode_ids(self.tokenizer, pred.label_ids)
            self.latest = {"predictions": texts, "labels": references}
            return self.task.text_metrics(texts, references)
        assert self.task.predicted is not None
        self.latest = {"predictions": self.task.predicted(logits), "labels": pred.label_ids}
        return self.task.score(logits, pred.label_ids, self.num_labels, self.names)


def _check_world(opts: TrainOptions) -> int:
    """The number of processes, which must divide the global batch."""
    world_size = world()[1]
    if opts.batch_size % world_size:
        raise UsageError(f"--batch-size {opts.batch_size} (the global batch) must be divisible by the "
                         f"{world_size} processes")
    return world_size


def _choose_lr(opts: TrainOptions, data: TaskData, prior: float, console: Console) -> tuple[float, Any]:
    """The rate to train at, and the search that chose it (``None`` unless ``--lr auto``)."""
    if not opts.lr_search:
        return prior, None
    from peftlab.lr_search import search_lr

    if world()[1] > 1:
        raise UsageError("--lr auto runs its trials in one process; choose the rate with a "
                         "single-process run first, then pass it as --lr")
    _say(console, opts.quiet, f"choosing the learning rate around {prior:g} on held-out training data")
    search = search_lr(opts, data, prior)
    _say(console, opts.quiet, f"learning rate: {search.lr:g} (" + (search.skipped or search.note or ", ".join(
        f"{t.lr:g}: {t.score:.4f}" for t in search.trials if t.rung == 2)) + ")")
    return search.lr, search


def _prepare_model(opts: TrainOptions, data: TaskData, config: AdapterConfig | None, name: str) -> _Model:
    """The pretrained model with the task's head, and the adapter (or every weight) trainable."""
    from transformers import set_seed

    set_seed(opts.seed)  # before loading: a new head is initialised while the model loads
    model, tokenizer, heads = load_model(opts.model, data.task, data.num_labels, opts.pooling, data.labels)
    if opts.chat_template is not None:  # so that a saved tokenizer (full fine-tuning) carries it
        tokenizer.chat_template = opts.template_text()
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        summary = f"full fine-tuning: {sum(p.numel() for p in model.parameters()):,} parameters"
        return _Model(model, tokenizer, heads, None, name, summary)
    set_seed(opts.seed)
    adapters = attach(model)
    adapters.add(name, config)
    adapters.activate(name)
    adapters.train(name, extras=heads)
    row = adapters.summary()[name]
    summary = (f"{opts.method}: {row.parameters:,} adapter parameters ({row.percent:.3f}% of "
               f"{adapters.base_parameters():,}) at {row.sites} sites; head {list(heads)} trained too")
    return _Model(model, tokenizer, heads, adapters, name, summary)


def _tokenized(opts: TrainOptions, data: TaskData, tokenizer: Any, max_length: int) -> _Sets:
    """Tokenise the splits. Under early stopping, checkpoints are selected on data held out from
    the training split: validation is read once, at the end."""
    fit = data
    if opts.patience:
        from peftlab.lr_search import held_out_split

        fit = held_out_split(data)
    train_set, cut_train = tokenize(fit["train"], tokenizer, data.task, max_length)
    eval_set, cut_eval = tokenize(data["validation"], tokenizer, data.task, max_length)
    eval_set = eval_set.by_length()  # less padding; the metrics do not depend on the order
    select = (tokenize(fit["validation"], tokenizer, data.task, max_length)[0].by_length()
              if opts.patience else eval_set)
    return _Sets(train_set, eval_set, select, {"train": cut_train, "validation": cut_eval},
                 bool(opts.patience), {"train": train_set.left_out, "validation": eval_set.left_out},
                 constant_floor(data, fit["validation"], selection(opts, task_for(data.task))[0])
                 if opts.patience else None)


def selection(opts: TrainOptions, task: Task) -> tuple[str, bool]:
    """The held-out metric that picks checkpoints and stops early, and whether higher is better."""
    from peftlab.metrics import LOWER_IS_BETTER

    if opts.select_metric is None or opts.select_metric == task.select_metric:
        return task.select_metric, task.select_greater
    return opts.select_metric, opts.select_metric not in LOWER_IS_BETTER


def constant_floor(data: TaskData, split: Split, metric: str) -> float | None:
    """The score of the best constant prediction on ``split`` by ``metric`` (the majority class's
    accuracy; 0 for a correlation; one tag for every word), for tasks whose rows hold classes or a
    value and metrics where higher is better; ``None`` for the others."""
    from peftlab.metrics import LOWER_IS_BETTER, TAGS, constant_score

    if task_for(data.task).labelled not in ("class", "value") or metric in LOWER_IS_BETTER:
        return None
    if data.task != TAGS:
        labels = np.asarray([r["label"] for r in split.rows])
        return constant_score(data.task, metric, labels, max(2, data.num_labels))
    tags = [r["tags"] for r in split.rows]
    labels = np.full((len(tags), max(map(len, tags), default=0)), -100)
    for row, words in zip(labels, tags):
        row[:len(words)] = words
    return constant_score(data.task, metric, labels, names=data.labels)


def _report_data(console: Console, opts: TrainOptions, data: TaskData, sets: _Sets, max_length: int) -> None:
    """Say which labels, columns and truncations training uses."""
    reads = data.columns.used() if data.columns else []
    if data.labels is not None:
        _say(console, opts.quiet, f"labels ({data.label_note}): {data.label_mapping()}")
    for split, cut in sets.truncated.items():
        if data[split].ignored:
            _say(console, opts.quiet, f"note: {data[split].path} has column(s) "
                 f"{list(data[split].ignored)} that peftlab does not use (it reads {reads})")
        if cut:
            _say(console, opts.quiet, f"[yellow]warning:[/] {cut} of {len(data[split])} {split} examples "
                 f"are longer than --max-length {max_length} tokens and were truncated")
        if sets.left_out.get(split):
            _say(console, opts.quiet, f"[yellow]warning:[/] {left_out_note(sets.left_out[split], split)}")


def left_out_note(n: int, split: str) -> str:
    return (f"{n} {split} example(s) kept no token to learn within --max-length (a prompt fills it) "
            "and were left out; raise --max-length to keep them")


def _write_run(out: Path, record: dict[str, Any], data: TaskData, m: _Model, sets: _Sets,
               max_length: int, adapter_run: bool) -> None:
    """``run.json``: what ``eval``, ``merge``, ``export`` and ``predict`` need to rebuild the run."""
    write_atomic(out / RUN_FILE, json_bytes({
        "peftlab_run": 1, "args": record, "task": data.task, "num_labels": data.num_labels,
        "pair": data.pair, "max_length": max_length, "heads": list(m.heads),
        "labels": None if data.labels is None else list(data.labels),
        "columns": None if data.columns is None else dataclasses.asdict(data.columns),
        "pooling": pooling_of(m.model),
        # The template that rendered chat rows, so that eval, predict and merge render them alike.
        "chat_template": getattr(m.tokenizer, "chat_template", None),
        "adapter_name": m.name if adapter_run else None,
        "train_examples": len(sets.train), "eval_examples": len(sets.eval)}))


def _training_arguments(opts: TrainOptions, task: Task, out: Path, lr: float, total_steps: int,
                        full: bool) -> Any:
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    world_size = world()[1]
    eval_every = opts.eval_every or (max(1, total_steps // EVALUATIONS) if opts.patience else None)
    save_every = eval_every if opts.patience else (opts.save_every or eval_every or 100)
    kind, generating = ((Seq2SeqTrainingArguments, {"predict_with_generate": True}) if task.generates
                        else (TrainingArguments, {}))
    return kind(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=opts.batch_size // world_size,
        per_device_eval_batch_size=max(opts.batch_size // world_size, 32),
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(opts.warmup * total_steps),
        weight_decay=0.0,
        max_grad_norm=opts.max_grad_norm,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if eval_every else "epoch",
        eval_steps=eval_every,
        # Early stopping restores the best checkpoint, so it needs them.
        save_strategy="steps" if opts.checkpoints or opts.patience else "no",
        save_steps=save_every,
        save_total_limit=2,
        load_best_model_at_end=bool(opts.patience),
        metric_for_best_model=selection(opts, task)[0],
        greater_is_better=selection(opts, task)[1],
        seed=opts.seed,
        report_to="none",
        # Without an accelerator, accelerate only sets up multi-process CPU training (gloo) when
        # told to use the CPU; otherwise each torchrun process would train alone on all the data.
        use_cpu=not _has_accelerator(),
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_accelerator(),
        remove_unused_columns=False,
        label_names=["labels"],
        **_sampling(opts.group_by_length),
        # Token-weighted averaging over processes suits language-model losses only: sequence
        # classifiers accept the kwargs but return a batch mean, which Trainer would then scale
        # by the number of processes (doubling the loss and gradients on 2 processes).
        average_tokens_across_devices=task.loss_only,
        # Every adapter and head tensor takes part in each forward; a full model may not.
        ddp_find_unused_parameters=full,
        **generating,
    )


def _make_trainer(opts: TrainOptions, m: _Model, data: TaskData, sets: _Sets, args: Any,
                  outputs: _EvalOutputs | None, console: Console, max_length: int) -> Any:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    task = task_for(data.task)
    trainer = _make_trainer_class(m.adapters is not None, task.generates, task.loss_only)(
        model=m.model, args=args, train_dataset=sets.train, eval_dataset=sets.select,
        data_collator=task.collator(m.tokenizer, m.model), compute_metrics=outputs,
        callbacks=(_callbacks(m.trainable(), console, opts.quiet, task.primary)
                   + _budget_callbacks(opts, task, sets.floor)),
    )
    for replaced in (ProgressCallback, PrinterCallback):  # our progress bar replaces both
        trainer.remove_callback(replaced)
    if task.loss_only and prompts_inputs(m.model):
        # Trainer divides the summed loss by its own token count, which skips each text's first
        # token; behind a prompt that token is predicted too, so the loss came out too large
        # (GPT-2, texts of 4 to 8 tokens: 3.88 against 3.21). The model's own mean is exact.
        trainer.model_accepts_loss_kwargs = False
    if task.generates:  # outputs as long as the targets it trained on may be
        from peftlab.predict import greedy

        trainer.generation = greedy(max_length)
    return trainer


def _train(trainer: Any, opts: TrainOptions, out: Path, adapter_run: bool, console: Console) -> float:
    """Run (or resume) training; the seconds it took. A non-finite loss keeps the log and names
    the last good checkpoint."""
    resume_from = None
    if opts.resume:
        resume_from = last_checkpoint(out / CHECKPOINTS, adapter_run)
        _say(console, opts.quiet, f"resuming from {resume_from}" if resume_from else
             "no complete checkpoint yet: starting from step 0")
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteLossError as e:
        e.last_checkpoint = last_checkpoint(out / CHECKPOINTS, adapter_run)
        if world()[0] == 0:
            write_log_csv(out / "log.csv", trainer.state.log_history)
        raise
    return time.perf_counter() - started


def _final_eval(trainer: Any, opts: TrainOptions, task: Task, eval_set: Any) -> dict[str, float]:
    """Validation metrics of the trained model: the last evaluation when it ran at the last step
    on the validation split, else a new one."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if not opts.patience and last is not None and last["step"] == trainer.state.global_step:
        final = dict(last)
    else:
        final = trainer.evaluate(eval_set)
    if task.loss_only:
        final["eval_perplexity"] = perplexity(final["eval_loss"])
    return {k[5:]: v for k, v in final.items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}


def _result(opts: TrainOptions, record: dict[str, Any], data: TaskData, m: _Model, sets: _Sets,
            trainer: Any, evaluation: dict[str, float], lr: float, search: Any, total_steps: int,
            max_length: int, train_seconds: float, counts: dict[str, int | None]) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    task = task_for(data.task)
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e and "train_runtime" not in e]
    return {
        "method": opts.method,
        "task": data.task,
        "model": record["model"],
        "data": record["data"],
        "eval": evaluation,
        "primary_metric": task.primary,
        "labels": None if data.labels is None else list(data.labels),
        "pooling": pooling_of(m.model) if task.labelled in ("class", "value") else None,
        "steps": trainer.state.global_step,
        "planned_steps": total_steps,
        "best_step": _best_step(trainer.state) if opts.patience else None,
        "held_out_examples": len(sets.select) if sets.held_out else 0,
        "epochs": opts.epochs,
        "lr": lr,
        "lr_search": None if search is None else search.to_dict(),
        "batch_size": opts.batch_size,
        "max_length": max_length,
        "train_examples": len(sets.train),
        "eval_examples": len(sets.eval),
        "truncated": sets.truncated,
        "train_loss_mean": sum(losses) / len(losses) if losses else None,
        **counts,
        "extras": list(m.heads),
        "timing": {"train_seconds": train_seconds, "processes": world()[1]},
    }


def _write_outputs(out: Path, opts: TrainOptions, m: _Model, result: dict[str, Any],
                   history: list[dict[str, Any]], outputs: _EvalOutputs | None) -> None:
    """The adapter (or model), metrics, predictions, log and plot."""
    if m.adapters is not None:  # saved by every process (save_adapter, in run_training)
        result["adapter_bytes"] = sum(f.stat().st_size for f in (out / ADAPTER_DIR).iterdir())
    else:
        save_model_atomic(m.model, m.tokenizer, out / MODEL_DIR)
    write_atomic(out / "metrics.json", json_bytes(result))
    if outputs is not None and outputs.latest:  # the final evaluation's, the last one that ran
        write_predictions(out, outputs.latest["predictions"], outputs.latest["labels"])
    write_log_csv(out / "log.csv", history)
    write_loss_plot(out / "loss.png", history, result["primary_metric"],
                    f"{opts.method} on {opts.data_name()}")


def run_training(opts: TrainOptions, console: Console | None = None,
                 data: TaskData | None = None) -> dict[str, Any]:
    """Train as ``peftlab train`` does and return the contents of ``metrics.json``.

    Everything that can be checked is checked before ``opts.out`` is created: on bad input
    nothing is written. ``data`` may be given pre-loaded (the demo does)."""
    console = console or Console(stderr=True)
    opts.check()
    _check_world(opts)
    check_launch(_has_accelerator(), opts.method == FULL, opts.resume, opts.patience)
    rank = world()[0]
    config = method_config(opts.method, opts.sets)
    name = check_name(opts.name or opts.method)
    out = Path(opts.out)
    record = opts.record()
    if rank == 0:
        check_out_dir(out, opts.resume, record)
    if data is None:
        data = load_task(opts.source(), task=opts.task, labels=opts.labels, max_samples={
            "train": opts.max_train_samples, "validation": opts.max_eval_samples})
    task = task_for(data.task)
    lr, search = _choose_lr(opts, data, opts.lr if opts.lr is not None else default_lr(opts.method), console)
    m = _prepare_model(opts, data, config, name)
    counts = m.counts()
    max_length = resolve_max_length(opts.max_length, m.model)
    sets = _tokenized(opts, data, m.tokenizer, max_length)
    _report_data(console, opts, data, sets, max_length)

    # ---- from here on, files are written
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not opts.resume:
            _write_run(out, record, data, m, sets, max_length, config is not None)
    _say(console, opts.quiet, m.summary)
    total_steps = opts.max_steps or math.ceil(math.ceil(len(sets.train) / opts.batch_size) * opts.epochs)
    args = _training_arguments(opts, task, out, lr, total_steps, full=config is None)
    outputs = None if task.loss_only else _EvalOutputs(task, data.num_labels, data.labels, m.tokenizer)
    trainer = _make_trainer(opts, m, data, sets, args, outputs, console, max_length)
    train_seconds = _train(trainer, opts, out, config is not None, console)
    evaluation = _final_eval(trainer, opts, task, sets.eval)
    result = _result(opts, record, data, m, sets, trainer, evaluation, lr, search, total_steps, max_length,
                     train_seconds, counts)
    if m.adapters is not None:  # every process: under FSDP they gather the adapter together
        save_adapter(trainer.model_wrapped, m.adapters, m.name, out / ADAPTER_DIR)
    if rank == 0:
        _write_outputs(out, opts, m, result, trainer.state.log_history, outputs)
        if not opts.quiet:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items() if isinstance(v, float))
            console.print(f"[bold green]done[/] in {train_seconds:.1f}s: {shown}")
    return result


# ---- evaluation outside training --------------------------------------------------------------
PREDICTIONS_FILE = "predictions.json"


def write_predictions(folder: Path, predictions: Any, labels: Any) -> None:
    """The validation predictions and labels of a run, for intervals (:mod:`peftlab.metrics`)."""
    write_atomic(Path(folder) / PREDICTIONS_FILE, json_bytes(
        {"predictions": np.asarray(predictions).tolist(), "labels": np.asarray(labels).tolist()}))


def read_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    data = json.loads((Path(folder) / PREDICTIONS_FILE).read_text())
    return np.asarray(data["predictions"]), np.asarray(data["labels"])


def evaluate(model: nn.Module, dataset: Any, collate: Callable[..., Any], task: str,
             batch_size: int = 32, names: typing.Sequence[str] | None = None, tokenizer: Any = None,
             max_new_tokens: int = 128) -> dict[str, float]:
    """Metrics of ``model`` on a tokenised dataset (one process, no Trainer). ``names``: the class
    names in id order (default: the model's ``id2label``), for tasks whose metrics read them. A task
    judged on generated text needs the ``tokenizer``, and generates up to ``max_new_tokens`` tokens."""
    return evaluate_with_predictions(model, dataset, collate, task, batch_size, names, tokenizer,
                                     max_new_tokens)[0]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Batches of outputs (or labels) as one tensor. Per-token ones differ in length from batch to
    batch: they are padded to the longest with -100, as Trainer does (labels -100 are ignored)."""
    longest = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        widths = [w for d in reversed(range(1, p.dim())) for w in (0, longest[d - 1] - p.shape[d])]
        padded.append(torch.nn.functional.pad(p, widths, value=-100) if any(widths) else p)
    return torch.cat(padded)


@torch.no_grad()
def evaluate_with_predictions(model: nn.Module, dataset: Any, collate: Callable[..., Any], task: str,
                              batch_size: int = 32, names: typing.Sequence[str] | None = None,
                              tokenizer: Any = None, max_new_tokens: int = 128
                              ) -> tuple[dict[str, float], Any, Any]:
    """:func:`evaluate`'s metrics plus the predictions and labels (``None`` for causal-lm; texts
    for a task judged on generated text)."""
    spec = task_for(task)
    if spec.generates and tokenizer is None:
        raise ValueError(f"evaluating {task} generates text: pass the tokenizer")
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    outputs, labels, loss_sum, n = [], [], 0.0, 0
    prompted = prompts_inputs(model)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        # A language model's loss is a mean over tokens, the others' over rows; weigh by the same.
        weight = predicted_tokens(batch["labels"], prompted) if spec.loss_only else len(batch["input_ids"])
        loss_sum += float(out.loss) * weight
        n += weight
        if spec.generates:
            from peftlab.predict import decode_ids, generated_texts

            outputs += generated_texts(model, tokenizer, batch, max_new_tokens)
            labels += decode_ids(tokenizer, batch["labels"])
        elif not spec.loss_only:
            outputs.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    result = {"loss": loss_sum / max(n, 1)}
    if spec.loss_only:
        result["perplexity"] = perplexity(result["loss"])
        return result, None, None
    if spec.text_metrics is not None:
        result.update(spec.text_metrics(outputs, labels))
        return result, outputs, labels
    assert spec.predicted is not None
    all_logits, all_labels = _joined(outputs).numpy(), _joined(labels).numpy()
    if names is None:
        names = label_names(model)
    result.update(spec.score(all_logits, all_labels, all_logits.shape[-1], names))
    return result, spec.predicted(all_logits), all_labels


__all__ = ["FULL_LR", "DataError", "NonFiniteLossError", "TrainOptions", "UsageError", "default_lr",
           "evaluate", "load_model", "method_config", "method_names", "run_training"]
