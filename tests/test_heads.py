"""Classification heads that read the backbone the way it was trained: mean pooling for
sentence-embedding models that declare it, [CLS] + pooler otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from test_cli import _save_bert, _sentiment
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app, demo_model_dir
from peftlab.heads import MeanPoolClassifier, declared_pooling
from peftlab.train import load_model

runner = CliRunner()


def _declare_mean_pooling(folder: Path) -> Path:
    """What sentence-transformers writes next to a model trained with mean pooling."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"root": root, "model": _declare_mean_pooling(_save_bert(root / "st", dropout=0.0)),
            "data": _sentiment(root / "data")}


def test_the_packaged_minilm_declares_mean_pooling():
    assert declared_pooling(demo_model_dir()) == "mean"


def test_mean_pooling_reads_only_real_tokens(st):
    model, tokenizer, heads = load_model(str(st["model"]), "classification", 2)
    assert isinstance(model, MeanPoolClassifier) and heads == ("classifier",)
    model.eval()
    short = tokenizer(["good movie"], return_tensors="pt")
    padded = tokenizer(["good movie", "a very very long and boring movie indeed"], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        hidden = model.backbone(**short).last_hidden_state
        expected = model.classifier(hidden.mean(1))
        torch.testing.assert_close(model(**short).logits, expected)
        torch.testing.assert_close(model(**padded).logits[:1], expected, atol=1e-5, rtol=0)
    cls, _, _ = load_model(str(st["model"]), "classification", 2, pooling="cls")
    assert isinstance(cls, T.BertForSequenceClassification)


def test_an_adapter_records_its_pooling_and_eval_reproduces_it(st, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(st["model"]), "--data", str(st["data"]),
                                 "--method", "lora", "--out", str(run), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pooling"] == "mean"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["head"] == {"pooling": "mean"}
    evaluated = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(st["data"])])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == metrics["eval"]["accuracy"]
    # A CLS-head model cannot take it: the head would read the backbone differently.
    cls_model, _, _ = load_model(str(st["model"]), "classification", 2, pooling="cls")
    with pytest.raises(peftlab.AdapterLoadError, match="mean"):
        peftlab.attach(cls_model).load(run / "adapter")
    for command in (["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")],
                    ["export", "--adapter", str(run), "--out", str(tmp_path / "peft")]):
        refused = runner.invoke(app, command)
        assert refused.exit_code == 2 and "mean-pooling" in refused.stderr
        assert not Path(command[-1]).exists()


def test_cls_pooling_overrides_and_merges(st, tmp_path):
    run = tmp_path / "cls"
    result = runner.invoke(app, ["train", "--model", str(st["model"]), "--data", str(st["data"]),
                                 "--method", "lora", "--pooling", "cls", "--out", str(run), "--epochs",
                                 "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "metrics.json").read_text())["pooling"] == "cls"
    merged = runner.invoke(app, ["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output


def test_a_fully_fine_tuned_mean_pooling_model_reloads(st, tmp_path):
    run = tmp_path / "full"
    result = runner.invoke(app, ["train", "--model", str(st["model"]), "--data", str(st["data"]),
                                 "--method", "full", "--out", str(run), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert declared_pooling(run / "model") == "mean"
    metrics = json.loads((run / "metrics.json").read_text())
    evaluated = runner.invoke(app, ["eval", "--adapter", str(run), "--data", str(st["data"])])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == metrics["eval"]["accuracy"]
