"""Datasets for the command line, read through Hugging Face ``datasets``.

Where the examples come from (:class:`DataSource`):

* a folder of split files ``<split>.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.txt`` (one
  text a line), e.g. ``train.csv`` and ``validation.csv``; ``split_names`` maps a split to another
  file name (``validation=dev`` reads ``dev.csv``);
* a folder written by ``DatasetDict.save_to_disk`` (its splits), or by ``Dataset.save_to_disk``
  (one split: for ``eval``/``predict``, or as ``--train-file``/``--validation-file``);
* single files per split (``files``: ``--train-file``, ``--validation-file``);
* a Hub dataset name when online, with a ``config`` and the same ``split_names`` mapping.

Files are converted once into Arrow files in the ``datasets`` cache (``HF_DATASETS_CACHE``, never
the data folder) and memory-mapped from there, so a file larger than memory is never read whole;
saved datasets are memory-mapped where they lie.

Columns: the text column is detected when that is unambiguous: peftlab's ``text`` (+
``text_pair``), else exactly one known pair (``sentence1/sentence2``, ``question/passage``,
``premise/hypothesis``, ``question/sentence`` ...), else exactly one known single column
(``sentence``, ``content`` ...); the label column is ``label``, ``labels``, ``score`` or
``target``. ``text_column``, ``pair_column`` and ``label_column`` override detection.

Labels: float labels make a regression task. Anything else makes a classification task whose
classes are *names* in id order (:attr:`TaskData.labels`), stored with the adapter as
``id2label``: string (and true/false) labels sorted; integer labels ``0..K-1`` are class ids
(names ``"0"..``); other integer sets (``1, 2``) are used as names (``1`` -> class 0) rather than
making a class that no example teaches; a ``ClassLabel`` feature brings its own names; ``labels``
(``--labels``, or the names a trained adapter recorded) fixes them. ``causal-lm`` uses the text
only and learns to predict it, up to an eos token; a pair or label column there is an error,
never silently dropped; its rows of prompt/completion or chat messages are read by
:mod:`peftlab.instruct` (``causal-lm``'s own ``load``, which falls back to :func:`load_texts`).
Other columns (an ``idx``) are listed as unused when training starts.

Everything is checked when read, and every problem raises :class:`DataError` naming the file,
the line (or row) and the fix. Tokenising truncates to ``max_length`` and reports how many
examples were cut.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from peftlab.errors import DataError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

#: Split file types in a data folder, in the order they are looked for.
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
#: Text columns recognised without --text-column: pairs first (a pair holds a single candidate,
#: QNLI's question/sentence), then single columns.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "passage"), ("premise", "hypothesis"),
                ("question", "sentence"), ("question1", "question2"), ("question", "context"),
                ("query", "passage"), ("text1", "text2"))
TEXT_COLUMNS = ("sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "score", "target")
#: DataSource options on how rows are rendered, read only by tasks that declare them (Task.data_options).
RENDERING = ("chat_template", "loss_on")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---- where the data is ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a task's splits are and which columns to read; see the module docstring."""

    data: str | None = None  # folder, data file, saved dataset, or Hub dataset name
    files: tuple[tuple[str, str], ...] = ()  # (split, file or saved Dataset folder)
    config: str | None = None  # Hub dataset config (--data-config)
    split_names: tuple[tuple[str, str], ...] = ()  # (split, its name in the source)
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    # Instruction rows (prompt/completion, chat messages) of causal-lm; any other rows refuse them.
    chat_template: str | None = None  # a Jinja chat template's text (--chat-template), else the tokenizer's
    loss_on: str | None = None  # which tokens the training loss covers (--loss-on), else the task's default

    @classmethod
    def of(cls, source: str | Path | DataSource) -> DataSource:
        return source if isinstance(source, DataSource) else cls(data=str(source))

    def name_of(self, split: str) -> str:
        return dict(self.split_names).get(split, split)


def parse_split_names(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--split validation=dev`` options as (split, name) pairs."""
    out = []
    for item in items:
        split, eq, name = (part.strip() for part in item.partition("="))
        if not eq or not split or not name:
            raise DataError(f"--split {item!r}: write it as split=name, e.g. --split validation=dev")
        out.append((split, name))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Columns:
    """The columns a task reads: text, optional pair, optional label."""

    text: str
    pair: str | None
    label: str | None

    def used(self) -> list[str]:
        return [c for c in (self.text, self.pair, self.label) if c is not None]


@dataclasses.dataclass(frozen=True)
class _Where:
    """Names a row of a split in messages: ``file:line`` for line-based files, else the row."""

    path: str
    lines: bool = False  # JSON Lines or CSV: report the file's line

    def row(self, i: int) -> str:
        if self.lines:
            with contextlib.suppress(OSError, UnicodeDecodeError, csv.Error):
                return f"{self.path}:{_line_of(Path(self.path), i)}"
        return f"{self.path}, row {i + 1}"


def _line_of(path: Path, index: int) -> int:
    """The line where data row ``index`` (0-based) starts; only called to report an error."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.reader(f)
            next(reader, None)
            start, n = reader.line_num + 1, -1
            for record in reader:
                if record:  # blank lines are skipped by the reader too
                    n += 1
                    if n == index:
                        return start
                start = reader.line_num + 1
        else:
            n = -1
            for number, line in enumerate(f, 1):
                if line.strip():
                    n += 1
                    if n == index:
                        return number
    return index + 1


# ---- the rows of a split ----------------------------------------------------------------------
class LazyRows(Sequence[dict[str, Any]]):
    """Rows read on demand: a subclass gives ``__len__`` and ``at(i)`` for ``0 <= i < len``;
    indexing by negative numbers and slices works as for a list."""

    def at(self, i: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.at(i)


class Rows(LazyRows):
    """A split's validated rows as ``{"text", "text_pair", "label"}`` dicts, read on demand from
    Arrow columns (memory-mapped for files): the texts are not copied into Python objects until
    they are tokenised, a batch at a time. Labels are class ids, floats, or ``None``."""

    def __init__(self, text: pa.ChunkedArray, pair: pa.ChunkedArray | None,
                 labels: np.ndarray | None) -> None:
        self.text, self.pair, self.labels = text, pair, labels

    def __len__(self) -> int:
        return len(self.text)

    def at(self, i: int) -> dict[str, Any]:
        return {"text": self.text[i].as_py(),
                "text_pair": None if self.pair is None else self.pair[i].as_py(),
                "label": None if self.labels is None else self.labels[i].item()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), 1024):
            texts, pairs, labels = self.batch(start, start + 1024)
            for j, text in enumerate(texts):
                yield {"text": text, "text_pair": pairs[j] if pairs else None,
                       "label": None if labels is None else labels[j]}

    def batch(self, start: int, stop: int) -> tuple[list[str], list[str] | None, list[Any] | None]:
        """Texts, pairs and labels of rows ``start:stop`` as Python lists."""
        n = max(0, min(stop, len(self)) - start)
        return (self.text.slice(start, n).to_pylist(),
                None if self.pair is None else self.pair.slice(start, n).to_pylist(),
                None if self.labels is None else self.labels[start:start + n].tolist())

    def take(self, indices: Sequence[int]) -> Rows:
        import pyarrow as pa

        idx = pa.array(indices, type=pa.int64())
        return Rows(self.text.take(idx), None if self.pair is None else self.pair.take(idx),
                    None if self.labels is None else self.labels[np.asarray(indices, dtype=np.int64)])


def text_batches(rows: Sequence[dict[str, Any]], size: int = 4096
             ) -> Iterator[tuple[list[str], list[str] | None, list[Any] | None]]:
    """Texts, pairs (``None`` for single texts) and labels, ``size`` rows at a time."""
    for start in range(0, len(rows), size):
        if isinstance(rows, Rows):
            yield rows.batch(start, start + size)
            continue
        part = rows[start:start + size]
        pairs = [r.get("text_pair") for r in part]
        yield ([r["text"] for r in part], pairs if pairs and pairs[0] is not None else None,
               [r.get("label") for r in part])


@dataclasses.dataclass
class Split:
    """One split's rows, already validated: ``text``, ``text_pair`` (or None), ``label``."""

    name: str
    path: Path
    rows: Sequence[dict[str, Any]]
    ignored: tuple[str, ...] = ()  # columns that no task uses (e.g. an ``idx``)

    def __len__(self) -> int:
        return len(self.rows)


@dataclasses.dataclass
class TaskData:
    """Splits of one task plus what the model head needs to know."""

    task: str
    num_labels: int  # classes for classification, 1 for regression, 0 for causal-lm
    splits: dict[str, Split]
    pair: bool
    labels: tuple[str, ...] | None = None  # class names in id order (classification)
    columns: Columns | None = None
    label_note: str = ""  # how the labels became class ids (printed by peftlab train)

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    def label_mapping(self) -> str:
        """``negative -> 0, positive -> 1``: the mapping that training uses."""
        return ", ".join(f"{name} -> {i}" for i, name in enumerate(self.labels or ()))


# ---- reading ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from ``datasets`` while peftlab reads: peftlab reports
    problems itself, as one error naming the row. The user's settings are restored after."""
    import datasets
    from datasets.utils import logging as ds_logging

    level, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def split_file(folder: Path, split: str) -> Path:
    """The file holding ``split`` in ``folder``; a :class:`DataError` lists what is there."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist; pass a folder with train and validation "
                        "files (.jsonl, .json, .csv or .parquet), a saved dataset, or a Hub dataset name")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file; --data takes a folder holding train and validation files")
    found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").is_file()]
    if not found:
        present = sorted(p.name for p in folder.iterdir() if p.suffix in EXTENSIONS)
        raise DataError(f"no {split} file in {folder} (looked for {split}.jsonl/.json/.csv/.parquet/.txt; "
                        f"found {present or 'no data files'}); name the file {split}.<ext>, or point "
                        "--split at another name")
    if len(found) > 1:
        raise DataError(f"{folder} has several {split} files {[p.name for p in found]}; keep one")
    return found[0]


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None


def _read_file(path: Path, label: str | None) -> tuple[datasets.Dataset, _Where]:
    """One data file as a memory-mapped Arrow dataset. ``label`` names the label column (default:
    the first of :data:`LABEL_COLUMNS` present; ``""``: none, every column is text), the only CSV
    column whose type is inferred: the others stay text ("007" is not 7, "NA" is not missing)."""
    import datasets

    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet "
                        "or .txt (one text a line)")
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        header = _csv_header(path)
        if not header:
            raise DataError(f"{path} holds no examples; its first line must name the columns")
        label = next((c for c in LABEL_COLUMNS if c in header), None) if label is None else label
        # pandas would read a ragged row's extra field as an index: index_col=False makes it a
        # warning, caught below.
        kwargs = {"keep_default_na": False, "na_values": [""], "index_col": False,
                  "converters": {c: str for c in header if c != label}}
    lines = builder in ("csv", "text") or (builder == "json" and not _json_array(path))
    where = _Where(str(path), lines)
    with _quiet_datasets(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
        except Exception as e:  # noqa: BLE001 - pyarrow, pandas and datasets raise many kinds
            raise _unreadable(path, builder, e) from None
        if builder == "text":  # datasets keeps blank lines as empty texts; a blank line is no example
            ds = ds.filter(lambda t: [bool(x.strip()) for x in t], input_columns="text", batched=True)
    if any("Length of header" in str(w.message) for w in caught):
        raise _unreadable(path, builder, None)
    return ds, where


def _json_array(path: Path) -> bool:
    """A ``.json`` file holding one array (or object) rather than JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"["


def _unreadable(path: Path, builder: str, error: BaseException | None) -> DataError:
    """The first row that stops ``path`` from being read, found by reading it line by line
    (only on this error path, so a good file is read once, by ``datasets``)."""
    try:
        if builder == "json":
            problem = _json_problem(path)
        elif builder == "csv":
            problem = _csv_problem(path)
        else:
            problem = None
    except UnicodeDecodeError as e:
        problem = f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8"
    if problem:
        return DataError(problem)
    if error is None or "corresponds to no data" in str(error) or "No columns to parse" in str(error):
        return DataError(f"{path} holds no examples; add rows with a text and a label")
    cause = error.__cause__ or error
    kind = {"json": "JSON Lines", "csv": "CSV", "parquet": "Parquet", "text": "text"}[builder]
    return DataError(f"{path} is not a readable {kind} file ({type(cause).__name__}: "
                     f"{' '.join(str(cause).split())[:300]})")


def _json_problem(path: Path) -> str | None:
    if _json_array(path):
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno} is not valid JSON ({e.msg}); fix the file or write JSON Lines"
        return None
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{i} is not valid JSON ({e.msg}); write one JSON object per line"
            if not isinstance(row, dict):
                return f"{path}:{i} must be a JSON object with a text and a label"
    return None


def _csv_problem(path: Path) -> str | None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        for record in reader:
            if record and len(record) != len(header):
                return (f"{path}:{start} has {len(record)} fields, but the header has {len(header)} "
                        f"({', '.join(header)}); quote values that hold commas")
            start = reader.line_num + 1
    return None


def _load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    try:
        with _quiet_datasets():
            return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path} looks like a saved dataset but cannot be read "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); save it again with "
                        "save_to_disk") from None


def _is_saved(path: Path) -> str | None:
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def _load_hub(source: DataSource) -> datasets.DatasetDict:
    import datasets

    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(source.data, source.config)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, missing config, ...
        raise DataError(f"--data {source.data}: not a local path, and not loadable from the Hub "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); pass a local folder "
                        "or file, or check the name (and --data-config) while online") from None
    return loaded


class _Opened:
    """Opens each split's dataset; a DatasetDict (saved, or from the Hub) is read once."""

    def __init__(self, source: DataSource, splits: tuple[str, ...]) -> None:
        self.source, self.splits = source, splits
        self.dict: Any = None

    def split(self, split: str, label: str | None) -> tuple[datasets.Dataset, _Where]:
        source = self.source
        files = dict(source.files)
        if split in files:
            return self._path(Path(files[split]).expanduser(), label, f"--{split}-file")
        if source.data is None:
            raise DataError(f"no {split} data: pass --data, or --{split}-file")
        path = Path(source.data).expanduser()
        name = source.name_of(split)
        if path.is_file() or _is_saved(path) == "dataset":
            if len([s for s in self.splits if s not in files]) > 1:
                raise DataError(f"{path} holds one split, but {split} and others are needed; pass a folder "
                                f"with train and validation files, or --train-file and --validation-file")
            return self._path(path, label, "--data")
        if path.is_dir() and _is_saved(path) is None:
            return _read_file(split_file(path, name), label)
        if path.is_dir():
            self.dict = self.dict if self.dict is not None else _load_saved(path)
        elif _HUB_NAME.match(source.data) and not Path(source.data).suffix:
            self.dict = self.dict if self.dict is not None else _load_hub(source)
        else:
            split_file(path, name)  # raises: the folder does not exist
        if name not in self.dict:
            raise DataError(f"{source.data} has no split {name!r} (it has {list(self.dict)}); map it with "
                            f"--split {split}=NAME")
        return self.dict[name], _Where(f"{source.data}[{name}]")

    def _path(self, path: Path, label: str | None, flag: str) -> tuple[datasets.Dataset, _Where]:
        if not path.exists():
            raise DataError(f"{flag} {path} does not exist")
        if path.is_file():
            return _read_file(path, label)
        if _is_saved(path) == "dataset":
            return _load_saved(path), _Where(str(path))  # type: ignore[return-value]
        if _is_saved(path) == "dict":
            raise DataError(f"{flag} {path} holds a DatasetDict (several splits); pass it as --data, with "
                            "--split to choose a split")
        raise DataError(f"{flag} {path} is a folder; pass a data file or a Dataset.save_to_disk folder")


# ---- columns ------------------------------------------------------------------------------------
def detect_columns(names: Sequence[str], source: DataSource, where: str, labelled: bool) -> Columns:
    """The text, pair and label columns of a dataset with columns ``names``; overrides first."""
    present = set(names)
    for flag, col in (("--text-column", source.text_column), ("--pair-column", source.pair_column),
                      ("--label-column", source.label_column)):
        if col is not None and col not in present:
            raise DataError(f"{where} has no column {col!r} ({flag}); its columns are {list(names)}")
    if source.pair_column is not None and source.text_column is None:
        raise DataError("--pair-column needs --text-column too (the first text of each pair)")
    if source.text_column is not None:
        text, pair = source.text_column, source.pair_column
    elif "text" in present:  # peftlab's own layout wins
        text, pair = "text", "text_pair" if "text_pair" in present else None
    else:
        pairs = [p for p in PAIR_COLUMNS if set(p) <= present]
        singles = [c for c in TEXT_COLUMNS if c in present]
        if len(pairs) > 1 or (not pairs and len(singles) > 1):
            found = [f"{a}/{b}" for a, b in pairs] if pairs else singles
            raise DataError(f"{where}: several possible text columns {found}; choose with --text-column "
                            "(and --pair-column for pairs)")
        if pairs:
            text, pair = pairs[0]
        elif singles:
            text, pair = singles[0], None
        elif present & {"prompt", "completion", "messages"}:
            found = ", ".join(sorted(present & {"prompt", "completion", "messages"}))
            raise DataError(f"{where}: rows of {found} are instructions for a language model: pass --task "
                            "causal-lm")
        else:
            raise DataError(f"{where}: no text column found among {list(names)} (looked for 'text', "
                            f"{', '.join(TEXT_COLUMNS)} and pairs such as sentence1/sentence2); name it "
                            "with --text-column")
    label = source.label_column
    if label is None and labelled:
        found = [c for c in LABEL_COLUMNS if c in present and c not in (text, pair)]
        if len(found) > 1:
            raise DataError(f"{where}: several possible label columns {found}; choose with --label-column")
        label = found[0] if found else None
    return Columns(text, pair, label)


def _column(ds: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """A column as Arrow, without copying (the dataset's own memory-mapped table)."""
    return ds.with_format("arrow")[name] if ds._indices is not None else ds.data.column(name)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    import pyarrow.compute as pc

    return int(pc.index(mask.fill_null(True), True).as_py())


def _blank(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Rows with no text: null, empty or only whitespace."""
    import pyarrow.compute as pc

    return pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0))


def _count_blank(arr: pa.ChunkedArray) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(_blank(arr).cast("int64")).as_py() or 0)


def _texts(ds: datasets.Dataset, col: str, where: _Where, optional: bool = False
           ) -> tuple[pa.ChunkedArray, int]:
    """A text column checked to hold strings; returns it and the first row with no text (-1 if
    every row has one). A required column must have text in every row."""
    import pyarrow as pa

    arr = _column(ds, col)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
        values = ds[col]  # decoded: numbers, lists, mixed JSON
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                raise DataError(f"{where.row(i)}: {col!r} must be a string (got {type(v).__name__} {v!r})")
        arr = pa.chunked_array([pa.array(values, type=pa.large_string())])
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.large_string())
    try:
        arr.validate(full=True)  # pyarrow's JSON reader lets invalid UTF-8 through
    except pa.ArrowInvalid:
        raw = arr.cast(pa.large_binary()).to_pylist()
        for i, b in enumerate(raw):
            try:
                b is None or b.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where.row(i)}: {col!r} is not UTF-8 text ({e.reason}); re-encode the "
                                "file as UTF-8") from None
        raise
    i = _first(_blank(arr))
    if i >= 0 and not optional:
        value = arr[i].as_py()
        raise DataError(f"{where.row(i)}: {col!r} must be a non-empty string (got {value!r})")
    return arr, i


# ---- labels -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Labels:
    """One split's raw label column: ``int`` (ids or numbers), ``float``, or ``name`` (strings
    and booleans); ``declared`` holds a ``ClassLabel`` feature's names."""

    kind: str
    values: Any  # pa.ChunkedArray
    declared: tuple[str, ...] | None = None

    def as_names(self) -> Any:
        import pyarrow as pa

        if self.declared is not None:
            return pa.array(self.declared).take(self.values)
        return self.values.cast(pa.large_string())


def _labels(ds: datasets.Dataset, col: str, where: _Where) -> _Labels:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _column(ds, col)
    feature = ds.features.get(col)
    declared = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if declared is not None:
        arr = pc.if_else(pc.less(arr, 0), pa.scalar(None, arr.type), arr)  # -1: no label (test sets)
    elif not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
              or pa.types.is_boolean(arr.type) or pa.types.is_string(arr.type)
              or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
        arr = _decoded_labels(ds[col], col, where)
    string = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    i = _first(_blank(arr) if string else pc.is_null(arr))
    if i >= 0:
        raise DataError(f"{where.row(i)}: missing {col!r}; every row needs a label (or use --task causal-lm, "
                        "or peftlab predict for unlabelled text)")
    if pa.types.is_floating(arr.type):
        bad = _first(pc.invert(pc.is_finite(arr)))
        if bad >= 0:
            raise DataError(f"{where.row(bad)}: label {arr[bad].as_py()!r} is not finite")
        return _Labels("float", arr)
    if pa.types.is_integer(arr.type):
        return _Labels("int", arr, declared)
    if pa.types.is_boolean(arr.type):
        return _Labels("name", arr.cast(pa.large_string()))
    return _Labels("name", arr)


def _decoded_labels(values: list[Any], col: str, where: _Where) -> Any:
    """A label column that Arrow could not type (JSON mixing numbers and names): all numbers or
    all names, else an error naming the first row that differs."""
    import pyarrow as pa

    def kind(v: Any) -> str:
        if v is None:
            return "missing"
        if isinstance(v, bool) or isinstance(v, str):
            return "name"
        if isinstance(v, (int, float)):
            return "number"
        return type(v).__name__

    kinds = [kind(v) for v in values]
    first = next((i for i, k in enumerate(kinds) if k != "missing"), 0)
    for i, k in enumerate(kinds):
        if k not in ("missing", "name", "number"):
            raise DataError(f"{where.row(i)}: label {values[i]!r} is a {k}; a label is a class name, a class "
                            "id or a number")
        if k not in ("missing", kinds[first]):
            raise DataError(f"{where.row(i)}: label {values[i]!r} is a {k}, but {where.row(first)} has "
                            f"{values[first]!r}; use class names everywhere, or numbers everywhere")
    if kinds[first] == "name":
        return pa.chunked_array([pa.array([None if v is None else str(v).lower() if isinstance(v, bool)
                                           else v for v in values], type=pa.large_string())])
    floats = any(isinstance(v, float) for v in values)
    return pa.chunked_array([pa.array(values, type=pa.float64() if floats else pa.int64())])


def _class_names(first: _Labels, where: str) -> tuple[tuple[str, ...], str]:
    """The class names of a classification task from its first split, and a note saying how."""
    import pyarrow.compute as pc

    if first.declared is not None:
        return first.declared, "class names declared by the dataset"
    unique = pc.unique(first.values).to_pylist()
    if first.kind == "int":
        values = sorted(unique)
        if values == list(range(len(values))):
            names, note = tuple(str(v) for v in values), f"class ids 0..{len(values) - 1}"
        else:
            # A head with max+1 classes would have classes that no example teaches.
            names, note = tuple(str(v) for v in values), (
                f"integer labels {values[:10]}{'...' if len(values) > 10 else ''} are not 0..K-1, so they "
                "are used as class names")
    else:
        names, note = tuple(sorted(unique)), "label names, sorted"
    if len(names) < 2:
        raise DataError(f"{where}: every label is {names[0]!r}; a classifier needs at least two classes "
                        "(or pass --labels with every class name)")
    return names, note


def _class_ids(labels: _Labels, names: tuple[str, ...], where: _Where) -> np.ndarray:
    """Class ids of a split's labels under ``names``. Integer labels are names too, except for a
    head whose classes have no names (transformers' ``LABEL_0``, ``LABEL_1`` ...): class ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if labels.kind == "float":
        i = _first(pc.not_equal(labels.values, pc.floor(labels.values)))
        value = labels.values[max(i, 0)].as_py()
        raise DataError(f"{where.row(max(i, 0))}: label {value!r} is not a class id; a classification task "
                        "needs class names or integer labels (pass --task regression for scores)")
    unnamed = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if labels.kind == "int" and labels.declared is None and unnamed:
        ids = labels.values.to_numpy()
        bad = np.flatnonzero((ids < 0) | (ids >= len(names)))
        if len(bad):
            raise DataError(f"{where.row(int(bad[0]))}: class label {ids[bad[0]]} does not fit the "
                            f"classification head's {len(names)} classes ({', '.join(names)}); the labels "
                            "do not match the head: use data with the same classes as training")
        return ids.astype(np.int64)
    keys = labels.as_names()
    ids = pc.index_in(keys, value_set=pa.array(names, type=pa.large_string()))
    i = _first(pc.is_null(ids))
    if i >= 0:
        raw = labels.values[i].as_py()
        what = f"class label {raw}" if labels.kind == "int" else f"label {raw!r}"
        raise DataError(f"{where.row(i)}: {what} is not one of the {len(names)} classes "
                        f"({', '.join(names)}); use data with the same classes as training, or pass "
                        "--labels with every class name")
    return ids.to_numpy(zero_copy_only=False).astype(np.int64)


# ---- loading a task -----------------------------------------------------------------------------
def load_task(source: str | Path | DataSource, splits: tuple[str, ...] = ("train", "validation"),
              task: str = "auto", max_samples: dict[str, int | None] | None = None,
              num_labels: int | None = None, labels: Sequence[str] | None = None,
              labelled: bool = True) -> TaskData:
    """Read ``splits`` from ``source`` (a folder, file, saved dataset or Hub name, or a
    :class:`DataSource`) and check they describe one task.

    ``task`` is ``auto`` (from the first split's labels), ``classification``, ``regression`` or
    ``causal-lm``. ``labels`` fixes the class names in id order (``--labels``, or those a trained
    adapter recorded); ``num_labels`` is the size of an existing classification head that recorded
    no names: labels must be its class ids. ``labelled=False`` reads texts only (prediction).
    ``max_samples`` keeps a fixed random subset per split (seed 0, original order), so that runs with
    different training seeds see the same data.
    """
    from peftlab.tasks import REGISTRY

    if task not in ("auto", *REGISTRY):
        raise DataError(f"unknown task {task!r}; use one of auto, {', '.join(REGISTRY)}")
    src = DataSource.of(source)
    opened = _Opened(src, splits)  # a DatasetDict (saved, or from the Hub) is read once for both uses
    if task == "auto" and labelled:
        task = recognized_task(opened, splits[0]) or task
    unread = [o for o in RENDERING if getattr(src, o) is not None
              and (task == "auto" or o not in REGISTRY[task].data_options)]
    if unread:
        raise DataError(f"{_options(unread)} for rows of prompt/completion or chat messages (--task "
                        f"causal-lm); {'--task ' + task if task != 'auto' else 'this task'} does not read "
                        "it: drop the option")
    if task != "auto" and REGISTRY[task].load is not None:
        return REGISTRY[task].load(src, splits=splits, max_samples=max_samples, num_labels=num_labels,
                                   labels=labels, labelled=labelled)
    return load_texts(src, splits, task, max_samples, num_labels, labels, labelled, opened)


def recognized_task(opened: _Opened, split: str) -> str | None:
    """The task whose :attr:`~peftlab.tasks.Task.recognizes` claims the columns of ``split``, or
    ``None`` (text/label rows, or data that cannot be opened: the loader then says why)."""
    from peftlab.tasks import REGISTRY

    try:
        ds, where = opened.split(split, opened.source.label_column)
    except DataError:
        return None
    names = frozenset(ds.column_names)
    found = [name for name, t in REGISTRY.items() if t.recognizes is not None and t.recognizes(names)]
    if len(found) > 1:
        raise DataError(f"{where.path}: columns {sorted(names)} fit several tasks ({', '.join(found)}); "
                        "choose one with --task")
    return found[0] if found else None


def _options(names: Sequence[str]) -> str:
    """``--chat-template is`` / ``--chat-template and --loss-on are``: options named in a message."""
    flags = " and ".join("--" + n.replace("_", "-") for n in names)
    return f"{flags} {'are' if len(names) > 1 else 'is'}"


class _TextSplit(NamedTuple):
    """One split's columns as read: texts, pairs (or ``None``), where it is, unused columns."""

    text: Any
    pair: Any
    where: _Where
    ignored: list[str]


def load_texts(source: str | Path | DataSource, splits: tuple[str, ...] = ("train", "validation"),
               task: str = "auto", max_samples: dict[str, int | None] | None = None,
               num_labels: int | None = None, labels: Sequence[str] | None = None,
               labelled: bool = True, opened: _Opened | None = None) -> TaskData:
    """:func:`load_task` for rows of a text (or text pair) and a label: what a task without its
    own ``load`` reads, and what a task's ``load`` may fall back to. ``opened``: the source as
    :func:`load_task` already opened it."""
    from peftlab.tasks import REGISTRY

    src = DataSource.of(source)
    labels = _checked_text_options(task, labelled, labels, src)
    opened = opened or _Opened(src, splits)
    causal = task != "auto" and REGISTRY[task].labelled == "text"  # the text is all it learns
    columns: Columns | None = None
    texts: dict[str, _TextSplit] = {}
    raw: dict[str, _Labels] = {}
    for split in splits:
        ds, where = opened.split(split, src.label_column or (columns.label if columns else None))
        columns = _text_columns(ds, where, src, columns, splits[0], labelled)
        used = {*columns.used(), columns.pair}
        texts[split] = _TextSplit(*_text_and_pair(ds, where, src, columns), where,
                                  [c for c in ds.column_names if c not in used])
        label_col = columns.label if columns.label in ds.column_names else None
        if causal:
            _check_only_text(ds, where, columns, texts[split].pair is not None, label_col)
        elif labelled:
            if label_col is None:
                raise DataError(f"{where.path}: no label column among {ds.column_names} (looked for "
                                f"{', '.join(LABEL_COLUMNS)}); name it with --label-column, use --task "
                                "causal-lm, or peftlab predict for unlabelled text")
            raw[split] = _labels(ds, label_col, where)
    assert columns is not None
    pairs = {s: texts[s].pair is not None for s in splits}
    if len(set(pairs.values())) > 1:
        raise DataError(f"splits disagree on {columns.pair!r} ({pairs}); a task is either single-text or "
                        "pairs")
    first = raw.get(splits[0])
    if task == "auto":
        task = "regression" if first is not None and first.kind == "float" else "classification"
    names, note, ids, num_labels = _label_ids(REGISTRY[task].labelled, labelled, raw, texts, labels,
                                              num_labels)
    loaded = {}
    for s in splits:
        rows = Rows(texts[s].text, texts[s].pair, ids.get(s))
        kept = sample_indices(len(rows), (max_samples or {}).get(s))
        loaded[s] = Split(s, Path(texts[s].where.path), rows if kept is None else rows.take(kept),
                          tuple(texts[s].ignored))
    return TaskData(task, num_labels, loaded, pairs[splits[0]], names, columns, note)


def _checked_text_options(task: str, labelled: bool, labels: Sequence[str] | None,
                          src: DataSource) -> tuple[str, ...] | None:
    """The class names given (as strings), after refusing what text rows cannot use."""
    if not labelled and task == "auto":
        raise DataError("unlabelled data needs the task of the trained model")
    if labels is not None:
        labels = tuple(str(n) for n in labels)
        if len(labels) < 2 or len(set(labels)) < len(labels):
            raise DataError(f"--labels {','.join(labels)}: give at least two different class names")
    given = [o for o in RENDERING if getattr(src, o) is not None]
    if given:
        raise DataError(f"{_options(given)} for rows of prompt/completion or chat messages (--task "
                        "causal-lm); these rows hold texts, which no template renders: drop the option")
    return labels


def _text_columns(ds: Any, where: _Where, src: DataSource, columns: Columns | None, first: str,
                  labelled: bool) -> Columns:
    """The text, pair and label columns: detected in the first split, the same in the others."""
    columns = columns or detect_columns(ds.column_names, src, where.path, labelled)
    _check_split(ds, where, (columns.text, columns.pair), first, "with a text and a label")
    return columns


def _check_split(ds: Any, where: _Where, needed: Sequence[str | None], first: str, rows_like: str) -> None:
    """A split with rows and the ``needed`` columns (``None``: not needed) that ``first`` has."""
    missing = [c for c in needed if c is not None and c not in ds.column_names]
    if missing:
        raise DataError(f"{where.path} lacks column(s) {missing} that {first} has; give every "
                        "split the same columns")
    if len(ds) == 0:
        raise DataError(f"{where.path} holds no examples; add rows {rows_like}")


def _text_and_pair(ds: Any, where: _Where, src: DataSource, columns: Columns) -> tuple[Any, Any]:
    """The split's texts, and its pairs (``None`` for single texts, as when the pair column is
    empty in every row); some rows with a pair and some without are refused."""
    text, _ = _texts(ds, columns.text, where)
    if columns.pair is None:
        return text, None
    pair, lacking = _texts(ds, columns.pair, where, optional=True)
    if lacking < 0:
        return text, pair
    count = _count_blank(pair)
    if count == len(pair) and src.pair_column is None:
        return text, None
    raise DataError(f"{where.row(lacking)}: no {columns.pair!r}, but other rows have one "
                    f"({count} of {len(pair)} rows lack it); give every row a {columns.pair} or none")


def _check_only_text(ds: Any, where: _Where, columns: Columns, has_pair: bool, label_col: str | None) -> None:
    """Causal-LM learns the text column alone: pairs or labels it would ignore are refused."""
    unused = [columns.pair] if has_pair else []
    if label_col is not None and _column(ds, label_col).null_count < len(ds):
        unused.append(label_col)
    if unused:
        raise DataError(f"{where.path}: causal-lm learns only {columns.text!r}, but the rows also "
                        f"have {unused}, which would be ignored. Put everything the model should "
                        f"learn into {columns.text!r}, or drop those columns or pick another --task")


def _label_ids(kind: str, labelled: bool, raw: dict[str, _Labels], texts: dict[str, _TextSplit],
               labels: tuple[str, ...] | None, num_labels: int | None
               ) -> tuple[tuple[str, ...] | None, str, dict[str, np.ndarray], int]:
    """Class names, how they were found, each split's label ids (class ids or values) and the
    head's width, for a task whose labels are of ``kind``."""
    ids: dict[str, np.ndarray] = {}
    if kind == "class" and labelled:
        first = raw[next(iter(texts))]
        if labels is not None:
            names, note = labels, "class names given"
        elif num_labels is not None:
            names, note = tuple(str(i) for i in range(num_labels)), f"class ids 0..{num_labels - 1}"
            if first.declared is not None:
                names = first.declared
        else:
            names, note = _class_names(first, next(iter(texts.values())).where.path)
        for s in texts:
            ids[s] = _class_ids(raw[s], names, texts[s].where)
        return names, note, ids, len(names)
    if kind == "class":
        return labels, "", ids, len(labels) if labels is not None else (num_labels or 2)
    if kind != "value":
        return None, "", ids, 0
    if num_labels not in (None, 1):
        raise DataError(f"the data has float labels (regression), but the head has {num_labels} classes; "
                        "use integer class labels or a regression adapter")
    for s in texts if labelled else ():
        if raw[s].kind == "name":
            raise DataError(f"{texts[s].where.row(0)}: label {raw[s].values[0].as_py()!r} is not a number; "
                            "regression needs numeric labels (drop --task regression for class names)")
        ids[s] = raw[s].values.to_numpy().astype(np.float64)
    return None, "", ids, 1


def sample_indices(n: int, keep: int | None) -> list[int] | None:
    """The rows that a ``max_samples`` limit of ``keep`` leaves of ``n``: a fixed random subset
    (seed 0) in the original order, so that runs with different training seeds see the same data;
    ``None`` when every row stays."""
    if keep is None or n <= keep:
        return None
    return sorted(random.Random(0).sample(range(n), keep))


def read_stdin(stream: io.TextIOBase, folder: Path) -> Path:
    """Standard input saved as a file in ``folder`` for :func:`load_task`: JSON Lines when the first
    line is a JSON object, else one text a line."""
    text = stream.read()
    first = next((line for line in text.splitlines() if line.strip()), "")
    path = folder / ("stdin.jsonl" if first.lstrip().startswith("{") else "stdin.txt")
    path.write_text(text, encoding="utf-8")
    return path


# ---- tokenising ---------------------------------------------------------------------------------
class Encoded(torch.utils.data.Dataset):
    """Tokenised examples as dicts of int lists, padded later by the collator. ``left_out``: rows
    that gave no example (truncation left them nothing to learn), which the caller reports."""

    def __init__(self, features: list[dict[str, list[int] | int | float]], left_out: int = 0) -> None:
        self.features = features
        self.left_out = left_out

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def lengths(self) -> list[int]:
        """Tokens per example."""
        return [len(f["input_ids"]) for f in self.features]  # type: ignore[arg-type]

    def by_length(self) -> Encoded:
        """The same examples, longest first: batches of similar length need less padding."""
        return Encoded(sorted(self.features, key=lambda f: -len(f["input_ids"])),  # type: ignore[arg-type]
                       self.left_out)


def tokenize(split: Split, tokenizer: Any, task: str, max_length: int) -> tuple[Encoded, int]:
    """Tokenise a split for ``task`` (:mod:`peftlab.tasks`), truncating to ``max_length`` tokens.
    Returns the dataset and the number of examples that were truncated (the caller warns about
    them)."""
    from peftlab.tasks import task_for

    return task_for(task).tokenize(split, tokenizer, max_length)


def tokenize_texts(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Texts (and pairs) with their labels, for sequence classification and regression. Unlabelled
    rows get no ``labels``."""
    features: list[dict[str, Any]] = []
    truncated = 0
    for texts, pairs, labels in text_batches(split.rows):
        pair_args = (pairs,) if pairs is not None else ()
        enc = tokenizer(texts, *pair_args, truncation=False, verbose=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
        truncated += len(long)
        if long:  # only the long ones are tokenised again, with truncation: the rest are unchanged
            cut = tokenizer([texts[i] for i in long], *([[pairs[i] for i in long]] if pairs else []),
                            truncation=True, max_length=max_length)
            for j, i in enumerate(long):
                for k in keys:
                    enc[k][i] = cut[k][j]
        for i in range(len(texts)):
            feature = {k: enc[k][i] for k in keys}
            if labels is not None and labels[i] is not None:
                feature["labels"] = labels[i]
            features.append(feature)
    return Encoded(features), truncated
