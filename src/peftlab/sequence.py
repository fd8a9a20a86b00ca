"""Sequence-level adapters: virtual tokens at the input (prompt tuning) or in every attention
layer's keys and values (prefix tuning), attached to a plain model through public interfaces only.

Every other method acts on a Linear layer; these act on the token sequence. They attach like this:

* The adapter's one piece (kind ``"sequence"``) lives in the :class:`peftlab.layer.AdaptedLayer`
  wrapper of the model's input embeddings (``model.get_input_embeddings()``), so that it is part
  of the module tree (``model.to``, ``model.parameters()``, HF Trainer's optimizer, saving) while
  the embeddings themselves compute exactly what they did.
* A forward pre-hook on the model (``register_forward_pre_hook(..., with_kwargs=True)``) rewrites
  the call's keyword arguments before the model sees them. Prompt tuning turns ``input_ids`` into
  ``inputs_embeds`` with the prompts in front and extends ``attention_mask``, ``token_type_ids``,
  ``position_ids`` and per-token ``labels`` consistently (peft's layout: the virtual tokens come
  first). Prefix tuning passes a ``DynamicCache`` filled through its public ``update(key, value,
  layer_idx)`` with each layer's prefix, and extends the attention mask. On an encoder-decoder
  model the encoder also gets a pre-hook, since ``generate`` calls it directly.
* After a forward that took a prefix, a forward hook checks that every layer read it (the cache
  grew by the input's length in every layer); a model whose attention ignores the cache raises
  :class:`TargetError` naming its model type instead of running without the prefix.

Nothing here names an architecture or copies model code: the kwargs are the ones every
transformers model takes, and the cache argument is found by name (``cache`` in transformers 5,
``past_key_values`` before), which is why the methods survive changes of transformers' cache
classes (peft's prefix tuning passes ``past_key_values`` and checks for that name, so on
transformers 5 it refuses BERT classifiers).

Per-example routing (:meth:`peftlab.AdapterSet.route`) runs one batch in which examples use
different prompts or none: every example gets ``N`` virtual slots (``N``: the longest prompt in
the batch), its own prompt in ``n ≤ N`` of them and masked padding in the rest. On a causal model
the padding goes on the left (``[pad | prompt | text]``, so that generation appends at the end);
elsewhere on the right (``[prompt | text | pad]``, so that position 0, which classification heads
read, is what it would be alone). Position ids are made explicit so that each example sees the
positions it would see alone; the result equals running each example by itself.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.errors import AdapterStateError, TargetError, UsageError
from peftlab.layer import Piece

if TYPE_CHECKING:
    from peftlab.adapter_set import AdapterSet


class SequencePiece(Piece):
    """A sequence-level adapter: ``prompt()`` gives virtual input embeddings ``[n, d]`` (prompt
    tuning), ``prefix()`` per-layer keys and values ``[layers, 2, kv_heads, n, head_dim]``
    (prefix tuning). A subclass implements one and sets ``num_virtual_tokens``."""

    kind = "sequence"
    num_virtual_tokens: int

    def prompt(self) -> torch.Tensor | None:
        return None

    def prefix(self) -> torch.Tensor | None:
        return None


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def embedding_table(model: nn.Module) -> nn.Module | None:
    """The model's input embeddings: ``get_input_embeddings()`` of the model, or of the first
    module inside that has one (a head around a backbone: peftlab's mean-pooling classifier)."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        found = getter() if callable(getter) else None
        if found is not None:
            return found
    return None


def input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the model's input embeddings, where the sequence pieces live."""
    from peftlab.layer import AdaptedLayer

    found = embedding_table(model)
    base = found.base if isinstance(found, AdaptedLayer) else found
    if not isinstance(base, nn.Embedding):
        raise TargetError(f"prompt and prefix tuning need a token embedding table (an nn.Embedding from "
                          f"get_input_embeddings()); this {model_type(model)!r} model's input embeddings "
                          f"are {type(base).__name__}")
    for name, module in model.named_modules():
        if module is found:
            return name, module
    raise TargetError(f"the input embeddings of this {model_type(model)!r} model are not one of its modules")


def is_causal(model: nn.Module) -> bool:
    """Decoder-only models generate by appending at the end: they take left padding."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    can = getattr(model, "can_generate", None)
    return bool(getattr(config, "is_decoder", False) or (callable(can) and can()))


def reads_last_token(model: nn.Module) -> bool:
    """A sequence-classification head that reads the last token (transformers' decoder heads,
    named ``score``): without ``input_ids`` to find the last real token, it reads the last
    position, so the virtual tokens' padding must go on the left and the text must not be
    right-padded."""
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(model, "score", None), nn.Module)


def cache_owner(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model in ``model`` whose forward takes a key/value cache."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel) and cache_argument(m)), None)


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a cache of keys and values, if any."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


# ---- which pieces each example runs -----------------------------------------------------------
_ROUTES = threading.local()


@contextlib.contextmanager
def sequence_routing(adapters: AdapterSet, routes: Sequence[tuple[str, ...]]) -> Iterator[None]:
    """Route this thread's forwards of ``adapters.model``: example ``i`` runs ``routes[i]``."""
    previous = getattr(_ROUTES, "plans", {})
    _ROUTES.plans = {**previous, id(adapters): list(routes)}
    try:
        yield
    finally:
        _ROUTES.plans = previous


def current_routes(adapters: AdapterSet) -> list[tuple[str, ...]] | None:
    """This thread's routes of ``adapters.model`` (inside :func:`sequence_routing`), else ``None``."""
    return getattr(_ROUTES, "plans", {}).get(id(adapters))


class Group:
    """Examples ``index`` (``None``: the whole batch) that run ``piece`` (``None``: no adapter)."""

    def __init__(self, index: torch.Tensor | None, piece: SequencePiece | None) -> None:
        self.index = index
        self.piece = piece

    def size(self, kind: str) -> int:
        if self.piece is None or not _implements(self.piece, kind):
            return 0
        return self.piece.num_virtual_tokens


def prompts_inputs(model: nn.Module) -> bool:
    """Whether an active adapter of ``model`` puts virtual tokens in front of its input (prompt
    tuning). A causal language model then predicts every real token, the first one too (from the
    last virtual position), where alone it predicts all but the first."""
    from peftlab.adapter_set import attached

    adapters = attached(model)
    return adapters is not None and any(
        isinstance(p, SequencePiece) and _implements(p, "prompt")
        for name in adapters.active for p in adapters[name].pieces.values())


def _implements(piece: SequencePiece, method: str) -> bool:
    return getattr(type(piece), method) is not getattr(SequencePiece, method)


class Batch:
    """The groups of one batch, with the number of virtual slots ``N`` of each kind."""

    def __init__(self, groups: list[Group], batch: int, device: torch.device) -> None:
        self.groups = groups
        self.batch = batch
        self.device = device
        self.order = None
        if len(groups) > 1:
            self.order = torch.cat([g.index for g in groups]).argsort()  # type: ignore[misc]

    def slots(self, kind: str) -> int:
        return max(g.size(kind) for g in self.groups)

    def mixed(self, kind: str) -> bool:
        """Whether some example has fewer virtual tokens of this kind than others."""
        sizes = {g.size(kind) for g in self.groups}
        return len(sizes) > 1

    def place(self, kind: str, real: torch.Tensor, virtual: Callable[[Group, int, int], torch.Tensor],
              fill: float, left: bool, shift: Callable[[Group, torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
        """``real [B, L, ...]`` with each example's ``n`` virtual rows (``virtual(group, rows, n)``,
        ``[rows, n, ...]``) in front and ``fill`` in the slots it does not use: ``[pad | virtual |
        real]`` when ``left``, else ``[virtual | real | pad]``. ``shift`` maps a group's real rows."""
        total = self.slots(kind)
        outs = []
        for g in self.groups:
            rows = real if g.index is None else real.index_select(0, g.index)
            if shift is not None:
                rows = shift(g, rows)
            n = g.size(kind)
            v = [virtual(g, rows.shape[0], n)] if n else []
            pad = [rows.new_full((rows.shape[0], total - n, *rows.shape[2:]), fill)] if total > n else []
            parts = [*pad, *v, rows] if left else [*v, rows, *pad]
            outs.append(torch.cat([p.to(device=rows.device, dtype=rows.dtype) for p in parts], dim=1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if self.order is None else out.index_select(0, self.order)


# ---- the hooks --------------------------------------------------------------------------------
_STATE = threading.local()


class SequenceHooks:
    """The pre-hooks that put the sequence pieces of ``adapters`` into the model's calls."""

    def __init__(self, adapters: AdapterSet) -> None:
        self.adapters = adapters
        model = adapters.model
        self.signature = inspect.signature(model.forward)
        self.causal = is_causal(model) or reads_last_token(model)
        self.last_token = reads_last_token(model)
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        # Prefixes go in where the cache goes in: the outermost transformers model that takes
        # one (LlamaForCausalLM itself; BertModel inside BertForSequenceClassification, whose
        # mask must stay the length of the hidden states a pooling head reads).
        self.owner = cache_owner(model)
        if self.owner is not None:
            self.owner_signature = inspect.signature(self.owner.forward)
            self.handles += [
                self.owner.register_forward_pre_hook(self._prefix_hook, with_kwargs=True),
                self.owner.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
            ]
        encoder = model.get_encoder() if self.encoder_decoder and hasattr(model, "get_encoder") else None
        self.encoder = encoder
        if encoder is not None:
            self.encoder_signature = inspect.signature(encoder.forward)
            self.handles.append(encoder.register_forward_pre_hook(self._encoder_hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # -- which pieces run
    def batch(self, size: int, device: torch.device) -> Batch | None:
        plans = getattr(_ROUTES, "plans", {})
        routes = plans.get(id(self.adapters))
        if routes is None:
            piece = self._piece(self.adapters.active)
            return None if piece is None else Batch([Group(None, piece)], size, device)
        if len(routes) != size:
            raise AdapterStateError(f"routing was set for {len(routes)} examples, but the model got a "
                                    f"batch of {size}")
        by_piece: dict[int, tuple[SequencePiece | None, list[int]]] = {}
        for i, names in enumerate(routes):
            piece = self._piece(names)
            by_piece.setdefault(id(piece), (piece, []))[1].append(i)
        if all(p is None for p, _ in by_piece.values()):
            return None
        if len(by_piece) == 1:
            return Batch([Group(None, next(iter(by_piece.values()))[0])], size, device)
        groups = [Group(torch.tensor(ix, device=device), p) for p, ix in by_piece.values()]
        return Batch(groups, size, device)

    def _piece(self, names: tuple[str, ...]) -> SequencePiece | None:
        found = {n: p for n in names for p in self.adapters[n].pieces.values()
                 if isinstance(p, SequencePiece)}
        pieces = list(found.values())
        if len(pieces) > 1:
            raise AdapterStateError(f"adapters {list(found)} are both sequence-level (prompt or prefix "
                                    "tuning); one example can run one of them at a time")
        return pieces[0] if pieces else None

    # -- the model's call
    def _pre_hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        kwargs = _bind(self.signature, args, kwargs)
        size, device = _batch_of(kwargs)
        batch = None if size is None else self.batch(size, device)
        if batch is not None and batch.slots("prompt"):
            self._prompt(model, batch, kwargs)
        return (), kwargs

    def _prefix_hook(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        _STATE.check = None
        kwargs = _bind(self.owner_signature, args, kwargs)
        size, device = _batch_of(kwargs)
        batch = None if size is None else self.batch(size, device)
        if batch is not None and batch.slots("prefix"):
            self._prefix(owner, batch, kwargs)
        return (), kwargs

    def _post_hook(self, model: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        check, _STATE.check = getattr(_STATE, "check", None), None
        if check is not None and output is not None:
            check()

    def _encoder_hook(self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        """``generate`` runs the encoder of an encoder-decoder model by itself: give it the
        prompts there too (when the model's own forward runs it, the inputs are already done)."""
        kwargs = _bind(self.encoder_signature, args, kwargs)
        if kwargs.get("input_ids") is None:
            return (), kwargs  # inputs_embeds: prompted by the model's pre-hook, or the caller's
        size, device = _batch_of(kwargs)
        batch = None if size is None else self.batch(size, device)
        if batch is not None and batch.slots("prompt"):
            self._prompt_inputs(encoder, batch, kwargs, left=False)
        return (), kwargs

    # -- prompt tuning
    def _prompt(self, model: nn.Module, batch: Batch, kwargs: dict[str, Any]) -> None:
        n = batch.slots("prompt")
        if self.encoder_decoder:
            if kwargs.get("encoder_outputs") is not None:
                # The encoder already ran with the prompts (generate): the cross-attention mask
                # must cover them.
                mask = kwargs.get("attention_mask")
                encoded = kwargs["encoder_outputs"][0].shape[1]
                if mask is None and batch.mixed("prompt"):  # padding slots must stay masked
                    mask = torch.ones(batch.batch, encoded - n, dtype=torch.long, device=batch.device)
                if mask is not None and mask.shape[1] + n == encoded:
                    kwargs["attention_mask"] = batch.place("prompt", mask, _ones, 0, left=False)
                return
            self._prompt_inputs(model, batch, kwargs, left=False)
            return
        cache_name = cache_argument(model)
        cache = kwargs.get(cache_name) if cache_name else None
        if cache is not None and _cache_length(cache) > 0:
            self._prompt_decode_step(batch, kwargs, _cache_length(cache))
            return
        mask = kwargs.get("attention_mask")
        if self.last_token and mask is not None and mask.dim() == 2 and bool((mask[:, -1] == 0).any()):
            raise UsageError(
                f"{type(model).__name__} reads the last position, which in a right-padded batch is "
                "padding once the prompt replaces input_ids by inputs_embeds (the head can no longer "
                "find the last real token); pad on the left (tokenizer.padding_side = 'left')")
        labels = kwargs.get("labels")
        length = _seq_len(kwargs)
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            kwargs["labels"] = batch.place("prompt", labels, _fill(-100), -100, left=self.causal)
        self._prompt_inputs(model, batch, kwargs, left=self.causal)

    def _prompt_inputs(self, model: nn.Module, batch: Batch, kwargs: dict[str, Any], left: bool) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.get("input_ids")
            embeds = embedding_table(self.adapters.model)(ids)
        _check_positions(model, embeds.shape[1] + batch.slots("prompt"), "prompt")
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = batch.place(
            "prompt", embeds, _prompts, 0.0, left=left)
        mask = kwargs.get("attention_mask")
        if mask is None and batch.mixed("prompt"):
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if mask is not None:
            kwargs["attention_mask"] = batch.place("prompt", mask, _ones, 0, left=left)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = batch.place("prompt", types, _fill(0), 0, left=left)
        positions = kwargs.get("position_ids")
        takes = "position_ids" in inspect.signature(model.forward).parameters
        if positions is not None or (batch.mixed("prompt") and left and takes):
            if positions is None:
                positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[:2])
            kwargs["position_ids"] = batch.place(
                "prompt", positions, _arange, 0, left=left, shift=lambda g, p: p + g.size("prompt"))

    def _prompt_decode_step(self, batch: Batch, kwargs: dict[str, Any], past: int) -> None:
        """A generation step after the first: the prompts are in the cache; the mask must cover
        them and positions continue after them."""
        mask = kwargs.get("attention_mask")
        if mask is None and batch.mixed("prompt"):  # the padding slots must stay masked
            # the cache holds every virtual slot: the prompts' and, routed beside them, prefixes'
            real = past - batch.slots("prompt") - batch.slots("prefix") + _seq_len(kwargs)
            mask = torch.ones(batch.batch, real, dtype=torch.long, device=batch.device)
        if mask is not None:
            kwargs["attention_mask"] = batch.place("prompt", mask, _ones, 0, left=True)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions + _per_example(batch, "prompt")
        elif batch.mixed("prompt") and "position_ids" in self.signature.parameters:
            full = kwargs["attention_mask"]
            kwargs["position_ids"] = (full.long().cumsum(-1) - 1).clamp(min=0)[:, -_seq_len(kwargs):]

    # -- prefix tuning
    def _prefix(self, model: nn.Module, batch: Batch, kwargs: dict[str, Any]) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        name = cache_argument(model)
        assert name is not None  # cache_owner found it
        n = batch.slots("prefix")
        cache = kwargs.get(name)
        past = 0 if cache is None else _cache_length(cache)
        length = _seq_len(kwargs, decoder=self.encoder_decoder)
        if past == 0:  # the first call (or generation's prefill): a new cache holding the prefixes
            _check_positions(model, length + n, "prefix")
            if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                # recomputing a layer in backward would append its keys to the cache a second time
                raise UsageError("prefix tuning cannot train with gradient checkpointing (each layer's "
                                 "recomputation would write into the prefix cache again); turn it off")
            self_cache = _new_cache(DynamicCache, model)
            dtype = embedding_table(model).weight.dtype
            keys = _prefix_rows(batch).to(dtype)
            # [B, N, layers, 2, heads, hd] -> per layer [B, heads, N, hd]
            for layer in range(keys.shape[2]):
                k = keys[:, :, layer, 0].transpose(1, 2)
                v = keys[:, :, layer, 1].transpose(1, 2)
                self_cache.update(k.contiguous(), v.contiguous(), layer)
            if self.encoder_decoder:
                cache = EncoderDecoderCache(self_cache, _new_cache(DynamicCache, model))
            else:
                cache = self_cache
            kwargs[name] = cache
            past = n
            layers = keys.shape[2]
            _STATE.check = lambda: _check_prefix(model, cache, layers, n + length)
        mask_name = "decoder_attention_mask" if self.encoder_decoder else "attention_mask"
        mask = kwargs.get(mask_name)
        if mask is None and batch.mixed("prefix"):
            mask = torch.ones(batch.batch, past - n + length, dtype=torch.long, device=batch.device)
        if mask is not None:
            kwargs[mask_name] = batch.place("prefix", mask, _ones, 0, left=True)
        if self.encoder_decoder or "position_ids" not in self.owner_signature.parameters:
            return  # relative positions (T5): the offset cancels out
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions + _per_example(batch, "prefix")
        elif batch.mixed("prefix"):
            start = past - n
            own = torch.arange(start, start + length, device=batch.device).expand(batch.batch, length)
            kwargs["position_ids"] = own + _per_example(batch, "prefix")


def _new_cache(cls: type, model: nn.Module) -> Any:
    try:
        return cls(config=model.config)
    except TypeError:  # transformers before DynamicCache took a config
        return cls()


def _cache_length(cache: Any) -> int:
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if cache else 0
    return int(cache.get_seq_length())


def _check_positions(model: nn.Module, total: int, kind: str) -> None:
    """The text and the virtual tokens must fit the model's positions (BERT's position table
    would otherwise fail with a shape error, rotary models run past what they were trained on)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and total > limit:
        raise UsageError(f"the input and the {kind}'s virtual tokens need {total} positions; this "
                         f"{model_type(model)!r} model has {limit}. Shorten the input (--max-length) "
                         f"by {total - limit} tokens, or use fewer virtual tokens")


def _check_prefix(model: nn.Module, cache: Any, layers: int, expected: int) -> None:
    """Every layer must have read its prefix (and written the input after it); a layer whose
    cache did not grow never attended to it."""
    own = getattr(cache, "self_attention_cache", cache)
    lengths = [int(own.get_seq_length(i)) for i in range(layers)]
    if any(n != expected for n in lengths):
        raise TargetError(
            f"{type(model).__name__} ({model_type(model)!r}) takes a cache but its attention layers "
            f"did not read the prefix (cache lengths per layer {lengths}, expected {expected}); "
            "prefix tuning cannot run on this architecture. Use prompt tuning or LoRA")


def _bind(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones named after the forward's signature)."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in signature.parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise AdapterStateError("too many positional arguments for the model's forward")
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _batch_of(kwargs: dict[str, Any]) -> tuple[int | None, torch.device]:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0], t.device
    return None, torch.device("cpu")


def _seq_len(kwargs: dict[str, Any], decoder: bool = False) -> int:
    # An encoder-decoder given only ``labels`` makes its decoder inputs from them (shifted right:
    # the same length), as in seq2seq training without decoder_input_ids.
    keys = (("decoder_input_ids", "decoder_inputs_embeds", "labels") if decoder
            else ("input_ids", "inputs_embeds"))
    for key in keys:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[1]
    return 0


def _prompts(g: Group, rows: int, n: int) -> torch.Tensor:
    p = g.piece.prompt()  # type: ignore[union-attr]
    return p.unsqueeze(0).expand(rows, *p.shape)


def _ones(g: Group, rows: int, n: int) -> torch.Tensor:
    return torch.ones(rows, n, dtype=torch.long)


def _fill(value: int) -> Callable[[Group, int, int], torch.Tensor]:
    def make(g: Group, rows: int, n: int) -> torch.Tensor:
        return torch.full((rows, n), value, dtype=torch.long)

    return make


def _arange(g: Group, rows: int, n: int) -> torch.Tensor:
    return torch.arange(n).expand(rows, n)


def _prefix_rows(batch: Batch) -> torch.Tensor:
    """Every example's prefix as ``[B, N, layers, 2, heads, head_dim]``, zeros (masked) in the
    slots before a shorter one."""
    total = batch.slots("prefix")
    like = next(g.piece.prefix() for g in batch.groups if g.size("prefix"))  # type: ignore[union-attr]
    outs = []
    for g in batch.groups:
        rows = batch.batch if g.index is None else len(g.index)
        n = g.size("prefix")
        p = g.piece.prefix().permute(3, 0, 1, 2, 4) if n else like[..., :0, :].permute(3, 0, 1, 2, 4)  # type: ignore[union-attr]
        p = p.unsqueeze(0).expand(rows, *p.shape)
        if total > n:
            p = torch.cat([p.new_zeros(rows, total - n, *p.shape[2:]), p], dim=1)
        outs.append(p)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if batch.order is None else out.index_select(0, batch.order)


def _per_example(batch: Batch, kind: str) -> torch.Tensor:
    """Each example's number of virtual tokens of ``kind``, as ``[B, 1]``."""
    sizes = torch.zeros(batch.batch, 1, dtype=torch.long, device=batch.device)
    for g in batch.groups:
        if g.index is None:
            sizes[:] = g.size(kind)
        else:
            sizes[g.index] = g.size(kind)
    return sizes
