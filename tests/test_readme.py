"""Every Python example in the README runs, in order, in one namespace (as a reader would)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "out" / "sst2" / "adapter_model.safetensors").is_file()
    assert namespace["mine"].summary()["roles"].parameters == 2 * 2 * 2 * (16 + 16)
