"""Weights that two modules share, and what merging an adapter into one of them must do.

GPT-2, T5, Gemma and many other models tie the output projection (``lm_head``) to the input
embeddings: one parameter, two owners. Merging an adapter into ``lm_head`` in place would
silently change the input embeddings too. Instead the merge gives ``lm_head`` its own copy of
the weight and records that in the model's config (``tie_word_embeddings=False``), so that
``save_pretrained`` / ``from_pretrained`` keep the two apart; unmerging the last adapter puts the
original shared parameter (never modified) and the config flag back. Any other kind of sharing
is refused: peftlab cannot record it in a way transformers would honour on reload.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from torch import nn

from peftlab.errors import AdapterStateError

_FLAG = "tie_word_embeddings"


@dataclasses.dataclass
class Untied:
    """A module given its own weight for a merge: the shared original and the config's flag."""

    module: nn.Module
    original: nn.Parameter
    flag: bool


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``id`` of every parameter that has more than one name in ``model`` -> its names."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def check_untie(model: nn.Module, module_name: str, layer: nn.Module, base: nn.Module,
                shared: dict[int, list[str]]) -> bool:
    """Whether ``base`` (wrapped by ``layer`` at ``module_name``) needs its own weight before a
    merge; raises when it shares a parameter in a way that cannot be undone safely."""
    bias = getattr(base, "bias", None)
    if bias is not None and id(bias) in shared:
        raise AdapterStateError(f"cannot merge into {module_name}: its bias is shared with "
                                f"{shared[id(bias)]}; merging would change them all")
    if id(base.weight) not in shared:
        return False
    get_out = getattr(model, "get_output_embeddings", None)
    is_output = callable(get_out) and get_out() in (layer, base)
    config = getattr(model, "config", None)
    if not (is_output and getattr(config, _FLAG, False)):
        raise AdapterStateError(
            f"cannot merge into {module_name}: its weight is shared with "
            f"{shared[id(base.weight)]}, so merging would change those too. Keep the adapter "
            "unmerged, or untie the weights yourself first")
    return True


def untie(model: nn.Module, base: nn.Module) -> Untied:
    """Give the output projection ``base`` its own copy of the tied weight, and say so in the
    model's config so that a saved model is reloaded untied."""
    original = base.weight
    base.weight = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    record = Untied(base, original, bool(getattr(model.config, _FLAG)))
    setattr(model.config, _FLAG, False)
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if callable(expand) and expand(all_submodels=True):
        retie(model, record)  # a sub-model still ties: reloading would share the weight again
        raise AdapterStateError("cannot merge into the output embeddings: the model still ties "
                                f"weights after setting {_FLAG}=False ({expand(all_submodels=True)})")
    return record


def retie(model: nn.Module, record: Untied) -> None:
    """Undo :func:`untie`: the original shared parameter and config flag come back."""
    record.module.weight = record.original
    setattr(model.config, _FLAG, record.flag)
