"""Data through HF `datasets`: sources, detected columns, label names, and `peftlab predict`.

Everything runs offline on tiny files; the Hub path is checked with `datasets.load_dataset`
replaced by a local DatasetDict (the datasets cache is a temporary folder, see conftest.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import transformers as T
from test_cli import _save_bert, _sentence, _tokenizer, _write_jsonl
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.data import DataSource, load_task, tokenize
from peftlab.errors import DataError

runner = CliRunner()


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _bad(result, *expected: str) -> str:
    """Exit code 2 with one `error:` line holding every expected piece."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


def _reviews(folder: Path, n_train: int = 32, n_val: int = 16, names=("negative", "positive"),
             header: str = "sentence,label") -> Path:
    """A CSV folder as a newcomer has it: `sentence,label`, labels as words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        lines = [header] + [f"{_sentence(rng, i % 2)},{names[i % 2]}" for i in range(n)]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"root": root, "bert": _save_bert(root / "bert"), "reviews": _reviews(root / "reviews")}


def _train(work, data_args: list[str], out: Path, *extra: str):
    return runner.invoke(app, ["train", "--model", str(work["bert"]), *data_args, "--method", "lora",
                               "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-length",
                               "16", "--lr", "5e-3", *extra])


@pytest.fixture(scope="module")
def reviews_run(work):
    out = work["root"] / "reviews_run"
    result = _train(work, ["--data", str(work["reviews"])], out)
    _ok(result)
    work["reviews_stderr"] = result.stderr
    return out


# ---- the friction cases from the issue ------------------------------------------------------------
def test_sentence_label_csv_with_string_labels_trains_and_records_the_names(work, reviews_run):
    assert "negative -> 0, positive -> 1" in " ".join(work["reviews_stderr"].split())
    config = json.loads((reviews_run / "adapter" / "adapter_config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    run = json.loads((reviews_run / "run.json").read_text())
    assert run["labels"] == ["negative", "positive"] and run["columns"]["text"] == "sentence"
    shown = runner.invoke(app, ["inspect", str(reviews_run), "--json"])
    _ok(shown)
    assert json.loads(shown.stdout)["labels"] == ["negative", "positive"]
    # eval maps the words with the recorded names and reproduces training's score
    result = runner.invoke(app, ["eval", "--adapter", str(reviews_run), "--data", str(work["reviews"])])
    _ok(result)
    trained = json.loads((reviews_run / "metrics.json").read_text())["eval"]
    assert json.loads(result.stdout)["accuracy"] == trained["accuracy"]


def test_eval_refuses_a_label_name_the_adapter_does_not_know(work, reviews_run, tmp_path):
    data = _reviews(tmp_path / "other", names=("negative", "neutral"))
    _bad(runner.invoke(app, ["eval", "--adapter", str(reviews_run), "--data", str(data)]),
         "validation.csv:3", "label 'neutral' is not one of the 2 classes (negative, positive)")


def test_merged_model_carries_the_label_names(work, reviews_run, tmp_path):
    out = tmp_path / "merged"
    _ok(runner.invoke(app, ["merge", "--adapter", str(reviews_run), "--out", str(out)]))
    model = T.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}


def test_full_fine_tuning_saves_the_names_in_the_model_config_and_predict_uses_them(work, tmp_path):
    out = tmp_path / "full"
    _ok(_train(work, ["--data", str(work["reviews"])], out, "--method", "full"))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    preds = tmp_path / "preds.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(out / "model"), "--data", "-", "--out", str(preds),
                            "--quiet"], input="the film was good\n"))
    assert json.loads(preds.read_text())["label"] in ("negative", "positive")


def test_an_adapter_with_a_broken_label_map_is_refused(work, reviews_run, tmp_path):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(reviews_run / "adapter", copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["id2label"] = {"0": "negative", "2": "positive"}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    _bad(runner.invoke(app, ["eval", "--adapter", str(copy), "--model", str(work["bert"]), "--data",
                             str(work["reviews"])]), "id2label must map the class ids 0..K-1")


def test_integer_labels_1_and_2_make_two_named_classes_not_three(work, tmp_path):
    data = _reviews(tmp_path / "ones_twos", names=("1", "2"))
    out = tmp_path / "run"
    result = _train(work, ["--data", str(data)], out)
    _ok(result)
    assert "1 -> 0, 2 -> 1" in " ".join(result.stderr.split())
    assert "not 0..K-1" in " ".join(result.stderr.split())
    run = json.loads((out / "run.json").read_text())
    assert run["num_labels"] == 2 and run["labels"] == ["1", "2"]
    preds = tmp_path / "preds.jsonl"
    (tmp_path / "new.txt").write_text("the film was very good\nthe meal was awful\n")
    _ok(runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(tmp_path / "new.txt"),
                            "--out", str(preds), "--quiet"]))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["label"] in (1, 2) for r in rows] == [True, True]  # written back as the data had them
    assert all(set(r["scores"]) == {"1", "2"} for r in rows)


def test_integer_labels_with_a_gap_are_names_and_validation_must_use_them(tmp_path):
    for split, labels in (("train", [0, 2, 0, 2]), ("validation", [0, 1])):
        _write_jsonl(tmp_path / f"{split}.jsonl", [{"text": "good", "label": v} for v in labels])
    with pytest.raises(DataError, match=r"validation.jsonl:2: class label 1 is not one of the 2 classes"):
        load_task(tmp_path)
    data = load_task(tmp_path, splits=("train",))
    assert data.labels == ("0", "2") and [r["label"] for r in data["train"].rows] == [0, 1, 0, 1]
    # --labels declares every class, absent ones too
    data = load_task(tmp_path, labels=["0", "1", "2"])
    assert data.num_labels == 3 and [r["label"] for r in data["validation"].rows] == [0, 1]


def test_class_ids_0_to_k_minus_1_stay_ids(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": v} for v in (2, 0, 1)])
    data = load_task(tmp_path, splits=("train",))
    assert data.labels == ("0", "1", "2") and [r["label"] for r in data["train"].rows] == [2, 0, 1]


# ---- predict ------------------------------------------------------------------------------------
def test_predict_on_an_unlabelled_file_writes_one_row_per_input_in_order(work, reviews_run, tmp_path):
    rng = random.Random(5)
    texts = [_sentence(rng, i % 2) + " really" * (i % 4) for i in range(11)]
    (tmp_path / "new.csv").write_text("sentence\n" + "\n".join(texts) + "\n")
    preds = tmp_path / "out" / "preds.jsonl"
    result = runner.invoke(app, ["predict", "--adapter", str(reviews_run), "--data",
                                 str(tmp_path / "new.csv"), "--out", str(preds), "--batch-size", "4"])
    _ok(result)
    assert "wrote 11 predictions" in result.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 11 and all(r["label"] in ("negative", "positive") for r in rows)
    for r in rows:
        assert set(r["scores"]) == {"negative", "positive"}
        assert sum(r["scores"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["scores"], key=r["scores"].get)
    # the order is the input's: each row equals the prediction for its text alone
    alone = tmp_path / "alone.jsonl"
    (tmp_path / "one.txt").write_text(texts[7] + "\n")
    _ok(runner.invoke(app, ["predict", "--adapter", str(reviews_run), "--data", str(tmp_path / "one.txt"),
                            "--out", str(alone), "--quiet"]))
    single = json.loads(alone.read_text())
    assert single["label"] == rows[7]["label"]
    assert single["scores"]["positive"] == pytest.approx(rows[7]["scores"]["positive"], abs=1e-5)


def test_predict_reads_standard_input_as_text_lines_or_json_lines(work, reviews_run, tmp_path):
    preds = tmp_path / "preds.jsonl"
    args = ["predict", "--adapter", str(reviews_run), "--data", "-", "--out", str(preds), "--quiet"]
    _ok(runner.invoke(app, args, input="the film was good\n\nthe book was dull\n"))
    assert len(preds.read_text().splitlines()) == 2  # the blank line is no example
    rows = '{"sentence": "the film was good", "id": 1}\n{"sentence": "the book was dull", "id": 2}\n'
    _ok(runner.invoke(app, args, input=rows))
    assert len(preds.read_text().splitlines()) == 2


def test_predict_ignores_labels_and_refuses_bad_input_writing_nothing(work, reviews_run, tmp_path):
    preds = tmp_path / "preds.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(reviews_run), "--data", str(work["reviews"]),
                            "--split", "validation", "--out", str(preds), "--quiet"]))
    assert len(preds.read_text().splitlines()) == 16
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "good"}\n{"sentence": ""}\n')
    out = tmp_path / "never.jsonl"
    _bad(runner.invoke(app, ["predict", "--adapter", str(reviews_run), "--data", str(broken),
                             "--out", str(out)]), "broken.jsonl:2", "'sentence' must be a non-empty string")
    devices = {"cuda:7": "not usable here", "meta": "holds no data", "gpu": "not a device"}
    for device, message in devices.items():
        for command in (["predict", "--out", str(out)], ["eval"]):
            result = runner.invoke(app, [*command, "--adapter", str(reviews_run), "--data",
                                         str(work["reviews"]), "--split", "validation", "--device", device])
            _bad(result, f"--device {device}", message)
    assert not out.exists()
    same = tmp_path / "on-cpu.jsonl"  # auto is the CPU on a machine without an accelerator
    _ok(runner.invoke(app, ["predict", "--adapter", str(reviews_run), "--data", str(work["reviews"]),
                            "--split", "validation", "--out", str(same), "--quiet", "--device", "cpu"]))
    assert same.read_text() == preds.read_text()


def test_predict_regression_writes_values(work, tmp_path):
    data = tmp_path / "scores"
    data.mkdir()
    rng = random.Random(1)
    for split, n in (("train", 16), ("validation", 8)):
        _write_jsonl(data / f"{split}.jsonl", [{"sentence1": _sentence(rng, 0), "score": float(i % 5),
                                               "sentence2": _sentence(rng, 1)} for i in range(n)])
    out = tmp_path / "run"
    _ok(_train(work, ["--data", str(data)], out))
    assert json.loads((out / "run.json").read_text())["columns"] == {
        "text": "sentence1", "pair": "sentence2", "label": "score"}
    preds = tmp_path / "preds.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(data / "validation.jsonl"),
                            "--out", str(preds), "--quiet"]))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["value"], float) for r in rows)
    # a pair model is not given single texts
    (tmp_path / "single.txt").write_text("the film was good\n")
    _bad(runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(tmp_path / "single.txt"),
                             "--out", str(preds)]), "trained on pairs")


def test_predict_causal_lm_generates_text(work, tmp_path):
    path = tmp_path / "gpt2"
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(_tokenizer()), n_embd=32, n_layer=2, n_head=2,
                                   n_positions=64)).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    data = tmp_path / "lm"
    data.mkdir()
    rng = random.Random(2)
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text("".join(_sentence(rng, i % 2) + "\n" for i in range(8)))
    out = tmp_path / "run"
    _ok(runner.invoke(app, ["train", "--model", str(path), "--data", str(data), "--task", "causal-lm",
                            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--quiet"]))
    preds = tmp_path / "preds.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(out), "--data", "-", "--out", str(preds),
                            "--max-new-tokens", "3", "--quiet"], input="the film\nthe meal was very\n"))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["generated"], str) for r in rows)
    assert all(len(_tokenizer()(r["generated"], add_special_tokens=False)["input_ids"]) <= 3 for r in rows)


# ---- sources ------------------------------------------------------------------------------------
def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": _sentence(rng, i % 2), "passage": _sentence(rng, 1 - i % 2),
             "label": ["no", "yes"][i % 2]} for i in range(n)]


def test_parquet_folder_and_detected_question_passage_pair(tmp_path):
    for split, n in (("train", 6), ("validation", 4)):
        datasets.Dataset.from_list(_rows(n)).to_parquet(str(tmp_path / f"{split}.parquet"))
    before = sorted(p.name for p in tmp_path.iterdir())
    data = load_task(tmp_path)
    assert data.pair and data.columns.text == "question" and data.columns.pair == "passage"
    assert data.labels == ("no", "yes") and len(data["train"]) == 6
    assert data["train"].rows[1]["text_pair"] == _rows(6)[1]["passage"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache files in the data folder


def test_saved_dataset_dict_with_class_label_names_and_split_mapping(work, tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    rng = random.Random(4)
    make = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"sentence": [_sentence(rng, i % 2) for i in range(n)], "label": [i % 2 for i in range(n)]},
        features=features)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": make(16), "dev": make(8)}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"has no split 'validation' \(it has \['train', 'dev'\]\).*--split"):
        load_task(saved)
    source = DataSource(data=str(saved), split_names=(("validation", "dev"),))
    data = load_task(source)
    assert data.labels == ("bad", "good") and data.label_note == "class names declared by the dataset"
    assert [r["label"] for r in data["validation"].rows][:4] == [0, 1, 0, 1]
    out = tmp_path / "run"
    _ok(_train(work, ["--data", str(saved), "--split", "validation=dev"], out))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["id2label"] == {
        "0": "bad", "1": "good"}


def test_single_files_and_saved_datasets_as_train_and_validation_files(work, tmp_path):
    rng = random.Random(6)
    _write_jsonl(tmp_path / "mine.jsonl", [{"body": _sentence(rng, i % 2), "y": "yes" if i % 2 else "no"}
                                           for i in range(16)])
    datasets.Dataset.from_list([{"body": _sentence(rng, i % 2), "y": "yes" if i % 2 else "no"}
                                for i in range(8)]).save_to_disk(str(tmp_path / "dev"))
    out = tmp_path / "run"
    args = ["--train-file", str(tmp_path / "mine.jsonl"), "--validation-file", str(tmp_path / "dev")]
    _bad(_train(work, args, out), "no text column found", "--text-column")
    assert not out.exists()
    _bad(_train(work, [*args, "--text-column", "body"], out), "no label column", "--label-column")
    result = _train(work, [*args, "--text-column", "body", "--label-column", "y"], out)
    _ok(result)
    run = json.loads((out / "run.json").read_text())
    assert run["labels"] == ["no", "yes"] and run["args"]["train_file"] == str(tmp_path / "mine.jsonl")
    _bad(_train(work, ["--train-file", str(tmp_path / "mine.jsonl")], tmp_path / "x"),
         "--train-file and --validation-file")


def test_hub_names_use_config_and_split_mapping_without_the_network(monkeypatch):
    calls = []
    rng = random.Random(7)
    local = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"sentence": [_sentence(rng, i % 2) for i in range(6)],
                                          "label": [i % 2 for i in range(6)], "idx": list(range(6))})
        for name in ("train", "validation_matched")})

    def fake_load_dataset(name, config=None, **kw):
        calls.append((name, config))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = DataSource(data="nyu-mll/glue", config="mnli",
                        split_names=(("validation", "validation_matched"),))
    data = load_task(source)
    assert calls == [("nyu-mll/glue", "mnli")]  # one load for both splits
    assert data["validation"].ignored == ("idx",) and "validation_matched" in str(data["validation"].path)


def test_a_hub_name_offline_is_a_clear_error(work, tmp_path):
    out = tmp_path / "run"
    _bad(_train(work, ["--data", "surely-not-a-local-folder"], out), "--data surely-not-a-local-folder",
         "not a local path")
    assert not out.exists()


# ---- columns and row-level errors ---------------------------------------------------------------
def test_ambiguous_text_columns_are_refused_and_overrides_choose(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"sentence": "good", "review": "x", "label": i % 2}
                                            for i in range(4)])
    with pytest.raises(DataError, match=r"several possible text columns \['sentence', 'review'\]"):
        load_task(tmp_path, splits=("train",))
    data = load_task(DataSource(data=str(tmp_path), text_column="review"), splits=("train",))
    assert data["train"].rows[0]["text"] == "x" and data["train"].ignored == ("sentence",)
    with pytest.raises(DataError, match=r"no column 'body' \(--text-column\)"):
        load_task(DataSource(data=str(tmp_path), text_column="body"), splits=("train",))


@pytest.mark.parametrize("name, content, expected", [
    ("train.csv", "sentence,label\ngood,positive\n\"bad, really\",negative,extra\n",
     "train.csv:3 has 3 fields, but the header has 2"),
    ("train.csv", "sentence,label\ngood,positive\n\"two\nlines\",\nok,negative\n",
     "train.csv:3: missing 'label'"),
    ("train.jsonl", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0\n',
     "train.jsonl:3 is not valid JSON"),
    ("train.jsonl", '{"text": "good", "label": 1}\n{"text": 7, "label": 0}\n',
     "train.jsonl:2: 'text' must be a string (got int 7)"),
    ("train.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": "no"}\n',
     "train.jsonl:2: label 'no' is a name, but /"),
    ("train.jsonl", '{"text": "good", "label": 1.5}\n{"text": "bad", "label": NaN}\n', "not finite"),
    ("train.jsonl", b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', "is not UTF-8"),
    ("train.parquet", None, "holds no examples"),
])
def test_errors_name_the_file_and_row(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is None:
        datasets.Dataset.from_dict({"text": [], "label": []}).to_parquet(str(path))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DataError) as caught:
        load_task(tmp_path, splits=("train",))
    assert expected in str(caught.value) and str(tmp_path) in str(caught.value)


def test_csv_texts_stay_text_and_a_detected_score_column_stays_numeric(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n007,1\nNA,0\nnull,1\n")
    rows = list(load_task(tmp_path, splits=("train",))["train"].rows)
    assert [r["text"] for r in rows] == ["007", "NA", "null"]
    (tmp_path / "train.csv").write_text("sentence1,sentence2,score\na cat,a dog,3.5\n1,2,0.25\n")
    data = load_task(tmp_path, splits=("train",))
    assert data.task == "regression" and [r["label"] for r in data["train"].rows] == [3.5, 0.25]
    assert data["train"].rows[1]["text_pair"] == "2"


def test_rows_view_samples_and_tokenises_like_lists(tmp_path):
    rng = random.Random(8)
    rows = [{"text": _sentence(rng, i % 2) + " very" * (i % 7), "label": i % 2} for i in range(40)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    split = load_task(tmp_path, splits=("train",), max_samples={"train": 10})["train"]
    keep = sorted(random.Random(0).sample(range(40), 10))  # the subset peftlab has always drawn
    assert list(split.rows) == [{**rows[i], "text_pair": None} for i in keep]
    assert split.rows[-1] == list(split.rows)[-1] and split.rows[2:4] == list(split.rows)[2:4]
    tokenizer = _tokenizer()
    encoded, cut = tokenize(split, tokenizer, "classification", 9)
    reference = tokenizer([rows[i]["text"] for i in keep], truncation=True, max_length=9)
    assert [f["input_ids"] for f in encoded.features] == reference["input_ids"]
    assert cut == sum(len(tokenizer(rows[i]["text"])["input_ids"]) > 9 for i in keep) > 0


# ---- the README's data examples ---------------------------------------------------------------------
def test_readme_data_examples_run(work, tmp_path, monkeypatch):
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Your data", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(commands) >= 8
    monkeypatch.chdir(tmp_path)
    _reviews(tmp_path / "reviews")
    rng = random.Random(9)
    (tmp_path / "stars").mkdir()
    for split, n in (("train", 16), ("validation", 8)):
        datasets.Dataset.from_dict({"review": [_sentence(rng, i % 2) for i in range(n)],
                                    "stars": [1 + i % 2 for i in range(n)]}
                                   ).to_parquet(str(tmp_path / "stars" / f"{split}.parquet"))
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"sentence": [_sentence(rng, i % 2) for i in range(n)], "label": [i % 2 for i in range(n)]})
        for split, n in (("train", 16), ("dev", 8))}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "new.txt").write_text("the film was good\nthe meal was awful\nthe book was fine\n")
    for line in commands:
        argv = shlex.split(line.replace("$MODEL", str(work["bert"])))
        assert argv[0] == "peftlab"
        stdin = None
        if "<" in argv:
            at = argv.index("<")
            stdin, argv = Path(argv[at + 1]).read_text(), argv[:at]
        result = runner.invoke(app, argv[1:], input=stdin)
        assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    assert json.loads((tmp_path / "runs/stars/run.json").read_text())["labels"] == ["1", "2"]
    for name, n in (("predictions.jsonl", 3), ("stars.jsonl", 8), ("from-stdin.jsonl", 3)):
        assert len((tmp_path / name).read_text().splitlines()) == n
    assert json.loads((tmp_path / "runs/saved/run.json").read_text())["labels"] == ["0", "1"]
