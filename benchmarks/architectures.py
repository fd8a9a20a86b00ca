"""Coverage of role inference: every model type of transformers' causal-LM, sequence-
classification and seq2seq auto-mappings, built tiny and random from its config class.

For each type: shrink the config's sizes (hidden 64, 4 heads, 2 kv-heads, head_dim 16,
intermediate 256, 6 layers, vocab 512, where those attributes exist; hybrids keep an attention
layer), build the task model
(causal LM, else seq2seq LM, else sequence classification), then add ``LoRAConfig()``
(roles query, value) and ``IA3Config()`` (roles key, value, ffn_down) with the default role
map (built-in or inferred), and run a forward and a backward pass with both active.

A type *passes* when both adapters attach through roles (no regex), the forward and backward
run, and every adapter gradient is finite with at least one non-zero. A type that cannot be
built from its config with small sizes (validation errors, missing optional libraries, over
30M parameters after shrinking) "does not build" and is reported with the reason, outside the
percentage.

    python benchmarks/architectures.py                  # all types, writes results/architectures.md
    python benchmarks/architectures.py gpt2 bloom       # some types, prints only

Each type runs in a worker process on one thread with a time limit; a crash or a timeout
fails that type only.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {
    64: ("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "model_dim", "d_embed",
         "emb_dim"),
    # 6 layers, so that hybrids interleaving attention with other layers keep an attention layer
    6: ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
        "num_decoder_layers", "num_encoder_layers"),
    2: ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
        "num_experts_per_tok"),
    1: ("n_group", "topk_group"),
    32: ("kv_lora_rank", "q_lora_rank"),
    4: ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
        "decoder_attention_heads", "num_experts", "num_local_experts", "n_routed_experts"),
    16: ("head_dim", "d_kv", "kv_channels", "attention_head_dim", "rotary_dim", "qk_rope_head_dim",
         "qk_nope_head_dim", "v_head_dim"),
    256: ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
          "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
          "dim_feedforward", "expert_intermediate_size"),
    512: ("vocab_size", "entity_vocab_size"),
}
VOCAB = 512
MAX_PARAMETERS = 30_000_000
TIME_LIMIT_S = 90
RESULTS = Path(__file__).resolve().parent / "results"


def model_types() -> dict[str, tuple[str, str]]:
    """model_type -> (task, model class name), causal LM first, then seq2seq, then classification."""
    from transformers.models.auto import modeling_auto as auto

    out: dict[str, tuple[str, str]] = {}
    for task, mapping in (("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("seq2seq-lm", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                          ("seq-cls", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)):
        for model_type, cls in mapping.items():
            out.setdefault(model_type, (task, cls))
    return dict(sorted(out.items()))


def small_config(config_class: Any, depth: int = 0) -> Any:
    """``config_class`` with every size attribute it has set small (sub-configs too)."""
    default = config_class()
    parameters = set(inspect.signature(config_class.__init__).parameters)
    settable = parameters | set(vars(default))
    changes: dict[str, Any] = {}
    for value, names in SIZES.items():
        for name in names:
            current = getattr(default, name, None)
            if name in settable and isinstance(current, int) and not isinstance(current, bool):
                changes[name] = value
    layers = next((getattr(default, n) for n in SIZES[6] if isinstance(getattr(default, n, None), int)),
                  None)
    if "kv_lora_rank" in changes:  # multi-head latent attention: keys have all the heads
        changes.update({n: 4 for n in SIZES[2][:3] if n in changes})
    # Hybrids choosing their attention layers by index (Bamba's attn_layer_indices, None by
    # default, which leaves no attention at all): one attention layer. Only where the index list
    # is a parameter of the config: Zamba2 derives its hybrid_layer_ids from its layer types.
    for name in ("attn_layer_indices", "hybrid_layer_ids"):
        if name in parameters and (getattr(default, name, None) is None
                                   or isinstance(getattr(default, name), list)):
            changes[name] = [1]
    for name, current in vars(default).items():
        if name.endswith("_token_id") and isinstance(current, int) and current >= VOCAB:
            changes[name] = 1  # special tokens must fit the small vocabulary
        if isinstance(current, list) and layers and len(current) == layers > 6 and name in settable:
            changes[name] = current[:6]  # per-layer lists (layer_types) follow the layer count
            if all(isinstance(kind, str) for kind in current):
                # ... keeping every kind of layer of the full list (Zamba2's first "hybrid"
                # attention layer is the 7th): missing kinds replace the last ones
                missing = [kind for kind in dict.fromkeys(current) if kind not in current[:6]]
                if missing:
                    changes[name] = current[:6 - len(missing)] + missing
    for name, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        if isinstance(sub, type) and depth < 2:
            try:
                changes[name] = small_config(sub, depth + 1).to_dict()
            except Exception:  # noqa: BLE001 - keep the sub-config's defaults
                pass
    return config_class(**changes)


def check(model_type: str, task: str, class_name: str) -> dict[str, Any]:
    """Build one tiny model and try LoRA and (IA)³ on it by roles."""
    import torch
    import transformers

    import peftlab
    from peftlab.infer import infer_role_map
    from peftlab.roles import ROLE_MAPS

    record: dict[str, Any] = {"type": model_type, "task": task, "class": class_name}
    try:
        config = small_config(transformers.CONFIG_MAPPING[model_type])
        model_class = getattr(transformers, class_name)
        with torch.device("meta"):
            size = sum(p.numel() for p in model_class(config).parameters())
        if size > MAX_PARAMETERS:
            raise RuntimeError(f"{size / 1e6:.0f}M parameters after shrinking the config")
        torch.manual_seed(0)
        model = model_class(config).train()
        if hasattr(model, "set_default_language") and getattr(config, "languages", None):
            model.set_default_language(config.languages[0])  # X-MOD needs one to run
    except Exception as e:  # noqa: BLE001 - any failure to build is reported, not raised
        record["built"] = False
        record["error"] = _short(e)
        return record
    record["built"] = True
    record["map"] = "built-in" if model_type in ROLE_MAPS else "inferred"
    inferred = infer_role_map(model)
    record["roles"] = sorted(inferred.roles)
    record["role_notes"] = sorted({r.note for r in map(inferred.get, inferred.roles)
                                   if r is not None and r.note})
    record["notes"] = list(inferred.notes)
    try:
        with torch.no_grad():
            _forward(model, config)
    except Exception as e:  # noqa: BLE001 - the shrunk config itself does not run
        record["built"] = False
        record["error"] = "base model forward: " + _short(e)
        return record
    adapters = peftlab.attach(model)
    for name, cfg in (("lora", peftlab.LoRAConfig()), ("ia3", peftlab.IA3Config())):
        try:
            adapters.add(name, cfg)
            record[f"{name}_sites"] = adapters.summary()[name].sites
        except Exception as e:  # noqa: BLE001
            record[f"{name}_error"] = "attach: " + _short(e)
    added = [n for n in ("lora", "ia3") if n in adapters]
    if not added:
        return record
    try:
        adapters.activate(*added)
        for p in model.parameters():
            p.requires_grad_(False)
        for n in added:
            for p in adapters.parameters(n):
                p.requires_grad_(True)
        _forward(model, config).backward()
    except Exception as e:  # noqa: BLE001
        for n in added:
            record[f"{n}_error"] = "forward/backward: " + _short(e)
        return record
    for n in added:
        # A site outside the text path (a vision tower fed no image) gets no gradient; the rest
        # must be finite, and not all zero.
        grads = [p.grad for p in adapters.parameters(n) if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):
            record[f"{n}_error"] = "non-finite gradient"
        elif not any(bool(g.abs().sum() > 0) for g in grads):
            record[f"{n}_error"] = "no non-zero gradient"
        else:
            record[f"{n}_ok"] = True
    return record


def _forward(model: Any, config: Any) -> Any:
    """A scalar from one forward pass on random token ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, min(VOCAB, getattr(config, "vocab_size", VOCAB) or VOCAB), (2, 8), generator=g)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :4]
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # hybrids' caches fail on a tiny config with no attention layer
    out = model(**inputs)
    logits = out.logits if getattr(out, "logits", None) is not None else out[0]
    return logits.float().square().mean()


def _short(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 240 else text[:237] + "..."


# ---- running every type in worker processes ---------------------------------------------------
def worker() -> None:
    """Read model types from stdin, one per line; write one JSON record per line."""
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    types = model_types()
    for line in sys.stdin:
        model_type = line.strip()
        start = time.perf_counter()
        record = check(model_type, *types[model_type])
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(record), flush=True)


def run_all(types: list[str]) -> list[dict[str, Any]]:
    """Check ``types`` one at a time in a worker, restarted after a crash or a timeout."""
    records, todo = [], list(types)
    proc = None
    while todo:
        if proc is None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    env=env)
        model_type = todo.pop(0)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(model_type + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], TIME_LIMIT_S + 30)  # + worker start
        line = proc.stdout.readline() if ready else ""
        if line:
            record = json.loads(line)
        else:
            proc.kill()
            proc.wait()
            proc = None
            reason = "timed out" if not ready else "the worker process crashed"
            record = {"type": model_type, "built": False, "error": reason}
        records.append(record)
        print(_line(record), flush=True)
    if proc is not None:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
    return records


def _line(r: dict[str, Any]) -> str:
    if not r.get("built"):
        return f"{r['type']:<28} does not build: {r['error']}"
    status = "pass" if passed(r) else "FAIL " + (r.get("lora_error") or r.get("ia3_error") or "")
    return f"{r['type']:<28} {r['map']:<9} {','.join(r['roles'])}  {status}"


def passed(r: dict[str, Any]) -> bool:
    return bool(r.get("lora_ok") and r.get("ia3_ok"))


def write_table(records: list[dict[str, Any]], seconds: float, path: Path) -> str:
    import torch
    import transformers

    built = [r for r in records if r.get("built")]
    ok = [r for r in built if passed(r)]
    inferred = [r for r in built if r["map"] == "inferred"]
    inferred_ok = [r for r in inferred if passed(r)]
    figure = (f"{len(ok)} of {len(built)} model types that build pass "
              f"({100 * len(ok) / max(len(built), 1):.1f}%); {len(inferred_ok)} of {len(inferred)} "
              f"with an inferred role map ({100 * len(inferred_ok) / max(len(inferred), 1):.1f}%). "
              f"{len(records)} types tried, {len(records) - len(built)} do not build.")
    lines = [
        "# Role coverage across transformers architectures",
        "",
        f"**{figure}**",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; "
        f"`python benchmarks/architectures.py` ({seconds / 60:.1f} min, one thread).",
        "",
        "Every model type of transformers' causal-LM, seq2seq-LM and sequence-classification",
        "auto-mappings, built tiny and random from its config class (sizes shrunk: hidden 64, 4",
        "heads, 2 kv-heads, head_dim 16, intermediate 256, 6 layers, vocab 512). A type **passes**",
        "when `LoRAConfig()` (roles `query`, `value`) and `IA3Config()` (roles `key`, `value`,",
        "`ffn_down`) both attach through the default role map - the built-in one, else the one",
        "inferred from the model's structure - with no regex, and a forward and backward pass",
        "with both active gives finite adapter gradients, not all zero. A role on a fused",
        "projection whose layout peftlab does not know covers the whole module (its note is",
        "under *notes*); that still counts as attached. Types that cannot be built from their",
        "config with small sizes are listed with the reason and left out of the percentage.",
        "",
        "| model type | task | map | roles found | LoRA | (IA)³ | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if not r.get("built"):
            continue
        notes = "; ".join(r.get("role_notes", []) + [e for e in (r.get("lora_error"), r.get("ia3_error"))
                                                        if e])
        lines.append(f"| {r['type']} | {r['task']} | {r['map']} | {', '.join(r['roles']) or '-'} | "
                     f"{'ok' if r.get('lora_ok') else 'fail'} | {'ok' if r.get('ia3_ok') else 'fail'} | "
                     f"{_cell(notes)} |")
    lines += ["", "## Failures by cause", ""]
    lines += [f"- {cause}: {len(types)} ({', '.join(types)})" for cause, types in _causes(built).items()]
    lora = sum(bool(r.get("lora_ok")) for r in built)
    lines += ["", f"`LoRAConfig()` alone attaches and trains on {lora} of {len(built)} "
              f"({100 * lora / max(len(built), 1):.1f}%)."]
    lines += ["", "## Types that do not build", "", "| model type | reason |", "|---|---|"]
    lines += [f"| {r['type']} | {_cell(r['error'])} |" for r in records if not r.get("built")]
    path.write_text("\n".join(lines) + "\n")
    return figure


def _causes(built: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Failed types grouped by what went wrong."""
    causes: dict[str, list[str]] = {}
    for r in built:
        if passed(r):
            continue
        error = r.get("lora_error") or r.get("ia3_error") or ""
        if "role 'query'" in error:
            cause = "no attention projections found (state-space, RWKV, FNet, XLNet's parameter " \
                    "matrices, I-BERT's QuantLinear, queries from experts (JetMoE) or a gated " \
                    "low-rank path (AXK2))"
        elif "role 'ffn_down'" in error:
            cause = "(IA)³ finds no `ffn_down`: the feed-forward layers are routed experts only " \
                    "(3-D parameters, not Linear); LoRA passes"
        else:
            cause = error
        causes.setdefault(cause, []).append(r["type"])
    return causes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker()
        return
    types = argv or list(model_types())
    start = time.perf_counter()
    records = run_all(types)
    seconds = time.perf_counter() - start
    if not argv:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "architectures.json").write_text(json.dumps(records, indent=1) + "\n")
        print(write_table(records, seconds, RESULTS / "architectures.md"))
    built = [r for r in records if r.get("built")]
    print(f"{sum(map(passed, built))}/{len(built)} pass; {math.ceil(seconds)} s")


if __name__ == "__main__":
    main(sys.argv[1:])
