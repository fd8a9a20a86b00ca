"""The task contract: a task is one module plus one registry line, and nothing else.

``F1_CLASSIFICATION`` below is a whole task defined in this file: classification judged (and
early-stopped) by F1 instead of accuracy, reusing the text tasks' pieces. Registered, it works
wherever a built-in task does: ``peftlab train --task``, ``eval`` and ``predict``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_cli import _save_bert, _sentiment, _write_jsonl
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.errors import UsageError
from peftlab.metrics import classification_metrics
from peftlab.tasks import REGISTRY, names, register, task_for, unregister
from peftlab.tasks.text import TASKS as TEXT_TASKS

runner = CliRunner()


def f1_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    return classification_metrics(labels, np.asarray(logits).argmax(-1), num_labels)


F1_CLASSIFICATION = dataclasses.replace(TEXT_TASKS[0], name="f1-classification", primary="f1",
                                        about="classification judged by F1", metrics=f1_metrics)


@pytest.fixture
def f1_task():
    register(F1_CLASSIFICATION)
    yield F1_CLASSIFICATION
    unregister("f1-classification")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {"bert": _save_bert(root / "bert"), "data": _sentiment(root / "data")}


def test_the_built_in_tasks_are_registered_with_their_judging_metric():
    assert {"classification", "regression", "causal-lm"} <= set(names())
    assert (task_for("classification").primary, task_for("regression").primary) == ("accuracy", "pearson")
    lm = task_for("causal-lm")
    assert lm.loss_only and (lm.select_metric, lm.select_greater) == ("loss", False)
    with pytest.raises(UsageError, match="unknown task 'clasification'.*classification"):
        task_for("clasification")


def test_a_task_name_is_registered_once(f1_task):
    register(f1_task)  # the same task again: nothing changes
    with pytest.raises(UsageError, match="already registered"):
        register(dataclasses.replace(f1_task, about="another"))
    assert REGISTRY["f1-classification"] is f1_task


def test_a_registered_task_trains_evaluates_and_predicts_from_the_command_line(f1_task, work, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(work["data"]),
                                 "--task", "f1-classification", "--method", "lora", "--out", str(run),
                                 "--epochs", "1", "--batch-size", "8", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "f1-classification" and metrics["primary_metric"] == "f1"
    assert set(metrics["eval"]) >= {"loss", "f1", "accuracy"}

    evaluated = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(work["data"]),
                                    "--split", "validation"])
    assert evaluated.exit_code == 0, evaluated.output + repr(evaluated.exception)
    assert json.loads(evaluated.output)["f1"] == pytest.approx(metrics["eval"]["f1"])

    _write_jsonl(tmp_path / "new.jsonl", [{"text": "a great film"}, {"text": "a dull meal"}])
    predicted = runner.invoke(app, ["predict", "--adapter", str(run), "--data", str(tmp_path / "new.jsonl"),
                                    "--out", str(tmp_path / "preds.jsonl"), "--quiet"])
    assert predicted.exit_code == 0, predicted.output + repr(predicted.exception)
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["label", "scores"]] * 2


def test_an_unknown_task_is_refused_before_anything_is_written(work, tmp_path):
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(work["data"]),
                                 "--task", "f1-classification", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "classification" in result.output
    assert not (tmp_path / "bad").exists()


# ---- --task auto: the columns name the task ------------------------------------------------------
AUTO_CASES = [
    ([{"text": "a fine day", "label": "pos"}, {"text": "a dull day", "label": "neg"}], "classification"),
    ([{"text": "a fine day", "label": 0.5}, {"text": "a dull day", "label": 1.5}], "regression"),
    ([{"text": "a fine day", "target": "pos"}, {"text": "a dull day", "target": "neg"}], "classification"),
    ([{"prompt": "2+2=", "completion": "4"}], "causal-lm"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
     "causal-lm"),
    ([{"tokens": ["John", "lives", "here"], "ner_tags": ["B-PER", "O", "O"]}], "token-classification"),
    ([{"document": "a long text about cats", "summary": "cats"}], "seq2seq"),
    ([{"source": "hello", "target": "bonjour"}], "seq2seq"),
]


@pytest.mark.parametrize(("rows", "task"), AUTO_CASES, ids=[t for _, t in AUTO_CASES])
def test_auto_reads_the_task_from_the_columns(tmp_path, rows, task):
    from peftlab.data import load_task

    for split in ("train", "validation"):
        _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    assert load_task(tmp_path).task == task


def test_columns_that_fit_two_tasks_are_refused_with_the_choice(tmp_path):
    from peftlab.data import load_task
    from peftlab.errors import DataError

    row = {"tokens": ["hi"], "tags": ["O"], "prompt": "say hi", "completion": "hi"}
    for split in ("train", "validation"):
        _write_jsonl(tmp_path / f"{split}.jsonl", [row])
    with pytest.raises(DataError, match=r"fit several tasks \(causal-lm, token-classification\); choose one "
                                        "with --task"):
        load_task(tmp_path)
