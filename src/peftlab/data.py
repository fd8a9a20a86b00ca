"""Datasets for the command line: a folder with ``train`` and ``validation`` files.

Each split is ``<split>.jsonl`` (one JSON object a line), ``<split>.json`` (the same) or
``<split>.csv`` (a header row). Fields: ``text``, optional ``text_pair``, and ``label``.
Integer labels make a classification task with classes ``0..K-1``; float labels a regression
task. ``causal-lm`` uses ``text`` only and learns to predict it, up to an eos token; a
``text_pair`` or ``label`` there is an error, never silently dropped. Other fields (an ``idx``)
are listed as unused when training starts.

Everything is checked when read, and every problem raises :class:`DataError` naming the file, the
line and the fix. Tokenising truncates to ``max_length`` and reports how many examples were cut.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import DataError

TASKS = ("classification", "regression", "causal-lm")
FIELDS = ("text", "text_pair", "label")
EXTENSIONS = (".jsonl", ".json", ".csv")
_MAX_FILE_BYTES = 2 << 30


@dataclasses.dataclass
class Split:
    """One split's rows, already validated: ``text``, ``text_pair`` (or None), ``label``."""

    name: str
    path: Path
    rows: list[dict[str, Any]]
    ignored: tuple[str, ...] = ()  # fields of the file that no task uses (e.g. an ``idx``)

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass
class TaskData:
    """Splits of one task plus what the model head needs to know."""

    task: str
    num_labels: int  # classes for classification, 1 for regression, 0 for causal-lm
    splits: dict[str, Split]
    pair: bool

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]


def split_file(folder: Path, split: str) -> Path:
    """The file holding ``split`` in ``folder``; a :class:`DataError` lists what is there."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist; pass a folder with train.jsonl and "
                        "validation.jsonl (or .csv); Hub dataset names are not read")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file; --data takes a folder holding train and validation files")
    found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").is_file()]
    if not found:
        present = sorted(p.name for p in folder.iterdir() if p.suffix in EXTENSIONS)
        raise DataError(f"no {split} file in {folder} (looked for {split}.jsonl/.json/.csv; found "
                        f"{present or 'no data files'})")
    if len(found) > 1:
        raise DataError(f"{folder} has several {split} files {[p.name for p in found]}; keep one")
    return found[0]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Raw rows of a JSONL or CSV file, with line numbers in every error."""
    path = Path(path)
    if path.stat().st_size > _MAX_FILE_BYTES:
        raise DataError(f"{path} is larger than 2 GiB; split or sample it first")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise DataError(f"{path}: the header row must name a 'text' column (found "
                            f"{reader.fieldnames})")
        return [{k: v for k, v in row.items() if k is not None} for row in reader]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); write one JSON object per "
                            "line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i} must be a JSON object with 'text' and 'label'")
        row["_line"] = i
        rows.append(row)
    return rows


def _csv_label(value: str) -> int | float | str:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _clean(path: Path, raw: list[dict[str, Any]], task: str | None) -> list[dict[str, Any]]:
    """Check each row's fields and types; returns rows of text, text_pair, label."""
    rows = []
    csv_file = path.suffix == ".csv"
    for n, row in enumerate(raw):
        where = f"{path}:{row.get('_line', n + 2)}"
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string (got {text!r})")
        pair = row.get("text_pair")
        if pair == "" and csv_file:
            pair = None
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{where}: 'text_pair' must be a string (got {type(pair).__name__})")
        label = row.get("label")
        if task == "causal-lm":
            unused = [k for k, v in (("text_pair", pair), ("label", label)) if v not in (None, "")]
            if unused:
                raise DataError(f"{where}: causal-lm learns only 'text', but the row also has "
                                f"{unused}, which would be ignored. Put everything the model should "
                                "learn into 'text', or drop those fields (or pick another --task)")
            rows.append({"text": text, "text_pair": None, "label": None})
            continue
        if label is None or label == "":
            raise DataError(f"{where}: missing 'label'; every row needs one (or use --task causal-lm)")
        if csv_file and isinstance(label, str):
            label = _csv_label(label)
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataError(f"{where}: label {label!r} is not a number; use class ids 0..K-1 "
                            "(integers) or float scores")
        if not math.isfinite(label):
            raise DataError(f"{where}: label {label!r} is not finite")
        if isinstance(label, int) and label < 0:
            raise DataError(f"{where}: class label {label} is negative; use class ids 0..K-1")
        rows.append({"text": text, "text_pair": pair, "label": label})
    return rows


def infer_task(rows: list[dict[str, Any]]) -> str:
    """Classification when every label is an integer, regression otherwise."""
    return "classification" if all(isinstance(r["label"], int) for r in rows) else "regression"


def load_split(folder: Path, split: str, task: str | None,
               max_samples: int | None = None) -> Split:
    """Read and validate one split. ``max_samples`` keeps a fixed random subset (seed 0, original
    order) so that runs with different training seeds see the same data."""
    path = split_file(folder, split)
    raw = read_rows(path)
    rows = _clean(path, raw, task)
    ignored = tuple(sorted({k for r in raw for k in r} - {*FIELDS, "_line"}))
    if not rows:
        raise DataError(f"{path} holds no examples; add rows with 'text' and 'label'")
    if max_samples is not None and len(rows) > max_samples:
        keep = sorted(random.Random(0).sample(range(len(rows)), max_samples))
        rows = [rows[i] for i in keep]
    return Split(split, path, rows, ignored)


def load_task(folder: str | Path, splits: tuple[str, ...] = ("train", "validation"),
              task: str = "auto", max_samples: dict[str, int | None] | None = None,
              num_labels: int | None = None) -> TaskData:
    """Read ``splits`` from ``folder`` and check they describe one task.

    ``task`` is ``auto`` (from the first split's labels), ``classification``, ``regression`` or
    ``causal-lm``. ``num_labels`` is the size of an existing classification head: labels must fit it.
    """
    if task not in ("auto", *TASKS):
        raise DataError(f"unknown task {task!r}; use one of auto, {', '.join(TASKS)}")
    max_samples = max_samples or {}
    loaded = {s: load_split(Path(folder), s, task if task == "causal-lm" else None, max_samples.get(s))
              for s in splits}
    first = loaded[splits[0]]
    if task == "auto":
        task = infer_task(first.rows)
    pairs = {s.name: any(r["text_pair"] is not None for r in s.rows) for s in loaded.values()}
    for s in loaded.values():
        missing = sum(r["text_pair"] is None for r in s.rows)
        if pairs[s.name] and missing:
            raise DataError(f"{s.path}: {missing} of {len(s)} rows lack 'text_pair'; give every row "
                            "a text_pair or none")
    if len(set(pairs.values())) > 1:
        raise DataError(f"splits disagree on 'text_pair' ({pairs}); a task is either single-text or pairs")
    if task == "classification":
        for s in loaded.values():
            bad = next((r for r in s.rows if not isinstance(r["label"], int)), None)
            if bad is not None:
                raise DataError(f"{s.path}: label {bad['label']!r} is not a class id; a classification "
                                "task needs integer labels (pass --task regression for scores)")
        top = max(r["label"] for r in first.rows) + 1
        if num_labels is None:
            num_labels = max(top, 2)
        for s in loaded.values():
            hi = max(r["label"] for r in s.rows)
            if hi >= num_labels:
                raise DataError(f"{s.path} has class label {hi}, but the classification head has "
                                f"{num_labels} classes (0..{num_labels - 1}); the labels do not match "
                                "the head: use data with the same classes as training")
    elif task == "regression":
        for s in loaded.values():
            for r in s.rows:
                r["label"] = float(r["label"])
        if num_labels not in (None, 1):
            raise DataError(f"the data has float labels (regression), but the head has {num_labels} "
                            "classes; use integer class labels or a regression adapter")
        num_labels = 1
    else:
        num_labels = 0
    return TaskData(task, num_labels, loaded, pairs[splits[0]])


class Encoded(torch.utils.data.Dataset):
    """Tokenised examples as dicts of int lists, padded later by the collator."""

    def __init__(self, features: list[dict[str, list[int] | int | float]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def lengths(self) -> list[int]:
        """Tokens per example."""
        return [len(f["input_ids"]) for f in self.features]  # type: ignore[arg-type]

    def by_length(self) -> Encoded:
        """The same examples, longest first: batches of similar length need less padding."""
        return Encoded(sorted(self.features, key=lambda f: -len(f["input_ids"])))  # type: ignore[arg-type]


def tokenize(split: Split, tokenizer: Any, task: str, max_length: int) -> tuple[Encoded, int]:
    """Tokenise a split, truncating to ``max_length`` tokens. Returns the dataset and the number
    of examples that were truncated (the caller warns about them)."""
    if task == "causal-lm":
        return _tokenize_causal(split, tokenizer, max_length)
    texts = [r["text"] for r in split.rows]
    pairs = [r["text_pair"] for r in split.rows]
    pair_args = (pairs,) if pairs[0] is not None else ()
    full = tokenizer(texts, *pair_args, truncation=False, verbose=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    enc = tokenizer(texts, *pair_args, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{**{k: enc[k][i] for k in keys}, "labels": row["label"]}
                for i, row in enumerate(split.rows)]
    return Encoded(features), truncated


def _tokenize_causal(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Each text ends with the tokenizer's eos token (added where the tokenizer does not add it
    itself), so that the model learns where a text stops. A text cut at ``max_length`` loses it:
    it did not end there."""
    eos = tokenizer.eos_token_id
    features, truncated = [], 0
    for ids in tokenizer([r["text"] for r in split.rows], verbose=False)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        truncated += len(ids) > max_length
        features.append({"input_ids": ids[:max_length]})
    return Encoded(features), truncated
