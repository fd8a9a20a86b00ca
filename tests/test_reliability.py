"""Reliability: hostile adapter files, saves killed mid-write, and adapter names.

Adapters are files from strangers. Whatever an adapter directory holds, loading it either loads
exactly what its files say or raises a typed :class:`peftlab.PeftlabError` with a short, readable
message; it never runs code (no pickle is ever read) and, when it fails, leaves the model's state
dict and adapter names as they were. A save killed at any instant leaves the previous adapter or
the new one, never a mix.

CI runs a few hundred fuzz cases and about ten kills. The long runs (see ``reliability/README.md``)::

    PEFTLAB_FUZZ_CASES=2000 PEFTLAB_KILLS=200 python -m pytest tests/test_reliability.py -q -s

``PEFTLAB_FUZZ_SEED`` picks another set of cases; a failing case is reported with its number and
a description of what was done to the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

import peftlab
import peftlab.io
from peftlab.io import CONFIG_FILE, WEIGHTS_FILE, adapter_tensors, is_adapter_dir

FUZZ_CASES = int(os.environ.get("PEFTLAB_FUZZ_CASES", "320"))
KILLS = int(os.environ.get("PEFTLAB_KILLS", "10"))
SEED = int(os.environ.get("PEFTLAB_FUZZ_SEED", "0"))
MAX_MESSAGE = 1000

BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, num_labels=2)
SOURCES = ("lora", "ia3", "peft_lora", "peft_ia3")  # peft_*: written by export_peft, read by import_peft


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT)).eval()


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every state-dict entry: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


class Evil:
    """Unpickling this creates directory ``path``: a stand-in for running any code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil_pickle(marker: Path, torch_format: bool = False) -> bytes:
    if not torch_format:
        return pickle.dumps({"weight": Evil(marker)})
    buffer = io.BytesIO()
    torch.save({"weight": Evil(marker)}, buffer)  # the zip format of torch.save, pickle inside
    return buffer.getvalue()


def test_the_pickle_payload_really_runs_code_when_unpickled(tmp_path):
    """The fuzz cases below plant this payload; prove it would fire if anything unpickled it."""
    pickle.loads(evil_pickle(tmp_path / "ran"))
    torch.load(io.BytesIO(evil_pickle(tmp_path / "ran too", torch_format=True)), weights_only=False)
    assert (tmp_path / "ran").is_dir() and (tmp_path / "ran too").is_dir()


# ---- the adapters that get damaged ------------------------------------------------------------
def _randomize(params, around: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(around + 0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter directory per source: LoRA (with the classifier as extra) and (IA)³, in
    peftlab's format and in peft's."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_bert()
    adapters = peftlab.attach(model)
    adapters.add("lora", peftlab.LoRAConfig(r=4, targets=("query", "value", "ffn_down")))
    adapters.add("ia3", peftlab.IA3Config())
    adapters.activate("lora")
    adapters.train("lora", extras="classifier")
    _randomize(adapters.parameters("lora") + list(model.classifier.parameters()), 0.0, seed=1)
    _randomize(adapters.parameters("ia3"), 1.0, seed=2)
    adapters.save("lora", root / "lora")
    adapters.save("ia3", root / "ia3")
    adapters.export_peft("lora", root / "peft_lora")
    adapters.export_peft("ia3", root / "peft_ia3")
    return {name: root / name for name in SOURCES}


# ---- damage: each mutator changes one adapter directory and says what it did ------------------
@dataclasses.dataclass(frozen=True)
class Ctx:
    rng: random.Random
    dir: Path
    peft: bool  # the directory is in peft's format
    marker: Path  # created only if a pickle planted by a mutator is ever unpickled
    outside: Path  # a path outside the adapter that path-like strings point at


@dataclasses.dataclass(frozen=True)
class Damage:
    what: str
    must_fail: bool  # False: the damage may leave a valid adapter (e.g. a flipped mantissa bit)


class Raw(str):
    """JSON text spliced into a config as is (numbers and nestings ``json.dumps`` cannot write)."""


def dumps(obj: Any) -> bytes:
    raws: list[str] = []

    def swap(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode()


def _weights(ctx: Ctx) -> tuple[Path, bytearray, int]:
    f = ctx.dir / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    return f, data, int.from_bytes(data[:8], "little")


def truncate_weights(ctx: Ctx) -> Damage:
    f, data, _ = _weights(ctx)
    cut = ctx.rng.randrange(len(data))
    f.write_bytes(data[:cut])
    return Damage(f"weights truncated to {cut} of {len(data)} bytes", True)


def flip_weight_bits(ctx: Ctx) -> Damage:
    f, data, n = _weights(ctx)
    region = ctx.rng.choice(["header length", "JSON header", "tensor data"])
    lo, hi = {"header length": (0, 8), "JSON header": (8, 8 + n), "tensor data": (8 + n, len(data))}[region]
    at = sorted(ctx.rng.randrange(lo, hi) for _ in range(ctx.rng.randint(1, 3)))
    for i in at:
        data[i] ^= 1 << ctx.rng.randrange(8)
    f.write_bytes(bytes(data))
    return Damage(f"bits flipped in the weights' {region} at bytes {at}", False)


def bad_header_length(ctx: Ctx) -> Damage:
    f, data, n = _weights(ctx)
    value = ctx.rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**32, 2**63, 2**64 - 1])
    data[:8] = value.to_bytes(8, "little")
    f.write_bytes(bytes(data))
    return Damage(f"weights header length {value} (really {n})", True)


def bad_header_json(ctx: Ctx) -> Damage:
    f, data, n = _weights(ctx)
    header, body = json.loads(data[8:8 + n]), bytes(data[8 + n:])
    rng = ctx.rng
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[key]
    begin, end = entry["data_offsets"]
    change = rng.choice(["dtype", "shape", "offsets", "drop", "alias", "metadata", "whole"])
    if change == "dtype":
        entry["dtype"] = rng.choice(["BOOL", "U8", "I8", "I16", "I32", "I64", "U64", "F8_E4M3", "F16",
                                     "BF16", "F64", "C64", "X", 5, None])
    elif change == "shape":
        entry["shape"] = rng.choice([[], [0], [-1], [2**62, 2**62], [2**64], ["a"], entry["shape"] + [1],
                                     entry["shape"][::-1], None])
    elif change == "offsets":
        entry["data_offsets"] = rng.choice([[0, 0], [-1, end], [end, begin], [0, 2**64], [begin + 1, end + 1],
                                            [begin], "x", None])
    elif change == "drop":
        del header[key]
    elif change == "alias":  # a second name for the same bytes
        header[rng.choice(["evil", "../../evil", key + ".x"])] = dict(entry)
    elif change == "metadata":
        header["__metadata__"] = rng.choice([{"a": 1}, [], {"x": "y"}, "text", {"a": {"b": "c"}}])
    else:
        header = rng.choice([Raw("[]"), Raw("null"), Raw("1" * 5000), Raw("[" * 100_000),
                             Raw('{"a":' * 100_000 + "1" + "}" * 100_000), Raw("\xff\xfe"), Raw("")])
    text = dumps(header)
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return Damage(f"weights JSON header: {change} of {key!r} -> {str(header)[:120]}", False)


def bad_tensors(ctx: Ctx) -> Damage:
    f = ctx.dir / WEIGHTS_FILE
    tensors = load_file(f)
    rng, key = ctx.rng, ctx.rng.choice(sorted(tensors))
    t = tensors[key]
    change = rng.choice(["shape", "int dtype", "bool dtype", "float dtype", "missing", "extra", "renamed",
                         "non-finite", "empty file", "zero-size"])
    # peft's format has no list of modules besides the tensors: without its one (IA)³ vector, a module
    # is simply not adapted (what peft does too), so only peftlab's format must refuse a missing key.
    must_fail = change != "float dtype" and not (change == "missing" and ctx.peft)
    if change == "shape":
        shapes = [t.reshape(1, -1), t.reshape(-1, 1), t[None], torch.cat([t, t[:1]]), t.reshape(-1)[:-1]]
        tensors[key] = rng.choice([x for x in shapes if x.shape != t.shape]).contiguous()
    elif change == "int dtype":
        tensors[key] = t.to(rng.choice([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]))
    elif change == "bool dtype":
        tensors[key] = t > 0
    elif change == "float dtype":
        tensors[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64]))
    elif change == "missing":
        del tensors[key]
    elif change == "extra":
        extra = rng.choice(["evil", "../../evil", "/abs/evil", key + ".x", "shared.evil",
                            "extra.classifier.w", "base_model.model.bert.pooler.dense.weight",
                            "base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"])
        tensors[extra] = torch.zeros(2)
    elif change == "renamed":
        tensors[key + "_"] = tensors.pop(key)
    elif change == "non-finite":
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        tensors[key] = t
    elif change == "empty file":
        tensors = {}
    else:
        tensors[key] = torch.empty(0)
    save_file(tensors, str(f))
    return Damage(f"tensor {key!r}: {change}", must_fail)


def planted_pickle(ctx: Ctx) -> Damage:
    payload = evil_pickle(ctx.marker, torch_format=ctx.rng.random() < 0.5)
    where = ctx.rng.choice(["as safetensors", "as config", "beside", "adapter_model.bin",
                            "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin"])
    if where == "as safetensors":
        (ctx.dir / WEIGHTS_FILE).write_bytes(payload)
    elif where == "as config":
        (ctx.dir / CONFIG_FILE).write_bytes(payload)
    elif where == "beside":  # the safetensors file stays: loading it is fine, the pickle is ignored
        (ctx.dir / "adapter_model.bin").write_bytes(payload)
    else:
        (ctx.dir / WEIGHTS_FILE).unlink()
        (ctx.dir / where).write_bytes(payload)
    return Damage(f"pickle payload {where}", where != "beside")


def special_file(ctx: Ctx) -> Damage:
    """A file replaced by a link to somewhere else, a pipe (reading it would block), or a folder."""
    victim = ctx.dir / ctx.rng.choice([CONFIG_FILE, WEIGHTS_FILE])
    victim.unlink()
    kind = ctx.rng.choice(["dangling link", "link loop", "link to /dev/zero", "link to /proc/self/mem",
                           "link to the folder", "named pipe", "folder"])
    if kind == "named pipe":
        os.mkfifo(victim)
    elif kind == "folder":
        victim.mkdir()
    else:
        target = {"dangling link": ctx.outside, "link loop": victim, "link to /dev/zero": Path("/dev/zero"),
                  "link to /proc/self/mem": Path("/proc/self/mem"), "link to the folder": ctx.dir}[kind]
        victim.symlink_to(target)
    return Damage(f"{victim.name} is a {kind}", True)


def bad_config_text(ctx: Ctx) -> Damage:
    f = ctx.dir / CONFIG_FILE
    text, rng = f.read_bytes(), ctx.rng
    change = rng.choice(["truncated", "garbage inserted", "not UTF-8", "BOM", "empty", "not an object",
                         "deeply nested", "5000-digit number", "over 1 MiB", "NUL byte"])
    must_fail = change not in ("garbage inserted", "BOM")
    at = rng.randrange(len(text))
    new = {
        "truncated": text[:at],
        "garbage inserted": text[:at] + rng.randbytes(rng.randint(1, 8)) + text[at:],
        "not UTF-8": text[:at] + b"\xff\xfe\xc3" + text[at:],
        "BOM": b"\xef\xbb\xbf" + text,
        "empty": b"",
        "not an object": rng.choice([b"[]", b'"adapter"', b"1", b"null", b"true", b"[{}]"]),
        "deeply nested": rng.choice([b"[" * 100_000 + b"]" * 100_000,
                                     b'{"a":' * 100_000 + b"1" + b"}" * 100_000]),
        "5000-digit number": b"1" * 5000,
        "over 1 MiB": text + b" " * (1 << 20),
        "NUL byte": text[:at] + b"\x00" + text[at:],
    }[change]
    f.write_bytes(new)
    return Damage(f"config text: {change} (at byte {at})", must_fail)


# Values written into config fields: wrong types, huge and non-finite numbers, deep nesting,
# path-like and very long strings.
NUMBERS = [2**31, 2**63, -(2**63), 2**64, 10**400, Raw("1" * 5000), Raw("1e999"), Raw("-1e999"), Raw("NaN"),
           Raw("Infinity"), 1e308, -1e308, 5e-324, -0.0, 0, -1, 0.5]


def path_like(ctx: Ctx) -> str:
    return ctx.rng.choice([str(ctx.outside), "../" * 6 + ctx.outside.name, "a/b", "a\\b", "..", ".", "/", "",
                           "C:\\adapter", "~/adapter", "a\x00b", "\ud800",
                           "x" * ctx.rng.choice([101, 5000, 200_000])])


def hostile(ctx: Ctx) -> Any:
    rng = ctx.rng
    kind = rng.choice(["number", "string", "other"])
    if kind == "number":
        return rng.choice(NUMBERS)
    if kind == "string":
        return rng.choice([path_like(ctx), "lora", "ia3", "compacter", "LORA", "query", ".*", "(",
                           "a{99999999999}", "(" * 600 + ")" * 600,
                           "bert.encoder.layer.0.attention.self.query"])
    d = rng.choice([64, 100_000])
    return rng.choice([None, True, False, [], {}, [1, "a", None], {"a": {"b": []}}, ["query"],
                       Raw("[" * d + "]" * d), Raw('{"a":' * d + "1" + "}" * d)])


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every value under ``obj`` (not ``obj`` itself)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for k, v in items:
        out.append(path + (k,))
        out += _nodes(v, path + (k,))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _edit_config(ctx: Ctx, edit: Callable[[dict], str]) -> str:
    f = ctx.dir / CONFIG_FILE
    config = json.loads(f.read_text())
    what = edit(config)
    f.write_bytes(dumps(config))
    return what


def bad_config_value(ctx: Ctx) -> Damage:
    """Any field, at any depth, set to a hostile value."""

    def edit(config: dict) -> str:
        path = ctx.rng.choice(_nodes(config))
        value = hostile(ctx)
        _at(config, path[:-1])[path[-1]] = value
        return f"config{list(path)} = {str(value)[:80]!r}"

    return Damage(_edit_config(ctx, edit), False)


def path_in_string_field(ctx: Ctx) -> Damage:
    """A string field (name, method, targets, module names, ...) set to a path or a long string."""

    def edit(config: dict) -> str:
        strings = [p for p in _nodes(config) if isinstance(_at(config, p), str)]
        path = ctx.rng.choice(strings)
        value = path_like(ctx)
        _at(config, path[:-1])[path[-1]] = value
        return f"config{list(path)} = {value[:80]!r}"

    return Damage(_edit_config(ctx, edit), False)


def huge_number(ctx: Ctx) -> Damage:
    def edit(config: dict) -> str:
        numbers = [p for p in _nodes(config) if isinstance(_at(config, p), (int, float))]
        path = ctx.rng.choice(numbers or _nodes(config))
        value = ctx.rng.choice(NUMBERS)
        _at(config, path[:-1])[path[-1]] = value
        return f"config{list(path)} = {str(value)[:40]}"

    return Damage(_edit_config(ctx, edit), False)


def dropped_or_unknown_key(ctx: Ctx) -> Damage:
    def edit(config: dict) -> str:
        dicts = [()] + [p for p in _nodes(config) if isinstance(_at(config, p), dict)]
        where = _at(config, ctx.rng.choice(dicts))
        if where and ctx.rng.random() < 0.5:
            key = ctx.rng.choice(sorted(where))
            del where[key]
            return f"config key {key!r} dropped"
        key = ctx.rng.choice(["evil", "../evil", "__class__", "use_dora", "x" * 10_000, "", "(?i)query",
                              r"(a)(b)\2", "members"])
        where[key] = ["keep"] if key == "members" and ctx.rng.random() < 0.5 else hostile(ctx)
        return f"unknown config key {key[:40]!r} added"

    return Damage(_edit_config(ctx, edit), False)


BAD_NAMES = ["", ".", "..", "../x", "a/b", "a\\b", "/abs", "x" * 101, "base", "Shared", "a b", "a\x00b",
             "-lead", ".hidden", "é", "a..b", "a\nb", 5, None, [], {"a": 1}]


def refused_field(ctx: Ctx) -> Damage:
    """Fields whose bad values must always be refused: format, version, method, name, peft_type."""
    rng = ctx.rng
    if ctx.peft:
        field, value = rng.choice([
            ("peft_type", rng.choice(["lora", "LOHA", "ADALORA", "", None, 5, [], {}, "../LORA"])),
            ("bias", rng.choice(["all", "lora_only"])),
            ("use_dora", True),
            ("init_lora_weights", rng.choice(["pissa", "olora", "loftq"])),
            ("modules_to_save", rng.choice(["classifier", 5, {"a": 1}])),
        ])
    else:
        field, value = rng.choice([
            ("format", rng.choice(["peft", None, "", 1, ["peftlab-adapter"]])),
            ("format_version", rng.choice([3, 99, 2**63, 10**400, Raw("1e999"), "1", 1.5, None, True, [1]])),
            ("method", rng.choice(["LORA", "evil", "", "../lora", "lora/../ia3", None, 5, [], {}, ["lora"]])),
            ("name", rng.choice(BAD_NAMES)),
            ("extras", rng.choice(["classifier", ["../classifier"], ["nope"], [5], {"a": 1}])),
            ("config", rng.choice([None, [], "r=4", {"r": 4, "evil": 1}])),
        ])

    def edit(config: dict) -> str:
        config[field] = value
        return f"config[{field!r}] = {str(value)[:60]!r}"

    return Damage(_edit_config(ctx, edit), True)


MUTATORS: list[Callable[[Ctx], Damage]] = [
    truncate_weights, flip_weight_bits, bad_header_length, bad_header_json, bad_tensors, bad_tensors,
    planted_pickle, special_file, bad_config_text, bad_config_value, bad_config_value, path_in_string_field,
    huge_number, dropped_or_unknown_key, refused_field, refused_field,
]


# ---- the fuzz loop -----------------------------------------------------------------------------
def _same_tensors(saved: Path, original: Path) -> bool:
    got, want = load_file(saved / WEIGHTS_FILE), load_file(original / WEIGHTS_FILE)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in got)


def _readable(message: str) -> bool:
    return 0 < len(message) <= MAX_MESSAGE and message.replace("\n", " ").isprintable()


@pytest.mark.parametrize("source", SOURCES)
def test_hostile_adapter_files_fail_cleanly(source, sources, tmp_path):
    peft = source.startswith("peft")
    model = tiny_bert()
    adapters = peftlab.attach(model)
    adapters.add("keep", peftlab.LoRAConfig(r=2, targets=("key",)))
    _randomize(adapters.parameters("keep"), 0.0, seed=3)
    adapters.activate("keep")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    before = (state_hash(model), adapters.names, adapters.active)
    marker, outside = tmp_path / "code-ran", tmp_path / "outside"

    failures: list[str] = []
    outcomes: Counter[str] = Counter()
    cases = range(SOURCES.index(source), FUZZ_CASES, len(SOURCES))
    for i in cases:
        rng = random.Random(f"{SEED}:{i}")
        case_dir = tmp_path / f"case{i}"
        shutil.copytree(sources[source], case_dir)
        mutate = MUTATORS[(i // len(SOURCES)) % len(MUTATORS)]
        damage = mutate(Ctx(rng, case_dir, peft, marker, outside))
        label = f"case {i} ({source}, {mutate.__name__}): {damage.what}"
        try:
            name = adapters.import_peft(case_dir, "imported") if peft else adapters.load(case_dir)
        except peftlab.PeftlabError as e:
            outcomes[type(e).__name__] += 1
            if type(e) is peftlab.PeftlabError or not _readable(str(e)):
                failures.append(f"{label}: unreadable or untyped {type(e).__name__}: {str(e)[:300]!r}")
        except Exception as e:  # the bug this test hunts
            outcomes["crash"] += 1
            failures.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        else:
            outcomes["loaded"] += 1
            if damage.must_fail:
                failures.append(f"{label}: loaded, but this damage must be refused")
            check = tmp_path / "check"
            try:  # what was loaded is exactly what the file holds: save it again and compare
                (adapters.export_peft if peft else adapters.save)(name, check)
                if not _same_tensors(check, case_dir):
                    failures.append(f"{label}: loaded tensors differ from the file's")
            except Exception as e:
                failures.append(f"{label}: loaded, but saving it again fails: {type(e).__name__}: {e}")
            shutil.rmtree(check, ignore_errors=True)
            adapters.remove(name)
            model.load_state_dict(snapshot)  # a loaded adapter may bring its classifier
        if (state_hash(model), adapters.names, adapters.active) != before:
            failures.append(f"{label}: the model or its adapters changed")
            for extra in set(adapters.names) - {"keep"}:
                adapters.remove(extra)
            model.load_state_dict(snapshot)
        if marker.exists() or outside.exists():
            failures.append(f"{label}: a file was created: code ran or a path escaped")
        shutil.rmtree(case_dir)

    print(f"\nfuzz {source}: {len(cases)} cases, outcomes {dict(outcomes)}, failures {len(failures)}")
    assert not failures, "\n".join(failures[:30])


# Config fields (path, JSON text) that crashed loading with another exception type, or gave a
# message of megabytes, before they were fixed (found by the fuzzing above, or by reading the code
# while fixing what it found); kept here so that CI always tries them.
ONCE_CRASHED = [
    ("lora", ("method",), "null"),  # AttributeError in method_for
    ("ia3", ("method",), '["lora"]'),
    ("lora", ("peftlab_version",), "1" * 5000),  # ValueError: Python's 4300-digit limit in json
    ("lora", ("config", "alpha"), "1" + "0" * 400),  # OverflowError: isfinite on a huge int
    ("peft_lora", ("lora_alpha",), "1" + "0" * 400),
    ("ia3", ("config", "scale_input"), '["a{99999999999}"]'),  # OverflowError in re.compile
    ("lora", ("config", "targets"), json.dumps(["(" * 600 + ")" * 600])),  # RecursionError in re.compile
    ("peft_lora", ("rank_pattern",), '{"(?i)query": 2}'),  # re.error in the combined suffix regex
    ("lora", ("name",), json.dumps("x" * 200_000)),  # a 200 kB error message
    ("lora", ("config", "x" * 200_000), "1"),
    ("peft_lora", ("x" * 200_000,), "1"),
    ("peft_ia3", ("peft_type",), json.dumps("x" * 200_000)),
]


def _plain_ids(texts: list[str]) -> list[str]:
    """Test ids of letters, digits and ``_`` plus a number: ids holding brackets, slashes or
    backslashes cannot be selected again by node id in the same process (mutmut does that)."""
    return [f"{i}-{re.sub(r'[^A-Za-z0-9]+', '_', t)[:24]}" for i, t in enumerate(texts)]


def _case_ids(cases: list[tuple[str, tuple, str]]) -> list[str]:
    return _plain_ids([f"{source}-{path[-1]}" for source, path, _ in cases])


def _with_value(sources, source: str, path: tuple, value: str, tmp_path: Path) -> Path:
    """A copy of ``source``'s saved adapter whose config has the JSON text ``value`` at ``path``."""
    case = shutil.copytree(sources[source], tmp_path / "case")
    config = json.loads((case / CONFIG_FILE).read_text())
    _at(config, path[:-1])[path[-1]] = Raw(value)
    (case / CONFIG_FILE).write_bytes(dumps(config))
    return case


def _load(adapters, source: str, case: Path) -> str:
    return adapters.import_peft(case, "imported") if source.startswith("peft") else adapters.load(case)


@pytest.mark.parametrize("source, path, value", ONCE_CRASHED, ids=_case_ids(ONCE_CRASHED))
def test_configs_that_once_crashed_loading_fail_cleanly(source, path, value, sources, tmp_path):
    adapters = peftlab.attach(tiny_bert())
    case = _with_value(sources, source, path, value, tmp_path)
    with pytest.raises(peftlab.AdapterLoadError) as e:
        _load(adapters, source, case)
    assert _readable(str(e.value)), str(e.value)[:300]
    assert adapters.names == ()


# Patterns with catastrophic backtracking: matching one module name ran for minutes before
# peftlab.patterns refused them. SIGALRM turns a regression into a failure instead of a hang.
BACKTRACKING = [
    ("lora", ("config", "targets"), '["(.*)*x"]'),
    ("ia3", ("config", "scale_input"), '["(a|ab)*c"]'),
    ("peft_lora", ("rank_pattern",), '{"(\\\\w+\\\\s?)*$": 2}'),
    ("peft_ia3", ("feedforward_modules",), '"(a+)+b"'),
]


def _damaged(sources, source: str, tmp_path: Path, config=None, tensors=None, files=None) -> Path:
    """A copy of ``source``'s adapter: ``config(dict)`` edits its config, ``tensors(dict)`` its
    tensors, ``files`` adds or replaces (bytes) or deletes (None) files."""
    case = shutil.copytree(sources[source], tmp_path / "case")
    if config is not None:
        data = json.loads((case / CONFIG_FILE).read_text())
        config(data)
        (case / CONFIG_FILE).write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(case / WEIGHTS_FILE)
        tensors(data)
        save_file(data, str(case / WEIGHTS_FILE))
    for name, content in (files or {}).items():
        if content is None:
            (case / name).unlink()
        else:
            (case / name).write_bytes(content)
    return case


def _first(d: dict):
    return sorted(d)[0]


# One case per refusal of load / import_peft, with what its message must say.
REFUSALS = [
    ("lora", dict(files={CONFIG_FILE: None, "adapter_model.bin": b"x"}),
     "adapter_config.json is missing (found ['adapter_model.bin']: pickle files are never loaded)"),
    ("lora", dict(files={CONFIG_FILE: b" " * (1 << 20) + b"{}"}),
     "is larger than 1048576 bytes; not an adapter config"),
    ("lora", dict(files={CONFIG_FILE: b"{"}), "adapter_config.json is not valid JSON"),
    ("ia3", dict(files={CONFIG_FILE: b"[]"}), "adapter_config.json must hold a JSON object"),
    ("lora", dict(files={WEIGHTS_FILE: None}), "is missing (only safetensors weights are loaded)"),
    ("peft_lora", dict(files={WEIGHTS_FILE: None}), "adapter_model.safetensors is missing"),
    ("lora", dict(files={WEIGHTS_FILE: b"\x00" * 16}),
     "is not a valid safetensors file: Error while deserializing header"),
    ("peft_ia3", dict(files={WEIGHTS_FILE: b"\x00" * 16}), "is not a valid safetensors file"),
    ("ia3", dict(tensors=lambda t: t.pop(_first(t))), "does not match the adapter's config: missing ['bert."),
    ("ia3", dict(tensors=lambda t: t.update(x=torch.ones(1))), "unexpected ['x']"),
    ("ia3", dict(tensors=lambda t: t.update({_first(t): torch.ones(3)})),
     "has shape (3,), the model needs (32,)"),
    ("lora", dict(tensors=lambda t: t.update({_first(t): t[_first(t)].to(torch.int8)})), "has dtype I8"),
    ("ia3", dict(tensors=lambda t: t[_first(t)].fill_(float("nan"))), "holds NaN or infinite values"),
    ("lora", dict(config=lambda c: c.update(format="x", peft_type="LORA")),
     "is not a peftlab adapter (this looks like a peft adapter: use import_peft)"),
    ("lora", dict(config=lambda c: c.update(format_version=3)),
     "has format version 3; this peftlab reads versions up to 2: upgrade peftlab"),
    ("lora", dict(config=lambda c: c.update(method=5)), "method must be a method name, got 5"),
    ("lora", dict(config=lambda c: c["base_model"].update(model_type="gpt2")),
     "was trained on a 'gpt2' model, this model is 'bert'"),
    ("lora", dict(config=lambda c: c.update(extras="classifier")),
     "extras must be a list of module names"),
    ("lora", dict(config=lambda c: c.update(members="a")), "members must be a list of adapter names"),
    ("lora", dict(config=lambda c: c.update(members=["m"])),
     "is a fusion of ['m']; load its members ['m'] before it"),
    ("lora", dict(config=lambda c: c.update(extras=["nope"])), "does not fit this model"),
    ("lora", dict(config=lambda c: c.update(target_modules=["x"])),
     "targets modules ['x'], but on this model its config resolves to ['bert."),
    ("peft_lora", dict(config=lambda c: c.update(peft_type="BOFT")),  # the list grows with the registry
     "peft_type 'BOFT' is not supported; import_peft reads ['IA3', "),
    ("peft_ia3", dict(config=lambda c: c.update(format="peftlab-adapter", peft_type=None)),
     "(this is a peftlab adapter: use load)"),
    ("peft_lora", dict(config=lambda c: c.update(use_dora=True)),  # read as DoRA, which needs m
     "does not match the adapter's config: missing ['base_model.model.bert.encoder.layer.0.attention."
     "self.query.lora_magnitude_vector'"),
    ("peft_lora", dict(config=lambda c: c.update(bias="all")),
     "trains biases (bias='all'); import_peft supports bias='none'"),
    ("peft_lora", dict(config=lambda c: c.update(init_lora_weights="pissa")),
     "was initialised with init_lora_weights='pissa', which rewrites the base weights"),
    ("peft_ia3", dict(tensors=lambda t: [t.pop(k) for k in list(t)] and t.update(x=torch.ones(1))),
     "tensor 'x' does not start with 'base_model.model.'"),
    ("peft_lora", dict(tensors=lambda t: [t.pop(k) for k in list(t) if "lora" in k]),
     "holds no LORA tensors"),
    ("peft_ia3", dict(tensors=lambda t: t.update({"base_model.model.nope.ia3_l": torch.ones(1, 1)})),
     "adapts modules this model has no Linear/Conv1D module for: ['nope']"),
    ("peft_lora", dict(config=lambda c: c.update(r=True)), "r: expected an integer below 2**31, got True"),
    ("peft_lora", dict(config=lambda c: c.update(rank_pattern=[1])),
     "rank_pattern must be an object of module pattern"),
    ("peft_lora", dict(config=lambda c: c.update(modules_to_save="classifier")),
     "modules_to_save must be a list of module names"),
    ("peft_lora", dict(tensors=lambda t: t.update({"base_model.model.classifier_weight": torch.ones(1)})),
     "unexpected tensor 'base_model.model.classifier_weight': neither an adapter tensor nor part of a "
     "module in modules_to_save ['classifier']"),
    ("peft_lora", dict(config=lambda c: c.update(modules_to_save=["nope"])),
     "unexpected tensor 'base_model.model.classifier.bias': neither an adapter tensor nor part of a module"),
]


@pytest.mark.parametrize("source, damage, message", REFUSALS,
                         ids=[f"{s}-{re.sub(r'[^a-z]+', '_', m)[:40]}" for s, _, m in REFUSALS])
def test_each_refusal_says_what_is_wrong(source, damage, message, sources, tmp_path):
    adapters = peftlab.attach(tiny_bert())
    before = state_hash(adapters.model)
    case = _damaged(sources, source, tmp_path, **damage)
    with pytest.raises(peftlab.AdapterLoadError) as e:
        _load(adapters, source, case)
    assert message in str(e.value)
    assert adapters.names == () and state_hash(adapters.model) == before


@pytest.mark.parametrize("missing, extra", [(1, 0), (5, 0), (6, 0), (0, 5), (0, 6), (6, 6)])
def test_a_key_mismatch_names_at_most_five_keys_of_each_kind(missing, extra, sources, tmp_path):
    def damage(t):
        for key in sorted(t)[:missing]:
            del t[key]
        t.update({f"x{i}": torch.ones(1) for i in range(extra)})

    case = _damaged(sources, "ia3", tmp_path, tensors=damage)  # 6 tensors
    keys = sorted(load_file(sources["ia3"] / WEIGHTS_FILE))[:missing]
    extras = [f"x{i}" for i in range(extra)]
    expected = (f"does not match the adapter's config: missing {keys[:5]}{'...' if missing > 5 else ''}, "
                f"unexpected {extras[:5]}{'...' if extra > 5 else ''}")
    with pytest.raises(peftlab.AdapterLoadError) as e:
        peftlab.attach(tiny_bert()).load(case)
    assert str(e.value).endswith(expected)


def test_loading_twice_under_one_name_is_refused(sources):
    adapters = peftlab.attach(tiny_bert())
    adapters.load(sources["lora"])
    adapters.import_peft(sources["peft_ia3"], "imported")
    with pytest.raises(peftlab.AdapterLoadError, match="named 'lora' is already attached; pass name="):
        adapters.load(sources["lora"])
    with pytest.raises(peftlab.AdapterLoadError, match="'imported' is already attached; pass another name"):
        adapters.import_peft(sources["peft_ia3"], "imported")
    with pytest.raises(peftlab.AdapterLoadError, match="is not a directory; pass the adapter's directory"):
        adapters.load(sources["lora"] / CONFIG_FILE)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
@pytest.mark.parametrize("source, path, value", BACKTRACKING, ids=_case_ids(BACKTRACKING))
def test_patterns_that_backtrack_exponentially_are_refused(source, path, value, sources, tmp_path):
    adapters = peftlab.attach(tiny_bert())
    case = _with_value(sources, source, path, value, tmp_path)

    def hung(*_):
        raise TimeoutError("pattern matching still running after 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(peftlab.AdapterLoadError, match="exponential time"):
            _load(adapters, source, case)
        with pytest.raises(peftlab.TargetError, match="exponential time"):
            adapters.add("direct", peftlab.LoRAConfig(targets=(r"(.*)*x",)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert adapters.names == ()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("source", ["lora", "peft_ia3"])
def test_tensors_that_are_not_float16_32_64_or_bfloat16_are_refused(source, dtype, sources, tmp_path):
    """Right keys and shapes, wrong dtype: an int or bool tensor would be copied into the adapter
    silently (0/1 weights), a float8 one would lose nearly all its precision."""
    adapters = peftlab.attach(tiny_bert())
    before = state_hash(adapters.model)
    case = shutil.copytree(sources[source], tmp_path / "case")
    tensors = load_file(case / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key].to(dtype)}, str(case / WEIGHTS_FILE))
    with pytest.raises(peftlab.AdapterLoadError, match="has dtype [A-Z0-9_]+, expected a floating-point typ"):
        _load(adapters, source, case)
    assert adapters.names == () and state_hash(adapters.model) == before


def test_the_saved_config_records_the_base_model_whatever_else_is_attached(tmp_path):
    model = tiny_bert()
    plain = hashlib.sha256("".join(f"{n}:{tuple(p.shape)};" for n, p in model.named_parameters()).encode())
    adapters = peftlab.attach(model)
    adapters.add("a", peftlab.LoRAConfig(r=2))
    adapters.save("a", tmp_path / "alone")
    adapters.add("b", peftlab.IA3Config())
    adapters.save("a", tmp_path / "with_b")
    configs = [json.loads((tmp_path / d / CONFIG_FILE).read_text()) for d in ("alone", "with_b")]
    assert configs[0] == configs[1]
    assert configs[0]["base_model"] == {"model_type": "bert", "parameters": adapters.base_parameters(),
                                        "shape_sha256": plain.hexdigest()}
    assert configs[0]["peftlab_version"] == peftlab.__version__
    assert configs[0]["format"] == "peftlab-adapter" and configs[0]["format_version"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("source", ["ia3", "peft_lora"])
def test_float16_bfloat16_and_float64_tensors_load(source, dtype, sources, tmp_path):
    """Adapters saved from a half-precision or double model load into a float32 one."""
    case = shutil.copytree(sources[source], tmp_path / "case")
    tensors = load_file(case / WEIGHTS_FILE)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(case / WEIGHTS_FILE))
    adapters = peftlab.attach(tiny_bert())
    name = _load(adapters, source, case)
    got = adapters[name].parameters()[0]
    assert got.dtype == torch.float32 and got.abs().sum() > 0


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("source", ["lora", "peft_lora"])
def test_a_config_that_cannot_be_read_is_a_load_error(source, sources, tmp_path):
    """Found by fuzzing: reading a link to /proc/self/mem raised a bare OSError."""
    adapters = peftlab.attach(tiny_bert())
    case = shutil.copytree(sources[source], tmp_path / "case")
    (case / CONFIG_FILE).unlink()
    (case / CONFIG_FILE).symlink_to("/proc/self/mem")
    with pytest.raises(peftlab.AdapterLoadError, match="cannot read"):
        adapters.import_peft(case, "imported") if source.startswith("peft") else adapters.load(case)


def test_peft_pattern_keys_keep_their_own_groups(sources, tmp_path):
    """rank_pattern keys are matched inside peft's suffix rule; a back-reference in a key used to
    point at the rule's own group (re.error: cannot refer to an open group)."""
    adapters = peftlab.attach(tiny_bert())
    case = shutil.copytree(sources["peft_lora"], tmp_path / "case")
    config = json.loads((case / CONFIG_FILE).read_text())
    (case / CONFIG_FILE).write_text(json.dumps({**config, "rank_pattern": {r"(x)(y)\2": 2}}))
    assert adapters.import_peft(case, "imported") == "imported"  # matches no module: rank stays r
    assert adapters.config("imported").r == config["r"]


# ---- crash safety -----------------------------------------------------------------------------
# A fresh interpreter builds two adapters once, then forks a worker per kill that saves them,
# alternately, to the same directory until the test SIGKILLs it (forking spares ~10 s of imports).
SAVER = """
import os, sys
import torch
from transformers import BertConfig, BertForSequenceClassification
import peftlab

torch.set_num_threads(1)
target, ref_a, ref_b = sys.argv[1:4]
torch.manual_seed(0)
adapters = peftlab.attach(BertForSequenceClassification(BertConfig(**BERT)).eval())
for name, alpha, seed in (("a", 8.0, 1), ("b", 16.0, 2)):  # same shapes: only a check of values tells a mix
    adapters.add(name, peftlab.LoRAConfig(r=4, alpha=alpha))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters(name):
            p.add_(torch.randn(p.shape, generator=g))
adapters.save("a", ref_a)
adapters.save("b", ref_b)
adapters.save("a", target)
print("ready", flush=True)
while line := sys.stdin.readline():  # "go a": save a first (the test says what is not there now)
    first, second = ("a", "b") if line.split()[1] == "a" else ("b", "a")
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                adapters.save(first, target)
                adapters.save(second, target)
        finally:
            os._exit(1)
    print(pid, flush=True)
    sys.stdin.readline()  # reap only after the test's kill, so that the pid cannot be reused before it
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Saver:
    """The saver process: start a worker saving ``first`` then the other, SIGKILL it, reap it."""

    def __init__(self, tmp: Path, target: Path, ref_a: Path, ref_b: Path) -> None:
        script = tmp / "saver.py"
        script.write_text(f"BERT = {BERT!r}\n" + SAVER)
        self.proc = subprocess.Popen([sys.executable, str(script), str(target), str(ref_a), str(ref_b)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout],
                         daemon=True).start()
        self.worker: int | None = None  # a worker's pid stays ours until the saver reaps it

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def start(self, first: str) -> None:
        self.say(f"go {first}")
        self.worker = int(self.hear(timeout=60))

    def kill(self) -> int:
        """SIGKILL the worker; its wait status."""
        os.kill(self.worker, signal.SIGKILL)
        self.say("reap")
        self.worker = None
        return int(self.hear(timeout=60))

    def hear(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the saver said nothing for {timeout} s "
                                 f"(exit code {self.proc.poll()})") from None

    def close(self) -> None:
        if self.worker is not None:
            os.kill(self.worker, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def _leftovers(target: Path) -> set[str]:
    return {p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")}


def test_a_save_killed_at_any_moment_leaves_one_whole_adapter(tmp_path):
    target, ref_a, ref_b = tmp_path / "out" / "adapter", tmp_path / "ref_a", tmp_path / "ref_b"
    saver = Saver(tmp_path, target, ref_a, ref_b)
    model = tiny_bert()
    adapters = peftlab.attach(model)
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    mid_save, kept, now = 0, 0, "a"
    try:
        assert saver.hear(timeout=600) == "ready"
        refs = {"a": files_of(ref_a), "b": files_of(ref_b)}
        assert refs["a"] != refs["b"]
        for kill in range(KILLS):
            before = _leftovers(target)
            saver.start(first="b" if now == "a" else "a")  # its first save changes the directory
            time.sleep(rng.uniform(0.0, 0.1))  # a save takes some 10-50 ms here
            status = saver.kill()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"kill {kill}: the saving worker stopped by itself (wait status {status})")
            state = files_of(target)
            which = [n for n, ref in refs.items() if state == ref]
            assert which, f"kill {kill}: {target} is neither adapter a nor b: files {sorted(state)}"
            assert adapters.load(target) == which[0]
            want = load_file(ref_a / WEIGHTS_FILE if which[0] == "a" else ref_b / WEIGHTS_FILE)
            got = adapter_tensors(adapters, which[0])
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            adapters.remove(which[0])
            kept += which[0] == now
            now = which[0]
            seen[now] += 1
            mid_save += bool(_leftovers(target) - before)
    finally:
        saver.close()

    # What a kill left behind is hidden beside the adapter, and is a whole adapter or refused.
    leftovers = _leftovers(target)
    print(f"\n{KILLS} kills: left the previous adapter {kept}x, the new one {KILLS - kept}x (a {seen['a']}x, "
          f"b {seen['b']}x); {mid_save} kills landed inside a save (temp dir left behind)")
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.startswith(".")) == ["adapter"]
    for name in leftovers:
        left = target.parent / name
        if files_of(left) in refs.values():
            continue
        with pytest.raises(peftlab.PeftlabError):
            adapters.load(left)
    assert adapters.names == ()
    # ...and does not get in the way of the next save.
    adapters.add("c", peftlab.IA3Config())
    adapters.save("c", target)
    assert is_adapter_dir(target) and adapters.load(target, name="c2") == "c2"


# ---- names and destinations -------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_NAMES, ids=_plain_ids([repr(b) for b in BAD_NAMES]))
def test_invalid_adapter_names_are_refused_everywhere(bad, sources, tmp_path):
    model = tiny_bert()
    adapters = peftlab.attach(model)
    before = state_hash(model)
    with pytest.raises(peftlab.AdapterNameError):
        adapters.add(bad, peftlab.LoRAConfig())
    if bad is not None:  # load(name=None) means "the name in the file"
        with pytest.raises(peftlab.AdapterLoadError, match="adapter name"):
            adapters.load(sources["lora"], name=bad)
    with pytest.raises(peftlab.AdapterLoadError, match="adapter name"):
        adapters.import_peft(sources["peft_lora"], bad)
    in_file = shutil.copytree(sources["lora"], tmp_path / "named")
    config = json.loads((in_file / CONFIG_FILE).read_text())
    (in_file / CONFIG_FILE).write_text(json.dumps({**config, "name": bad}))
    with pytest.raises(peftlab.AdapterLoadError, match="adapter name"):
        adapters.load(in_file)
    assert adapters.names == () and state_hash(model) == before


def _tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("others", [{"notes.txt": b"mine"}, {"data/x.bin": b"\x00\x01"},
                                    {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"", "train.log": b"step 1"}])
def test_saving_into_a_directory_with_other_files_refuses_and_keeps_them(others, tmp_path):
    adapters = peftlab.attach(tiny_bert())
    adapters.add("a", peftlab.LoRAConfig())
    dest = tmp_path / "dest"
    for rel, content in others.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(content)
    before = _tree(dest)
    with pytest.raises(peftlab.AdapterSaveError, match="refusing to replace it. Choose an empty or new dir"):
        adapters.save("a", dest)
    with pytest.raises(peftlab.AdapterSaveError, match="refusing"):
        adapters.export_peft("a", dest)
    assert _tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]  # no temp dir left behind


def test_saving_over_a_file_refuses(tmp_path):
    adapters = peftlab.attach(tiny_bert())
    adapters.add("a", peftlab.LoRAConfig())
    dest = tmp_path / "adapter"
    dest.write_bytes(b"not a directory")
    with pytest.raises(peftlab.AdapterSaveError):
        adapters.save("a", dest)
    assert dest.read_bytes() == b"not a directory"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "without_renameat2"])
def test_saving_over_an_adapter_replaces_it_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a kernel or libc without renameat2: keep the old copy until the new one is in
        monkeypatch.setattr(peftlab.io, "_exchange", lambda a, b: False)
    model = tiny_bert()
    adapters = peftlab.attach(model)
    adapters.add("a", peftlab.LoRAConfig(r=4))
    adapters.add("b", peftlab.IA3Config())
    _randomize(adapters.parameters("a"), 0.0, seed=1)
    dest = tmp_path / "adapter"
    adapters.save("a", dest)
    adapters.save("b", dest)
    adapters.save("b", tmp_path / "ref")
    assert files_of(dest) == files_of(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ref"]  # the old copy is gone
    fresh = peftlab.attach(tiny_bert())
    assert fresh.load(dest) == "b" and fresh.config("b") == adapters.config("b")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "without_renameat2"])
def test_a_full_model_save_that_fails_leaves_the_previous_model_whole(tmp_path, monkeypatch, exchange):
    from peftlab.train import save_model_atomic

    if not exchange:
        monkeypatch.setattr(peftlab.io, "_exchange", lambda a, b: False)
    first, second = tiny_bert(), tiny_bert()
    with torch.no_grad():
        second.bert.embeddings.word_embeddings.weight.add_(1.0)
    dest = tmp_path / "model"
    save_model_atomic(first, None, dest)
    saved = files_of(dest)

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(second), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="no space"):
        save_model_atomic(second, None, dest)
    assert files_of(dest) == saved and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(peftlab.io, "_exchange", lambda a, b: False)
    save_model_atomic(second, None, dest)
    assert files_of(dest) != saved and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: renameat2 resolves them from the working directory
    Path("a").mkdir()
    Path("b").mkdir()
    Path("a", "from_a").write_text("a")
    assert peftlab.io._exchange(Path("a"), Path("b"))
    assert [p.name for p in Path("b").iterdir()] == ["from_a"] and not any(Path("a").iterdir())


def test_without_renameat2_exchange_says_so(tmp_path, monkeypatch):
    import ctypes.util

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: object())  # a libc without it
    assert not peftlab.io._exchange(tmp_path / "a", tmp_path / "b")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # no libc found at all
    assert not peftlab.io._exchange(tmp_path / "a", tmp_path / "b")


def test_a_model_without_a_config_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    adapters = peftlab.attach(model)
    adapters.add("a", peftlab.LoRAConfig(r=2, targets=(r"^0$",)))
    adapters.activate("a")
    adapters.train("a")
    adapters.save("a", tmp_path / "a", extras=("1",))  # extras named here, not by train
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["base_model"]["model_type"] is None and config["extras"] == ["1"]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert peftlab.attach(fresh).load(tmp_path / "a") == "a"


def test_an_adapter_loads_without_its_head_where_the_head_does_not_fit(tmp_path):
    adapters = peftlab.attach(tiny_bert())
    adapters.add("a", peftlab.LoRAConfig())
    adapters.save("a", tmp_path / "a", extras=("classifier",))  # a 2-label head
    torch.manual_seed(0)
    three_labels = BertForSequenceClassification(BertConfig(**{**BERT, "num_labels": 3}))
    other = peftlab.attach(three_labels)
    with pytest.raises(peftlab.AdapterLoadError, match="has a head of 2 classes, this model's has 3"):
        other.load(tmp_path / "a")
    head = three_labels.classifier.weight.detach().clone()
    assert other.load(tmp_path / "a", with_extras=False) == "a"
    assert torch.equal(three_labels.classifier.weight, head) and other["a"].extras == ()
    assert all(torch.equal(x, y) for x, y in zip(other.parameters("a"), adapters.parameters("a")))


def test_a_peft_directory_with_its_readme_is_an_adapter_directory(tmp_path):
    adapters = peftlab.attach(tiny_bert())
    adapters.add("a", peftlab.LoRAConfig())
    dest = tmp_path / "dest"
    adapters.export_peft("a", dest)
    (dest / "README.md").write_text("model card")  # what peft's save_pretrained writes too
    assert is_adapter_dir(dest)
    adapters.save("a", dest)
    assert sorted(p.name for p in dest.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_a_save_into_new_nested_directories_works_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    adapters = peftlab.attach(tiny_bert())
    adapters.add("a", peftlab.LoRAConfig())
    adapters.save("a", tmp_path / "x" / "y" / "adapter")
    assert is_adapter_dir(tmp_path / "x" / "y" / "adapter")
    (tmp_path / "file").write_text("")
    with pytest.raises(peftlab.AdapterSaveError, match="^cannot write to .*file: "):
        adapters.save("a", tmp_path / "file" / "adapter")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(peftlab.io, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        adapters.save("a", tmp_path / "x" / "z")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]  # no temporary directory left


def test_a_version_1_file_names_its_extras_extra_modules_and_still_loads(tmp_path):
    model = tiny_bert()
    adapters = peftlab.attach(model)
    adapters.add("a", peftlab.LoRAConfig())
    adapters.activate("a")
    adapters.train("a", extras=("classifier",))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    adapters.save("a", tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["format_version"] == 2 and config["extras"] == ["classifier"]
    config["format_version"] = 1
    config["extra_modules"] = config.pop("extras")
    config_file.write_text(json.dumps(config))
    fresh = tiny_bert()
    assert peftlab.attach(fresh).load(tmp_path / "a") == "a"
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert peftlab.attach(fresh)["a"].extras == ("classifier",)
