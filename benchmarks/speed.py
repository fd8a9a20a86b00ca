"""Train-step time, training memory and inference latency of peftlab's methods, side by side
with HF peft, on a MiniLM-L6-shaped BERT (batch 16 x 128 tokens, 2 threads).

Everything is measured in ONE process and interleaved (round-robin over the variants each
round), and reported as ratios to baselines measured in the same run:

* the base model's forward (eval, no grad): the reference for inference latency;
* the frozen-backbone bound: forward + backward down to the input embeddings with every weight
  frozen -- the least work any method that adapts the bottom layer must do per train step.

Memory is the bytes autograd keeps for backward (distinct storages, parameters excluded) plus
the trainable state (parameters, gradients and two AdamW moments): what a method adds to the
frozen weights at the training peak. It is exact and repeatable, unlike process RSS.

    python benchmarks/speed.py                      # all methods, 10 rounds
    python benchmarks/speed.py --methods lora,ia3 --rounds 20 --json out.json
    python benchmarks/speed.py --methods lora,dora      # DoRA vs peft's use_dora and our LoRA
    python benchmarks/speed.py --methods prompt,prefix   # sequence-level methods (issue 15)

Prompt and prefix tuning (20 virtual tokens) lengthen the sequence the layers see, so their
train step is held to ``bound × (1 + virtual/real tokens) + 5%`` (20/128 here: ≤ 1.214× the
bound); the table's last lines print that target beside the measured ratio. peft's prefix
tuning cannot run a BERT classifier on transformers 5 (it looks for ``past_key_values``, which
became ``cache``): its row is then reported as unavailable with peft's own error.

With ``--adapterhub``, AdapterHub's own presets of the same methods join the run (ratios
peftlab/AH); they need its venv (transformers 4.57): ``bash benchmarks/adapterhub_venv.sh``, then
``/tmp/peftlab-ah/bin/python benchmarks/speed.py --adapterhub --fusion``. ``--fusion`` adds a
fusion of 3 Pfeiffer adapters (members frozen, the fusion trained).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
import transformers as T

import peftlab
from peftlab.measure import SavedBytes

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              vocab_size=30522, num_labels=2)


def peftlab_configs() -> dict[str, peftlab.AdapterConfig]:
    configs: dict[str, peftlab.AdapterConfig] = {
        "lora": peftlab.LoRAConfig(r=8, alpha=16, targets=("query", "value")),
        "ia3": peftlab.IA3Config(),
    }
    if hasattr(peftlab, "DoRAConfig"):  # LoRA's rank, scale and targets: the step ratio is DoRA's own cost
        configs["dora"] = peftlab.DoRAConfig(r=8, alpha=16, targets=("query", "value"))
    if hasattr(peftlab, "LoHaConfig"):  # peft's defaults (r=8, alpha=8) on peft's BERT targets
        configs["loha"] = peftlab.LoHaConfig(r=8, alpha=8, targets=("query", "value"))
        configs["lokr"] = peftlab.LoKrConfig(r=8, alpha=8, targets=("query", "value"))
    if hasattr(peftlab, "BottleneckConfig"):
        configs["pfeiffer"] = peftlab.BottleneckConfig.pfeiffer()
        configs["houlsby"] = peftlab.BottleneckConfig.houlsby()
    if hasattr(peftlab, "CompacterConfig"):
        configs["compacter"] = peftlab.CompacterConfig()
        configs["compacter++"] = peftlab.CompacterConfig.plus_plus()
    if hasattr(peftlab, "VeRAConfig"):
        configs["vera"] = peftlab.VeRAConfig(r=256, targets=("query", "value"))  # peft's default rank
    if hasattr(peftlab, "PromptTuningConfig"):
        configs["prompt"] = peftlab.PromptTuningConfig(num_virtual_tokens=VIRTUAL)
        configs["prefix"] = peftlab.PrefixTuningConfig(num_virtual_tokens=VIRTUAL)
    return configs


#: Virtual tokens of the prompt and prefix rows; the batch has 128 real tokens per example.
VIRTUAL = 20
REAL = 128


def peft_model(base: torch.nn.Module, method: str) -> torch.nn.Module | None:
    """The same adapter built with HF peft (equal targets and sizes), or None if peft lacks it."""
    try:
        import peft
    except ImportError:
        return None
    ffn_down = r".*layer\.\d+\.output\.dense$"
    if method in ("lora", "dora"):
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                                 use_dora=method == "dora")
    elif method == "ia3":
        # Explicit regexes: peft's BERT default also hits attention.output.dense.
        config = peft.IA3Config(target_modules=rf".*\.(key|value)$|{ffn_down}", feedforward_modules=ffn_down)
    elif method == "loha":
        config = peft.LoHaConfig(r=8, alpha=8, target_modules=["query", "value"])
    elif method == "lokr":
        config = peft.LoKrConfig(r=8, alpha=8, target_modules=["query", "value"])
    elif method == "vera":
        config = peft.VeraConfig(r=256, vera_dropout=0.0, target_modules=["query", "value"])
    elif method in ("prompt", "prefix"):
        # peft's prompt learning needs its sequence-classification class, which also trains the
        # classifier: frozen again below, so that both sides train the virtual tokens only.
        kind = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
        model = peft.get_peft_model(copy.deepcopy(base),
                                    kind(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL))
        for name, p in model.named_parameters():
            if "prompt_encoder" not in name:
                p.requires_grad_(False)
        try:  # peft's prefix tuning refuses BERT on transformers 5; report that instead of a figure
            with torch.no_grad():
                model.eval()(**make_batch())
        except Exception as e:  # peft raises ValueError; any failure means no peft row
            print(f"peft:{method} unavailable: {type(e).__name__}: {e}")
            return None
        return model
    else:
        return None
    return peft.get_peft_model(copy.deepcopy(base), config)


FUSION_MEMBERS = ("a", "b", "c")
#: Methods also compared with another peftlab method in the same run (issue 14: DoRA's step
#: at most 1.15x our LoRA's, and at most 0.8x peft's DoRA, the "/peft" column).
RELATIVE = {"dora": "lora"}


def peftlab_fusion(base: torch.nn.Module) -> torch.nn.Module | None:
    """A fusion of 3 Pfeiffer adapters set up for training, or None if peftlab lacks fusion."""
    if not hasattr(peftlab, "FusionConfig"):
        return None
    model = copy.deepcopy(base)
    adapters = peftlab.attach(model)
    for name in FUSION_MEMBERS:
        adapters.add(name, peftlab.BottleneckConfig.pfeiffer())
    adapters.add_fusion("fusion", FUSION_MEMBERS, peftlab.FusionConfig())
    adapters.activate("fusion")
    adapters.train("fusion")
    return model


def adapterhub_model(base: torch.nn.Module, method: str) -> torch.nn.Module | None:
    """The method built with AdapterHub's preset config and set up for training, or None if
    AdapterHub lacks it. Its Pfeiffer and Compacter++ presets feed the adapter the sub-layer's
    LayerNorm'd output (``original_ln_before``) and so compute one LayerNorm more per block
    than peftlab's; see benchmarks/parity_adapterhub.py."""
    import adapters as ah

    presets = {"pfeiffer": ah.SeqBnConfig, "houlsby": ah.DoubleSeqBnConfig,
               "compacter": ah.CompacterConfig, "compacter++": ah.CompacterPlusPlusConfig}
    if method not in presets and method != "fusion":
        return None
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "none are activated" while adding
    model = copy.deepcopy(base)
    ah.init(model)
    if method == "fusion":
        for name in FUSION_MEMBERS:
            model.add_adapter(name, config=ah.SeqBnConfig())
        model.add_adapter_fusion(ah.Fuse(*FUSION_MEMBERS))  # "dynamic": Q, K and V, as peftlab's
        model.train_adapter_fusion(ah.Fuse(*FUSION_MEMBERS))
    else:
        model.add_adapter(method, config=presets[method]())
        model.train_adapter(method)
    return model


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (16, 128), generator=g),
            "attention_mask": torch.ones(16, 128, dtype=torch.long),
            "labels": torch.randint(0, 2, (16,), generator=g)}


class Variant:
    """One model set up for training: a step function, and its memory."""

    def __init__(self, name: str, model: torch.nn.Module, bound: bool = False) -> None:
        self.name, self.model, self.bound = name, model.train(), bound
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        if bound:  # gradients flow down to the embeddings' output, no weight gets one
            embeddings = model.get_input_embeddings()
            self.hook = model.base_model.embeddings.register_forward_hook(
                lambda m, i, out: out.requires_grad_()) if embeddings is not None else None
        self.times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**batch).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss

    def memory(self, batch: dict[str, torch.Tensor]) -> int:
        saved = SavedBytes(self.model)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = self.model(**batch).loss
        loss.backward()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        state = sum(p.numel() * p.element_size() for p in self.params) * 4  # param, grad, 2 moments
        return saved.total + state


def vs(figures: dict[str, float], name: str, tool: str) -> str:
    """``name``'s figure over that of its peer built with ``tool`` (peft, adapterhub), or blank."""
    peer = name.replace("peftlab:", f"{tool}:")
    return f"{figures[name] / figures[peer]:8.3f}" if peer != name and peer in figures else f"{'':>8}"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma list (default: every available method)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=None, help="override the model's dropout (0.1)")
    ap.add_argument("--no-peft", action="store_true", help="skip the HF peft side")
    ap.add_argument("--adapterhub", action="store_true", help="add AdapterHub's versions (its venv)")
    ap.add_argument("--fusion", action="store_true", help="add a fusion of 3 Pfeiffer adapters")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.adapterhub:
        try:
            import adapters  # noqa: F401
        except ImportError:
            print("--adapterhub: `adapters` is not installed here (see benchmarks/adapterhub_venv.sh); "
                  "running without it")
            args.adapterhub = False

    extra = {} if args.dropout is None else {"hidden_dropout_prob": args.dropout,
                                             "attention_probs_dropout_prob": args.dropout}
    base = T.BertForSequenceClassification(T.BertConfig(**MINILM, **extra))
    base.requires_grad_(False)
    configs = peftlab_configs()
    methods = list(configs) if args.methods == "all" else args.methods.split(",")
    batch = make_batch()

    train: list[Variant] = [Variant("bound", copy.deepcopy(base), bound=True)]
    infer: dict[str, torch.nn.Module] = {"base": copy.deepcopy(base).eval()}
    for m in methods:
        model = copy.deepcopy(base)
        adapters = peftlab.attach(model)
        adapters.add(m, configs[m])
        adapters.activate(m)
        adapters.train(m)
        train.append(Variant(f"peftlab:{m}", model))
        infer[f"peftlab:{m}"] = model
        if configs[m].mergeable:
            merged = copy.deepcopy(base)
            a = peftlab.attach(merged)
            a.add(m, configs[m])
            a.activate(m)
            a.merge(m)
            infer[f"peftlab:{m}:merged"] = merged.eval()
        pm = None if args.no_peft else peft_model(base, m)
        if pm is not None:
            train.append(Variant(f"peft:{m}", pm))
            infer[f"peft:{m}"] = pm
            if configs[m].mergeable:
                merged = peft_model(base, m)
                merged.merge_adapter()
                infer[f"peft:{m}:merged"] = merged.eval()
    added = {"peftlab:fusion": peftlab_fusion(base)} if args.fusion else {}
    if args.adapterhub:
        for m in methods + (["fusion"] if args.fusion else []):
            added[f"adapterhub:{m}"] = adapterhub_model(base, m)
    for name, model in added.items():
        if model is not None:
            train.append(Variant(name, model))
            infer[name] = model

    params = {v.name: sum(p.numel() for p in v.params) for v in train}
    memory = {v.name: v.memory(batch) for v in train}
    for v in train:  # warm-up
        v.step(batch)
    infer_times: dict[str, list[float]] = {k: [] for k in infer}
    for r in range(args.rounds):
        # A new order each round, so that no variant always runs first (or right after training).
        order = random.Random(r)
        for v in order.sample(train, len(train)):
            v.times.append(timed(lambda v=v: v.step(batch)))
        with torch.no_grad():
            for k in order.sample(list(infer), len(infer)):
                infer[k].eval()
                infer_times[k].append(timed(lambda model=infer[k]: model(**batch)))
        for v in train:
            v.model.train()
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    med = {v.name: statistics.median(v.times) for v in train}
    imed = {k: statistics.median(t) for k, t in infer_times.items()}
    bound, base_fwd = med["bound"], imed["base"]
    print(f"\ntorch {torch.__version__}, transformers {T.__version__}, {args.threads} threads, "
          f"batch 16x128, dropout {0.1 if args.dropout is None else args.dropout}, {args.rounds} rounds")
    print(f"base forward {base_fwd * 1e3:.1f} ms; frozen-backbone bound {bound * 1e3:.1f} ms "
          f"({bound / base_fwd:.2f}x the forward)\n")
    print(f"{'train step':<24}{'ms':>9}{'/bound':>9}{'/peft':>8}{'/AH':>8}{'params':>10}{'memory MB':>11}"
          f"{'/peft':>8}{'/AH':>8}")
    for v in train:
        print(f"{v.name:<24}{med[v.name] * 1e3:9.1f}{med[v.name] / bound:9.3f}{vs(med, v.name, 'peft')}"
              f"{vs(med, v.name, 'adapterhub')}{params[v.name]:>10,}{memory[v.name] / 2**20:11.1f}"
              f"{vs(memory, v.name, 'peft')}{vs(memory, v.name, 'adapterhub')}")
    for method, peer in RELATIVE.items():
        ours, theirs = f"peftlab:{method}", f"peftlab:{peer}"
        if ours in med and theirs in med:
            print(f"{ours} / {theirs}: train step {med[ours] / med[theirs]:.3f}, "
                  f"memory {memory[ours] / memory[theirs]:.3f}")
    for v in train:  # the sequence methods' target: the bound for a sequence of real + virtual
        if v.name.startswith("peftlab:") and v.name[8:] in ("prompt", "prefix"):
            target = (1 + VIRTUAL / REAL) * 1.05
            verdict = "ok" if med[v.name] / bound <= target else "OVER"
            print(f"{v.name}: step {med[v.name] / bound:.3f}x the bound; target <= {target:.3f}x "
                  f"(1 + {VIRTUAL}/{REAL} virtual/real tokens, +5%): {verdict}")
    print(f"\n{'inference':<24}{'ms':>9}{'/base':>9}{'/peft':>8}{'/AH':>8}")
    for k in infer:
        print(f"{k:<24}{imed[k] * 1e3:9.1f}{imed[k] / base_fwd:9.3f}{vs(imed, k, 'peft')}"
              f"{vs(imed, k, 'adapterhub')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": {"torch": torch.__version__, "transformers": T.__version__,
                                    "peftlab": peftlab.__version__, "python": platform.python_version()},
                       "machine": platform.processor() or platform.machine(), "threads": args.threads,
                       "rounds": args.rounds, "train_ms": {k: v * 1e3 for k, v in med.items()},
                       "train_ms_all": {v.name: [t * 1e3 for t in v.times] for v in train},
                       "memory_bytes": memory, "params": params,
                       "infer_ms": {k: v * 1e3 for k, v in imed.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
