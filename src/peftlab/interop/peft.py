"""HF ``peft``'s adapter format: export peftlab LoRA, DoRA, (IA)³, VeRA, LoHa and LoKr adapters to
it, import them from it.

peft saves ``adapter_config.json`` (its config dataclass as JSON) and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module>.<tensor>``:

    LoRA    <module>.lora_A.weight [r, in] and <module>.lora_B.weight [out, r]; the update is
            scaled by lora_alpha/r (use_rslora: lora_alpha/√r); rank_pattern and alpha_pattern
            override r and lora_alpha for modules whose name ends in a match of their key
    DoRA    LoRA's tensors (``use_dora: true``) plus <module>.lora_magnitude_vector [out], the
            magnitude m of W' = m ⊙ (W + s·B·A)/‖W + s·B·A‖ (see :mod:`peftlab.methods.dora`)
    (IA)³   <module>.ia3_l, [out, 1] rescaling the output, or [1, in] rescaling the input for
            modules in feedforward_modules
    VeRA    <module>.vera_lambda_b [out] and <module>.vera_lambda_d [r]; once per adapter the shared
            projections base_model.vera_A [r, in_max] and base_model.vera_B [out_max, r] (none with
            save_projection=false: peft regenerates them from projection_prng_key)
    LoHa    <module>.hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a, hada_w2_b; scaled by alpha/r
    LoKr    <module>.lokr_w1 (or lokr_w1_a, lokr_w1_b) and lokr_w2 (or lokr_w2_a, lokr_w2_b), which
            ones from r, decompose_both and decompose_factor; scaled by alpha/r
            (see :mod:`peftlab.methods.loha` and :mod:`peftlab.methods.lokr`)
    extras  <module>.<param> of every module in modules_to_save (a classifier head, ...)
    experts LoRA on 3-D expert parameters (``target_parameters``, peft's ``lora.ParamWrapper``):
            <experts>.lora_A.weight [E·r, in] and <experts>.lora_B.weight [out, r·E] (see
            :class:`peftlab.methods.lora.ExpertLoRA` for which rows belong to which expert). When
            several parameters of one experts module are targeted, peft nests one wrapper per
            parameter, and the key says which: the parameter registered first in the module is the
            innermost, ``<experts>.base_layer.base_layer...``, the last one ``<experts>``

How peftlab maps onto it:

- LoRA on a fused projection (GPT-2's ``c_attn`` with query+value) is one rank ``parts·r`` update
  of the whole module whose ``B`` is zero outside the targeted features. It is exported exactly as
  that, with the alpha that keeps the update's scale (rank_pattern/alpha_pattern where modules of
  one adapter end up with different ranks).
- (IA)³ on a fused projection is exported as a full vector, ones on the untargeted features.
- Import builds a config whose targets are the module names found in the file, as anchored
  regexes, so the adapter acts exactly where the file says whatever defaults peft used (its BERT
  (IA)³ default also rescales ``attention.output.dense``).
- LoRA on routed experts is exported with ``target_parameters`` (each parameter's full name) and
  imported from it; peftlab's expert LoRA has peft's exact layout, so both ways are a renaming of
  keys, and the parameter counts are equal. (IA)³ on routed experts cannot be exported: peft's
  (IA)³ has no ``target_parameters``, so the export refuses rather than drop the vectors.

Import checks everything (config, every key, every shape) before the model changes and never
reads a pickle (``adapter_model.bin``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.config import clip
from peftlab.errors import AdapterLoadError, ConfigError, PeftlabError
from peftlab.experts import AdaptedExperts, expert_parameters, experts_layout
from peftlab.interop.codec import PeftCodec, Tensors
from peftlab.io import CONFIG_FILE, FORMAT, WEIGHTS_FILE, read_config, read_tensors, write_dir_atomic
from peftlab.layer import AdaptedLayer, weight_out_in
from peftlab.methods import REGISTRY, method_for
from peftlab.names import check_name
from peftlab.sites import linear_modules

if TYPE_CHECKING:
    from peftlab.adapter_set import AdapterSet

PREFIX = "base_model.model."
PICKLE_FILE = "adapter_model.bin"

# Config keys of every peft type that carry what we map, or that only matter while a peft adapter
# is created or trained; each method's codec adds its own (PeftCodec.config_keys).
_COMMON_KEYS = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out",
}
# Initialisations after which a peft LoRA is a plain ``W + s·B·A`` on the unchanged base weights
# (PiSSA, OLoRA, LoftQ, CorDA, ... rewrite the base weights, so their adapters need that base).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Model class name endings -> peft task type, so peft builds the matching PeftModel subclass.
_TASKS = (
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
    ("MarianMTModel", "SEQ_2_SEQ_LM"),  # (other encoder-decoders end in ForConditionalGeneration)
)
# Heads that peft's task classes add to modules_to_save on their own.
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}


# ---- export -----------------------------------------------------------------------------------
def export_peft(adapters: AdapterSet, name: str, path: Path) -> Path:
    """Write adapter ``name`` (LoRA, (IA)³, VeRA) as a peft adapter directory at ``path`` (atomically),
    with its extra modules (see :meth:`AdapterSet.train`) as peft's ``modules_to_save``.
    ``peft.PeftModel.from_pretrained(base_model, path)`` then computes what peftlab computes."""
    adapter = adapters[name]
    model = adapters.model
    codec = method_for(adapter.config).peft
    if codec is None:
        raise ConfigError(f"peft's format has no {adapter.config.method} adapters ({name!r}); it holds "
                          f"{', '.join(m.name for m in REGISTRY.values() if m.peft)} adapters")
    experts = [s.module for s in adapter.sites if s.num_experts is not None]
    if experts and not codec.target_parameters:
        raise ConfigError(
            f"{adapter.config.method} adapter {name!r} acts on routed experts' 3-D parameters "
            f"({experts[0]}, ...), which peft's {codec.peft_type} cannot express (it has no "
            "target_parameters); it cannot be exported to peft. Keep it in peftlab's format (save), "
            "or merge it into the weights")
    if codec.sequence:
        return _export_sequence(adapters, adapter, codec, path)
    fields, found = codec.export(adapter, _expert_keys(model, experts))
    tensors = {_full_key(codec, key): t for key, t in found.items()}
    linear = dict(linear_modules(model))
    names = list(linear)
    sites = [s.module for s in adapter.sites if s.num_experts is None]
    fields["target_modules"] = _as_peft_names(sites, names, dotted=True)
    if experts:
        fields["target_parameters"] = experts  # full names: peft matches them exactly
    if fields["peft_type"] == "LORA":
        _refuse_peft_rewrite(model, fields)
    if "feedforward_modules" in fields:
        fields["feedforward_modules"] = _as_peft_names(fields["feedforward_modules"], names, dotted=False)
    if codec.fan_in_fan_out:
        # peft warns and flips this flag unless it matches the layer type (transformers Conv1D).
        fields["fan_in_fan_out"] = bool(sites) and all(isinstance(linear[s], Conv1D) for s in sites)
    return _write(model, fields, tensors, list(adapter.extras), PREFIX, path)


def _write(model: nn.Module, fields: dict[str, Any], tensors: Tensors, extras: list[str],
           prefix: str, path: Path) -> Path:
    """The peft directory: ``fields`` (``peft_type`` first) and ``tensors`` plus the extras, which
    peft calls ``modules_to_save`` and keys under ``prefix``; checked to mean the same to peft."""
    # peft wraps every module whose name ends with a modules_to_save entry (task classes add
    # their heads) and refuses to load unless the file holds the tensors of each one.
    module_names = _module_names(model)
    if _suffix_hits(module_names, extras) != set(extras):
        raise ConfigError(f"peft would also treat {sorted(_suffix_hits(module_names, extras) - set(extras))}"
                          f" as extra modules (it matches modules_to_save {extras} as name suffixes)")
    task = _task_type(model)
    if task in _TASK_HEADS and _suffix_hits(module_names, extras + _TASK_HEADS[task]) != set(extras):
        task = None  # peft's task class would demand head tensors this adapter does not carry
    tensors = dict(tensors)
    for module in extras:
        extra = model.get_submodule(module)
        if any(isinstance(m, (AdaptedLayer, AdaptedExperts)) for m in extra.modules()):
            raise ConfigError(f"extra module {module!r} holds adapted layers; peft cannot save a module "
                              "both in modules_to_save and as an adapter target")
        for key, t in extra.state_dict().items():
            tensors[f"{prefix}{module}.{key}"] = t
    config = {
        "peft_type": fields.pop("peft_type"),
        "task_type": task,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        **fields,
        "modules_to_save": extras or None,
    }
    # clone: safetensors refuses tensors that share memory (tied weights in an extra module).
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    blob = json.dumps(config, indent=2, sort_keys=True).encode()
    return write_dir_atomic(path, {CONFIG_FILE: blob, WEIGHTS_FILE: weights})


# peft keys the extra modules of prompt-learning adapters one level up: its PeftModel's
# base_model is the transformers model itself there.
SEQUENCE_PREFIX = "base_model."


def _export_sequence(adapters: AdapterSet, adapter: Any, codec: PeftCodec, path: Path) -> Path:
    """A prompt-learning adapter (prompt, prefix tuning): the codec's own tensors, the extras."""
    fields, found = codec.export(adapter, {})
    return _write(adapters.model, fields, dict(found), list(adapter.extras), SEQUENCE_PREFIX, path)


def _import_sequence(adapters: AdapterSet, path: Path, name: str, codec: PeftCodec,
                     data: dict[str, Any]) -> str:
    """Load a peft prompt-learning adapter: the codec's own tensors and the extras, all checked
    before the model changes."""
    shapes = _tensor_shapes(path)
    own = {k: s for k, s in shapes.items() if not k.startswith(SEQUENCE_PREFIX)}
    others = [k[len(SEQUENCE_PREFIX):] for k in shapes if k.startswith(SEQUENCE_PREFIX)]
    try:
        config, wanted = codec.sequence_config(data, adapters.model, own)
    except ConfigError as e:
        raise AdapterLoadError(f"{path}: {e}") from None
    expected = dict(wanted)
    extras = _extra_modules(adapters.model, data, others, path)
    expected.update(_extra_shapes(extras, SEQUENCE_PREFIX))
    try:
        built = adapters.build(config)
    except PeftlabError as e:
        raise AdapterLoadError(f"{path} does not fit this model: {e}") from None
    tensors = read_tensors(path, expected)
    own = {k: t for k, t in tensors.items() if k in wanted}
    codec.load_sequence(next(iter(built.pieces.values())), own, data)
    for module, m in extras.items():
        prefix = f"{SEQUENCE_PREFIX}{module}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    built.extras = tuple(extras)
    adapters.install(name, built)
    return name


def _refuse_peft_rewrite(model: nn.Module, fields: dict[str, Any]) -> None:
    """Refuse when peft would load this LoRA config onto other weights than it names.

    With transformers 5, peft rewrites the LoRA config of MoE model types whose checkpoints were
    converted from transformers 4 (DeepSeek-V3, GLM-4-MoE, ERNIE-4.5-MoE, Qwen3-MoE, OLMoE, ...):
    every ``target_modules`` entry ending in ``gate_proj``/``up_proj``/``down_proj`` becomes the
    routed experts' ``gate_up_proj``/``down_proj`` (rank doubled for gate+up), and a regex becomes
    bare leaf names. A LoRA on a shared expert's or a dense layer's Linear ``down_proj`` would then
    land on the routed experts. peft's own converter is asked whether it changes this config; when
    peft is not installed there is nothing to ask."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except Exception:  # peft absent, or a version without the conversion
        return
    def state(modules, parameters, ranks, alphas):
        return (modules if isinstance(modules, str) else set(modules or ()), set(parameters or ()),
                dict(ranks or {}), dict(alphas or {}))

    targets = fields["target_modules"]
    before = state(targets, fields.get("target_parameters"), fields["rank_pattern"], fields["alpha_pattern"])
    probe = LoraConfig(r=fields["r"], lora_alpha=fields["lora_alpha"], target_modules=targets,
                       target_parameters=list(before[1]), rank_pattern=dict(before[2]),
                       alpha_pattern=dict(before[3]))
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
        after = state(probe.target_modules, probe.target_parameters, probe.rank_pattern, probe.alpha_pattern)
        changed, reason = after != before, "rewrites its target_modules onto the routed experts' parameters"
    except ValueError as e:  # peft refuses gate without up, ...
        changed, reason = True, f"refuses it ({e})"
    if changed:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(
            f"peft cannot hold this adapter for a {model_type!r} model: on load it {reason}, so "
            f"the LoRA on {clip(str(targets), 150)} would act on other weights (peft's conversion of "
            "transformers-4 MoE configs). Keep it in peftlab's format (save), or leave the Linear "
            "gate/up/down projections (shared experts, dense layers) out of the adapter")


def _expert_keys(model: nn.Module, params: list[str]) -> dict[str, str]:
    """peft's module key for each expert parameter in ``params`` (``<experts>.<param>``) when
    exactly ``params`` are targeted: peft wraps an experts module once per targeted parameter, in
    the module's parameter order, each wrapper around the previous one, so the first parameter's
    tensors sit under ``<experts>.base_layer`` once per later targeted parameter."""
    by_module: dict[str, list[str]] = {}
    for p in params:
        module, _, param = p.rpartition(".")
        by_module.setdefault(module, []).append(param)
    keys = {}
    for module, chosen in by_module.items():
        order = [p for p in experts_layout(model.get_submodule(module)) if p in chosen]
        for i, param in enumerate(order):
            keys[f"{module}.{param}"] = module + ".base_layer" * (len(order) - 1 - i)
    return keys


def _as_peft_names(wanted: list[str], names: list[str], dotted: bool) -> list[str] | str:
    """``wanted`` as peft's list form (entries match as name suffixes, after a dot if ``dotted``),
    or as a regex string (full match) when the list would also hit other modules."""
    chosen = set(wanted)
    for n in names:
        hit = any(n == w or n.endswith("." + w if dotted else w) for w in wanted)
        if hit != (n in chosen):
            return "|".join(re.escape(w) for w in wanted)
    return list(wanted)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForConditionalGeneration") and getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return next((task for suffix, task in _TASKS if cls.endswith(suffix)), None)


def _suffix_hits(names: list[str], entries: list[str]) -> set[str]:
    return {n for n in names if any(n.endswith(e) for e in entries)}


def _module_names(model: nn.Module) -> list[str]:
    """Module names as peft sees them: adapted layers count as their base module."""

    def walk(module: nn.Module, prefix: str) -> list[str]:
        out = []
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            out.append(full)
            if isinstance(child, AdaptedExperts):
                out += walk(child.base, full)
            elif not isinstance(child, AdaptedLayer):
                out += walk(child, full)
        return out

    return walk(model, "")


# ---- import -----------------------------------------------------------------------------------
def import_peft(adapters: AdapterSet, path: Path, name: str) -> str:
    """Load the LoRA, (IA)³ or VeRA adapter that peft's ``save_pretrained`` wrote to ``path`` as adapter
    ``name``; its ``modules_to_save`` tensors go into the model's modules and become the adapter's
    extras. Any problem raises :class:`AdapterLoadError` with the model untouched."""
    path = Path(path)
    try:
        check_name(name)
    except PeftlabError as e:
        raise AdapterLoadError(str(e)) from None
    if name in adapters:
        raise AdapterLoadError(f"an adapter named {name!r} is already attached; pass another name")
    data = read_config(path)
    codec = _codec_for(data, path)
    _refuse_unsupported(data, codec, path)
    if codec.sequence:
        return _import_sequence(adapters, path, name, codec, data)
    shapes = _tensor_shapes(path)
    keys, others = _split_keys(shapes, codec, path)
    if not keys:
        raise AdapterLoadError(f"{path} holds no {codec.peft_type} tensors")
    # site name -> its key in the file: itself for a Linear module, the (nested) experts module
    # for an expert parameter in target_parameters
    site_keys = {site: key for key, site in _expert_sites(adapters.model, data, codec, path).items()}
    linear = {n: tuple(weight_out_in(m).shape) for n, m in linear_modules(adapters.model)}
    linear.update({n: (p.out_features, p.in_features, p.num_experts)
                   for n, p in expert_parameters(adapters.model) if n in site_keys})
    site_keys.update({m: m for m in keys if m in linear and m not in site_keys})
    unknown = sorted(set(keys) - set(site_keys.values()))
    if unknown:
        raise AdapterLoadError(f"{path} adapts modules this model has no Linear/Conv1D module for: "
                               f"{clip(str(unknown[:5]))}{'...' if len(unknown) > 5 else ''}")
    missing = sorted(m for m, k in site_keys.items() if k not in keys)
    if missing:
        raise AdapterLoadError(f"{path} lists {missing[:3]} in target_parameters but holds no tensors "
                               "for them")
    modules = [m for m in linear if m in site_keys]  # model order, like the sites
    in_file = {_codec_key(codec, k): shape for k, shape in shapes.items()}
    try:
        config, wanted = codec.config(data, modules, linear, site_keys, in_file)
    except ConfigError as e:
        raise AdapterLoadError(f"{path}: {e}") from None
    expected = {_full_key(codec, k): shape for k, shape in wanted.items()}
    extras = _extra_modules(adapters.model, data, others, path)
    expected.update(_extra_shapes(extras, PREFIX))
    try:
        built = adapters.build(config)
    except PeftlabError as e:
        raise AdapterLoadError(f"{path} does not fit this model: {e}") from None
    tensors = read_tensors(path, expected)
    # Everything is checked: only now does the model change.
    codec.load(built.pieces, {_codec_key(codec, k): t for k, t in tensors.items()
                              if _codec_key(codec, k) in wanted}, site_keys)
    for module, m in extras.items():
        prefix = f"{PREFIX}{module}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    built.extras = tuple(extras)
    adapters.install(name, built)
    return name


def _codec_for(data: dict[str, Any], path: Path) -> PeftCodec:
    """The codec that reads this config; for a known peft type with a feature no codec reads
    (``use_dora`` before DoRA existed), that type's codec, whose key check then names it."""
    codecs = [m.peft for m in REGISTRY.values() if m.peft is not None]
    chosen = next((c for c in codecs if c.accepts(data)), None) or next(
        (c for c in codecs if c.peft_type == data.get("peft_type")), None)
    if chosen is None:
        hint = " (this is a peftlab adapter: use load)" if data.get("format") == FORMAT else ""
        raise AdapterLoadError(
            f"{path}: peft_type {clip(repr(data.get('peft_type')))} is not supported; import_peft reads "
            f"{sorted({c.peft_type for c in codecs})} adapters{hint}")
    return chosen


def _refuse_unsupported(data: dict[str, Any], codec: PeftCodec, path: Path) -> None:
    known = _COMMON_KEYS | codec.config_keys
    used = sorted(k for k, v in data.items() if k not in known and v not in (None, False, {}, [], ""))
    if used:
        raise AdapterLoadError(f"{path} uses peft features peftlab cannot import: "
                               f"{', '.join(clip(f'{k}={data[k]!r}', 100) for k in used[:5])}")
    if data.get("bias", "none") != "none":
        raise AdapterLoadError(f"{path} trains biases (bias={clip(repr(data['bias']))}); import_peft "
                               "supports bias='none' only")
    init = data.get("init_lora_weights", True)
    if not any(init is p if isinstance(p, bool) else init == p for p in _PLAIN_INITS):
        raise AdapterLoadError(f"{path} was initialised with init_lora_weights={clip(repr(init))}, which "
                               "rewrites the base weights; peftlab imports adapters of an unchanged base")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the safetensors header (no tensor data is read)."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        if (path / PICKLE_FILE).exists():
            raise AdapterLoadError(
                f"{path} holds only {PICKLE_FILE}, a pickle file, which peftlab never loads; re-save "
                "the adapter with peft's save_pretrained(..., safe_serialization=True)")
        raise AdapterLoadError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors reports corrupt files with several exception types
        raise AdapterLoadError(f"{file} is not a valid safetensors file: {clip(str(e))}") from None


def _full_key(codec: PeftCodec, key: str) -> str:
    """A codec's tensor key as it is in peft's file (see :attr:`PeftCodec.shared_keys`)."""
    return key if key in codec.shared_keys else PREFIX + key


def _codec_key(codec: PeftCodec, key: str) -> str:
    """A key of peft's file as the codec names it: without the prefix, unless a shared key."""
    return key if key in codec.shared_keys else key[len(PREFIX):]


def _split_keys(shapes: dict[str, tuple[int, ...]], codec: PeftCodec, path: Path):
    """Adapted module names, and the other keys (without the prefix), which must be extras; the
    codec's shared keys are neither (its config says whether the file must hold them)."""
    suffixes = codec.suffixes
    modules: list[str] = []
    others: list[str] = []
    for key in shapes:
        if key in codec.shared_keys:
            continue
        if not key.startswith(PREFIX):
            raise AdapterLoadError(f"{path}: tensor {clip(repr(key))} does not start with {PREFIX!r}; this "
                                   "is not a file written by peft's save_pretrained")
        rest = key[len(PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith(s)), None)
        if suffix is None:
            others.append(rest)
        elif rest[: -len(suffix)] not in modules:
            modules.append(rest[: -len(suffix)])
    return modules, others


def _expert_sites(model: nn.Module, data: dict[str, Any], codec: PeftCodec, path: Path) -> dict[str, str]:
    """peft's module key -> expert site for the parameters that ``target_parameters`` reaches.
    peft matches each parameter's full name, or its end after a dot, against the list; one that
    is not a 3-D expert parameter is refused (peftlab adapts no other parameter)."""
    rule = data.get("target_parameters")
    if not rule:
        return {}
    if not isinstance(rule, list) or not all(isinstance(t, str) for t in rule):
        raise AdapterLoadError(f"{path}: target_parameters must be a list of parameter names")
    if not codec.target_parameters:
        readers = sorted(m.peft.peft_type for m in REGISTRY.values() if m.peft and m.peft.target_parameters)
        raise AdapterLoadError(f"{path}: peftlab reads target_parameters of {readers} adapters only")
    experts = dict(expert_parameters(model))
    hits = [n for n in _parameter_names(model) if n in rule or any(n.endswith("." + t) for t in rule)]
    other = [n for n in hits if n not in experts]
    if other:
        raise AdapterLoadError(f"{path}: target_parameters {clip(str(rule))} reach {clip(str(other[:3]))}, "
                               "which are not routed experts' 3-D parameters; peftlab adapts no other "
                               "parameter directly")
    if not hits:
        raise AdapterLoadError(f"{path}: target_parameters {clip(str(rule))} match no parameter of this "
                               "model")
    return {key: site for site, key in _expert_keys(model, hits).items()}


def _parameter_names(model: nn.Module) -> list[str]:
    """Every parameter's name as peft sees it (wrappers and adapters left out)."""

    def walk(module: nn.Module, prefix: str) -> list[str]:
        out = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            out += walk(child.base if isinstance(child, (AdaptedLayer, AdaptedExperts)) else child, full)
        return out

    return walk(model, "")


def _extra_shapes(extras: dict[str, nn.Module], prefix: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the extras, keyed as peft keys them under ``prefix``."""
    return {f"{prefix}{module}.{k}": tuple(t.shape) for module, m in extras.items()
            for k, t in m.state_dict().items()}


def _extra_modules(model: nn.Module, data: dict[str, Any], others: list[str], path: Path):
    """The modules_to_save modules whose tensors the file holds (each one complete)."""
    wanted = data.get("modules_to_save") or []
    if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
        raise AdapterLoadError(f"{path}: modules_to_save must be a list of module names")
    # peft wraps every module whose name ends with an entry; the outermost one owns the tensors.
    candidates = sorted(((n, m, m.state_dict()) for n, m in model.named_modules()
                         if n and any(n.endswith(w) for w in wanted)), key=lambda c: len(c[0]))
    found: dict[str, nn.Module] = {}
    for rest in others:
        owner = next((n for n, m, sd in candidates
                      if rest.startswith(n + ".") and rest[len(n) + 1:] in sd), None)
        if owner is None:
            raise AdapterLoadError(
                f"{path}: unexpected tensor {clip(repr(PREFIX + rest))}: neither an adapter tensor nor part "
                f"of a module in modules_to_save {clip(str(wanted))}")
        found.setdefault(owner, model.get_submodule(owner))
    return {n: found[n] for n, _, _ in candidates if n in found}
