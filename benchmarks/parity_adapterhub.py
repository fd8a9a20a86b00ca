"""Parity of peftlab's bottleneck and Compacter adapters with AdapterHub (`adapters` 1.3.0).

Needs the venv of ``benchmarks/adapterhub_venv.sh`` (AdapterHub requires transformers 4.57)::

    bash benchmarks/adapterhub_venv.sh
    /tmp/peftlab-ah/bin/python benchmarks/parity_adapterhub.py

On a MiniLM-shaped random BERT, for each method it compares the parameter counts, then gives
AdapterHub's adapter random weights (its default init would already be non-trivial, but random
weights of a visible size make sure every tensor matters), copies them tensor by tensor into the
peftlab adapter and compares the logits (eval mode, float32 and float64).

Where AdapterHub adds its adapter, for a BERT sub-layer with projection output ``h`` (after the
sub-layer's dropout), residual input ``x`` and LayerNorm ``LN`` (``Adapter.pre_forward`` /
``forward`` / ``post_forward`` in ``adapters/methods/modeling.py``), with ``residual_before_ln``
True as in all four configs:

* ``original_ln_before=False`` (DoubleSeqBnConfig = Houlsby, CompacterConfig):
  ``LN(x + h + A(h))`` -- peftlab's placement exactly: the adapter acts on the projection output.
* ``original_ln_before=True`` (SeqBnConfig = Pfeiffer, CompacterPlusPlusConfig):
  ``LN(x + h + A(LN(x + h)))`` -- the adapter reads the sub-layer's normalised OUTPUT, its result
  is added back before the (same, pre-trained) LayerNorm is applied a second time. peftlab's
  adapters wrap a projection and never see ``x`` or ``LN``, so they cannot express this; the
  script shows the gap, then reruns AdapterHub with ``original_ln_before=False``, which matches.

One more difference that eval-mode logits do not show: AdapterHub applies the sub-layer's dropout
to ``h`` before its adapter; peftlab's adapter acts on the projection output and the dropout then
falls on ``h + A(h)``.
"""

from __future__ import annotations

import copy
import logging

import adapters as ah
import torch
import transformers as T

import peftlab

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              vocab_size=30522, num_labels=2)
NAME = "x"


def cases() -> list[tuple[str, peftlab.AdapterConfig, ah.BnConfig]]:
    """(label, peftlab config, AdapterHub config): defaults first, then placement-matched."""
    return [
        ("pfeiffer", peftlab.BottleneckConfig.pfeiffer(), ah.SeqBnConfig()),
        ("pfeiffer, AH original_ln_before=False", peftlab.BottleneckConfig.pfeiffer(),
         ah.SeqBnConfig(original_ln_before=False)),
        ("houlsby", peftlab.BottleneckConfig.houlsby(), ah.DoubleSeqBnConfig()),
        ("compacter", peftlab.CompacterConfig(), ah.CompacterConfig()),
        ("compacter++", peftlab.CompacterConfig.plus_plus(), ah.CompacterPlusPlusConfig()),
        ("compacter++, AH original_ln_before=False", peftlab.CompacterConfig.plus_plus(),
         ah.CompacterPlusPlusConfig(original_ln_before=False)),
    ]


def ah_model(base: torch.nn.Module, config: ah.BnConfig) -> torch.nn.Module:
    model = copy.deepcopy(base)
    ah.init(model)
    model.add_adapter(NAME, config=config)
    model.set_active_adapters(NAME)
    return model.eval()


def ah_adapter_params(model: torch.nn.Module, base: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """AdapterHub's tensors for adapter NAME: every parameter the base model does not have."""
    base_names = set(dict(base.named_parameters()))
    return {k: p for k, p in model.named_parameters() if k not in base_names}


def randomise(params: dict[str, torch.nn.Parameter], seed: int) -> None:
    """Weights of a size that gives each adapter a visible effect (~ the size of its input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in params.items():
            std = 0.5 if ("phm_rule" in k or "W_left" in k or "W_right" in k) else 0.1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def copy_into_peftlab(ah_params: dict[str, torch.nn.Parameter], aset: peftlab.AdapterSet) -> int:
    """Copy every AdapterHub tensor into its peftlab counterpart; returns how many were copied.
    ``<block>.adapters.x.adapter_down.0.weight`` -> piece at ``<block>.dense``: ``down.weight``;
    PHM ``W_left / W_right / b`` -> ``w_left / w_right / bias``; ``shared_parameters.x.phm_rule``
    -> the adapter's shared ``rules``."""
    adapter = aset[NAME]
    rename = {"W_left": "w_left", "W_right": "w_right", "b": "bias", "weight": "weight", "bias": "bias"}
    done = 0
    with torch.no_grad():
        for key, value in ah_params.items():
            if ".shared_parameters." in key:
                assert key.endswith(f"{NAME}.phm_rule"), key
                adapter.shared.rules.copy_(value)
            else:
                block, rest = key.split(f".adapters.{NAME}.")
                proj, *_, leaf = rest.split(".")  # adapter_down.0.weight / adapter_up.weight
                part = {"adapter_down": "down", "adapter_up": "up"}[proj]
                target = getattr(getattr(adapter.pieces[f"{block}.dense"], part), rename[leaf])
                assert target.shape == value.shape, (key, target.shape, value.shape)
                target.copy_(value)
            done += 1
    return done


def compare(label: str, pl_config: peftlab.AdapterConfig, ah_config: ah.BnConfig,
            base: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int) -> dict[str, object]:
    ahm = ah_model(base, ah_config)
    ahp = ah_adapter_params(ahm, base)
    plm = copy.deepcopy(base).eval()
    aset = peftlab.attach(plm)
    aset.add(NAME, pl_config)
    aset.activate(NAME)
    row: dict[str, object] = {"label": label, "params_peftlab": aset[NAME].num_parameters(),
                              "params_adapterhub": sum(p.numel() for p in ahp.values())}
    randomise(ahp, seed)
    row["tensors_copied"] = f"{copy_into_peftlab(ahp, aset)}/{len(ahp)}"
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            ref, a, p = (m.to(dtype)(**batch, output_hidden_states=True) for m in (base, ahm, plm))
        kind = str(dtype)[6:]
        row[f"logits_{kind}"] = (a.logits - p.logits).abs().max().item()
        row[f"hidden_{kind}"] = (a.hidden_states[-1] - p.hidden_states[-1]).abs().max().item()
        # How far the adapter moves the last hidden state (LayerNorm'd, so entries are ~1).
        row[f"effect_{kind}"] = (a.hidden_states[-1] - ref.hidden_states[-1]).abs().max().item()
    base.float()
    return row


def main() -> None:
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "none are activated" during add_adapter
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(T.BertConfig(**MINILM)).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 30000, (4, 64), generator=g),
             "attention_mask": torch.ones(4, 64, dtype=torch.long)}
    batch["attention_mask"][1, 40:] = 0  # one padded example
    print(f"torch {torch.__version__}, transformers {T.__version__}, adapters {ah.__version__}\n")
    print("max |AdapterHub - peftlab| of the logits and of the last hidden state, in float32 and "
          "float64;\neffect: max |AdapterHub adapted - base| of the last hidden state (float32)\n")
    print(f"{'case':<42}{'peftlab':>9}{'AH':>9}{'copied':>8}{'logits32':>10}{'logits64':>10}"
          f"{'hidden32':>10}{'hidden64':>10}{'effect':>8}")
    for i, (label, pl_config, ah_config) in enumerate(cases()):
        r = compare(label, pl_config, ah_config, base, batch, seed=100 + i)
        print(f"{label:<42}{r['params_peftlab']:>9,}{r['params_adapterhub']:>9,}{r['tensors_copied']:>8}"
              + "".join(f"{r[k]:>10.1e}" for k in ("logits_float32", "logits_float64",
                                                   "hidden_float32", "hidden_float64"))
              + f"{r['effect_float32']:>8.2f}")


if __name__ == "__main__":
    main()
