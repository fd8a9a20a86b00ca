"""Instruction tuning rows for causal language models: prompt/completion pairs and chat messages.

The columns of a dataset say which kind of rows it holds; one kind per dataset, every split alike:

* ``text``: a text learned whole (:func:`peftlab.data.load_texts`; not read here);
* ``prompt`` and ``completion`` as strings: the model learns the completion given the prompt. They
  are joined as they are, ``prompt + completion`` then eos, with no chat template: TRL's rule for
  rows that are not conversational (a prompt such as ``"Question: ...\\nAnswer:"`` is often
  formatted already). To have them rendered by a chat template, write them as messages;
* ``prompt`` and ``completion`` as lists of messages (TRL's conversational prompt/completion):
  rendered with the chat template, the prompt with the template's generation prompt;
* ``messages``: a conversation, a list of ``{"role", "content"}``; every assistant turn is learned.

Rows are rendered with ``--chat-template FILE`` (a Jinja template) when given, else with the
tokenizer's own ``chat_template``.

Which tokens the loss covers, as TRL's ``SFTTrainer`` decides it (``completion_only_loss``, and
``assistant_only_loss`` without needing ``{% generation %}`` markers in the template):

* prompt/completion: the completion starts where the tokenised prompt and the tokenised
  ``prompt + completion`` first differ (TRL's ``common_prefix_length``: a token that merges across
  the boundary belongs to the completion);
* messages: each assistant turn ``k`` covers the tokens that the conversation up to and including
  it adds to the conversation up to turn ``k`` rendered with the generation prompt, so the
  generation prompt (``<|im_start|>assistant\\n``), given at inference, is not learned, and the
  turn's end marker is. A template that renders earlier turns differently once later turns follow
  (not prefix-preserving) cannot be split this way and is refused, naming the row;
* ``loss_on="all"`` (``--loss-on all``): every token of the training split, TRL's default for
  messages. Validation and ``peftlab eval`` always measure the completion tokens, so runs trained
  either way compare.

Every example ends with the tokenizer's eos token, which the loss covers, so that the model learns
to stop: string completions get it appended (as TRL does); a chat template that ends assistant turns
with another marker (Gemma's ``<end_of_turn>``, ChatML without an eos of ``<|im_end|>``) gets eos
appended after the last turn. TRL appends nothing to conversations; on such templates the two
differ by that one token.

Examples longer than ``max_length`` tokens keep their start (TRL's ``keep_start``); one left with
no completion token is left out of the set (TRL drops them too), counted in ``Encoded.left_out``,
which training and ``peftlab eval`` report.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftlab.data import (
    Columns,
    DataSource,
    Encoded,
    LazyRows,
    Split,
    TaskData,
    _column,
    _Opened,
    _Where,
    load_texts,
)
from peftlab.errors import DataError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

#: The kinds of instruction rows: prompt/completion strings, the same as lists of messages, chats.
PROMPT, CONVERSATION, MESSAGES = "prompt/completion", "conversational prompt/completion", "messages"
#: The column groups whose presence decides the kind of rows (mixing groups is refused).
GROUPS = {"text": ("text",), "prompt/completion": ("prompt", "completion"), "messages": ("messages",)}
LOSS_ON = ("completion", "all")
_BATCH = 512


@dataclasses.dataclass(frozen=True)
class Rendering:
    """How instruction rows become tokens: the chat template (``None``: the tokenizer's) and which
    tokens the training loss covers (:data:`LOSS_ON`)."""

    chat_template: str | None = None
    loss_on: str = "completion"


def read_chat_template(path: str | Path) -> str:
    """The text of a ``--chat-template`` file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--chat-template {path} does not exist; pass a Jinja chat template file") from None
    except IsADirectoryError:
        raise UsageError(f"--chat-template {path} is a folder; pass a Jinja chat template file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--chat-template {path} is not UTF-8 text ({e.reason})") from None
    if not text.strip():
        raise UsageError(f"--chat-template {path} is empty; it must hold a Jinja chat template")
    return text


def check_loss_on(value: str | None) -> None:
    if value is not None and value not in LOSS_ON:
        raise UsageError(f"--loss-on {value!r}: use {' or '.join(LOSS_ON)}")


# ---- the rows -------------------------------------------------------------------------------------
class InstructRows(LazyRows):
    """A split's validated instruction rows, read on demand from Arrow columns: ``{"prompt",
    "completion"}`` (strings, or lists of messages) or ``{"messages"}``, with how to render them
    and where each row came from (for errors found when tokenising)."""

    def __init__(self, kind: str, columns: dict[str, pa.ChunkedArray], where: _Where, rendering: Rendering,
                 origin: np.ndarray | None = None) -> None:
        self.kind, self.columns, self.where, self.rendering = kind, columns, where, rendering
        self.origin = origin  # each row's index in the file, once rows were taken out of order

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def at(self, i: int) -> dict[str, Any]:
        return self.batch(i, i + 1)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), _BATCH):
            yield from self.batch(start, start + _BATCH)

    def batch(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows ``start:stop`` as dicts; messages lose the fields they do not have (``None``)."""
        n = max(0, min(stop, len(self)) - start)
        values = {name: _decoded(col.slice(start, n).to_pylist(), col.type)
                  for name, col in self.columns.items()}
        if self.kind != PROMPT:
            values = {name: [_clean(v) for v in vs] for name, vs in values.items()}
        return [{name: values[name][j] for name in values} for j in range(n)]

    def take(self, indices: Sequence[int]) -> InstructRows:
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64)
        origin = idx if self.origin is None else self.origin[idx]
        return InstructRows(self.kind, {k: c.take(pa.array(idx)) for k, c in self.columns.items()},
                            self.where, self.rendering, origin)

    def row(self, i: int) -> str:
        """Row ``i`` named for a message: ``file:line``, or the file and row."""
        return self.where.row(int(self.origin[i]) if self.origin is not None else i)


def _is_json(arrow_type: Any) -> bool:
    return getattr(arrow_type, "extension_name", None) == "arrow.json"


def _decoded(values: list[Any], arrow_type: Any) -> list[Any]:
    """Python values of a column. ``datasets`` stores JSON objects whose keys differ from row to row
    (a message with a ``name``, another without) as JSON text (the ``arrow.json`` type): decoded."""
    import json

    item = getattr(arrow_type, "value_type", None)
    if _is_json(arrow_type):
        return [None if v is None else json.loads(v) for v in values]
    if item is not None and _is_json(item):
        return [None if v is None else [None if m is None else json.loads(m) for m in v] for v in values]
    return values


def _clean(messages: Any) -> Any:
    """A list of messages without the ``None`` fields that Arrow gives messages lacking a field
    another message has (a ``name``): a template would print them."""
    if not isinstance(messages, list):
        return messages
    return [{k: v for k, v in m.items() if v is not None or k == "content"} if isinstance(m, dict) else m
            for m in messages]


# ---- reading ----------------------------------------------------------------------------------------
def kind_of(names: Sequence[str], ds: Any, source: DataSource, where: _Where) -> str | None:
    """The kind of instruction rows in dataset ``ds`` with columns ``names``, or ``None`` for texts
    (read by :func:`peftlab.data.load_texts`). Two groups of columns with values are refused,
    naming the first row that differs from the first row."""
    if source.text_column is not None:
        return None
    groups = [g for g, cols in GROUPS.items() if any(c in names and _has_values(ds, c) for c in cols)]
    if len(groups) > 1:
        raise _mixture(ds, groups, where)
    if not groups or groups == ["text"]:
        return None
    if groups == ["messages"]:
        return MESSAGES
    return PROMPT  # strings or conversational: decided by the column's type


def _has_values(ds: Any, col: str) -> bool:
    return _column(ds, col).null_count < len(ds)


def _mixture(ds: Any, groups: list[str], where: _Where) -> DataError:
    """The error for a dataset mixing kinds of rows: the first row holding two kinds, or a kind
    other than the first row's."""
    import pyarrow.compute as pc

    valid = {g: np.zeros(len(ds), dtype=bool) for g in groups}
    for g in groups:
        for c in GROUPS[g]:
            if c in ds.column_names:
                valid[g] |= pc.is_valid(_column(ds, c)).to_numpy(zero_copy_only=False)
    kinds = np.stack([valid[g] for g in groups], axis=1)
    i = int(np.flatnonzero((kinds.sum(axis=1) != 1) | (kinds != kinds[0]).any(axis=1))[0])
    has = [g for g in groups if valid[g][i]]
    if len(has) > 1:
        what = f"has both {' and '.join(_named(g) for g in has)}"
    elif not has:
        what = f"has none of {', '.join(_named(g) for g in groups)}"
    else:  # row 0 has exactly one kind, else it would be the row named
        what = f"has {_named(has[0])}, but {where.row(0)} has {_named(groups[int(np.argmax(kinds[0]))])}"
    return DataError(f"{where.row(i)} {what}; a dataset holds one kind of rows (text, prompt/completion, or "
                     "chat messages): put each kind in its own dataset")


def _named(group: str) -> str:
    return "/".join(repr(c) for c in GROUPS[group])


def load(source: str | Path | DataSource, splits: tuple[str, ...] = ("train", "validation"),
         max_samples: dict[str, int | None] | None = None, num_labels: int | None = None,
         labels: Sequence[str] | None = None, labelled: bool = True, task: str = "causal-lm") -> TaskData:
    """``task``'s splits: rows of prompt/completion or chat messages (see the module docstring),
    else rows of text through :func:`peftlab.data.load_texts`. ``labelled=False`` (prediction)
    reads prompts: a completion is not needed (nor used), and a conversation's final assistant turn
    is the one to generate."""
    src = DataSource.of(source)
    check_loss_on(src.loss_on)
    opened = _Opened(src, splits)
    ds, where = opened.split(splits[0], None)
    kind = kind_of(ds.column_names, ds, src, where) if len(ds) else None
    if kind is None:
        return load_texts(src, splits, task, max_samples, num_labels, labels, labelled)
    rendering = Rendering(src.chat_template, src.loss_on or "completion")
    loaded = {}
    for split in splits:
        if split != splits[0]:
            ds, where = opened.split(split, None)
            other = kind_of(ds.column_names, ds, src, where) if len(ds) else kind
            if other != kind:
                raise DataError(f"{where.path} holds {other or 'text'} rows, but the {splits[0]} split holds "
                                f"{kind} rows; give every split the same kind of rows")
        loaded[split] = _split(split, ds, where, kind, rendering, labelled, (max_samples or {}).get(split))
    first = loaded[splits[0]].rows
    assert isinstance(first, InstructRows)
    if first.kind == PROMPT and rendering.chat_template is not None:
        raise DataError(f"{loaded[splits[0]].path}: prompt/completion strings are joined as they are, as TRL "
                        "does, so --chat-template would not be used; write the rows as chat messages (a "
                        "'messages' list of role/content) to have them rendered, or drop --chat-template")
    kinds = {s.rows.kind for s in loaded.values()}  # type: ignore[attr-defined]
    if len(kinds) > 1:
        raise DataError(f"splits disagree: {sorted(kinds)}; write prompts and completions as strings in "
                        "every split, or as messages in every split")
    columns = Columns("messages", None, None) if kind == MESSAGES else Columns("prompt", None, "completion")
    return TaskData(task, 0, loaded, False, None, columns)


def _split(name: str, ds: Any, where: _Where, kind: str, rendering: Rendering, labelled: bool,
           keep: int | None) -> Split:
    """One split's rows, checked; ``keep`` rows at most (a fixed random subset, as for texts)."""
    if len(ds) == 0:
        raise DataError(f"{where.path} holds no examples; add rows")
    used = ["messages"] if kind == MESSAGES else ["prompt", "completion"]
    if kind == PROMPT:
        if "prompt" not in ds.column_names:
            raise DataError(f"{where.path}: a 'completion' column but no 'prompt'; give each row the prompt "
                            "that the completion answers")
        if labelled and "completion" not in ds.column_names:
            raise DataError(f"{where.path}: a 'prompt' column but no 'completion'; give each row the "
                            "completion to learn (peftlab predict reads prompts alone)")
        kind = _prompt_kind(ds, where)
    columns = {c: _column(ds, c) for c in used if c in ds.column_names and (labelled or c != "completion")}
    rows = InstructRows(kind, columns, where, rendering)
    _check(rows, labelled)
    if keep is not None and len(rows) > keep:
        rows = rows.take(sorted(random.Random(0).sample(range(len(rows)), keep)))
    ignored = tuple(c for c in ds.column_names if c not in used)
    return Split(name, Path(where.path), rows, ignored)


def _prompt_kind(ds: Any, where: _Where) -> str:
    """Prompt/completion as strings or as lists of messages, from the ``prompt`` column's type."""
    import pyarrow as pa

    kinds = set()
    for col in ("prompt", "completion"):
        if col in ds.column_names:
            t = _column(ds, col).type
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                kinds.add(CONVERSATION)
            elif pa.types.is_string(t) or pa.types.is_large_string(t):
                kinds.add(PROMPT)
    if len(kinds) > 1:
        raise DataError(f"{where.path}: 'prompt' and 'completion' must be both strings or both lists of "
                        "messages")
    return kinds.pop() if kinds else PROMPT


# ---- checking rows ------------------------------------------------------------------------------------
def _check(rows: InstructRows, labelled: bool) -> None:
    """Every row well formed for its kind (see :func:`_problem`), else a :class:`DataError`."""
    for start in range(0, len(rows), _BATCH):
        for j, row in enumerate(rows.batch(start, start + _BATCH)):
            problem = _problem(row, rows.kind, labelled)
            if problem:
                raise DataError(f"{rows.row(start + j)}: {problem}")


def _problem(row: dict[str, Any], kind: str, labelled: bool) -> str | None:
    if kind == PROMPT:
        for col in ("prompt", "completion") if labelled else ("prompt",):
            value = row.get(col)
            if not isinstance(value, str) or not value.strip():
                return (f"{col!r} must be a non-empty string (got {value!r}); give every row a prompt and "
                        "the completion to learn")
        return None
    if kind == CONVERSATION:
        problem = _messages_problem(row.get("prompt"), "prompt")
        if problem or not labelled:
            return problem
        problem = _messages_problem(row.get("completion"), "completion")
        if problem is None and row["completion"][-1]["role"] != "assistant":
            problem = (f"'completion' ends with a message from {row['completion'][-1]['role']!r}; the "
                       "completion is the assistant's reply to learn")
        return problem
    messages = row.get("messages")
    problem = _messages_problem(messages, "messages")
    if problem:
        return problem
    if labelled and messages[-1]["role"] != "assistant":
        return (f"the last message is from {messages[-1]['role']!r}; a conversation to learn ends with the "
                "assistant's reply (the assistant turns are what the model learns)")
    if not labelled and len(_prompt_turns(messages)) == 0:
        return "there is no message before the assistant's turn to answer"
    return None


def _messages_problem(messages: Any, col: str) -> str | None:
    fix = 'write it as a list of {"role": ..., "content": "..."} messages'
    if not isinstance(messages, list) or not messages:
        return f"{col!r} must be a non-empty list of messages (got {messages!r}); {fix}"
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {n} of {col!r} is {type(m).__name__} {m!r}; {fix}"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"message {n} of {col!r} has no role (got {role!r}); {fix}"
        if not isinstance(content, str):
            return f"message {n} of {col!r} has content {content!r}, not a string; {fix}"
        if role == "assistant" and not content.strip():
            return f"message {n} of {col!r} is an empty assistant message; give it the reply to learn"
    return None


def _prompt_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation to answer: without its final assistant turn, if it has one."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


# ---- tokenising ---------------------------------------------------------------------------------------
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def template_of(rows: InstructRows, tokenizer: Any, path: Path) -> str | dict[str, str]:
    """The chat template that renders ``rows``: ``--chat-template``'s, else the tokenizer's."""
    template = rows.rendering.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{path}: rows of {rows.kind} are rendered with a chat template, and the tokenizer "
                        "has none; pass --chat-template FILE (a Jinja template, e.g. your model family's)")
    return template


def _render(tokenizer: Any, template: Any, messages: list[dict[str, Any]], generation: bool,
            rows: InstructRows, i: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, and templates raise what they like
        raise DataError(f"{rows.row(i)}: the chat template cannot render this conversation "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); fix the row, or pass a "
                        "--chat-template that accepts it") from None


def encode(split: Split, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """A split of instruction rows as ``input_ids`` with a per-example ``loss_mask`` (1: the token
    is learned), cut to ``max_length`` tokens; and how many examples were cut (those left with
    nothing to learn are left out: ``left_out``). The training split learns what
    :attr:`Rendering.loss_on` says, every other split the completion only."""
    rows = split.rows
    assert isinstance(rows, InstructRows)
    loss_on = rows.rendering.loss_on if split.name == "train" else "completion"
    template = template_of(rows, tokenizer, split.path) if rows.kind != PROMPT else None
    features, truncated, dropped = [], 0, 0
    for start in range(0, len(rows), _BATCH):
        batch = rows.batch(start, start + _BATCH)
        pieces = (_prompt_pieces(batch, tokenizer) if rows.kind == PROMPT
                  else _chat_pieces(batch, tokenizer, template, rows, start, every_turn=loss_on != "all"))
        for ids, mask in pieces:
            if loss_on == "all":
                mask = [1] * len(ids)
            truncated += len(ids) > max_length
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):  # nothing to learn: the first token is never predicted
                dropped += 1
                continue
            features.append({"input_ids": ids, "loss_mask": mask})
    if dropped and not features:
        raise DataError(f"{split.path}: every example's prompt fills --max-length {max_length} tokens, "
                        "so no completion token is left to learn; raise --max-length")
    return Encoded(features, left_out=dropped), truncated


def _with_eos(ids: list[int], mask: list[int], eos: int | None, start: int) -> tuple[list[int], list[int]]:
    """``ids`` ending with eos, learned: appended unless the learned part from ``start`` holds it."""
    if eos is None or eos in ids[start:]:
        return ids, mask
    return [*ids, eos], [*mask, 1]


def _prompt_pieces(batch: list[dict[str, Any]], tokenizer: Any) -> Iterator[tuple[list[int], list[int]]]:
    """Prompt/completion strings: ``prompt + completion`` + eos, the completion learned."""
    prompts = tokenizer([r["prompt"] for r in batch], verbose=False)["input_ids"]
    fulls = tokenizer([r["prompt"] + r["completion"] for r in batch], verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    for prompt, ids in zip(prompts, fulls):
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        start = common_prefix(prompt, ids)
        yield ids, [0] * start + [1] * (len(ids) - start)


def _conversation(row: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A row as one conversation, and the first message whose assistant turns are learned."""
    if "messages" in row:
        return row["messages"], 0
    return row["prompt"] + row["completion"], len(row["prompt"])


def _chat_pieces(batch: list[dict[str, Any]], tokenizer: Any, template: Any, rows: InstructRows,
                 offset: int, every_turn: bool = True) -> Iterator[tuple[list[int], list[int]]]:
    """Conversations rendered with ``template``, each assistant turn learned (see the module
    docstring); ``every_turn=False`` finds the last turn only (where eos belongs), for a loss on
    every token. The texts of a batch are tokenised together."""
    texts: list[str] = []
    plans = []  # per row: index of the full text, and (before, through) text indices per learned turn
    for j, row in enumerate(batch):
        conv, first = _conversation(row)
        full = len(texts)
        texts.append(_render(tokenizer, template, conv, False, rows, offset + j))
        turns = []
        learned = [k for k in range(first, len(conv)) if conv[k]["role"] == "assistant"]
        for k in learned if every_turn else learned[-1:]:
            texts.append(_render(tokenizer, template, conv[:k], True, rows, offset + j))
            if k == len(conv) - 1:
                turns.append((len(texts) - 1, full))
            else:
                texts.append(_render(tokenizer, template, conv[:k + 1], False, rows, offset + j))
                turns.append((len(texts) - 2, len(texts) - 1))
        plans.append((full, turns))
    tokens = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    for j, (full, turns) in enumerate(plans):
        ids = list(tokens[full])
        mask = [0] * len(ids)
        start = len(ids)
        for before, through in turns:
            upto = tokens[through]
            if ids[:len(upto)] != upto:
                raise DataError(
                    f"{rows.row(offset + j)}: the chat template renders earlier turns differently once later "
                    "turns follow, so the assistant's tokens cannot be told apart; use a template that keeps "
                    "earlier turns as they were (e.g. TRL's training templates), split the conversation into "
                    "prompt/completion rows, or train on every token with --loss-on all")
            start = common_prefix(tokens[before], upto)
            mask[start:len(upto)] = [1] * (len(upto) - start)
        yield _with_eos(ids, mask, eos, start)


def prompt_ids(rows: InstructRows, tokenizer: Any) -> list[list[int]]:
    """The tokens each row's generation starts from: the prompt string as training tokenised it,
    or the conversation without its final assistant turn, with the generation prompt."""
    if rows.kind == PROMPT:
        return [ids for start in range(0, len(rows), _BATCH) for ids in tokenizer(
            [r["prompt"] for r in rows.batch(start, start + _BATCH)], verbose=False)["input_ids"]]
    template = template_of(rows, tokenizer, Path(rows.where.path))
    out = []
    for start in range(0, len(rows), _BATCH):
        batch = rows.batch(start, start + _BATCH)
        texts = [_render(tokenizer, template, _prompt_turns(r["messages"]) if rows.kind == MESSAGES
                         else r["prompt"], True, rows, start + j) for j, r in enumerate(batch)]
        out += tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return out


__all__ = ["CONVERSATION", "LOSS_ON", "MESSAGES", "PROMPT", "InstructRows",
           "Rendering", "check_loss_on", "common_prefix", "encode", "kind_of", "load", "prompt_ids",
           "read_chat_template"]
