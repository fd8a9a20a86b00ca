"""FSDP on GPUs: does ``accelerate launch --use_fsdp`` save the whole adapter, equal to one process's?

Not a timing: a correctness check that needs two or more GPUs, so it is not in the test suite
(accelerate shards only on accelerators; ``tests/test_distributed.py`` runs the same comparison on
CPUs by lifting that check). On a machine with N >= 2 GPUs it trains LoRA (with the
classification head) on a BERT of MiniLM-L6's shape (random weights, built from a config: no Hub)
five ways with the same global batch, 4 per GPU:

* one process on one GPU (the reference);
* ``accelerate launch --multi_gpu --num_processes N`` (DDP);
* ``accelerate launch --use_fsdp --fsdp_version 1`` and ``--fsdp_version 2``, with accelerate's
  defaults otherwise (full state dict, RAM-efficient loading, wrapping per ``BertLayer``);
* ``torchrun --nproc_per_node N`` (DDP).

and checks that every adapter has the reference's keys and shapes, no empty tensor (the
40-byte adapters peft users meet under FSDP), and values equal within 1e-5 + 1e-4 x |value|
(reductions over N GPUs round differently from one GPU's). The report (one line per run, then
PASS or FAIL) goes to stdout and, with ``--json``, to a file; the exit code is 1 on any failure.

    python benchmarks/fsdp_check.py                     # all GPUs, about 2-3 minutes
    python benchmarks/fsdp_check.py --gpus 2 --json fsdp_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("good great fine lovely superb bad awful poor dull boring the a movie film meal book "
         "was is very not really quite").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ATOL, RTOL = 1e-5, 1e-4


def make_model(path: Path) -> Path:
    """MiniLM-L6's shape, random weights, no dropout (processes must not draw different masks)."""
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=12, intermediate_size=1536, max_position_embeddings=64,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    T.BertForSequenceClassification(config).save_pretrained(path)
    T.BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + list(WORDS))}).save_pretrained(path)
    return path


def make_data(folder: Path, n_train: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", 32)):
        rows = []
        for i in range(n):
            words = WORDS[:5] if i % 2 else WORDS[5:10]
            rows.append({"text": f"the {rng.choice(['movie', 'film', 'meal', 'book'])} was "
                                 f"{rng.choice(['very', 'really'])} {rng.choice(words)}", "label": i % 2})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launchers(gpus: int) -> dict[str, list[str]]:
    py = sys.executable
    accelerate = [py, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    fsdp = ["--use_fsdp", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "BertLayer"]
    return {
        "one-gpu": [py],
        "accelerate-ddp": [*accelerate, "--multi_gpu"],
        "accelerate-fsdp1": [*accelerate, *fsdp, "--fsdp_version", "1"],
        "accelerate-fsdp2": [*accelerate, *fsdp, "--fsdp_version", "2"],
        "torchrun-ddp": [py, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)],
    }


def run(name: str, launcher: list[str], train: list[str], out: Path, gpus: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    env["CUDA_VISIBLE_DEVICES"] = "0" if name == "one-gpu" else ",".join(map(str, range(gpus)))
    port = ["--main_process_port", free_port()] if "accelerate" in name else (
        ["--master_port", free_port()] if "torchrun" in name else [])
    command = [*launcher, *port, "-m", "peftlab.cli", "train", *train, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    row = {"run": name, "command": " ".join(command), "returncode": proc.returncode,
           "seconds": round(time.perf_counter() - started, 1)}
    if proc.returncode:
        row["error"] = proc.stderr[-4000:]
    return row


def compare(folder: Path, reference: Path) -> dict:
    """Keys, shapes, emptiness and the largest difference from the reference adapter."""
    path = folder / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return {"ok": False, "problem": "no adapter written"}
    ours, theirs = load_file(path), load_file(reference / "adapter" / "adapter_model.safetensors")
    problems = []
    if ours.keys() != theirs.keys():
        problems.append(f"keys differ: {sorted(ours.keys() ^ theirs.keys())[:4]}")
    empty = [k for k, t in ours.items() if t.numel() == 0]
    if empty:
        problems.append(f"{len(empty)} empty tensors, e.g. {empty[0]}")
    shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
    if len(shared) < len(ours):
        problems.append(f"{len(ours) - len(shared)} tensors of another shape")
    diff = max(((ours[k] - theirs[k]).abs().max().item() for k in shared), default=float("nan"))
    close = all(torch.allclose(ours[k], theirs[k], atol=ATOL, rtol=RTOL) for k in shared)
    if not close:
        problems.append(f"values differ beyond atol {ATOL}, rtol {RTOL}")
    return {"ok": not problems, "tensors": len(ours), "bytes": path.stat().st_size,
            "max_abs_diff": diff, "problem": "; ".join(problems) or None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(), help="processes (GPUs) to use")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    if args.gpus < 2 or torch.cuda.device_count() < args.gpus:
        print(f"needs at least 2 GPUs (found {torch.cuda.device_count()}, asked for {args.gpus}): FSDP "
              "shards across processes, and NCCL puts one process on each GPU", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="peftlab-fsdp-check-"))
    batch = 4 * args.gpus
    model, data = make_model(root / "model"), make_data(root / "data", 8 * batch)
    train = ["--model", str(model), "--data", str(data), "--method", "lora", "--batch-size", str(batch),
             "--epochs", "2", "--max-length", "16", "--lr", "5e-3", "--quiet"]
    rows = []
    for name, launcher in launchers(args.gpus).items():
        row = run(name, launcher, train, root / name, args.gpus)
        if name != "one-gpu" and row["returncode"] == 0:
            row.update(compare(root / name, root / "one-gpu"))
        else:
            row["ok"] = row["returncode"] == 0
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("command", "error")}
        print(json.dumps(shown), flush=True)
        if row.get("error"):
            print(row["error"], file=sys.stderr)
    report = {"gpus": args.gpus, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": T.__version__, "tolerance": {"atol": ATOL, "rtol": RTOL}, "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    passed = all(r["ok"] for r in rows)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
