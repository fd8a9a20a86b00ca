"""Sequence to sequence: a text in, a text out (summaries, translations, ...) with an
encoder-decoder: T5, BART, Marian, Pegasus, mT5, mBART ...

The model is ``AutoModelForSeq2SeqLM`` with its own pretrained LM head: nothing but the adapter is
trained. Each row holds a source text and its target text. The columns are found by name when
that is unambiguous: the source is one of :data:`SOURCE_COLUMNS` (``text``, ``source``,
``document``, ``article``, ``dialogue``, ``input``, ``src``), the target one of
:data:`TARGET_COLUMNS` (``target``, ``summary``, ``highlights``, ``output``, ``tgt``);
``--text-column`` and ``--label-column`` name them. Nested columns are read by their dotted
names (a ``translation`` column of ``{"en": ..., "fr": ...}`` rows gives ``translation.en`` and
``translation.fr``). Every CSV column stays text ("007" is not 7).

Sources and targets are tokenised with the tokenizer's ``text_target`` (Marian's target
vocabulary, T5's and BART's special tokens); a target gets the eos token where the tokenizer does
not add one, so the model learns where an output ends. Either side longer than ``max_length``
tokens is cut, and counted. The collator (transformers' ``DataCollatorForSeq2Seq``) pads labels
with -100, which the loss ignores, and makes the decoder inputs from them.

Judged on generated text (:attr:`peftlab.tasks.Task.text_metrics`): evaluation generates each
output greedily (up to ``max_length`` new tokens) and scores it against the target with ROUGE-1,
ROUGE-2, ROUGE-L (the primary metric, which selects checkpoints under ``--patience``) and BLEU
(:func:`peftlab.metrics.text_metrics`); the loss is reported beside them. ``predict`` writes the
greedy output of up to ``max_new_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.data import (
    Columns,
    DataSource,
    Encoded,
    Split,
    TaskData,
    _Opened,
    _texts,
    _Where,
    sample_indices,
)
from peftlab.errors import DataError
from peftlab.metrics import require_text_metrics, text_metrics
from peftlab.predict import generated_texts
from peftlab.tasks import ModelSpec, PredictOptions, Task, longest_first

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

#: Column names recognised without --text-column / --label-column.
SOURCE_COLUMNS = ("text", "source", "document", "article", "dialogue", "input", "src")
TARGET_COLUMNS = ("target", "summary", "highlights", "output", "tgt")


def recognizes(names: frozenset[str]) -> bool:
    """A source column and a target column that no other task uses: ``summary``, ``highlights``
    or ``tgt``, or ``target`` beside ``source``/``src``. ``text``/``target`` rows can be class
    labels, and ``output`` is instruction data's (``instruction``/``input``/``output``) too, so
    those need ``--task seq2seq``."""
    if names & {"label", "score"} or not names & set(SOURCE_COLUMNS):
        return False
    return bool(names & {"summary", "highlights", "tgt"}) or (
        "target" in names and bool(names & {"source", "src"}))


class Examples(Sequence[dict[str, Any]]):
    """A split's validated rows as ``{"text", "target"}`` dicts, read on demand from Arrow columns
    (memory-mapped for files); ``target`` is ``None`` in unlabelled data."""

    def __init__(self, text: pa.ChunkedArray, target: pa.ChunkedArray | None) -> None:
        self.text, self.target = text, target

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return {"text": self.text[i].as_py(),
                "target": None if self.target is None else self.target[i].as_py()}

    def batch(self, start: int, stop: int) -> tuple[list[str], list[str] | None]:
        """Sources and targets of rows ``start:stop`` as Python lists."""
        n = max(0, min(stop, len(self)) - start)
        return (self.text.slice(start, n).to_pylist(),
                None if self.target is None else self.target.slice(start, n).to_pylist())

    def take(self, indices: Sequence[int]) -> Examples:
        import pyarrow as pa

        idx = pa.array(indices, type=pa.int64())
        return Examples(self.text.take(idx), None if self.target is None else self.target.take(idx))


def _batches(rows: Sequence[dict[str, Any]], size: int = 4096
             ) -> Iterator[tuple[list[str], list[str] | None]]:
    """Sources and targets (``None`` when unlabelled), ``size`` rows at a time; ``rows`` are
    :class:`Examples` or dicts (a held-out slice of them)."""
    for start in range(0, len(rows), size):
        if isinstance(rows, Examples):
            yield rows.batch(start, start + size)
            continue
        part = rows[start:start + size]
        targets = [r.get("target") for r in part]
        yield [r["text"] for r in part], targets if part and targets[0] is not None else None


# ---- reading ------------------------------------------------------------------------------------
def _one(present: Sequence[str], known: Sequence[str], what: str, flag: str, where: str) -> str:
    found = [c for c in known if c in present]
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{where}: several possible {what} columns {found}; choose with {flag}")
    raise DataError(f"{where}: no {what} column found among {list(present)} (looked for "
                    f"{', '.join(known)}); name it with {flag}")


def detect_columns(names: Sequence[str], source: DataSource, where: str, labelled: bool) -> Columns:
    """The source and (when ``labelled``) target columns; the overrides first."""
    if source.pair_column is not None:
        raise DataError("seq2seq reads one source text a row; drop --pair-column (join the texts into "
                        "one column if the model should read both)")
    for flag, col in (("--text-column", source.text_column), ("--label-column", source.label_column)):
        if col is not None and col not in names:
            raise DataError(f"{where} has no column {col!r} ({flag}); its columns are {list(names)}")
    text = source.text_column or _one(names, SOURCE_COLUMNS, "source", "--text-column", where)
    if not labelled:
        return Columns(text, None, None)
    rest = [c for c in names if c != text]
    target = source.label_column or _one(rest, TARGET_COLUMNS, "target", "--label-column", where)
    if target == text:
        raise DataError(f"--text-column and --label-column both name {text!r}; the source and the target "
                        "are different columns")
    return Columns(text, None, target)


def _flat(ds: datasets.Dataset) -> datasets.Dataset:
    """Nested columns (``translation: {"en", "fr"}``, or the Hub's ``Translation`` feature) as
    dotted top-level ones (``translation.en``)."""
    import datasets

    nested = any(isinstance(f, (dict, datasets.Translation)) for f in ds.features.values())
    return ds.flatten() if nested else ds


def load(source: str | Path | DataSource, splits: tuple[str, ...] = ("train", "validation"),
         max_samples: dict[str, int | None] | None = None, num_labels: int | None = None,
         labels: Sequence[str] | None = None, labelled: bool = True) -> TaskData:
    """Read ``splits`` as (source, target) texts; see the module docstring. ``labelled=False``
    reads the sources only (prediction)."""
    if labels is not None:
        raise DataError("--labels names classes; seq2seq has none (its targets are texts)")
    if labelled:
        require_text_metrics()  # before anything is written: evaluation scores with them
    src = DataSource.of(source)
    opened = _Opened(src, splits)
    columns: Columns | None = None
    loaded: dict[str, Split] = {}
    for split in splits:
        ds, where = opened.split(split, "")  # "": no CSV column is read as a number
        ds = _flat(ds)
        if columns is None:
            columns = detect_columns(ds.column_names, src, where.path, labelled)
        loaded[split] = _split(split, ds, where, columns, (max_samples or {}).get(split))
    assert columns is not None
    return TaskData("seq2seq", 0, loaded, False, None, columns, "")


def _split(name: str, ds: datasets.Dataset, where: _Where, columns: Columns, keep: int | None) -> Split:
    used = columns.used()
    missing = [c for c in used if c not in ds.column_names]
    if missing:
        raise DataError(f"{where.path} lacks column(s) {missing}; give every split the same columns")
    if len(ds) == 0:
        raise DataError(f"{where.path} holds no examples; add rows with a source and a target text")
    text, _ = _texts(ds, columns.text, where)
    target = None if columns.label is None else _texts(ds, columns.label, where)[0]
    rows = Examples(text, target)
    kept = sample_indices(len(rows), keep)
    if kept is not None:
        rows = rows.take(kept)
    return Split(name, Path(where.path), rows, tuple(c for c in ds.column_names if c not in used))


# ---- model inputs -------------------------------------------------------------------------------
def _model(spec: ModelSpec) -> nn.Module:
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(spec.source, config=spec.config)


def _ended(ids: list[int], eos: int | None) -> list[int]:
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Sources as ``input_ids``, targets as ``labels`` ending with eos. An example whose source or
    target is longer than ``max_length`` tokens is tokenised again with truncation (the tokenizer
    keeps its special tokens) and counted; a cut target gets no eos added: it did not end there."""
    eos = tokenizer.eos_token_id
    features: list[dict[str, Any]] = []
    truncated = 0
    for sources, targets in _batches(split.rows):
        enc = tokenizer(sources, text_target=targets, verbose=False)
        ids = enc["input_ids"]
        ends = [_ended(t, eos) for t in enc["labels"]] if targets is not None else [[]] * len(ids)
        long = [i for i in range(len(ids)) if max(len(ids[i]), len(ends[i])) > max_length]
        truncated += len(long)
        if long:  # only the long ones are tokenised again: the rest stay as they are
            cut = tokenizer([sources[i] for i in long], truncation=True, max_length=max_length,
                            text_target=None if targets is None else [targets[i] for i in long])
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                ends[i] = cut["labels"][j] if targets is not None else []
        for row, labels in zip(ids, ends):
            feature: dict[str, Any] = {"input_ids": row, "attention_mask": [1] * len(row)}
            if targets is not None:
                feature["labels"] = labels
            features.append(feature)
    return Encoded(features), truncated


def collator(tokenizer: Any, model: nn.Module | None = None) -> Callable[..., Any]:
    """Pads inputs with the pad token and labels with -100; with the model, also makes the decoder
    inputs (the labels shifted right), as the model would itself."""
    from transformers import DataCollatorForSeq2Seq

    shifts = hasattr(model, "prepare_decoder_input_ids_from_labels")
    return DataCollatorForSeq2Seq(tokenizer, model=model if shifts else None, label_pad_token_id=-100)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
             options: PredictOptions, advance: Callable[[int], None] | None = None
             ) -> list[dict[str, Any]]:
    """``{"generated": text}`` per row, in input order: the greedy output of up to
    ``max_new_tokens`` tokens for each source (cut at ``max_length`` tokens)."""
    model.eval()
    encoded, _ = tokenize(split, tokenizer, options.max_length)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = [{} for _ in range(len(encoded))]
    for index in longest_first(encoded.lengths(), options.batch_size, advance):
        batch = tokenizer.pad([{k: encoded[i][k] for k in ("input_ids", "attention_mask")} for i in index],
                              return_tensors="pt")
        texts = generated_texts(model, tokenizer, {k: v.to(device) for k, v in batch.items()},
                                options.max_new_tokens)
        for i, text in zip(index, texts):
            out[i] = {"generated": text}
    return out


TASKS = (
    Task(name="seq2seq", about="a text -> a text (summaries, translations): T5, BART, Marian, ...",
         primary="rougeL", greater_is_better=True, model=_model, heads=lambda model: (),
         tokenize=tokenize, collator=collator, predict=generate, text_metrics=text_metrics, load=load,
         labelled="target", architectures=("ForConditionalGeneration", "MarianMTModel", "ForTextToText"),
         recognizes=recognizes),
)
