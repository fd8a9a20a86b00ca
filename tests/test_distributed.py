"""Training on several processes: the README's torchrun and accelerate examples, FSDP1 and FSDP2
through ``accelerate launch``, and the refusals. Every launch is real: 2 processes on the CPU,
talking over gloo, compared with a one-process run of the same arguments.

A global batch of 8 split 4 + 4 averages two half-batch gradients where one process averages
eight: the same value up to float rounding. Over these 12 AdamW steps the adapters (values up to
0.18) differ by at most 1.5e-8 (measured, every launch here); the tolerance (1e-6 + 1e-5 x |value|)
leaves room for rounding and still catches any real error (a shard saved as the adapter, or
gradients averaged over the wrong count, are off by 1e-3 and more).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from test_cli import _env, _free_port, _ok, _save_bert, _sentiment, runner

import peftlab
from peftlab.cli import app
from peftlab.distributed import check_launch
from peftlab.errors import AdapterStateError, UsageError

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = re.split(r"\n##+ ", README.split("### Several processes and machines", 1)[1], maxsplit=1)[0]
FSDP_ON_CPU = Path(__file__).with_name("accelerate_fsdp_on_cpu.py")
ADAPTER = Path("adapter") / "adapter_model.safetensors"
ARGS = ["--method", "lora", "--batch-size", "8"]  # the README's, on 32 examples: 12 steps


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny BERT without dropout (so that processes draw no different masks), data, and the
    one-process run that every launch is compared with."""
    root = tmp_path_factory.mktemp("distributed")
    work = {"model": _save_bert(root / "model", dropout=0.0), "data": _sentiment(root / "data")}
    work["single"] = root / "single"
    _ok(runner.invoke(app, ["train", "--model", str(work["model"]), "--data", str(work["data"]), *ARGS,
                            "--quiet", "--out", str(work["single"])]))
    return work


def _launch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun`` / ``accelerate launch`` as this Python's modules, on a free local port."""
    port = str(_free_port())
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
                "--master_port", port, *argv[1:]]
    elif argv[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", port, *argv[2:]]
    env = _env() | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_adapter(folder: Path, reference: Path) -> None:
    ours, theirs = load_file(folder / ADAPTER), load_file(reference / ADAPTER)
    assert ours.keys() == theirs.keys() and len(ours) == 12  # 8 LoRA tensors, pooler and classifier
    for key, t in ours.items():
        assert t.shape == theirs[key].shape and t.numel() > 0, key
        torch.testing.assert_close(t, theirs[key], atol=1e-6, rtol=1e-5, msg=key)


def test_readme_examples_on_one_machine(work, tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    blocks = re.findall(r"```(bash|yaml)\n(.*?)```", SECTION, flags=re.S)
    commands = blocks[0][1].strip().splitlines()
    assert [b[0] for b in blocks] == ["bash", "yaml", "bash", "yaml"] and len(commands) == 3
    (tmp_path / "fsdp.yaml").write_text(blocks[1][1])
    for line in commands:
        argv = shlex.split(line.replace("$MODEL", str(work["model"])).replace("$DATA", str(work["data"])))
        out = tmp_path / argv[argv.index("--out") + 1]
        if "fsdp.yaml" in argv and not torch.cuda.is_available():
            # accelerate shards only on accelerators, so peftlab refuses FSDP here before writing
            # anything. Each process would refuse alike; one, in this process, shows it (with the
            # variable that accelerate launch sets from the file).
            assert load_config_from_file(str(tmp_path / "fsdp.yaml")).distributed_type == "FSDP"
            monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
            monkeypatch.chdir(tmp_path)
            result = runner.invoke(app, argv[argv.index("peftlab.cli") + 1:])
            assert result.exit_code == 2 and "--use_fsdp needs GPUs" in " ".join(result.output.split())
            assert not out.exists()
            continue
        proc = _launch(argv + ["--quiet"], tmp_path)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        _assert_same_adapter(out, work["single"])
        assert '"processes": 2' in (out / "metrics.json").read_text()

    # The multi-machine config is not run (it needs two machines); accelerate reads it as written.
    (tmp_path / "multi-node.yaml").write_text(blocks[3][1])
    config = load_config_from_file(str(tmp_path / "multi-node.yaml"))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_through_accelerate_saves_the_whole_adapter(work, tmp_path, version):
    out = tmp_path / f"fsdp{version}"
    proc = _launch([
        "accelerate", "launch", "--use_fsdp", "--fsdp_version", str(version), "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "BertLayer",
        # On a CPU: torch's offload of a full state dict frees the storage it gathered into
        # (Trainer's own checkpoint of the model would crash), and accelerate syncs module states
        # only through an accelerator. Neither concerns the adapter.
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_sync_module_states", "false",
        "--fsdp_cpu_ram_efficient_loading", "false",
        str(FSDP_ON_CPU), "train", "--model", str(work["model"]), "--data", str(work["data"]), *ARGS,
        "--quiet", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = out / "checkpoints" / "checkpoint-12"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # Trainer did shard the model
    _assert_same_adapter(out, work["single"])
    saved = load_file(out / ADAPTER)
    during = load_file(checkpoint / "adapter_model.safetensors")  # the checkpoint, gathered too
    assert all(torch.equal(during[k], saved[k]) for k in saved)
    ours, theirs = (peftlab.io.read_config(d / "adapter") for d in (out, work["single"]))
    assert ours["base_model"] == theirs["base_model"]  # the shapes hash, with FSDP1's wrappers unwrapped


def test_what_fsdp_cannot_do_yet_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_launch(has_accelerator=True, full=False, resume=False, patience=None)  # an adapter run: fine
    for full, resume, patience, flag in ((True, False, None, "--method full"),
                                         (False, True, None, "--resume"), (False, False, 3, "--patience")):
        with pytest.raises(UsageError, match=f"{flag}: not supported under FSDP"):
            check_launch(has_accelerator=True, full=full, resume=resume, patience=patience)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_launch(has_accelerator=False, full=True, resume=True, patience=3)  # no FSDP: all fine


def test_a_shard_is_never_saved_as_the_adapter(tmp_path):
    """FSDP1 and ZeRO-3 leave a process empty tensors for the parameters it does not hold: saved
    on the main process alone, they made the 40-byte adapters peft users meet. A view of storage
    that FSDP has freed would crash safetensors; it is refused too."""
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig())
    adapters.activate("lora")
    adapters.train("lora", extras=("classifier",))
    model.classifier.bias.untyped_storage().resize_(0)  # what FSDP does to storage it frees
    with pytest.raises(AdapterStateError, match="extra.classifier.bias is freed: the model is sharded"):
        adapters.save("lora", tmp_path / "adapter")
    model.classifier.weight.data = torch.empty(0)  # what such a process holds
    with pytest.raises(AdapterStateError, match="extra.classifier.weight is empty: the model is sharded"):
        adapters.save("lora", tmp_path / "adapter")
    assert os.listdir(tmp_path) == []
