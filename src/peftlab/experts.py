"""Routed experts of mixture-of-experts FFNs: 3-D parameters adapted per expert.

In transformers 5 the routed experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ... are
not Linear layers but one module holding stacked weights, e.g. ``gate_up_proj [E, 2·ffn, hidden]``
and ``down_proj [E, hidden, ffn]`` (expert ``e``'s matrix is ``[out, in]``); gpt-oss stores them
transposed, ``[E, in, out]``, with a bias ``[E, out]`` each. transformers marks these modules with
their layout (``is_transposed``, ``has_bias``, ``has_gate``, set by ``use_experts_implementation``);
only modules carrying those marks are treated as experts, so no layout is ever guessed.

A targeted expert parameter is a site named ``<experts module>.<parameter>``. Its pieces act on the
weights, not on activations: with the active pieces of one parameter, per expert ``e``,

    W_e' = diag(l_out,e) · W_e · diag(l_in,e) + Σ_d s_d·B_d,e·A_d,e · diag(l_in,e)
    b_e' = l_out,e ⊙ b_e

which is exactly what :class:`peftlab.layer.AdaptedLayer` computes for a Linear layer ((IA)³ scales
first, LoRA updates see the scaled input), so merging, unmerging and several active adapters behave
the same. :class:`AdaptedExperts` replaces the experts module; its forward runs the original
module's forward on a shallow stand-in whose parameters are the effective ``W'`` (the original is
never mutated, so threads can share the model), whatever experts implementation transformers
dispatches to (eager loop, batched or grouped matmul). This is the computation of HF peft's
``target_parameters`` (``lora.ParamWrapper``), which swaps the same sum in through a temporary
parametrisation.

Per-example routing (:meth:`AdapterSet.route`) cannot give examples different pieces on the experts:
the experts see a flat list of tokens, not examples. Such a route is refused with an error; routes
that run the same pieces on the experts for every example work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.layer import _ROUTES, Active, AdaptedLayer, Piece, RoutePlan, _product


@dataclasses.dataclass(frozen=True)
class ExpertParam:
    """Layout of one 3-D expert parameter: ``num_experts`` matrices mapping ``in_features`` to
    ``out_features``, stored ``[E, out, in]`` or, ``transposed``, ``[E, in, out]``; ``bias`` names
    its ``[E, out]`` bias parameter, if any."""

    num_experts: int
    in_features: int
    out_features: int
    transposed: bool
    bias: str | None = None


def experts_layout(module: nn.Module) -> dict[str, ExpertParam]:
    """The 3-D expert parameters of ``module`` by name, or ``{}`` when it is not an experts module
    that transformers marked with its layout."""
    if isinstance(module, AdaptedExperts):
        module = module.base
    if not (hasattr(module, "is_transposed") and hasattr(module, "has_gate")):
        return {}
    transposed = bool(module.is_transposed)
    found = {}
    for name, p in module.named_parameters(recurse=False):
        if p is None or p.dim() != 3:
            continue
        e, a, b = p.shape
        bias = f"{name}_bias"
        has_bias = getattr(module, "has_bias", False) and getattr(module, bias, None) is not None
        found[name] = ExpertParam(e, a if transposed else b, b if transposed else a, transposed,
                                  bias if has_bias else None)
    return found


def gate_up_layout(module: nn.Module) -> str | None:
    """How the experts module ``module`` splits each expert's ``gate_up_proj`` output into gate and
    up, as transformers marks it: ``"concatenated"`` (``[gate | up]``, halves: ``is_concatenated``)
    or ``"interleaved"`` (gate, up, gate, up, ...); ``None`` when the module has no gate or does
    not say (no ``is_concatenated`` flag)."""
    if isinstance(module, AdaptedExperts):
        module = module.base
    if not experts_layout(module) or not getattr(module, "has_gate", False):
        return None
    flag = getattr(module, "is_concatenated", None)
    if not isinstance(flag, bool):
        return None
    return "concatenated" if flag else "interleaved"


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, ExpertParam]]:
    """(``<module>.<parameter>``, layout) of every 3-D expert parameter, in module order; a wrapped
    experts module is listed under its original name, adapter internals never."""
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, ExpertParam]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            layout = experts_layout(child)
            if layout:
                for param, info in layout.items():
                    yield f"{full}.{param}", info
            elif not isinstance(child, AdaptedLayer):
                yield from walk(child, full)

    yield from walk(model, "")


class AdaptedExperts(nn.Module):
    """An experts module whose 3-D parameters carry adapter pieces. ``base`` is the original module;
    each adapted parameter has an :class:`AdaptedParameter` child of the same name, so that the
    site ``<experts>.<parameter>`` is also this child's module path."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.layout = experts_layout(base)

    def adapt(self, param: str) -> AdaptedParameter:
        """The child for parameter ``param``, created on first use."""
        if param not in self._modules:
            child = AdaptedParameter(self.base, param, self.layout[param]).train(self.training)
            self.add_module(param, child)
        child = self._modules[param]
        assert isinstance(child, AdaptedParameter)
        return child

    def release(self, param: str) -> None:
        """Drop the (empty) child of ``param``."""
        del self._modules[param]

    def parameter_layers(self) -> Iterator[AdaptedParameter]:
        for child in self.children():
            if isinstance(child, AdaptedParameter):
                yield child

    def forward(self, *args, **kwargs):
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.parameter_layers():
            tensors.update(layer.effective(layer.current()))
        if not tensors:
            return self.base(*args, **kwargs)
        return _stand_in(self.base, tensors)(*args, **kwargs)


def _stand_in(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters named in ``tensors`` are those tensors. The
    original is left alone (unlike ``functional_call``, which swaps its parameters for the call), so
    concurrent forwards on other threads still see the weights they expect."""
    proxy = object.__new__(type(module))
    proxy.__dict__.update(module.__dict__)
    proxy.__dict__["_parameters"] = {**module._parameters, **tensors}
    return proxy


class AdaptedParameter(nn.Module):
    """The adapter pieces acting on one 3-D expert parameter, by adapter name; the counterpart of
    :class:`peftlab.layer.AdaptedLayer` for a parameter (same activation, merge and routing API)."""

    def __init__(self, experts: nn.Module, param: str, layout: ExpertParam) -> None:
        super().__init__()
        # A plain reference, not a submodule: the experts module is registered once, as the
        # wrapper's ``base``; its parameter is looked up by name on every use (``.to()`` may
        # replace it).
        self.__dict__["_experts"] = experts
        self.param = param
        self.layout = layout
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        self._active = Active()

    @property
    def weight(self) -> torch.Tensor:
        """The base parameter as stored."""
        return getattr(self._experts, self.param)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._experts, self.layout.bias) if self.layout.bias else None

    def weight_out_in(self) -> torch.Tensor:
        """The base parameter as ``[E, out, in]`` (a view for a transposed layout)."""
        w = self.weight
        return w.transpose(1, 2) if self.layout.transposed else w

    def set_active(self, names: tuple[str, ...]) -> None:
        self._active = self.resolve(names)

    def resolve(self, names: tuple[str, ...]) -> Active:
        """The pieces that run here when ``names`` are active (fusions never act on experts)."""
        live = [self.adapters[n] for n in names if n in self.adapters and n not in self.merged]
        return Active(tuple(p for p in live if p.kind == "scale"),
                      tuple(p for p in live if p.kind == "delta"))

    @property
    def active_pieces(self) -> tuple[Piece, ...]:
        return self._active.scale + self._active.delta

    def current(self) -> Active:
        """The active pieces, or those of this thread's route."""
        plan = getattr(_ROUTES, "plans", {}).get(id(self))
        return self._active if plan is None else plan.groups[0][1]

    def plan_route(self, entries: list[tuple[str, ...]], device: torch.device,
                   indexes: dict[Any, Any] | None = None) -> RoutePlan:
        """Routing is possible only when every example runs the same pieces here."""
        groups = {self.resolve(names) for names in entries}
        if len(groups) > 1:
            names = sorted({n for names in entries for n in names if n in self.adapters})
            raise AdapterStateError(
                f"this route gives examples different adapters on the routed experts "
                f"{self._name()} ({names} act there): the experts see a flat list of tokens, not "
                "examples, so per-example routing cannot reach them. Route only adapters that do "
                "not act on the experts differently per example, or run the groups as separate batches")
        return RoutePlan(len(entries), ((None, groups.pop()),), None)

    def _name(self) -> str:
        return f"{type(self._experts).__name__}.{self.param}"

    def effective(self, active: Active) -> dict[str, torch.Tensor]:
        """``{param: W', bias: b'}`` for ``active`` (see the module docstring); ``{}`` when nothing
        acts here. Computed in the stored layout, so a transposed parameter is never copied."""
        if not active.scale and not active.delta:
            return {}
        w = self.weight
        t = self.layout.transposed
        l_in = l_out = None
        if active.scale:
            ins, outs = zip(*(p.scales() for p in active.scale))
            l_in = _product([v for v in ins if v is not None])
            l_out = _product([v for v in outs if v is not None])
            w = _scale(w, l_in, l_out, t)
        for p in active.delta:
            a, b, s = p.factors()  # [E, r, in], [E, out, r]
            if l_in is not None:
                a = a * l_in[:, None, :]
            # W + s·B·A per expert in one batched GEMM (B·A never materialised separately)
            w = (torch.baddbmm(w, a.transpose(1, 2), b.transpose(1, 2), alpha=s) if t
                 else torch.baddbmm(w, b, a, alpha=s))
        out = {self.param: w}
        if l_out is not None and self.layout.bias:
            out[self.layout.bias] = self.bias * l_out
        return out

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the expert weights (see :meth:`AdapterSet.merge`)."""
        with torch.no_grad():
            self.adapters[name].merge_into(self.weight_out_in(), self.bias, +1)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`; only the most recently merged adapter here can go."""
        if name not in self.merged:
            raise AdapterStateError(f"adapter {name!r} is not merged here")
        if self.merged[-1] != name:
            raise AdapterStateError(f"adapter {name!r} must be unmerged after "
                                    f"{self.merged[self.merged.index(name) + 1:]} (reverse order)")
        with torch.no_grad():
            self.adapters[name].merge_into(self.weight_out_in(), self.bias, -1)
        self.merged.pop()


def _scale(w: torch.Tensor, l_in: torch.Tensor | None, l_out: torch.Tensor | None,
           transposed: bool) -> torch.Tensor:
    """``diag(l_out,e)·W_e·diag(l_in,e)`` for every expert, in the stored layout."""
    in_dim, out_dim = (1, 2) if transposed else (2, 1)
    if l_out is not None:
        w = w * l_out.unsqueeze(in_dim)
    if l_in is not None:
        w = w * l_in.unsqueeze(out_dim)
    return w
