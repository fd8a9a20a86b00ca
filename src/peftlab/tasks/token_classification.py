"""Token classification: a sentence as a list of words in, one tag per word out (named entities,
part-of-speech tags, chunks).

Rows hold the words and their tags: ``{"tokens": ["John", "lives", "in", "Paris"], "tags":
["B-PER", "O", "O", "B-LOC"]}``. The words column is ``tokens`` or ``words``, the tags column
``tags``, ``ner_tags`` or ``labels`` (``--text-column`` and ``--label-column`` choose others, such
as ``pos_tags``); both are lists, of equal length, so JSON Lines, JSON, Parquet or saved datasets
hold them (a CSV cell cannot). Unlabelled rows for ``peftlab predict`` may be plain texts
instead (a ``text`` column or a ``.txt`` file): their words are what whitespace separates.

Tags become classes as labels do (:mod:`peftlab.data`): string tags are names, numbered in sorted
order; a ``ClassLabel`` sequence feature (HF datasets' NER sets) brings its names; integer tags
``0..K-1`` are class ids. ``--labels`` (or the names a trained adapter recorded) fixes the names:
string tags must be among them, and integer tags are ids into them (or, where the names are
integers themselves, names). The head (``AutoModelForTokenClassification``'s ``classifier``) is
trained with the adapter; the names are stored as ``id2label``/``label2id`` in the adapter and in
saved or merged models.

Words become sub-words with the tokenizer's ``is_split_into_words`` (a fast tokenizer, for its
word ids). As in transformers' token-classification recipe, a word's tag goes to its first
sub-word; the other sub-words and the special tokens get -100 and count in neither the loss nor
the metrics, and predictions are read at each word's first sub-word. A word that the tokenizer
turns into nothing (a zero-width space) is an error naming its row, since it could be neither
learned nor judged. Sentences longer than ``max_length`` sub-words are cut and counted.

Judged by ``f1``: with entity tags (``O`` and ``B-``/``I-``/``E-``/``S-`` + type) it is seqeval's
entity F1, as CoNLL's conlleval computes it (with precision, recall and the accuracy per word);
with other tags (part of speech) each word is its own unit, and ``f1`` is the accuracy per word
(:func:`peftlab.metrics.tag_metrics`). ``predict`` gives each word's tag and every tag's
probability.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from peftlab.data import (
    Columns,
    DataSource,
    Encoded,
    LazyRows,
    Split,
    TaskData,
    _blank,
    _check_split,
    _class_ids,
    _class_names,
    _column,
    _first,
    _Labels,
    _Opened,
    _Where,
)
from peftlab.errors import DataError, UsageError
from peftlab.metrics import entity_tags, require_seqeval, tag_metrics
from peftlab.tasks import ModelSpec, PredictOptions, Task
from peftlab.tasks.text import _name, heads

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

NAME = "token-classification"
#: Columns recognised without --text-column / --label-column.
WORD_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("tags", "ner_tags", "labels")
#: The rows' layout, for messages.
EXAMPLE = '{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}'


# ---- the model ---------------------------------------------------------------------------------
def _model(spec: ModelSpec) -> nn.Module:
    """``AutoModelForTokenClassification`` with a head of ``num_labels`` tags, named. Pooling does
    not apply: every position is read."""
    from transformers import AutoModelForTokenClassification

    config = spec.config
    config.num_labels = spec.num_labels
    if spec.labels is not None:
        if len(spec.labels) != spec.num_labels:
            raise UsageError(f"{len(spec.labels)} tag names for a head of {spec.num_labels} tags")
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {name: i for i, name in enumerate(spec.labels)}
    # A head with other tags than the saved one is replaced.
    return AutoModelForTokenClassification.from_pretrained(spec.source, config=config,
                                                           ignore_mismatched_sizes=True)


# ---- rows ----------------------------------------------------------------------------------------
class TaggedRows(LazyRows):
    """A split's validated rows as ``{"tokens": [word, ...], "tags": [class id, ...] or None}``.
    The words stay an Arrow column (memory-mapped for files) until they are tokenised; the tags
    are one flat array of class ids, row ``i``'s at ``tags[starts[i]:starts[i + 1]]``. ``index``
    holds each row's number in its file, for messages."""

    def __init__(self, words: pa.ChunkedArray, tags: np.ndarray | None, where: _Where,
                 index: np.ndarray | None = None) -> None:
        import pyarrow.compute as pc

        self.words, self.tags, self.where = words, tags, where
        lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False)
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.index = np.arange(len(words)) if index is None else index

    def __len__(self) -> int:
        return len(self.words)

    def at(self, i: int) -> dict[str, Any]:
        tags = None if self.tags is None else self.tags[self.starts[i]:self.starts[i + 1]].tolist()
        return {"tokens": self.words[i].as_py(), "tags": tags}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), 1024):
            words, tags = self.batch(start, start + 1024)
            for j, w in enumerate(words):
                yield {"tokens": w, "tags": None if tags is None else tags[j]}

    def batch(self, start: int, stop: int) -> tuple[list[list[str]], list[list[int]] | None]:
        """Words and tags of rows ``start:stop`` as Python lists."""
        n = max(0, min(stop, len(self)) - start)
        words = self.words.slice(start, n).to_pylist()
        if self.tags is None:
            return words, None
        return words, [self.tags[self.starts[i]:self.starts[i + 1]].tolist() for i in range(start, start + n)]

    def take(self, indices: Sequence[int]) -> TaggedRows:
        import pyarrow as pa

        rows = np.asarray(indices, dtype=np.int64)
        tags = None if self.tags is None else np.concatenate(
            [self.tags[self.starts[i]:self.starts[i + 1]] for i in rows] or [np.zeros(0, np.int64)])
        return TaggedRows(self.words.take(pa.array(rows)), tags, self.where, self.index[rows])

    def locate(self, i: int) -> str:
        """Where row ``i`` is in its file (``train.jsonl:12``)."""
        return self.where.row(int(self.index[i]))


def _batches(rows: Sequence[dict[str, Any]], size: int = 1024
             ) -> Iterator[tuple[int, list[list[str]], list[list[int]] | None]]:
    """(first row, words, tags or None), ``size`` rows at a time; ``rows`` is a :class:`TaggedRows`
    or a list of its dicts (a slice held out for early stopping)."""
    for start in range(0, len(rows), size):
        if isinstance(rows, TaggedRows):
            yield start, *rows.batch(start, start + size)
            continue
        part = rows[start:start + size]
        tags = [r.get("tags") for r in part]
        yield start, [r["tokens"] for r in part], None if any(t is None for t in tags) else tags


# ---- reading -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _TagWhere(_Where):
    """Names the word behind an index into a split's flat tags (``train.jsonl:3, word 2``), so
    that :func:`peftlab.data._class_ids` points at the tag it refuses; ``starts``: each row's first
    index."""

    starts: Any = None

    @classmethod
    def of(cls, where: _Where, starts: np.ndarray) -> _TagWhere:
        return cls(where.path, where.lines, starts)

    def row(self, i: int) -> str:
        row = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f"{super().row(row)}, word {i - int(self.starts[row]) + 1}"


def _columns(names: Sequence[str], source: DataSource, where: str, labelled: bool) -> Columns:
    """The words and tags columns (``Columns.text`` and ``Columns.label``); overrides first."""
    present = set(names)
    for flag, col in (("--text-column", source.text_column), ("--label-column", source.label_column)):
        if col is not None and col not in present:
            raise DataError(f"{where} has no column {col!r} ({flag}); its columns are {list(names)}")
    if source.pair_column is not None:
        raise DataError("--pair-column does not apply to token classification: a row is one list of words")

    def one(candidates: Sequence[str], what: str, flag: str) -> str | None:
        found = [c for c in candidates if c in present]
        if len(found) > 1:
            raise DataError(f"{where}: several possible {what} columns {found}; choose with {flag}")
        return found[0] if found else None

    words = source.text_column or one(WORD_COLUMNS, "words", "--text-column")
    if words is None and not labelled and "text" in present:
        words = "text"  # unlabelled plain text: words are what whitespace separates
    if words is None:
        raise DataError(f"{where}: no words column among {list(names)} (looked for "
                        f"{', '.join(WORD_COLUMNS)}); give each row its words as a list, e.g. {EXAMPLE}, "
                        "or name the column with --text-column")
    tags = source.label_column or (one(TAG_COLUMNS, "tags", "--label-column") if labelled else None)
    if tags is None and labelled:
        raise DataError(f"{where}: no tags column among {list(names)} (looked for {', '.join(TAG_COLUMNS)}); "
                        f"give each row one tag per word, e.g. {EXAMPLE}, or name the column with "
                        "--label-column (peftlab predict tags unlabelled words)")
    return Columns(words, None, tags)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _not_list(ds: datasets.Dataset, col: str, where: _Where, what: str) -> DataError:
    """The error for a column that is not a list per row: names the first row and what it holds."""
    values = ds.select_columns([col]).with_format(None)
    for i in range(len(ds)):
        v = values[i][col]
        if not isinstance(v, list):
            hint = " (a CSV cell holds text, not a list: use JSON Lines or Parquet)" * isinstance(v, str)
            return DataError(f"{where.row(i)}: {col!r} must be a list of {what}, one per word, e.g. "
                             f"{EXAMPLE} (got {type(v).__name__} {_shown(v)}){hint}")
    return DataError(f"{where.path}: {col!r} must hold lists of {what} (its type is {ds.features[col]})")


def _words(ds: datasets.Dataset, col: str, where: _Where, split_text: bool) -> pa.ChunkedArray:
    """The words column as ``list<string>``, checked: a list in every row, no empty list, no
    empty word. ``split_text``: a column of texts is split at whitespace (unlabelled input)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _column(ds, col)
    if split_text and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        i = _first(_blank(arr))
        if i >= 0:
            raise DataError(f"{where.row(i)}: {col!r} holds no words; drop the row or give it some")
        arr = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(arr.cast(pa.large_string())))
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise _not_list(ds, col, where, "words")
    if not (pa.types.is_string(arr.type.value_type) or pa.types.is_large_string(arr.type.value_type)
            or pa.types.is_null(arr.type.value_type)):
        i = _first(pc.greater(pc.list_value_length(arr), 0))
        raise DataError(f"{where.row(max(i, 0))}: {col!r} must be a list of words (strings); got "
                        f"{_shown(arr[max(i, 0)].as_py())}")
    arr = arr.cast(pa.large_list(pa.large_string()))
    i = _first(pc.is_null(arr))
    if i >= 0:
        raise DataError(f"{where.row(i)}: no {col!r}; give every row its words, e.g. {EXAMPLE}")
    i = _first(pc.equal(pc.list_value_length(arr), 0))
    if i >= 0:
        raise DataError(f"{where.row(i)}: {col!r} is an empty list; drop the row or give it its words")
    flat = pc.list_flatten(arr)
    j = _first(_blank(flat))
    if j >= 0:
        starts = np.concatenate([[0], np.cumsum(pc.list_value_length(arr).to_numpy(zero_copy_only=False))])
        raise DataError(f"{_TagWhere.of(where, starts).row(j)} is {_shown(flat[j].as_py())}; a word must "
                        "be a non-empty string: drop it (and its tag)")
    return arr


def _tags(ds: datasets.Dataset, col: str, where: _Where, words: pa.ChunkedArray
          ) -> tuple[_Labels, np.ndarray]:
    """A split's tags, checked (a list per row, one tag per word, none missing, names or integer
    ids), flattened into one :class:`peftlab.data._Labels`; with the row starts into it."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _column(ds, col)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise _not_list(ds, col, where, "tags")
    i = _first(pc.is_null(arr))
    if i >= 0:
        raise DataError(f"{where.row(i)}: no {col!r}; every row needs one tag per word (peftlab predict "
                        "tags unlabelled words)")
    counts = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    n_words = pc.list_value_length(words).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(counts != n_words)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where.row(i)}: {counts[i]} tags for {n_words[i]} words; give exactly one tag per "
                        "word")
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    at = _TagWhere.of(where, starts)
    flat = pc.list_flatten(arr)
    j = _first(pc.is_null(flat))
    if j >= 0:
        raise DataError(f"{at.row(j)}: the tag is missing; give every word a tag")
    value = flat.type
    feature = getattr(ds.features.get(col), "feature", None)
    declared = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if pa.types.is_integer(value):
        if declared is not None:
            j = _first(pc.or_(pc.less(flat, 0), pc.greater_equal(flat, len(declared))))
            if j >= 0:
                raise DataError(f"{at.row(j)}: tag {flat[j].as_py()} is not one of the {len(declared)} "
                                f"classes that the dataset declares ({', '.join(declared)})")
        return _Labels("int", flat.cast(pa.int64()), declared), starts
    if pa.types.is_string(value) or pa.types.is_large_string(value):
        j = _first(_blank(flat))
        if j >= 0:
            raise DataError(f"{at.row(j)}: the tag is empty; give every word a tag")
        return _Labels("name", flat.cast(pa.large_string())), starts
    j = int(np.argmax(counts > 0))
    raise DataError(f"{where.row(j)}: {col!r} must hold tag names or integer ids; got "
                    f"{_shown(arr[j].as_py())}")


def _names(first: _Labels, labels: tuple[str, ...] | None, num_labels: int | None, path: str
           ) -> tuple[tuple[str, ...], str]:
    """The tag names in id order, and how they were found (as :func:`peftlab.data.load_task`)."""
    if labels is not None:
        if len(labels) < 2 or len(set(labels)) < len(labels):
            raise DataError(f"--labels {','.join(labels)}: give at least two different tag names")
        return labels, "tag names given"
    if num_labels is not None:
        if first.declared is not None:
            return first.declared, "tag names declared by the dataset"
        return tuple(str(i) for i in range(num_labels)), f"tag ids 0..{num_labels - 1}"
    names, note = _class_names(first, path)
    return names, note.replace("label", "tag").replace("class", "tag")  # the same rules, for tags


def _tag_ids(tags: _Labels, names: tuple[str, ...], at: _TagWhere) -> np.ndarray:
    """Class ids of a split's tags under ``names``. Integer tags are ids into names that are not
    integers themselves (``--labels O,B-PER,I-PER`` names 0, 1, 2), else names (``_class_ids``)."""
    numeric = [n.lstrip("-").isdigit() for n in names]
    if tags.kind != "int" or tags.declared is not None or all(numeric):
        return _class_ids(tags, names, at)
    if any(numeric):
        raise DataError(f"{at.path}: integer tags, and tag names {', '.join(names)} of which some are "
                        "integers: it is unclear whether a tag is an id or a name; use string tags")
    ids = tags.values.to_numpy()
    bad = np.flatnonzero((ids < 0) | (ids >= len(names)))
    if len(bad):
        raise DataError(f"{at.row(int(bad[0]))}: tag {ids[bad[0]]} is not an id of the {len(names)} tags "
                        f"({', '.join(names)}); use data with the same tags as training")
    return ids.astype(np.int64)


def load(source: str | Path | DataSource, splits: tuple[str, ...] = ("train", "validation"),
         max_samples: dict[str, int | None] | None = None, num_labels: int | None = None,
         labels: Sequence[str] | None = None, labelled: bool = True) -> TaskData:
    """Read ``splits`` of words and tags from ``source``; see the module docstring. Every problem
    is a :class:`DataError` naming the file, row (and word) and the fix."""
    src = DataSource.of(source)
    opened = _Opened(src, splits)
    names = None if labels is None else tuple(str(n) for n in labels)
    columns: Columns | None = None
    read: dict[str, tuple[Any, _Labels | None, np.ndarray | None, _Where, list[str]]] = {}
    for split in splits:
        ds, where = opened.split(split, src.label_column or (columns.label if columns else None))
        columns = columns or _columns(ds.column_names, src, where.path, labelled)
        _check_split(ds, where, (columns.text, columns.label), splits[0], f"such as {EXAMPLE}")
        words = _words(ds, columns.text, where, split_text=not labelled and columns.text == "text")
        tags, starts = _tags(ds, columns.label, where, words) if labelled else (None, None)
        ignored = [c for c in ds.column_names if c not in columns.used()]
        read[split] = (words, tags, starts, where, ignored)
    assert columns is not None
    note = ""
    if labelled:
        first = read[splits[0]][1]
        assert first is not None
        names, note = _names(first, names, num_labels, read[splits[0]][3].path)
        if entity_tags(names):
            require_seqeval()
    loaded = {}
    for s in splits:
        words, tags, starts, where, ignored = read[s]
        ids = None if tags is None else _tag_ids(tags, names, _TagWhere.of(where, starts))
        rows = TaggedRows(words, ids, where)
        keep = (max_samples or {}).get(s)
        if keep is not None and len(rows) > keep:  # the same subset as peftlab.data.load_task draws
            rows = rows.take(sorted(random.Random(0).sample(range(len(rows)), keep)))
        loaded[s] = Split(s, Path(where.path), rows, tuple(ignored))
    count = len(names) if names is not None else (num_labels or 2)
    return TaskData(NAME, count, loaded, False, names, columns, note)


# ---- tokenising ----------------------------------------------------------------------------------
def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"token classification needs a fast tokenizer (one that maps sub-words to words); "
                         f"{type(tokenizer).__name__} is not: save the model with its tokenizer.json")


def _encode(tokenizer: Any, words: list[list[str]], max_length: int
            ) -> tuple[list[dict[str, list[int]]], list[list[int | None]], list[bool]]:
    """Each row's sub-word inputs and the word of each sub-word (``None``: a special token), cut at
    ``max_length``; and which rows were cut. Only the long rows are tokenised a second time."""
    enc = tokenizer(words, is_split_into_words=True, truncation=False, verbose=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    inputs = [{k: enc[k][i] for k in keys} for i in range(len(words))]
    word_ids = [enc.word_ids(i) for i in range(len(words))]
    long = [i for i, row in enumerate(inputs) if len(row["input_ids"]) > max_length]
    if long:
        cut = tokenizer([words[i] for i in long], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        for j, i in enumerate(long):
            inputs[i], word_ids[i] = {k: cut[k][j] for k in keys}, cut.word_ids(j)
    return inputs, word_ids, [len(row["input_ids"]) != len(ids) for row, ids in zip(inputs, enc["input_ids"])]


def aligned(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """Per sub-word labels: a word's tag on its first sub-word, -100 on the others and on special
    tokens (transformers' token-classification recipe), so each word counts once."""
    out, previous = [], None
    for w in word_ids:
        out.append(-100 if w is None or w == previous else tags[w])
        previous = w
    return out


def _lost_word(word_ids: Sequence[int | None], n_words: int, cut: bool) -> int | None:
    """The first word with no sub-word (the tokenizer dropped it), among those not cut off."""
    seen = {w for w in word_ids if w is not None}
    last = max(seen) + 1 if cut and seen else n_words
    return next((w for w in range(last) if w not in seen), None)


def tokenize(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Each row's sub-words with labels aligned (:func:`aligned`); the number of rows cut at
    ``max_length``, whose last words are then neither learned nor judged. Unlabelled rows get no
    labels."""
    _check_fast(tokenizer)
    features: list[dict[str, Any]] = []
    truncated = 0
    for start, words, tags in _batches(split.rows):
        inputs, word_ids, cut = _encode(tokenizer, words, max_length)
        truncated += sum(cut)
        for i, feature in enumerate(inputs):
            lost = _lost_word(word_ids[i], len(words[i]), cut[i])
            if lost is not None:
                raise DataError(f"{_locate(split, start + i)}, word {lost + 1}: {words[i][lost]!r} is "
                                "nothing to the tokenizer (no sub-word), so its tag could be neither learned "
                                "nor judged; drop the word and its tag")
            if tags is not None:
                feature["labels"] = aligned(word_ids[i], tags[i])
            features.append(feature)
    return Encoded(features), truncated


def _locate(split: Split, i: int) -> str:
    rows = split.rows
    return rows.locate(i) if isinstance(rows, TaggedRows) else f"{split.path}, example {i + 1}"


def collator(tokenizer: Any, model: nn.Module | None = None) -> Callable[..., Any]:
    """Pads sub-words, and labels with -100."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer)


# ---- metrics -------------------------------------------------------------------------------------
def _per_word(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The outputs at the labels' positions. Prompt tuning puts its virtual tokens first (peft's
    layout), so outputs longer than the labels are read from their end."""
    logits = np.asarray(logits)
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"{logits.shape[1]} outputs per example for {labels.shape[1]} labels")
    return logits[:, extra:]


def named_metrics(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """:func:`peftlab.metrics.tag_metrics` of the words (labels other than -100) of each example."""
    labels = np.asarray(labels)
    predicted = _per_word(logits, labels).argmax(-1)
    true, guessed = [], []
    for row_labels, row_predicted in zip(labels, predicted):
        keep = row_labels != -100
        true.append([names[t] for t in row_labels[keep]])
        guessed.append([names[p] for p in row_predicted[keep]])
    return tag_metrics(true, guessed, entity_tags(names))


def _metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Without names, tags are their ids, which mark no entities: judged word by word."""
    return named_metrics(logits, labels, [str(i) for i in range(np.asarray(logits).shape[-1])])


# ---- prediction ----------------------------------------------------------------------------------
@torch.no_grad()
def _word_probabilities(model: nn.Module, tokenizer: Any, words: list[list[str]], options: PredictOptions,
                        advance: Callable[[int], None] | None) -> list[list[list[float] | None]]:
    """Per row and word the tag probabilities at the word's first sub-word; ``None`` for a word cut
    off at ``max_length`` or with no sub-word. Batched longest first."""
    inputs, word_ids, _ = _encode(tokenizer, words, options.max_length)
    order = sorted(range(len(words)), key=lambda i: -len(inputs[i]["input_ids"]))
    collate = collator(tokenizer)
    device = next(model.parameters()).device
    out: list[list[list[float] | None]] = [[] for _ in words]
    for start in range(0, len(order), options.batch_size):
        index = order[start:start + options.batch_size]
        batch = collate([inputs[i] for i in index])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        probs = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:].softmax(-1)
        for row, i in enumerate(index):
            first = {}
            for position, w in enumerate(word_ids[i]):
                if w is not None and w not in first:
                    first[w] = position
            out[i] = [probs[row, first[w]].tolist() if w in first else None for w in range(len(words[i]))]
        if advance is not None:
            advance(len(index))
    return out


def predict(model: nn.Module, tokenizer: Any, split: Split, labels: Sequence[str] | None,
            options: PredictOptions, advance: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """``{"tokens": [...], "tags": [tag per word], "scores": [{tag: probability} per word]}`` per
    row, in input order. A word past ``max_length`` sub-words has tag and scores ``null``."""
    _check_fast(tokenizer)
    model.eval()
    names = [_name(n) for n in labels] if labels is not None else None
    out: list[dict[str, Any]] = []
    for _, words, _ in _batches(split.rows):
        probabilities = _word_probabilities(model, tokenizer, words, options, advance)
        for row, per_word in zip(words, probabilities):
            tags, scores = [], []
            for p in per_word:
                classes = names if names is not None else list(range(len(p or ())))
                tags.append(None if p is None else classes[max(range(len(p)), key=p.__getitem__)])
                scores.append(None if p is None else {str(c): s for c, s in zip(classes, p)})
            out.append({"tokens": row, "tags": tags, "scores": scores})
    return out


TASKS = (
    Task(name=NAME, about="words -> one tag per word (named entities, part of speech)",
         primary="f1", greater_is_better=True, model=_model, heads=heads, tokenize=tokenize,
         collator=collator, predict=predict, metrics=_metrics, named_metrics=named_metrics,
         predicted=lambda logits: np.asarray(logits).argmax(-1), load=load,
         architectures=("ForTokenClassification",),
         recognizes=lambda names: bool(names & set(WORD_COLUMNS)) and bool(names & set(TAG_COLUMNS))),
)
