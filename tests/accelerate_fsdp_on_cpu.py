"""``peftlab train`` under ``accelerate launch --use_fsdp`` on CPUs, for tests/test_distributed.py.

accelerate 1.15 shards only on accelerators: on a CPU it keeps plain DDP (FSDP2) or fails (FSDP1),
and peftlab refuses FSDP on CPUs for that reason. torch itself shards on CPUs with gloo, so this
launcher lifts those checks to run the real FSDP path of Trainer, accelerate and peftlab here:

- accelerate's state keeps ``MULTI_CPU`` when given an FSDP plugin on a CPU; it becomes ``FSDP``;
- FSDP1 compares its compute device ``cpu`` with the ``device_id`` accelerate passes (``cpu:0``);
- peftlab's refusal of FSDP without an accelerator (``peftlab.distributed.check_launch``).

``benchmarks/fsdp_check.py`` runs the same comparison on GPUs without any of this.
Run as ``accelerate launch --use_fsdp ... tests/accelerate_fsdp_on_cpu.py train ...``.
"""

from __future__ import annotations

from typing import Any

import accelerate.state
import torch
import torch.distributed.fsdp._init_utils as fsdp_init
from accelerate.utils import DistributedType

import peftlab.distributed

_state_init = accelerate.state.AcceleratorState.__init__
_compute_device = fsdp_init._get_compute_device


def _fsdp_state_on_cpu(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def _cpu_compute_device(module: Any, ignored: Any, device: Any, *args: Any) -> torch.device:
    if device is not None and device.type == "cpu":
        return torch.device("cpu")
    return _compute_device(module, ignored, device, *args)


accelerate.state.AcceleratorState.__init__ = _fsdp_state_on_cpu
fsdp_init._get_compute_device = _cpu_compute_device
peftlab.distributed.fsdp_requested = lambda: False

if __name__ == "__main__":
    from peftlab.cli import main

    main()
