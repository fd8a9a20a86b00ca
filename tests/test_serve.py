"""``peftlab serve``: requests for adapters of different kinds share forwards and get what offline
prediction gives each of them alone; bad requests and bad files get a 4xx and the server goes on."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import transformers as T
import uvicorn
from conftest import randomize
from safetensors.torch import load_file, save_file
from test_cli import _save_bert, _tokenizer
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.data import Split
from peftlab.errors import UsageError
from peftlab.heads import set_label_names
from peftlab.predict import RowRouting, predict_split
from peftlab.serve import Batcher, Job, Pool, ServeError, Server, create_app
from peftlab.train import load_model, task_head
from peftlab.trained import Trained

KINDS = {
    "lora": lambda: peftlab.LoRAConfig(r=4),
    "ia3": lambda: peftlab.IA3Config(),
    "pfeiffer": lambda: peftlab.BottleneckConfig.pfeiffer(reduction=4),
    "compacter": lambda: peftlab.CompacterConfig.plus_plus(reduction=4),
    "prompt": lambda: peftlab.PromptTuningConfig(num_virtual_tokens=3),
}
FUSED = ("pfeiffer", "compacter")
TEXTS = ["the film was very good", "the meal was quite bad", "the book was really good and the meal bad",
         "the movie", "the meal was very bad the film was good the book was quite good"]


def _heads(model) -> list[torch.nn.Parameter]:
    return [p for m in task_head(model, "classification") for p in model.get_submodule(m).parameters()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A tiny BERT classifier and six adapters trained on it (moved from their init instead, each
    with its own head and class names): five kinds and a fusion of two of them."""
    root = tmp_path_factory.mktemp("serve")
    folder = _save_bert(root / "bert", dropout=0.0)
    model, _, _ = load_model(str(folder), "classification", 2, "cls")
    adapters = peftlab.attach(model)
    for i, (name, config) in enumerate(KINDS.items()):
        adapters.add(name, config())
        randomize(adapters.parameters(name), 0.3, seed=i)
        randomize(_heads(model), 0.5, seed=10 + i)
        set_label_names(model, [f"{name}-no", f"{name}-yes"])
        adapters.save(name, root / name, extras=task_head(model, "classification"))
    adapters.add_fusion("fusion", list(FUSED))
    randomize(adapters.parameters("fusion"), 0.3, seed=7)
    randomize(_heads(model), 0.5, seed=20)
    adapters.save("fusion", root / "fusion", extras=task_head(model, "classification"))
    return {"root": root, "model": folder, "names": [*KINDS, "fusion"]}


def _pool(saved: dict, names: list[str] | None = None, **options) -> Pool:
    model, tokenizer, _ = load_model(str(saved["model"]), "classification", 2, "cls")
    pool = Pool(model, tokenizer, "classification", max_length=24, **options)
    for name in saved["names"] if names is None else names:
        pool.load(saved["root"] / name)
    return pool


def _offline(saved: dict, name: str, texts: list[str]) -> list[dict]:
    """What ``peftlab predict`` gives adapter ``name`` alone (a fusion: its members loaded first)."""
    trained = Trained(saved["root"] / name)
    model, tokenizer, _ = load_model(str(saved["model"]), "classification", 2, "cls", trained.labels())
    adapters = peftlab.attach(model)
    for member in FUSED if name == "fusion" else ():
        adapters.load(saved["root"] / member, with_extras=False)
    trained.attach_to(model)
    rows = [{"text": t, "text_pair": None} for t in texts]
    return predict_split(model, tokenizer, "classification", Split("x", Path("x"), rows), trained.labels())


@pytest.fixture(scope="module")
def pool(saved) -> Pool:
    """All six adapters on one model, for the tests that do not load or unload (each runs it
    from its own Batcher, one test at a time)."""
    return _pool(saved, max_batch=16)


@pytest.fixture(scope="module")
def offline(saved) -> dict:
    return {name: dict(zip(TEXTS, _offline(saved, name, TEXTS))) for name in saved["names"]}


def _same(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert got["scores"].keys() == want["scores"].keys()
    assert max(abs(got["scores"][k] - want["scores"][k]) for k in want["scores"]) <= 1e-5


# ---- the batcher, without HTTP ------------------------------------------------------------------
def test_the_batcher_mixes_adapters_of_every_kind_in_one_forward_and_answers_each_as_alone(saved, pool,
                                                                                             offline):
    sizes = []
    batcher = Batcher(pool.run, pool.key, max_batch=16, max_wait=0.05)
    batcher.metrics = type("Sizes", (), {"batch": lambda self, n, s: sizes.append(n)})()
    batcher.start()
    rng = random.Random(0)
    asked = [(rng.choice(saved["names"]), rng.sample(TEXTS, rng.randint(1, 3))) for _ in range(40)]
    with ThreadPoolExecutor(8) as clients:
        futures = list(clients.map(lambda a: batcher.submit(pool.job({"adapter": a[0], "inputs": a[1]})),
                                   asked))
        answers = [f.result(timeout=60) for f in futures]
    batcher.stop()
    for (name, texts), outputs in zip(asked, answers):
        assert len(outputs) == len(texts)
        for text, got in zip(texts, outputs):
            _same(got, offline[name][text])
    assert sum(sizes) == sum(len(t) for _, t in asked) and max(sizes) > 3  # forwards were shared


def test_a_cancelled_or_failing_job_does_not_touch_the_rest_of_its_batch(pool, offline):
    batcher = Batcher(pool.run, pool.key, max_batch=32, max_wait=0.2)
    batcher.start()
    gone = batcher.submit(pool.job({"adapter": "lora", "inputs": [TEXTS[0]]}))
    kept = batcher.submit(pool.job({"adapter": "ia3", "inputs": [TEXTS[1]]}))
    long = batcher.submit(pool.job({"adapter": "lora", "inputs": [" ".join(["good"] * 40)]}))
    assert gone.cancel()  # the client went away before its batch formed
    _same(kept.result(timeout=30)[0], offline["ia3"][TEXTS[1]])
    with pytest.raises(ServeError, match="42 tokens; this server takes at most 24"):
        long.result(timeout=30)
    broken = batcher.call(lambda: 1 / 0)  # an error on the worker thread reaches its caller only
    with pytest.raises(ZeroDivisionError):
        broken.result(timeout=30)
    _same(batcher.submit(pool.job({"adapter": "lora", "inputs": [TEXTS[2]]})).result(timeout=30)[0],
          offline["lora"][TEXTS[2]])
    batcher.stop()
    with pytest.raises(ServeError, match="shutting down"):
        batcher.submit(Job("lora", [(TEXTS[0], None)]))


def test_a_pool_keeps_weight_products_between_forwards_until_it_loads_or_unloads(saved, offline):
    pool = _pool(saved, ["pfeiffer", "compacter", "fusion"])

    def answers_each_as_alone() -> None:
        jobs = [Job(name, [(text, None)]) for name in ("compacter", "fusion", "pfeiffer") for text in TEXTS]
        for job, got in zip(jobs, pool.run(jobs)):
            _same(got[0], offline[job.adapter][job.inputs[0][0]])

    answers_each_as_alone()
    kept = len(pool.weights)
    assert kept > 0  # the fusion's query-key products and Compacter's Kronecker sums
    answers_each_as_alone()
    assert len(pool.weights) == kept
    pool.load(saved["root"] / "lora")
    assert len(pool.weights) == 0
    answers_each_as_alone()
    pool.unload("fusion")
    assert len(pool.weights) == 0
    pool.load(saved["root"] / "fusion")
    answers_each_as_alone()


def test_per_row_adapters_are_refused_where_a_task_cannot_route_them(pool):
    rows = Split("x", Path("x"), [{"text": "a", "text_pair": None}])
    with pytest.raises(UsageError, match="cannot run each row with its own adapter"):
        predict_split(pool.model, pool.tokenizer, "token-classification", rows, None,
                      routing=RowRouting(["lora"]))
    with pytest.raises(UsageError, match="routing names 2 adapters for 1 rows"):
        predict_split(pool.model, pool.tokenizer, "classification", rows, None,
                      routing=RowRouting(["lora", "ia3"]))


def test_adapters_on_routed_experts_are_batched_only_with_themselves(saved):
    pool = _pool(saved, ["lora"])
    pool.served["experts"] = dataclasses.replace(pool.served["lora"], name="experts", solo=True)
    jobs = [pool.job({"adapter": a, "inputs": [TEXTS[0]]}) for a in ("lora", "experts", "lora", "experts")]
    keys = [pool.key(j) for j in jobs]
    assert keys[0] == keys[2] != keys[1] == keys[3]
    assert pool.key(pool.job({"adapter": "lora", "inputs": [["a", "b"]]})) != keys[0]  # pairs apart


def test_causal_lm_generation_with_mixed_adapters_equals_each_alone(tmp_path):
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                     max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model, tok, _ = load_model(str(tmp_path / "llama"), "causal-lm", 0)
    adapters = peftlab.attach(model)
    kinds = {"lora": peftlab.LoRAConfig(r=4), "ia3": peftlab.IA3Config(),
             "prompt": peftlab.PromptTuningConfig(num_virtual_tokens=2),
             "prefix": peftlab.PrefixTuningConfig(num_virtual_tokens=2)}
    for i, (name, config) in enumerate(kinds.items()):
        adapters.add(name, config)
        randomize(adapters.parameters(name), 1.0, seed=i)
        adapters.save(name, tmp_path / name)
    served, tok2, _ = load_model(str(tmp_path / "llama"), "causal-lm", 0)
    pool = Pool(served, tok2, "causal-lm", max_length=32, max_new_tokens=4)
    for name in kinds:
        pool.load(tmp_path / name)
    asked = [(name, text) for name in (*kinds, None) for text in TEXTS[:3]]
    random.Random(1).shuffle(asked)
    outputs = pool.run([pool.job({"adapter": a, "inputs": [t], "max_new_tokens": 4}) for a, t in asked])
    rows = [{"text": t, "text_pair": None} for t in TEXTS[:3]]
    for name in (*kinds, None):
        adapters.activate(*(() if name is None else (name,)))
        alone = predict_split(model, tok, "causal-lm", Split("x", Path("x"), rows), None, max_new_tokens=4)
        got = [out[0] for (a, _), out in zip(asked, outputs) if a == name]
        want = [alone[TEXTS.index(t)] for a, t in asked if a == name]
        assert got == want
    assert len({o[0]["generated"] for o in outputs}) > 3  # the adapters change what is generated


def test_an_adapter_on_routed_experts_is_batched_apart_and_generates_as_alone(tmp_path):
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    model, tok, _ = load_model(str(tmp_path / "moe"), "causal-lm", 0)
    adapters = peftlab.attach(model)
    kinds = {"experts": peftlab.LoRAConfig(r=2, targets=("ffn_up", "ffn_down")),
             "attention": peftlab.LoRAConfig(r=2)}
    for i, (name, config) in enumerate(kinds.items()):
        adapters.add(name, config)
        randomize(adapters.parameters(name), 1.0, seed=40 + i)
        adapters.save(name, tmp_path / name)
    served, served_tokenizer, _ = load_model(str(tmp_path / "moe"), "causal-lm", 0)
    pool = Pool(served, served_tokenizer, "causal-lm", max_length=32, max_new_tokens=3)
    for name in kinds:
        pool.load(tmp_path / name)
    assert pool.served["experts"].solo and not pool.served["attention"].solo
    batcher = Batcher(pool.run, pool.key, max_batch=16, max_wait=0.2)
    batcher.start()
    asked = [(name, text) for text in TEXTS[:3] for name in ("experts", "attention", None)]
    futures = [batcher.submit(pool.job({"adapter": a, "inputs": [t]})) for a, t in asked]
    answers = [f.result(timeout=60)[0] for f in futures]
    batcher.stop()
    rows = [{"text": t, "text_pair": None} for t in TEXTS[:3]]
    for name in ("experts", "attention", None):
        adapters.activate(*(() if name is None else (name,)))
        alone = predict_split(model, tok, "causal-lm", Split("x", Path("x"), rows), None, max_new_tokens=3)
        assert [a for (n, _), a in zip(asked, answers) if n == name] == alone


def test_regression_values_of_mixed_adapters_equal_each_alone(tmp_path):
    folder = _save_bert(tmp_path / "bert", dropout=0.0)
    model, tokenizer, _ = load_model(str(folder), "regression", 1, "cls")
    adapters = peftlab.attach(model)
    for i, name in enumerate(("lora", "compacter")):
        adapters.add(name, KINDS[name]())
        randomize([*adapters.parameters(name), *_heads(model)], 0.5, seed=30 + i)
        adapters.save(name, tmp_path / name, extras=task_head(model, "regression"))
    served, served_tokenizer, _ = load_model(str(folder), "regression", 1, "cls")
    pool = Pool(served, served_tokenizer, "regression", max_length=24)
    for name in ("lora", "compacter"):
        pool.load(tmp_path / name)
    asked = [(name, text) for text in TEXTS for name in ("lora", "compacter")]
    outputs = pool.run([pool.job({"adapter": a, "inputs": [t]}) for a, t in asked])
    rows = [{"text": t, "text_pair": None} for t in TEXTS]
    for name in ("lora", "compacter"):
        fresh, fresh_tokenizer, _ = load_model(str(folder), "regression", 1, "cls")
        Trained(tmp_path / name).attach_to(fresh)
        alone = predict_split(fresh, fresh_tokenizer, "regression", Split("x", Path("x"), rows), None)
        got = [out[0]["value"] for (a, _), out in zip(asked, outputs) if a == name]
        assert got == pytest.approx([r["value"] for r in alone], abs=1e-5)
    assert outputs[0][0]["value"] != pytest.approx(outputs[1][0]["value"], abs=1e-3)  # heads differ


# ---- over HTTP ----------------------------------------------------------------------------------
@contextlib.contextmanager
def running(server: Server) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread; yields its URL."""
    http = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(30)


def _predict(client: httpx.Client, adapter: str | None, inputs: list) -> httpx.Response:
    return client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs})


def test_concurrent_mixed_requests_over_http_equal_offline_predict(saved, pool, offline, tmp_path):
    server = Server(pool, max_wait=0.02)
    rng = random.Random(3)
    asked = [(rng.choice(saved["names"]), rng.sample(TEXTS, rng.randint(1, 2))) for _ in range(48)]
    with running(server) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(12) as clients:
            answers = list(clients.map(lambda a: _predict(client, *a), asked))
        listing = client.get("/v1/adapters").json()
        metrics = client.get("/metrics").text
        health = client.get("/health").json()
    for (name, texts), response in zip(asked, answers):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == name and body["task"] == "classification"
        for text, got in zip(texts, body["outputs"]):
            _same(got, offline[name][text])
    assert [a["name"] for a in listing["adapters"]] == saved["names"]
    fusion = listing["adapters"][-1]
    assert fusion["method"] == "fusion" and fusion["members"] == list(FUSED) and fusion["file_bytes"] > 0
    assert health == {"status": "ok", "task": "classification", "adapters": 6, "waiting": 0,
                      "threads": torch.get_num_threads()}
    assert 'peftlab_requests_total{endpoint="predict",status="200"} 48' in metrics
    assert sum(int(_metric(metrics, f'peftlab_adapter_requests_total{{adapter="{n}"}}') or 0)
               for n in saved["names"]) == 48
    batches = _metric(metrics, "peftlab_batch_size_count")
    assert _metric(metrics, "peftlab_batch_size_sum") == sum(len(t) for _, t in asked) and batches < 48
    assert _metric(metrics, 'peftlab_request_seconds_bucket{le="+Inf"}') == 48
    # the same answers as the command line's predict, for one adapter
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    result = CliRunner().invoke(app, ["predict", "--adapter", str(saved["root"] / "lora"), "--model",
                                      str(saved["model"]), "--task", "classification", "--data",
                                      str(tmp_path / "texts.txt"), "--out", str(tmp_path / "p.jsonl"),
                                      "--max-length", "24", "--quiet"])
    assert result.exit_code == 0, result.output
    for text, line in zip(TEXTS, (tmp_path / "p.jsonl").read_text().splitlines()):
        _same(json.loads(line), offline["lora"][text])


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


BAD_REQUESTS = [
    # (what, body or raw bytes, status, part of the message)
    ("not JSON", b'{"adapter": "lora", "inputs": [', 400, "not valid JSON"),
    ("not UTF-8", b'{"adapter": "lora", "inputs": ["\xff"]}', 400, "not valid JSON"),
    ("not an object", ["lora"], 422, "must be a JSON object"),
    ("unknown field", {"adapter": "lora", "inputs": ["a"], "temperature": 1}, 422, "unknown field"),
    ("unknown adapter", {"adapter": "nope", "inputs": ["a"]}, 404, "no adapter named 'nope'"),
    ("adapter not a string", {"adapter": 3, "inputs": ["a"]}, 422, "adapter: expected a string"),
    ("no adapter for a head", {"adapter": None, "inputs": ["a"]}, 422, "name an adapter"),
    ("no inputs", {"adapter": "lora"}, 422, "non-empty list"),
    ("empty inputs", {"adapter": "lora", "inputs": []}, 422, "non-empty list"),
    ("inputs not a list", {"adapter": "lora", "inputs": "the film"}, 422, "non-empty list"),
    ("empty text", {"adapter": "lora", "inputs": ["good", "  "]}, 422, "inputs[1] is empty"),
    ("number", {"adapter": "lora", "inputs": [5]}, 422, "inputs[0] must be a text"),
    ("three texts", {"adapter": "lora", "inputs": [["a", "b", "c"]]}, 422, "inputs[0] must be a text"),
    ("pairs and texts", {"adapter": "lora", "inputs": ["a", ["a", "b"]]}, 422, "mix single texts and pairs"),
    ("too many inputs", {"adapter": "lora", "inputs": ["good"] * 17}, 413, "at most 16"),
    ("too many tokens", {"adapter": "lora", "inputs": ["good " * 30]}, 413, "32 tokens; this server takes"),
    ("too many characters", {"adapter": "lora", "inputs": ["x" * 100_001]}, 413, "more than 100000"),
    ("bad max_new_tokens", {"adapter": "lora", "inputs": ["a"], "max_new_tokens": 0}, 422, "max_new_tokens"),
]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(pool, offline):
    server = Server(pool, max_wait=0.01)
    with running(server) as url, httpx.Client(base_url=url, timeout=60) as client:
        for what, body, status, message in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = client.post("/v1/predict", content=body,
                                       headers={"content-type": "application/json"})
            else:
                response = client.post("/v1/predict", json=body)
            assert response.status_code == status, (what, response.text)
            assert message in response.json()["error"], (what, response.text)
            good = _predict(client, "ia3", [TEXTS[0]])  # and the next request is answered
            assert good.status_code == 200, (what, good.text)
            _same(good.json()["outputs"][0], offline["ia3"][TEXTS[0]])
        huge = client.post("/v1/predict", content=b"x" * (17 << 20))
        assert huge.status_code == 413
        assert client.get("/v1/nothing").status_code == 404
        assert client.put("/v1/predict", json={}).status_code == 405
        metrics = client.get("/metrics").text
    assert 'peftlab_requests_total{endpoint="predict",status="422"}' in metrics


def test_a_client_that_disconnects_mid_request_does_not_poison_the_batch(pool, offline):
    server = Server(pool, max_wait=0.05)
    slow_run = server.batcher.run
    server.batcher.run = lambda jobs: (time.sleep(0.5), slow_run(jobs))[1]  # a forward that takes long
    with running(server) as url, httpx.Client(base_url=url, timeout=60) as client:
        impatient = httpx.Client(base_url=url, timeout=0.2)
        with ThreadPoolExecutor(3) as clients:
            gone = clients.submit(_predict, impatient, "lora", [TEXTS[0]])
            stays = [clients.submit(_predict, client, n, [TEXTS[1]]) for n in ("lora", "ia3")]
            with pytest.raises(httpx.TimeoutException):
                gone.result()
            answers = [s.result() for s in stays]
        impatient.close()
        for name, response in zip(("lora", "ia3"), answers):
            assert response.status_code == 200
            _same(response.json()["outputs"][0], offline[name][TEXTS[1]])
        after = _predict(client, "lora", [TEXTS[2]])
        assert after.status_code == 200
        _same(after.json()["outputs"][0], offline["lora"][TEXTS[2]])


def _hostile(root: Path, lora: Path) -> dict[str, tuple[Path, str]]:
    """Adapter folders that must be refused: (folder, part of the message)."""
    out = {}
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{not json")
    out["garbage"] = (garbage, "not valid JSON")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    out["pickled"] = (pickled, "not an adapter directory")
    nan = root / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    out["nan"] = (nan, "NaN or infinite")
    out["missing"] = (root / "missing", "does not exist")
    return out


def test_hot_load_and_unload_under_traffic(saved, offline, tmp_path):
    server = Server(_pool(saved, ["lora", "ia3", "pfeiffer", "compacter", "fusion"], max_batch=16),
                    max_wait=0.01)
    stop = threading.Event()
    seen: dict[str, list[int]] = {"lora": [], "pfeiffer": [], "prompt": []}
    wrong: list[str] = []

    def traffic(client: httpx.Client, name: str) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            text = rng.choice(TEXTS)
            response = _predict(client, name, [text])
            seen[name].append(response.status_code)
            try:  # never a wrong answer, whatever is loaded or unloaded meanwhile
                assert response.status_code in (200, 404), response.text
                if response.status_code == 200:
                    _same(response.json()["outputs"][0], offline[name][text])
            except AssertionError as e:
                wrong.append(f"{name}: {e}")

    with running(server) as url, httpx.Client(base_url=url, timeout=60) as client:
        threads = [threading.Thread(target=traffic, args=(client, n)) for n in seen]
        for t in threads:
            t.start()
        try:
            _load_and_unload(client, saved, tmp_path, seen)
        finally:
            stop.set()
            for t in threads:
                t.join()
        names = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert names == ["lora", "ia3", "compacter", "prompt"]
    assert not wrong
    assert set(seen["lora"]) == {200} and len(seen["lora"]) > 5
    # answered until it was unloaded, refused after; refused until it was loaded, answered after
    assert seen["pfeiffer"] == sorted(seen["pfeiffer"]) and seen["pfeiffer"][0] == 200
    assert seen["pfeiffer"][-1] == 404
    assert seen["prompt"] == sorted(seen["prompt"], reverse=True) and seen["prompt"][-1] == 200


def _load_and_unload(client: httpx.Client, saved: dict, tmp_path: Path, seen: dict[str, list[int]]) -> None:
    _wait_for(lambda: 200 in seen["pfeiffer"])
    loaded = client.post("/v1/adapters", json={"path": str(saved["root"] / "prompt")})
    assert loaded.status_code == 201 and loaded.json()["method"] == "prompt"
    clash = client.post("/v1/adapters", json={"path": str(saved["root"] / "lora"), "name": "lora"})
    assert clash.status_code == 409 and "already" in clash.json()["error"]
    member = client.delete("/v1/adapters/pfeiffer")
    assert member.status_code == 409 and "member of fusion" in member.json()["error"]
    for name, (folder, message) in _hostile(tmp_path, saved["root"] / "lora").items():
        refused = client.post("/v1/adapters", json={"path": str(folder), "name": f"bad-{name}"})
        assert refused.status_code == 422 and message in refused.json()["error"], (name, refused.text)
    for body in ({"path": str(saved["root"] / "ia3"), "name": "a.b"}, {"name": "x"}, {"path": 3}):
        assert client.post("/v1/adapters", json=body).status_code == 422
    _wait_for(lambda: 200 in seen["prompt"])
    assert client.delete("/v1/adapters/fusion").status_code == 200
    assert client.delete("/v1/adapters/pfeiffer").status_code == 200
    assert client.delete("/v1/adapters/pfeiffer").status_code == 404
    count = len(seen["pfeiffer"])
    # a Pfeiffer request sent after the unload (refused), and LoRA traffic all along
    _wait_for(lambda: len(seen["pfeiffer"]) > count and len(seen["lora"]) > 5)


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Until ``condition()`` holds (the traffic threads got that far); fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the traffic did not get there in time"
        time.sleep(0.02)


def test_serve_command_refuses_bad_input_with_exit_2(saved, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--adapter", f"x={tmp_path / 'none'}", "--model",
                                 str(saved["model"])])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["serve", "--adapter", str(saved["root"] / "lora"), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
    result = runner.invoke(app, ["serve", "--adapter", str(saved["root"] / "lora"), "--threads", "0"])
    assert result.exit_code == 2 and "--threads 0" in result.output
    result = runner.invoke(app, ["serve", "--adapter", f"lora={saved['root'] / 'lora'}", "--model",
                                 str(saved["model"]), "--task", "classification", "--device", "cuda:3"])
    assert result.exit_code == 2 and "--device cuda:3: not usable here" in result.output
    result = runner.invoke(app, ["serve", "--adapter", str(saved["root"] / "lora"), "--model",
                                 str(saved["model"]), "--port", "0"])
    assert result.exit_code == 2 and "pass --task" in result.output  # no run.json says the task


# ---- the README's example -----------------------------------------------------------------------
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _curl(line: str, url: str) -> httpx.Response:
    """A README ``curl -s [-X METHOD] [-H header] [-d body] localhost:8000/path`` line, sent with httpx."""
    argv = shlex.split(line)
    method, headers, body, target = "GET", {}, None, None
    i = 1
    while i < len(argv):
        if argv[i] in ("-X", "-H", "-d"):
            value = argv[i + 1]
            if argv[i] == "-X":
                method = value
            elif argv[i] == "-H":
                key, _, header = value.partition(":")
                headers[key.strip()] = header.strip()
            else:
                body, method = value, "POST" if method == "GET" else method
            i += 2
        elif argv[i] == "-s":
            i += 1
        else:
            target = argv[i]
            i += 1
    path = target.split("localhost:8000", 1)[1]
    return httpx.request(method, url + path, headers=headers, content=body, timeout=60)


def test_readme_serve_example_runs(tmp_path, monkeypatch):
    from test_cli import _sentiment

    section = README.split("### Serving many adapters", 1)[1]
    lines = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    model, data = _save_bert(tmp_path / "model"), _sentiment(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        for line in lines:
            line = line.replace("$MODEL", str(model)).replace("$DATA", str(data))
            if line.startswith("peftlab serve"):
                assert line.endswith(" &")
                server = _start_serve(shlex.split(line[:-2].replace("--port 8000", f"--port {port}")), url)
            elif line.startswith("peftlab "):
                result = CliRunner().invoke(app, shlex.split(line)[1:])
                assert result.exit_code == 0, f"{line}\n{result.output}"
            else:
                response = _curl(line, url)
                assert response.status_code in (200, 201), f"{line}\n{response.text}"
                if line.endswith("/health"):
                    assert response.json()["threads"] == 1  # the server's --threads 1
                if "/v1/predict" in line:
                    outputs = response.json()["outputs"]
                    assert len(outputs) == line.count('"the ') and all(o["label"] in (0, 1) for o in outputs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    assert server is not None and server.returncode in (0, -15)  # stopped by SIGTERM, cleanly or not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(argv: list[str], url: str) -> subprocess.Popen:
    """``peftlab serve ...`` as its own process (this checkout's peftlab), once it answers /health."""
    env = {**os.environ, "PYTHONPATH": str(Path(peftlab.__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "peftlab.cli", *argv[1:]], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"peftlab serve exited: {process.stdout.read().decode()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process
        time.sleep(0.1)
    process.kill()
    raise AssertionError("peftlab serve did not answer /health within 120 s")
