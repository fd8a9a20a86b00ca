"""Training across processes and machines, and saving an adapter that FSDP has sharded.

``torchrun`` and ``accelerate launch`` start one process per device. HF ``Trainer`` (so
``peftlab train``) then trains data-parallel (DDP: every process holds the whole model) or, under
``accelerate launch --use_fsdp``, fully sharded (FSDP: every parameter is split across the
processes). A sharded adapter has to be gathered before it is saved: the main process alone
holds only its slice, and under FSDP1 most of its adapter tensors are empty there -- the 40-byte
adapters that peft users meet under FSDP and DeepSpeed ZeRO-3.

:func:`gathered` makes the adapter (and the head saved with it) whole on the main process for
the length of a ``with`` block; every process must enter it, since gathering is collective.
:func:`save_adapter` and the ``Trainer`` checkpoints (:mod:`peftlab.checkpoints`) go through it,
and :func:`peftlab.io.adapter_files` refuses tensors that are still sharded, so that no sharded
adapter is ever written as if it were whole.

- FSDP2 (``fully_shard``): parameters are ``DTensor`` s; only the adapter's and the head's are
  gathered (``DTensor.full_tensor``), each for the length of the block.
- FSDP1 (``FullyShardedDataParallel``, accelerate's default ``fsdp_version: 1``): its units are
  gathered onto the main process's CPU (``summon_full_params(rank0_only=True,
  offload_to_cpu=True)``), the whole model, as a full state dict would be; the other processes
  keep their shards.

accelerate 1.15 shards only on GPUs (and other accelerators): on a CPU-only machine it runs
``--fsdp_version 2`` as plain DDP and fails on ``--fsdp_version 1``, so :func:`check_launch`
refuses FSDP there with a message that says what to run instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftlab.errors import AdapterStateError, UsageError

if TYPE_CHECKING:
    from peftlab.adapter_set import AdapterSet

# Names FSDP1 and activation checkpointing insert between a module and its children.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (or an FSDP config file) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_launch(has_accelerator: bool, full: bool, resume: bool, patience: int | None) -> None:
    """Refuse, before anything is written, what a launch with FSDP cannot do correctly."""
    if not fsdp_requested():
        return
    if not has_accelerator:
        raise UsageError(
            "accelerate launch --use_fsdp needs GPUs (accelerate shards only on accelerators: on a CPU "
            "it runs FSDP2 as plain data-parallel training and fails on FSDP1); on CPUs, train "
            "data-parallel with 'accelerate launch --multi_gpu --num_processes N' or "
            "'torchrun --nproc_per_node N' instead")
    unsupported = [flag for flag, on in (("--method full", full), ("--resume", resume),
                                         ("--patience", patience)) if on]
    if unsupported:
        raise UsageError(
            f"{', '.join(unsupported)}: not supported under FSDP yet (saving a whole sharded model, and "
            "loading a checkpoint into one, are not implemented); drop it, or train data-parallel "
            "(accelerate launch --multi_gpu, torchrun)")


def fsdp_version(model: nn.Module) -> int | None:
    """1 if FSDP1 wraps a module of ``model`` (or ``model`` itself), 2 if ``fully_shard`` sharded
    one, else ``None`` (one process, or DDP: every process holds the whole model)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, FullyShardedDataParallel) for k in kinds):
        return 1
    if any(issubclass(k, FSDPModule) for k in kinds):
        return 2
    return None


def clean_name(name: str) -> str:
    """A parameter or module name as it is without FSDP1's and activation checkpointing's
    wrappers (``layer.0._fsdp_wrapped_module.attention`` -> ``layer.0.attention``)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also when FSDP1 has wrapped a module on the way; the
    wrapped module itself, not its wrapper."""
    try:
        found = model.get_submodule(name)
    except AttributeError:
        found = next((m for n, m in model.named_modules() if clean_name(n) == name), None)
        if found is None:
            raise
    while isinstance(getattr(found, "_fsdp_wrapped_module", None), nn.Module):
        found = found._fsdp_wrapped_module
    while isinstance(getattr(found, "_checkpoint_wrapped_module", None), nn.Module):
        found = found._checkpoint_wrapped_module
    return found


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 ``DTensor``, else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def any_process(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on any process (so that all processes stop together).
    ``device``: where the process group reduces (the model's device: NCCL reduces on GPUs only,
    so a CPU tensor there fails)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def summed(values: list[float], device: torch.device | None = None) -> list[float]:
    """``values`` added up over all processes (each process's own where there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()
    return list(values)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def gathered(model: nn.Module, modules: list[nn.Module]) -> Iterator[bool]:
    """Inside, the parameters of ``modules`` (parts of ``model``) are whole on the main process;
    yields whether this process is the main one (the one that should read and write them).
    ``model`` is the model as training wraps it (``trainer.model_wrapped``: the FSDP1 root is
    a wrapper around the model). Every process must enter, in the same order."""
    version = fsdp_version(model)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=_offload(model)):
            yield _is_main()
    elif version == 2:
        from torch.distributed.fsdp import FSDPModule

        # A forward without backward (evaluation) leaves the root unsharded, and state_dict()
        # would then reshard it under our feet (FSDP2's pre-hook): reshard everything first.
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        with _full_dtensors(modules):
            yield _is_main()
    else:
        yield _is_main()


def _offload(model: nn.Module) -> bool:
    """Whether FSDP1 should gather onto the CPU: where it computes on an accelerator and shards
    at all (torch refuses offloading unsharded units, and computing on a CPU its offload frees
    the very storage it gathered into: a later read crashes)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    units = FSDP.fsdp_modules(model)
    device = getattr(units[0], "compute_device", None) if units else None
    return (device is not None and device.type != "cpu"
            and all(m.sharding_strategy != ShardingStrategy.NO_SHARD for m in units))


@contextlib.contextmanager
def _full_dtensors(modules: list[nn.Module]) -> Iterator[None]:
    """Each ``DTensor`` parameter of ``modules`` replaced by its gathered whole (on the CPU) for
    the length of the block, then put back: the FSDP2 parameter objects stay as they were."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[int] = set()
    try:
        for module in modules:
            for owner in module.modules():
                if id(owner) in seen:
                    continue
                seen.add(id(owner))
                for key, p in list(owner._parameters.items()):
                    if isinstance(p, DTensor):
                        whole = p.detach().full_tensor().cpu()  # collective: every process gathers
                        owner._parameters[key] = nn.Parameter(whole, requires_grad=p.requires_grad)
                        swapped.append((owner, key, p))
        yield
    finally:
        for owner, key, p in reversed(swapped):
            owner._parameters[key] = p


def adapter_modules(adapters: AdapterSet, name: str,
                    extras: tuple[str, ...] | None = None) -> list[nn.Module]:
    """The modules whose tensors the files of adapter ``name`` hold: its pieces and the extra
    modules saved with it (its head)."""
    adapter = adapters[name]
    extras = adapter.extras if extras is None else adapters.resolve_modules(tuple(extras))
    return [*adapter.pieces.values(), *(submodule(adapters.model, e) for e in extras)]


def save_adapter(model: nn.Module, adapters: AdapterSet, name: str, path: str | Path) -> Path | None:
    """Save adapter ``name`` (with its head) as :meth:`AdapterSet.save` does, also when FSDP has
    sharded ``model`` (the model as training wraps it). Call it on every process; the main
    process writes, and gets the folder (the others get ``None``)."""
    with gathered(model, adapter_modules(adapters, name)) as main:
        if main:
            return adapters.save(name, path)
    return None


def check_whole(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are a process's shard of a sharded model rather than the whole: an
    FSDP2 ``DTensor``, an empty tensor (what FSDP1 and ZeRO-3 leave on a process that does not
    hold that parameter), or a view of storage that FSDP has freed (safetensors would crash)."""
    from torch.distributed.tensor import DTensor

    for key, t in tensors.items():
        problem = ("a DTensor shard" if isinstance(t, DTensor) else "empty" if t.numel() == 0 else
                   "freed" if t.untyped_storage().nbytes() == 0 else None)
        if problem:
            raise AdapterStateError(
                f"tensor {key} is {problem}: the model is "
                "sharded (FSDP or DeepSpeed ZeRO-3) and this process holds only part of it; save with "
                "peftlab.distributed.save_adapter(wrapped_model, adapters, name, path) on every "
                "process, or trainer.save_model() with peftlab.adapter_checkpoints")
