"""Every example in the README runs: the Python blocks in order in one namespace (as a reader
would run them), and each command of the command-line block on a tiny model and data set."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from test_cli import _save_bert, _sentiment
from typer.testing import CliRunner

from peftlab.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "sst2" / "adapter_model.safetensors").is_file()
    assert namespace["mine"].summary()["roles"].parameters == 2 * 2 * 2 * (16 + 16)
    assert (tmp_path / "out" / "trainer" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "trainer" / "checkpoint-4" / "model.safetensors").exists()
    assert (tmp_path / "out" / "merged-model" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "moe-peft" / "adapter_model.safetensors").is_file()
    assert namespace["experts"].summary()["shared-only"].notes
    assert len(namespace["cache"]) > 0  # the fusion's products, kept for the next batch
    bloom = namespace["bloom_adapters"].summary()
    assert bloom["lora"].sites == 2 and "roles inferred" in str(bloom)


def test_readme_cli_examples_run(tmp_path, monkeypatch):
    section = README.split("## The command line", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(commands) >= 6
    model, data = _save_bert(tmp_path / "model"), _sentiment(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line in commands:
        argv = shlex.split(line.replace("$MODEL", str(model)).replace("$DATA", str(data)))
        assert argv[0] == "peftlab"
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "peft-adapter" / "adapter_config.json").is_file()
