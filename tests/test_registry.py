"""The method contract: a method is one file plus one registry line, and nothing else.

``Shift`` below is a whole method defined in this file: a learned offset added to a projection's
output. Registered, it works everywhere a built-in method does: the Python API, files, the
command line (train, inspect, methods), compare and recommend. Its builder reads the layer it
adapts through the read-only base view, which is how weight-aware methods (DoRA) fit.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from test_cli import _save_bert, _sentiment
from torch import nn
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.config import AdapterConfig
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import REGISTRY, Method, Preset, method_for, register, unregister
from peftlab.sites import Site

runner = CliRunner()


# ---- a whole method -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShiftConfig(AdapterConfig):
    """``targets``: roles or module regexes; ``init``: the offset's start, as a multiple of the
    layer's mean bias (0: the model is unchanged)."""

    method = "shift"
    targets: tuple[str, ...] = ("value",)
    init: float = 0.0


class Shift(Piece):
    """``y + b``, with ``b`` over the output features."""

    kind = "post"

    def __init__(self, config: ShiftConfig, base: BaseLayer) -> None:
        super().__init__()
        bias = base.bias if base.bias is not None else base.weight.new_zeros(base.out_features)
        self.shift = nn.Parameter(torch.full((base.out_features,), config.init * float(bias.mean())))
        self.seen_weight = base.weight.clone()  # for the test: what the builder was shown

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.shift


def build(config: ShiftConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Shift:
    return Shift(config, base)


SHIFT = Method(ShiftConfig, build, presets=(
    Preset("shift", ShiftConfig, lr=1e-2, quality=-2.0, about="a learned output offset"),))


@pytest.fixture
def shift():
    register(SHIFT)
    yield SHIFT
    unregister("shift")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {"bert": _save_bert(root / "bert"), "data": _sentiment(root / "data")}


# ---- the Python API ------------------------------------------------------------------------------
def test_a_registered_method_builds_on_the_layer_it_sees_and_round_trips_through_files(shift, bert, tmp_path):
    batch = {"input_ids": torch.randint(5, 90, (2, 7))}
    bert.eval()
    before = bert(**batch).last_hidden_state
    adapters = peftlab.attach(bert)
    adapters.add("s", ShiftConfig())
    adapters.activate("s")
    assert torch.allclose(bert(**batch).last_hidden_state, before)  # zero offset: the model is unchanged
    for module, piece in adapters["s"].pieces.items():
        layer = bert.get_submodule(module)
        assert torch.equal(piece.seen_weight, layer.base.weight)  # nn.Linear: [out, in] as stored
    with torch.no_grad():
        for p in adapters.parameters("s"):
            p.normal_()
    changed = bert(**batch).last_hidden_state
    assert not torch.allclose(changed, before)
    adapters.save("s", tmp_path / "s")
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["method"] == "shift"
    adapters.remove("s")
    assert adapters.load(tmp_path / "s") == "s"
    adapters.activate("s")
    assert torch.allclose(bert(**batch).last_hidden_state, changed)
    assert peftlab.ShiftConfig is ShiftConfig  # lazy exports come from the registry


def test_the_base_view_follows_the_model_and_is_read_only_by_value(shift, bert):
    adapters = peftlab.attach(bert)
    adapters.add("s", ShiftConfig(init=1.0))
    module = next(iter(adapters["s"].pieces))
    view = adapters._base_layer(module)
    linear = bert.get_submodule(module).base
    assert view.weight.data_ptr() == linear.weight.data_ptr() and not view.weight.requires_grad
    assert torch.equal(view.bias, linear.bias) and view.out_features == linear.out_features
    with torch.no_grad():
        linear.weight.mul_(2)  # a merge of another adapter changes the weight in place
    assert torch.equal(view.weight, linear.weight)


def test_an_unknown_method_in_a_file_is_refused_with_the_known_ones(tmp_path, bert, shift):
    adapters = peftlab.attach(bert)
    adapters.add("s", ShiftConfig())
    adapters.save("s", tmp_path / "s")
    unregister("shift")
    with pytest.raises(peftlab.AdapterLoadError, match="unknown method 'shift'.*lora"):
        peftlab.attach(bert).load(tmp_path / "s", name="again")
    register(SHIFT)


def test_preset_names_are_unique_across_methods(shift):
    clash = dataclasses.replace(SHIFT, config=type("Other", (ShiftConfig,), {"method": "other"}))
    with pytest.raises(peftlab.ConfigError, match="taken by another method"):
        register(clash)
    assert "other" not in REGISTRY and method_for("shift") is SHIFT


# ---- the command line, compare and recommend ----------------------------------------------------------
def test_a_registered_method_trains_and_inspects_from_the_command_line(shift, work, tmp_path):
    listed = runner.invoke(app, ["methods", "--json"])
    assert listed.exit_code == 0
    assert {"name": "shift", "config": "ShiftConfig", "lr": 0.01, "mergeable": False, "peft": None,
            "about": "a learned output offset"} in json.loads(listed.output)
    result = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(work["data"]),
                                 "--method", "shift", "--set", "targets=query,value", "--out",
                                 str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "shift" and saved["config"]["targets"] == ["query", "value"]
    shown = runner.invoke(app, ["inspect", str(tmp_path / "run" / "adapter"), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["method"] == "shift"
    unknown = runner.invoke(app, ["train", "--model", str(work["bert"]), "--data", str(work["data"]),
                                  "--method", "shfit", "--out", str(tmp_path / "bad")])
    assert unknown.exit_code == 2 and "shift" in unknown.output and not (tmp_path / "bad").exists()


def test_a_registered_method_is_compared_and_recommended(shift, work, tmp_path):
    result = runner.invoke(app, [
        "compare", "--model", str(work["bert"]), "--data", str(work["data"]), "--methods", "shift,lora",
        "--out", str(tmp_path / "cmp"), "--epochs", "1", "--batch-size", "8", "--max-length", "16",
        "--no-lr-search", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert {r["method"] for r in report["runs"]} == {"shift", "lora"}
    assert report["settings"]["learning_rates"]["shift"] == 0.01
    ranked = runner.invoke(app, ["recommend", "--model", str(work["bert"]), "--batch-size", "4",
                                 "--max-length", "16", "--json"])
    assert ranked.exit_code == 0, ranked.output + repr(ranked.exception)
    shift_row = next(r for r in json.loads(ranked.output)["ranking"] if r["method"] == "shift")
    assert shift_row["parts"]["quality"] == -2.0 and "a learned output offset" in shift_row["reason"]


# ---- no import cycle -----------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["peftlab.io", "peftlab.interop.peft", "peftlab.methods.lora"])
def test_each_module_imports_first_in_a_fresh_process(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_adapter_set_imports_neither_io_nor_interop():
    code = ("import sys, peftlab.adapter_set; "
            "print(sorted(m for m in sys.modules if m in ('peftlab.io', 'peftlab.interop.peft')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
