"""A second backbone for the GLUE-small comparison: a small decoder-only (Llama) model made offline.

No second pretrained model can be downloaded here, and one initialised at random would compare
methods on features that mean nothing: adapters steer a pretrained network, so on noise every
method but full fine-tuning stays near the constant prediction. So this benchmark first *makes*
its backbone, with peftlab itself:

1. **corpus**: every text (and text pair) of the training splits in ``../shared/data`` (never a
   validation split), one row ``{"text": ...}`` each, 2% held out for the language model's eval;
2. **base**: a Llama from a config (``--hidden`` wide, ``--layers`` deep, the packaged MiniLM
   tokenizer's vocabulary), initialised at random and saved with that tokenizer;
3. **pretrain**: ``peftlab train --task causal-lm --method full`` on the corpus
   (``--pretrain-epochs``; plain text rows: next-token loss on every token);
4. **compare**: ``peftlab compare`` of LoRA, (IA)³, Pfeiffer, Compacter++ and full fine-tuning on
   SST-2, MRPC and STS-B with that model as a sequence classifier (last-token pooling, as
   transformers' ``LlamaForSequenceClassification`` does), at most 2,000 training examples, rates
   chosen per method by the held-out search, early stopping: the GLUE-small settings.

Each step is skipped when its output exists, and the comparison continues with ``--resume``, so
the command can be re-run after an interruption. ``targets.md`` checks the report against the same
targets as ``glue_small.py``.

    python benchmarks/second_backbone.py      # 26 min pretraining + 14 min compare (1 thread)
    python benchmarks/second_backbone.py --tasks sst2 --methods lora,full --seeds 0
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from glue_small import DEFAULT_DATA, METRICS, targets  # noqa: E402


def write_corpus(data_dir: Path, out: Path, seed: int = 0) -> int:
    """Training-split texts of every task folder as ``{"text"}`` rows; returns the row count."""
    texts: list[str] = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        train = folder / "train.jsonl"
        if not train.is_file():
            continue
        for line in train.read_text().splitlines():
            row = json.loads(line)
            texts += [row[k] for k in ("text", "text_pair") if isinstance(row.get(k), str) and row[k].strip()]
    texts = sorted(set(texts))
    random.Random(seed).shuffle(texts)
    held = max(1, len(texts) // 50)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("validation", texts[:held]), ("train", texts[held:])):
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        tmp.replace(out / f"{name}.jsonl")
    return len(texts)


def write_base(out: Path, hidden: int, layers: int, seed: int = 0) -> int:
    """A randomly initialised Llama with the packaged tokenizer; returns its parameter count."""
    import torch
    import transformers as T

    from peftlab.cli import demo_model_dir
    from peftlab.train import save_model_atomic

    tokenizer = T.AutoTokenizer.from_pretrained(demo_model_dir())
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                           max_position_embeddings=128, tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config)
    save_model_atomic(model, tokenizer, out)
    return sum(p.numel() for p in model.parameters())


def run(command: list[str]) -> float:
    """Run a ``peftlab`` command, echoing it; returns its wall seconds (exit on failure)."""
    print("$ " + shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "second_backbone")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=float, default=0.5)
    ap.add_argument("--pretrain-lr", default="1e-3")
    ap.add_argument("--tasks", default="sst2,mrpc,stsb")
    ap.add_argument("--methods", default="lora,ia3,pfeiffer,compacter++,full")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-train-samples", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--time-budget", type=float, help="minutes for the comparison (then --resume)")
    args = ap.parse_args()
    out: Path = args.out
    peftlab = [sys.executable, "-m", "peftlab"]
    log: dict = json.loads((out / "steps.json").read_text()) if (out / "steps.json").is_file() else {}

    if not (out / "corpus" / "train.jsonl").is_file():
        log["corpus_texts"] = write_corpus(args.data_dir, out / "corpus")
    if not (out / "base" / "config.json").is_file():
        log["base_parameters"] = write_base(out / "base", args.hidden, args.layers)
    model = out / "pretrain" / "model"
    if not (model / "config.json").is_file():
        pretrain = [*peftlab, "train", "--model", str(out / "base"), "--data", str(out / "corpus"),
                    "--task", "causal-lm", "--method", "full", "--epochs",
                    str(args.pretrain_epochs), "--lr", args.pretrain_lr, "--batch-size", "32",
                    "--max-length", "64", "--out", str(out / "pretrain")]
        if (out / "pretrain").exists():
            pretrain.append("--resume")
        log["pretrain_seconds"] = round(run(pretrain), 1)
        log["pretrain_command"] = "peftlab " + shlex.join(pretrain[3:])
        log["pretrain_metrics"] = json.loads((out / "pretrain" / "metrics.json").read_text())
    (out / "steps.json").write_text(json.dumps(log, indent=1) + "\n")

    tasks = args.tasks.split(",")
    compare = [*peftlab, "compare", "--model", str(model),
               "--data", ",".join(str(args.data_dir / t) for t in tasks), "--methods", args.methods,
               "--seeds", args.seeds, "--max-train-samples", str(args.max_train_samples),
               "--epochs", str(args.epochs), "--batch-size", "16", "--max-length", "128",
               "--out", str(out / "compare"),
               *[a for t in tasks if t in METRICS for a in ("--metric", f"{t}={METRICS[t]}")],
               *(["--time-budget", str(args.time_budget)] if args.time_budget else []),
               *(["--resume"] if (out / "compare" / "report.json").is_file() else [])]
    seconds = run(compare)
    report = json.loads((out / "compare" / "report.json").read_text())
    command = shlex.join(["python", "benchmarks/second_backbone.py", *sys.argv[1:]])
    text = targets(report, command, seconds, "full", title="Second backbone (pretrained here) targets")
    (out / "targets.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
