"""``--task seq2seq``: a text in, a text out, on tiny T5 and BART models built from configs, with a
word-level tokenizer built offline (``tokenizers``; no sentencepiece, no Hub).

The command-line examples of the README's seq2seq section run once (``readme_run``); the tests
after it check what they wrote: metrics, evaluation, predictions, the merged model and the peft
export.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import datasets
import pytest
import torch
import transformers as T
from conftest import randomize
from test_cli import _ok, _save_bert, _write_jsonl
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.data import DataSource, Split, load_task
from peftlab.errors import DataError
from peftlab.metrics import RougeWords, text_metrics
from peftlab.roles import role_map_for
from peftlab.tasks.seq2seq import collator, tokenize
from peftlab.train import load_model, method_config

SPECIAL = ["<pad>", "</s>", "<unk>"]
PAD, EOS = 0, 1
WORDS = ("good great fine lovely superb bad awful poor dull boring the a movie film meal book "
         "was is very not really quite").split()
runner = CliRunner()


# ---- fixtures: a tokenizer, tiny models and data on disk ---------------------------------------------
def _tokenizer() -> T.PreTrainedTokenizerFast:
    """Lower-cased words, each text ending with </s> as T5's tokenizer ends it."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return T.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                     unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def _t5() -> T.T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=len(SPECIAL) + len(WORDS), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))


def _bart() -> T.BartForConditionalGeneration:
    torch.manual_seed(0)
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=len(SPECIAL) + len(WORDS), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
        decoder_start_token_id=EOS, forced_eos_token_id=None))


def _marian() -> T.MarianMTModel:
    """No built-in role map: peftlab infers where its roles are (peftlab.infer)."""
    torch.manual_seed(0)
    return T.MarianMTModel(T.MarianConfig(
        vocab_size=len(SPECIAL) + len(WORDS), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _reviews(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``{"document": "the film was really dull", "summary": "dull film"}`` rows."""
    rows = []
    for _ in range(n):
        thing, adjective = rng.choice(["movie", "film", "meal", "book"]), rng.choice(WORDS[:10])
        rows.append({"document": f"the {thing} was {rng.choice(['very', 'really', 'quite'])} {adjective}",
                     "summary": f"{adjective} {thing}"})
    return rows


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 32), ("validation", 8)):
        _write_jsonl(folder / f"{split}.jsonl", _reviews(rng, n))
    return folder


def _commands() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Sequence to sequence", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's seq2seq commands, run in a fresh folder on a tiny T5."""
    root = tmp_path_factory.mktemp("seq2seq")
    model, data = _save(_t5(), root / "t5"), _data(root / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for line in _commands():
            argv = shlex.split(line.replace("$MODEL", str(model)).replace("$DATA", str(data)))
            assert argv[0] == "peftlab"
            result = runner.invoke(app, argv[1:])
            assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    evaluated = json.loads((root / "runs" / "t5-lora" / "eval-validation.json").read_text())
    return {"root": root, "model": model, "data": data, "eval": evaluated}


def _batch(texts: list[str], targets: list[str], model: torch.nn.Module | None = None
           ) -> dict[str, torch.Tensor]:
    """A padded batch; with the model, its decoder inputs too."""
    split = Split("x", Path("x"), [{"text": t, "target": g} for t, g in zip(texts, targets)])
    return collator(_tokenizer(), model)(tokenize(split, _tokenizer(), 16)[0].features)


# ---- metrics ------------------------------------------------------------------------------------------
def test_rouge_and_bleu_on_known_strings():
    scores = text_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    # 5 of 6 words shared in order; bigrams "the cat", "on the", "the mat" of 5.
    assert scores["rouge1"] == pytest.approx(5 / 6) and scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    # BLEU: n-gram precisions 5/6, 3/5, 1/4 and no 4-gram match, which sacreBLEU's default "exp"
    # smoothing counts as 1/2 of the 3 4-grams; equal lengths, so no brevity penalty.
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    both = text_metrics(["the cat sat on the mat", "a dog"], ["the cat is on the mat", "a dog"])
    assert both["rouge1"] == pytest.approx((5 / 6 + 1) / 2)


def test_rouge_words_are_rouge_scores_own_on_ascii_and_keep_other_scripts():
    from rouge_score.tokenizers import DefaultTokenizer

    english = "The Cats were SITTING on mats, weren't they? 42 times!"
    assert RougeWords().tokenize(english) == DefaultTokenizer(use_stemmer=True).tokenize(english)
    assert DefaultTokenizer(use_stemmer=True).tokenize("кошка спит") == []  # why we do not use it
    assert text_metrics(["кошка спит"], ["кошка ест"])["rouge1"] == pytest.approx(1 / 2)
    chinese = text_metrics(["我喜欢猫"], ["我喜欢狗"])  # each character a word: 3 of 4 shared
    assert chinese["rouge1"] == pytest.approx(3 / 4) and chinese["rouge2"] == pytest.approx(2 / 3)
    assert chinese["bleu"] > 0  # sacreBLEU's zh tokenizer; 13a sees one word per sentence: 0


# ---- tokenising and batching ----------------------------------------------------------------------------
def test_targets_end_with_eos_long_examples_are_cut_and_counted():
    rows = [{"text": "the film was good", "target": "good film"},
            {"text": "the film was very very very good", "target": "good"}]
    encoded, cut = tokenize(Split("train", Path("t"), rows), _tokenizer(), 6)
    first, second = encoded.features
    assert first["labels"] == _tokenizer()("good film")["input_ids"] and first["labels"][-1] == EOS
    assert len(second["input_ids"]) == 6 and second["input_ids"][-1] == EOS and cut == 1


def test_collator_pads_labels_with_minus_100_and_shifts_them_into_decoder_inputs():
    batch = _batch(["the film was good", "a meal"], ["good film was very good", "fine"])
    fine = _tokenizer()("fine")["input_ids"]
    assert batch["labels"][1].tolist() == fine + [-100] * (6 - len(fine))
    assert batch["input_ids"][1].tolist()[-1] == PAD and batch["attention_mask"][1].tolist()[-1] == 0
    model = _t5()
    with_model = collator(_tokenizer(), model)([{"input_ids": [5, EOS], "labels": [6, 7, EOS]}])
    assert with_model["decoder_input_ids"].tolist() == [[PAD, 6, 7]]  # T5 starts its decoder at pad


# ---- columns --------------------------------------------------------------------------------------------
def test_columns_are_found_by_name_or_named(tmp_path):
    _write_jsonl(tmp_path / "io.jsonl", [{"input": "the film", "output": "film", "id": 3}])
    data = load_task(DataSource(files=(("train", str(tmp_path / "io.jsonl")),)), splits=("train",),
                     task="seq2seq")
    assert data.columns.used() == ["input", "output"] and data["train"].ignored == ("id",)
    assert list(data["train"].rows) == [{"text": "the film", "target": "film"}]

    _write_jsonl(tmp_path / "both.jsonl", [{"document": "a", "article": "b", "summary": "c"}])
    with pytest.raises(DataError, match=r"several possible source columns \['document', 'article'\]"):
        load_task(str(tmp_path / "both.jsonl"), splits=("train",), task="seq2seq")
    named = load_task(DataSource(str(tmp_path / "both.jsonl"), text_column="article"),
                      splits=("train",), task="seq2seq")
    assert named["train"].rows[0] == {"text": "b", "target": "c"}


def test_nested_translation_columns_go_by_dotted_names(tmp_path):
    path = tmp_path / "books.jsonl"
    _write_jsonl(path, [{"translation": {"en": "the book", "fr": "le livre"}}])
    with pytest.raises(DataError, match=r"translation\.en"):  # the message lists the columns
        load_task(str(path), splits=("train",), task="seq2seq")
    data = load_task(DataSource(str(path), text_column="translation.en", label_column="translation.fr"),
                     splits=("train",), task="seq2seq")
    assert data["train"].rows[0] == {"text": "the book", "target": "le livre"}
    # The Hub's translation sets (WMT, opus) declare a Translation feature: read the same way.
    features = datasets.Features({"translation": datasets.Translation(languages=["en", "fr"])})
    datasets.Dataset.from_dict({"translation": [{"en": "a film", "fr": "un film"}]}, features=features
                               ).save_to_disk(str(tmp_path / "saved"))
    saved = load_task(DataSource(str(tmp_path / "saved"), text_column="translation.en",
                                 label_column="translation.fr"), splits=("train",), task="seq2seq")
    assert saved["train"].rows[0] == {"text": "a film", "target": "un film"}


def test_csv_targets_stay_text_and_a_missing_target_names_its_line(tmp_path):
    (tmp_path / "codes.csv").write_text("source,target\nseven,007\nnone,\n")
    with pytest.raises(DataError, match=r"codes\.csv:3: 'target' must be a non-empty string"):
        load_task(str(tmp_path / "codes.csv"), splits=("train",), task="seq2seq")
    (tmp_path / "codes.csv").write_text("source,target\nseven,007\n")
    rows = load_task(str(tmp_path / "codes.csv"), splits=("train",), task="seq2seq")["train"].rows
    assert rows[0] == {"text": "seven", "target": "007"}


# ---- adapters on encoder-decoders ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [_t5, _bart, _marian], ids=["t5", "bart", "marian"])
@pytest.mark.parametrize("method, sets", [
    ("lora", ["targets=query,value,cross_query,cross_value"]),
    ("houlsby", ["placement=attn_out,cross_attn_out,ffn_down"]),
])
def test_adapters_on_cross_attention_train(build, method, sets):
    model = build()
    assert role_map_for(model).source == ("inferred" if build is _marian else "built-in")
    adapters = peftlab.attach(model)
    adapters.add("a", method_config(method, sets))
    adapters.activate("a")
    params = adapters.train("a")
    cross = [s.module for s in adapters["a"].sites if re.search(r"EncDecAttention|encoder_attn", s.module)]
    assert len(cross) == (4 if method == "lora" else 2)  # 2 decoder layers
    randomize(params)  # away from the zero init, where some factors get no gradient yet
    batch = _batch(["the film was good", "a meal"], ["good film", "fine"])
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and any(name.startswith(m + ".") for m in cross):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5", "bart"])
def test_prefix_tuning_reads_the_decoder_made_from_the_labels(build):
    """Given only labels, the model makes its decoder inputs from them: the prefix must be read
    exactly as when the decoder inputs are given."""
    model = build().eval()
    adapters = peftlab.attach(model)
    adapters.add("p", method_config("prefix-tuning", ["num_virtual_tokens=4"]))
    adapters.activate("p")
    randomize(adapters.parameters("p"))
    batch = _batch(["the film was good", "a meal"], ["good film", "fine"], model)
    assert "decoder_input_ids" in batch
    given = model(**batch).loss
    implicit = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    adapters.activate()
    assert torch.allclose(given, implicit) and not torch.allclose(given, model(**batch).loss)


# ---- the command line: the README's examples and what they wrote ---------------------------------------
def test_readme_seq2seq_runs_report_rouge_and_bleu(readme_run):
    runs = readme_run["root"] / "runs"
    lora = json.loads((runs / "t5-lora" / "metrics.json").read_text())
    assert lora["task"] == "seq2seq" and lora["primary_metric"] == "rougeL" and lora["pooling"] is None
    assert set(lora["eval"]) == {"loss", "rouge1", "rouge2", "rougeL", "bleu"}
    assert json.loads((runs / "t5-lora" / "run.json").read_text())["columns"]["label"] == "summary"
    predictions = json.loads((runs / "t5-lora" / "predictions.json").read_text())
    assert len(predictions["predictions"]) == 8
    assert all(isinstance(p, str) for p in predictions["predictions"])
    assert text_metrics(predictions["predictions"], predictions["labels"]) == {
        k: v for k, v in lora["eval"].items() if k != "loss"}
    # The validation targets, decoded back from the labels.
    rows = [json.loads(line) for line in (readme_run["data"] / "validation.jsonl").read_text().splitlines()]
    assert sorted(predictions["labels"]) == sorted(r["summary"] for r in rows)


def test_patience_selects_the_checkpoint_by_rouge(readme_run):
    run = readme_run["root"] / "runs" / "t5-houlsby"
    metrics = json.loads((run / "metrics.json").read_text())
    state = json.loads(max((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    evaluations = [e for e in state["log_history"] if "eval_rougeL" in e]
    assert [e["step"] for e in evaluations] == list(range(2, metrics["steps"] + 1, 2))  # --eval-every 2
    best = max(e["eval_rougeL"] for e in evaluations)
    # The first checkpoint reaching the best ROUGE-L (a tie is no improvement), whatever the loss.
    assert state["best_metric"] == best
    assert metrics["best_step"] == next(e["step"] for e in evaluations if e["eval_rougeL"] == best)
    assert metrics["held_out_examples"] == 3  # 10% of 32 training rows


def test_eval_reproduces_the_runs_metrics(readme_run):
    trained = json.loads((readme_run["root"] / "runs" / "t5-lora" / "metrics.json").read_text())["eval"]
    evaluated = readme_run["eval"]["metrics"]
    assert evaluated == pytest.approx(trained, rel=1e-5)


def test_predict_generates_per_row_and_the_merged_model_agrees(readme_run):
    root = readme_run["root"]
    rows = [json.loads(line) for line in (root / "summaries.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(set(r) == {"generated"} and len(r["generated"].split()) <= 8 for r in rows)
    assert (root / "merged-summaries.jsonl").read_text() == (root / "summaries.jsonl").read_text()


def test_merged_folder_reloads_with_equal_outputs(readme_run):
    root = readme_run["root"]
    model, tokenizer, _ = load_model(str(readme_run["model"]), "seq2seq", 0)
    adapters = peftlab.attach(model)
    adapters.activate(adapters.load(root / "runs" / "t5-lora" / "adapter"))
    merged = T.AutoModelForSeq2SeqLM.from_pretrained(root / "t5-merged").eval()
    assert type(merged) is T.T5ForConditionalGeneration
    batch = _batch(["the film was really good", "a meal"], ["good film", "fine meal"])
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        assert (expected - merged(**batch).logits).abs().max() < 1e-5
        assert (expected - _t5().eval()(**batch).logits).abs().max() > 1e-3  # the adapter did change them


def test_export_loads_in_peft_with_equal_logits(readme_run):
    peft = pytest.importorskip("peft")
    root = readme_run["root"]
    assert json.loads((root / "t5-peft" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    model, _, _ = load_model(str(readme_run["model"]), "seq2seq", 0)
    adapters = peftlab.attach(model)
    adapters.activate(adapters.load(root / "runs" / "t5-lora" / "adapter"))
    theirs = peft.PeftModel.from_pretrained(
        T.AutoModelForSeq2SeqLM.from_pretrained(readme_run["model"]), str(root / "t5-peft"))
    assert isinstance(theirs, peft.PeftModelForSeq2SeqLM)
    batch = _batch(["the film was really good", "a meal"], ["good film", "fine meal"])
    with torch.no_grad():
        assert (model.eval()(**batch).logits - theirs.eval()(**batch).logits).abs().max() < 1e-5


# ---- bad input: a clear error, exit 2, nothing written --------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--pair-column", "summary", "--text-column", "document"], "drop --pair-column"),
    (["--label-column", "nope"], "has no column 'nope'"),
    (["--labels", "a,b"], "seq2seq has none"),
    (["--bert"], "cannot be loaded for seq2seq"),
])
def test_bad_input_exits_2_and_writes_nothing(readme_run, tmp_path, extra, message):
    model = str(readme_run["model"])
    if extra == ["--bert"]:
        model, extra = str(_save_bert(tmp_path / "bert")), []
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", model, "--data", str(readme_run["data"]), "--task",
                                 "seq2seq", "--max-steps", "1", "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_unlabelled_predict_reads_sources_only(readme_run, tmp_path):
    (tmp_path / "new.txt").write_text("the book was dull\nthe meal was superb\n")
    out = tmp_path / "new.jsonl"
    _ok(runner.invoke(app, ["predict", "--adapter", str(readme_run["root"] / "runs" / "t5-lora"),
                            "--data", str(tmp_path / "new.txt"), "--out", str(out), "--quiet"]))
    assert [set(json.loads(line)) for line in out.read_text().splitlines()] == [{"generated"}] * 2
