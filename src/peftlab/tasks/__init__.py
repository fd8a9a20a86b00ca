"""The registry of tasks: what a model learns from the examples, and how it is judged.

Each task lives in a module of this package and is described completely by one :class:`Task`:

* ``model(spec)``: the pretrained model with this task's head (:class:`ModelSpec` says from where,
  with how many classes, which class names and pooling);
* ``heads(model)``: the names of the modules trained and saved with an adapter (a new
  classification head; none for a language model, whose head is pretrained);
* ``tokenize(split, tokenizer, max_length)``: a split's rows as model inputs, and how many were
  truncated; ``collator(tokenizer, model)``: pads a batch of them;
* ``metrics(outputs, labels, num_labels)``: the validation metrics from the model's outputs
  (``None``: the loss is the metric, reported with its perplexity: language models);
  ``predicted(outputs)``: what was predicted, kept for intervals; ``primary`` and
  ``greater_is_better``: the metric that judges a run and selects checkpoints;
  ``named_metrics(outputs, labels, names)``: optionally, metrics that need the class names in id
  order (entity spans read from tags); where the names are known they replace ``metrics``
  (:meth:`Task.score`). Per-token outputs and labels come padded to the longest example
  (labels with -100);
* ``text_metrics(predictions, references)``: optionally, for a task judged on *generated* text
  (seq2seq) rather than on one forward's outputs: evaluation then generates each output
  (greedy, up to the run's ``max_length`` new tokens; training runs on transformers'
  ``Seq2SeqTrainer`` with ``predict_with_generate``), decodes outputs and labels (-100 read as
  padding) and scores the texts; ``metrics`` stays ``None`` and the loss is reported beside;
* ``predict(model, tokenizer, split, labels, options, advance)``: one output row per input row
  (``peftlab predict``);
* ``architectures``: the endings of its transformers model classes, to recognise the task of a
  saved full model;
* ``load``: optionally, how the task reads its splits (:func:`peftlab.data.load_task` reads
  text, text pair and label columns when it is ``None``); ``data_options``: the rendering options
  of :class:`peftlab.data.DataSource` that it reads (``chat_template``, ``loss_on``: causal-lm's
  instruction rows); a task given one it does not read refuses it rather than ignore it.

Adding a task is one new module plus one line in :data:`BUILT_IN`; a task defined elsewhere joins
with :func:`register`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from peftlab.errors import UsageError

if TYPE_CHECKING:
    from peftlab.data import Encoded, Split, TaskData


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a task's :attr:`Task.model` builds: from ``source`` (a folder, or a Hub id) with the
    loaded transformers ``config``, a head of ``num_labels`` outputs named ``labels`` in id order,
    read from the backbone by ``pooling`` (resolved: ``cls`` or ``mean``)."""

    source: str
    folder: Path | None  # the local model folder, when there is one
    config: Any
    num_labels: int
    labels: tuple[str, ...] | None = None
    pooling: str = "cls"


@dataclasses.dataclass(frozen=True)
class RowRouting:
    """Per-row adapters for one prediction call: row ``i`` runs adapter ``adapters[i]`` (``None``:
    the base model) and its classes are named ``labels[adapters[i]]`` (default: the call's
    ``labels``). Rows for different adapters share forwards (per-example routing,
    :meth:`peftlab.AdapterSet.route`): ``peftlab serve`` batches its requests this way."""

    adapters: Sequence[str | None]
    labels: Mapping[str | None, Sequence[str] | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How ``peftlab predict`` runs: examples a batch, input tokens kept, tokens generated, and
    ``routing``: each row's adapter (honoured by tasks with :attr:`Task.routes`)."""

    batch_size: int = 32
    max_length: int = 128
    max_new_tokens: int = 32
    routing: RowRouting | None = None

    @contextlib.contextmanager
    def routed(self, model: nn.Module, index: Sequence[int]) -> Iterator[None]:
        """Run the forward of rows ``index`` with each row's adapter (as it is without routing)."""
        if self.routing is None:
            yield
            return
        from peftlab.adapter_set import attached
        from peftlab.errors import AdapterStateError

        adapters = attached(model)
        if adapters is None:
            raise AdapterStateError("per-row adapters need a model with adapters: peftlab.attach(model)")
        with adapters.route([self.routing.adapters[i] for i in index]):
            yield

    def labels_of(self, row: int, labels: Sequence[str] | None) -> Sequence[str] | None:
        """The class names of row ``row``: its adapter's under routing, else ``labels``."""
        if self.routing is None:
            return labels
        return self.routing.labels.get(self.routing.adapters[row], labels)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything peftlab needs to know about a task; see the module docstring."""

    name: str
    about: str
    primary: str
    greater_is_better: bool
    model: Callable[[ModelSpec], nn.Module]
    heads: Callable[[nn.Module], tuple[str, ...]]
    tokenize: Callable[[Split, Any, int], tuple[Encoded, int]]
    collator: Callable[[Any, nn.Module | None], Callable[..., Any]]
    predict: Callable[[nn.Module, Any, Split, Sequence[str] | None, PredictOptions,
                       Callable[[int], None] | None], list[dict[str, Any]]]
    metrics: Callable[[np.ndarray, np.ndarray, int], dict[str, float]] | None = None
    #: Metrics of generated texts against reference texts (see the module docstring).
    text_metrics: Callable[[Sequence[str], Sequence[str]], dict[str, float]] | None = None
    predicted: Callable[[np.ndarray], np.ndarray] | None = None
    load: Callable[..., TaskData] | None = None
    # What its labels are: class, value, text (none beyond the text), target (a text to produce), ...
    labelled: str = "class"
    #: Endings of the transformers class names of a saved full model of this task
    #: (``BertForSequenceClassification``), to recognise the task of a model folder.
    architectures: tuple[str, ...] = ()
    #: Metrics that read the class names (``named_metrics(outputs, labels, names)``); see
    #: :meth:`score`.
    named_metrics: Callable[[np.ndarray, np.ndarray, Sequence[str]], dict[str, float]] | None = None
    #: The rendering options of a DataSource that ``load`` reads (``chat_template``, ``loss_on``).
    data_options: tuple[str, ...] = ()
    #: Whether ``predict`` runs each row with its own adapter under ``PredictOptions.routing``.
    routes: bool = False
    #: For ``--task auto``: whether a dataset with these column names is unmistakably this task's
    #: (``None``: never chosen by columns; text/label rows are classification or regression by
    #: their labels).
    recognizes: Callable[[frozenset[str]], bool] | None = None

    def score(self, outputs: np.ndarray, labels: np.ndarray, num_labels: int,
              names: Sequence[str] | None = None) -> dict[str, float]:
        """The validation metrics of ``outputs``: ``named_metrics`` where the task has them and the
        class ``names`` are known, else ``metrics``."""
        if self.named_metrics is not None and names is not None:
            return self.named_metrics(outputs, labels, names)
        assert self.metrics is not None, f"{self.name} is judged by its loss alone"
        return self.metrics(outputs, labels, num_labels)

    @property
    def loss_only(self) -> bool:
        """Judged by the loss alone (a token-mean cross-entropy: language modelling)."""
        return self.metrics is None and self.text_metrics is None

    @property
    def generates(self) -> bool:
        """Judged on generated text (:attr:`text_metrics`): evaluation generates."""
        return self.text_metrics is not None

    @property
    def select_metric(self) -> str:
        """The metric that picks the best checkpoint (``loss`` for a loss-only task)."""
        return "loss" if self.loss_only else self.primary

    @property
    def select_greater(self) -> bool:
        return False if self.loss_only else self.greater_is_better


def longest_first(lengths: Sequence[int], batch_size: int,
                  advance: Callable[[int], None] | None = None) -> Iterator[list[int]]:
    """Row indices in batches of ``batch_size``, longest rows first (batches of similar length
    need less padding); ``advance(n)`` is called after each batch of ``n`` rows is done. Every
    task's ``predict`` batches this way and puts its results back in input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield index
        if advance is not None:
            advance(len(index))


#: The modules that define the built-in tasks, each ending with ``TASKS = (Task(...), ...)``.
BUILT_IN = (
    "text",  # classification, regression
    "causal_lm",
    "token_classification",
    "seq2seq",
)


def _registry() -> dict[str, Task]:
    # Imported here, after Task exists: each task module imports it from us.
    modules = [importlib.import_module(f"{__name__}.{name}") for name in BUILT_IN]
    return {task.name: task for m in modules for task in m.TASKS}


#: Every known task by name.
REGISTRY: dict[str, Task] = _registry()


def register(task: Task) -> Task:
    """Make ``task`` known to the command line, training, evaluation and prediction."""
    if task.name in REGISTRY and REGISTRY[task.name] is not task:
        raise UsageError(f"a task named {task.name!r} is already registered")
    REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The known tasks, built-in ones first."""
    return tuple(REGISTRY)


def task_for(name: str) -> Task:
    if name not in REGISTRY:
        raise UsageError(f"unknown task {name!r}; use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["BUILT_IN", "ModelSpec", "PredictOptions", "RowRouting", "Task", "names", "register", "task_for",
           "unregister"]
