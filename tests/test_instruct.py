"""Instruction tuning with `--task causal-lm`: rows of prompt/completion and chat messages.

A tiny Llama built from a config, with a word-level tokenizer whose chat template is set here (no
Hub): which tokens the loss covers (the completion and the assistant's turns, with eos), the loss
itself, the same labels as TRL's SFTTrainer on the same rows, and train -> eval -> predict through
the command line, with bad rows refused before anything is written.
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
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.data import DataSource, load_task, tokenize
from peftlab.errors import DataError
from peftlab.instruct import InstructRows
from peftlab.lr_search import held_out_split
from peftlab.train import collator, evaluate

runner = CliRunner()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = "the cat sat on mat what did a dog do yes no is it red blue".split()
#: A chat template in the style of Zephyr/ChatML: each turn opens with its role, an assistant turn
#: ends with eos, the others with <|end|>; the generation prompt opens the assistant's turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' }}"
            "{% if m['role'] == 'assistant' %}{{ m['content'] + ' ' + eos_token }}"
            "{% else %}{{ m['content'] + ' <|end|>' }}{% endif %}{{ ' ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
#: The same, with TRL's {% generation %} markers around what the assistant writes.
MARKED = TEMPLATE.replace("{{ m['content'] + ' ' + eos_token }}",
                          "{% generation %}{{ m['content'] + ' ' + eos_token }}{% endgeneration %}")
CONVERSATION = [{"role": "system", "content": "yes"}, {"role": "user", "content": "what did the cat do"},
                {"role": "assistant", "content": "sat"}, {"role": "user", "content": "is it red"},
                {"role": "assistant", "content": "no it is blue"}]


def chat_tokenizer(template: str | None = TEMPLATE) -> T.PreTrainedTokenizerFast:
    """Word-level, a bos added to each text (as Llama's tokenizer does), special role tokens."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                          unk_token="<unk>", pad_token="<pad>",
                                          additional_special_tokens=SPECIAL[4:])
    tokenizer.chat_template = template
    return tokenizer


def ids(text: str, tokenizer=None) -> list[int]:
    return (tokenizer or chat_tokenizer()).convert_tokens_to_ids(text.split())


def _write(folder: Path, split_rows: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in split_rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _rows(folder: Path, rows: list[dict], splits=("train", "validation")) -> Path:
    return _write(folder, {s: rows for s in splits})


def _split(folder: Path, rows: list[dict], **source) -> tuple:
    data = load_task(DataSource(str(_rows(folder, rows)), **source), task="causal-lm")
    return data["train"], data["validation"]


# ---- which tokens are learned -----------------------------------------------------------------------
def test_prompt_completion_learns_the_completion_and_eos(tmp_path):
    tokenizer = chat_tokenizer()
    train, _ = _split(tmp_path, [{"prompt": "what did the cat do", "completion": " sat on the mat"},
                                 {"prompt": "is it red", "completion": " no"}])
    encoded, cut = tokenize(train, tokenizer, "causal-lm", 64)
    first, second = encoded.features
    assert first["input_ids"] == ids("<s> what did the cat do sat on the mat </s>") and cut == 0
    assert first["loss_mask"] == [0] * 6 + [1] * 5  # bos and prompt: not learned; completion and eos: learned
    assert second["loss_mask"] == [0, 0, 0, 0, 1, 1]
    tokenizer.pad_token = tokenizer.eos_token  # what load_model does for a tokenizer without a pad token
    batch = collator(tokenizer, "causal-lm")([first, second])
    eos = tokenizer.eos_token_id
    no = ids("no")[0]
    assert batch["labels"][1].tolist() == [-100] * 4 + [no, eos] + [-100] * 5  # padding found by position
    assert batch["input_ids"][1].tolist()[-5:] == [eos] * 5


def test_messages_learn_every_assistant_turn_and_not_the_generation_prompt(tmp_path):
    tokenizer = chat_tokenizer()
    train, _ = _split(tmp_path, [{"messages": CONVERSATION}])
    feature = tokenize(train, tokenizer, "causal-lm", 64)[0][0]
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert "".join(tokens) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False).replace(" ", "")
    learned = [t for t, m in zip(tokens, feature["loss_mask"]) if m]
    assert learned == "sat </s> no it is blue </s>".split()


def test_messages_whose_fields_differ_are_read_as_written(tmp_path):
    """`datasets` stores messages with differing keys as JSON text; they come back as dicts."""
    named = {"role": "user", "content": "is it red", "name": "a"}
    train, _ = _split(tmp_path, [{"messages": [named, {"role": "assistant", "content": "no"}]}])
    assert train.rows[0]["messages"] == [named, {"role": "assistant", "content": "no"}]
    assert tokenize(train, chat_tokenizer(), "causal-lm", 64)[0][0]["loss_mask"].count(1) == 2


def test_a_template_without_eos_gets_eos_after_the_last_turn(tmp_path):
    tokenizer = chat_tokenizer(TEMPLATE.replace("' ' + eos_token", "' <|end|>'"))
    train, _ = _split(tmp_path, [{"messages": CONVERSATION[1:3]}])
    feature = tokenize(train, tokenizer, "causal-lm", 64)[0][0]
    tokens = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens[-3:] == ["sat", "<|end|>", "</s>"] and feature["loss_mask"][-3:] == [1, 1, 1]
    assert tokens.count("</s>") == 1


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_every_token_is_learned(tmp_path):
    """Like reasoning templates that drop earlier turns' thoughts: an earlier assistant turn renders
    differently once a later turn follows, so its tokens in the conversation cannot be found."""
    rewritten = "{{ (m['content'] if loop.last else 'yes') + ' ' + eos_token }}"
    tokenizer = chat_tokenizer(TEMPLATE.replace("{{ m['content'] + ' ' + eos_token }}", rewritten))
    train, _ = _split(tmp_path / "a", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match="train.jsonl:2: the chat template renders earlier turns"):
        tokenize(train, tokenizer, "causal-lm", 64)
    train, _ = _split(tmp_path / "b", [{"messages": CONVERSATION}], loss_on="all")
    feature = tokenize(train, tokenizer, "causal-lm", 64)[0][0]
    assert tokenizer.convert_ids_to_tokens(feature["input_ids"])[12] == "yes"  # the first reply, rewritten
    assert set(feature["loss_mask"]) == {1} and feature["input_ids"].count(tokenizer.eos_token_id) == 2


def test_loss_on_all_covers_every_training_token_and_validation_stays_on_the_completion(tmp_path):
    data = load_task(DataSource(str(_rows(tmp_path, [{"messages": CONVERSATION}] * 10)), loss_on="all"),
                     task="causal-lm")
    tokenizer = chat_tokenizer()
    assert set(tokenize(data["train"], tokenizer, "causal-lm", 64)[0][0]["loss_mask"]) == {1}
    assert tokenize(data["validation"], tokenizer, "causal-lm", 64)[0][0]["loss_mask"].count(1) == 7
    held = held_out_split(data)  # --lr auto and --patience: the held-out slice is measured like validation
    assert isinstance(held["train"].rows, InstructRows) and len(held["validation"]) == 1
    assert set(tokenize(held["train"], tokenizer, "causal-lm", 64)[0][0]["loss_mask"]) == {1}
    assert tokenize(held["validation"], tokenizer, "causal-lm", 64)[0][0]["loss_mask"].count(1) == 7


def test_a_prompt_that_fills_max_length_leaves_the_example_out(tmp_path):
    train, _ = _split(tmp_path, [{"prompt": "the cat sat on the mat", "completion": " yes"},
                                 {"prompt": "is it", "completion": " no"}])
    encoded, cut = tokenize(train, chat_tokenizer(), "causal-lm", 6)
    assert len(encoded) == 1 and cut == 1 and encoded.left_out == 1 and encoded.by_length().left_out == 1
    with pytest.raises(DataError, match="raise --max-length"):
        tokenize(train, chat_tokenizer(), "causal-lm", 2)


# ---- the loss ---------------------------------------------------------------------------------------
def tiny_llama(vocab: int, seed: int = 0) -> T.LlamaForCausalLM:
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=vocab, max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
        pad_token_id=0)).eval()


def test_loss_is_the_cross_entropy_of_the_completion_tokens(tmp_path):
    tokenizer = chat_tokenizer()
    train, _ = _split(tmp_path, [{"prompt": "what did the cat do", "completion": " sat on the mat"},
                                 {"prompt": "is it red", "completion": " no"},
                                 {"prompt": "a dog", "completion": " sat on a mat"}])
    encoded, _ = tokenize(train, tokenizer, "causal-lm", 64)
    model = tiny_llama(len(tokenizer))
    total, count = 0.0, 0
    with torch.no_grad():
        for f in encoded.features:  # each example alone, unpadded: the learned tokens' log-likelihood
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            for t in range(1, len(f["input_ids"])):
                if f["loss_mask"][t]:
                    total -= torch.log_softmax(logits[t - 1].double(), -1)[f["input_ids"][t]].item()
                    count += 1
    assert count == 5 + 2 + 5
    batch = collator(tokenizer, "causal-lm")(encoded.features)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(total / count, rel=1e-5)
    for size in (1, 2, 8):  # batches of 5 + 2 and of 5 tokens weigh 7 : 5, not 1 : 1
        metrics = evaluate(model, encoded, collator(tokenizer, "causal-lm"), "causal-lm", batch_size=size)
        assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_behind_a_prompt_the_first_token_is_predicted_and_counted_too(tmp_path):
    """Prompt tuning puts virtual tokens in front, so the last of them predicts a text's first
    token: the mean over the split counts every labelled token, whatever the batches."""
    import peftlab
    from peftlab.methods.prompt import PromptTuningConfig

    tokenizer = chat_tokenizer()
    train, _ = _split(tmp_path, [{"text": "what did the cat do"}, {"text": "is it red"}, {"text": "a dog"}])
    encoded, _ = tokenize(train, tokenizer, "causal-lm", 64)
    model = tiny_llama(len(tokenizer))
    adapters = peftlab.attach(model)
    adapters.add("p", PromptTuningConfig(num_virtual_tokens=3))
    adapters.activate("p")
    collate = collator(tokenizer, "causal-lm")
    total = count = 0.0
    with torch.no_grad():
        for feature in encoded.features:  # alone, the model's own mean over its (extended) labels
            batch = collate([feature])
            tokens = int(batch["labels"].ne(-100).sum())  # every labelled token, the first included
            total += model(**batch).loss.item() * tokens
            count += tokens
    for size in (1, 2, 8):
        assert evaluate(model, encoded, collate, "causal-lm", batch_size=size)["loss"] == pytest.approx(
            total / count, rel=1e-5)


# ---- the same labels as TRL --------------------------------------------------------------------------
@pytest.mark.parametrize("rows, trl_options, loss_on", [
    ([{"prompt": "what did the cat do", "completion": " sat on the mat"},
      {"prompt": "is it red", "completion": " no"}], {}, None),
    ([{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}], {}, None),
    ([{"messages": CONVERSATION}], {"assistant_only_loss": True}, None),
    ([{"messages": CONVERSATION}], {}, "all"),
], ids=["prompt-completion", "conversational-prompt-completion", "messages", "messages-loss-on-all"])
def test_labels_equal_trl_sft_trainers(tmp_path, rows, trl_options, loss_on):
    trl = pytest.importorskip("trl")  # in the dev extra
    tokenizer = chat_tokenizer(MARKED)  # TRL needs the markers for assistant_only_loss
    trainer = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
        args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=64,
                           **trl_options))
    theirs = [r["labels"] for r in trainer.train_dataset]
    train, _ = _split(tmp_path / "data", rows, loss_on=loss_on)
    encoded, _ = tokenize(train, tokenizer, "causal-lm", 64)
    ours = [collator(tokenizer, "causal-lm")([f])["labels"][0].tolist() for f in encoded.features]
    assert ours == theirs


# ---- the command line ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama saved twice: with the chat template in its tokenizer, and without one."""
    root = tmp_path_factory.mktemp("instruct")
    out = {}
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        tiny_llama(len(chat_tokenizer())).save_pretrained(root / name)
        chat_tokenizer(template).save_pretrained(root / name)
        out[name] = root / name
    (root / "template.jinja").write_text(TEMPLATE)
    out["template"] = root / "template.jinja"
    return out


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:10]) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def _train(model: Path, data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--model", str(model), "--data", str(data), "--task", "causal-lm",
                               "--out", str(out), "--batch-size", "8", "--quiet", *extra])


def test_prompt_completion_trains_evaluates_and_predicts(llama, tmp_path):
    """Every completion is "yes": a fully fine-tuned model learns to answer "yes" and stop there."""
    data = _write(tmp_path / "qa", {s: [{"prompt": p, "completion": " yes"} for p in _prompts(n, i)]
                                    for i, (s, n) in enumerate((("train", 16), ("validation", 8)))})
    out = tmp_path / "run"
    _ok(_train(llama["chat"], data, out, "--method", "full", "--lr", "1e-2", "--epochs", "3",
               "--batch-size", "4"))
    trained = json.loads((out / "metrics.json").read_text())["eval"]
    assert trained["perplexity"] < 3  # on "yes" and eos only (the prompts, of 10 words, are not in the loss)
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--data", str(data)])
    _ok(result)
    assert json.loads(result.stdout)["loss"] == pytest.approx(trained["loss"], rel=1e-4)
    (tmp_path / "ask.jsonl").write_text('{"prompt": "what did the cat do"}\n{"prompt": "is it a dog"}\n')
    _ok(runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(tmp_path / "ask.jsonl"),
                            "--out", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "6", "--quiet"]))
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers == [{"generated": "yes"}, {"generated": "yes"}]  # eos learned: generation stops


def test_messages_with_a_chat_template_file_train_evaluate_and_predict(llama, tmp_path):
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": "no"}]
                     for p in _prompts(16, 3)]
    data = _write(tmp_path / "chat", {"train": [{"messages": c} for c in conversations[:12]],
                                      "validation": [{"messages": c} for c in conversations[12:]]})
    out = tmp_path / "run"
    _ok(_train(llama["plain"], data, out, "--chat-template", str(llama["template"]), "--epochs", "1"))
    run = json.loads((out / "run.json").read_text())
    assert run["chat_template"] == TEMPLATE and run["args"]["chat_template"] == str(llama["template"])
    trained = json.loads((out / "metrics.json").read_text())["eval"]
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--data", str(data)])  # the run's template
    _ok(result)
    assert json.loads(result.stdout)["loss"] == pytest.approx(trained["loss"], rel=1e-4)
    (tmp_path / "ask.jsonl").write_text(json.dumps({"messages": conversations[0][:1]}) + "\n")
    _ok(runner.invoke(app, ["predict", "--adapter", str(out), "--data", str(tmp_path / "ask.jsonl"),
                            "--out", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "3", "--quiet"]))
    assert set(json.loads((tmp_path / "answers.jsonl").read_text())) == {"generated"}
    merged = tmp_path / "merged"
    _ok(runner.invoke(app, ["merge", "--adapter", str(out), "--out", str(merged)]))
    assert T.AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATE


@pytest.mark.parametrize("rows, extra, expected", [
    ([{"text": "the cat sat"}, {"messages": CONVERSATION}], (),
     "train.jsonl:2 has 'messages', but {data}/train.jsonl:1 has 'text'"),
    ([{"prompt": "is it red", "completion": " no", "messages": CONVERSATION}], (),
     "train.jsonl:1 has both 'prompt'/'completion' and 'messages'"),
    ([{"messages": CONVERSATION}, {"messages": CONVERSATION[:4]}], (),
     "train.jsonl:2: the last message is from 'user'"),
    ([{"messages": [{"content": "is it red"}, {"role": "assistant", "content": "no"}]}], (),
     "train.jsonl:1: message 1 of 'messages' has no role"),
    ([{"prompt": "is it red"}], (), "no 'completion'"),
    ([{"prompt": "is it red", "completion": " "}], (),
     "train.jsonl:1: 'completion' must be a non-empty string"),
    ([{"prompt": "is it red", "completion": " no"}], ("--chat-template", "{template}"),
     "prompt/completion strings are joined as they are"),
    ([{"text": "the cat sat"}], ("--loss-on", "completion"), "--loss-on is for rows of prompt/completion"),
    ([{"messages": CONVERSATION}], ("--model", "{plain}"), "the tokenizer has none; pass --chat-template"),
    ([{"messages": CONVERSATION}], ("--loss-on", "prompt"), "--loss-on 'prompt': use completion or all"),
], ids=["text-and-messages", "two-kinds-in-a-row", "ends-with-user", "no-role", "no-completion",
        "blank-completion", "template-unused", "loss-on-text", "no-template", "bad-loss-on"])
def test_bad_rows_exit_2_and_write_nothing(llama, tmp_path, rows, extra, expected):
    data = _rows(tmp_path / "data", rows)
    extra = tuple(e.format(template=llama["template"], plain=llama["plain"]) for e in extra)
    model = llama["chat"] if "--model" not in extra else Path(extra[extra.index("--model") + 1])
    extra = tuple(e for i, e in enumerate(extra) if "--model" not in (e, extra[i - 1] if i else None))
    result = _train(model, data, tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert result.stderr.startswith("error: ") and expected.format(data=data) in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_other_tasks_refuse_the_rendering_options(tmp_path):
    data = _rows(tmp_path, [{"text": "the cat sat", "label": "a"}, {"text": "is it red", "label": "b"}])
    for task in ("classification", "auto"):
        with pytest.raises(DataError, match="--chat-template and --loss-on are for rows of prompt"):
            load_task(DataSource(str(data), chat_template=TEMPLATE, loss_on="all"), task=task)


def test_instruction_rows_train_without_task(llama, tmp_path):
    """--task auto recognises messages (and prompt/completion) rows as causal-LM data."""
    data = _rows(tmp_path / "data", [{"messages": CONVERSATION}])
    result = runner.invoke(app, ["train", "--model", str(llama["chat"]), "--data", str(data),
                                 "--method", "lora", "--epochs", "1", "--out", str(tmp_path / "run"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["task"] == "causal-lm"


# ---- the README's examples ---------------------------------------------------------------------------
def test_readme_instruction_tuning_examples_run(llama, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Instruction tuning", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    files = dict(re.findall(r"`([\w/]+\.jsonl)` holds:\n\n```json\n(.*?)```", section, flags=re.S))
    assert len(commands) >= 5 and len(files) >= 3
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(text)
    for split in ("train", "validation"):  # the README shows one file of each kind; both splits hold it
        for kind in ("qa", "chat"):
            if not Path(f"{kind}/{split}.jsonl").exists():
                Path(f"{kind}/{split}.jsonl").write_text(Path(f"{kind}/train.jsonl").read_text())
    Path("template.jinja").write_text(TEMPLATE)
    for line in commands:
        argv = shlex.split(line.replace("$MODEL", str(llama["plain"])))
        assert argv[0] == "peftlab"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    assert len(Path("answers.jsonl").read_text().splitlines()) == 2
