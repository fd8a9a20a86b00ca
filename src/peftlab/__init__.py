"""peftlab: parameter-efficient fine-tuning beyond LoRA, on any transformers model.

    import peftlab
    adapters = peftlab.attach(model)
    adapters.add("sst2", peftlab.LoRAConfig(r=8, alpha=16))
    adapters.activate("sst2")
    adapters.train("sst2", extras=("classifier",))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peftlab.errors import (
    AdapterLoadError,
    AdapterNameError,
    AdapterSaveError,
    AdapterStateError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    PartialTargetWarning,
    PeftlabError,
    TargetError,
    UsageError,
)

if TYPE_CHECKING:
    from peftlab.adapter_set import AdapterSet, attach, detach
    from peftlab.checkpoints import adapter_checkpoints
    from peftlab.config import AdapterConfig
    from peftlab.describe import RoleTable, describe_roles
    from peftlab.infer import infer_role_map
    from peftlab.roles import ROLE_MAPS, ROLES, Role, RoleMap

# Imported on first use, so that `peftlab --help` does not wait for torch and transformers.
# Method config classes (``peftlab.LoRAConfig``, ...) come from the registry (peftlab.methods).
_LAZY = {
    "AdapterSet": "adapter_set", "attach": "adapter_set", "detach": "adapter_set",
    "adapter_checkpoints": "checkpoints", "AdapterConfig": "config",
    "ROLE_MAPS": "roles", "ROLES": "roles", "Role": "roles",
    "RoleMap": "roles", "RoleTable": "describe", "describe_roles": "describe",
    "infer_role_map": "infer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"peftlab.{_LAZY[name]}"), name)
    elif name.endswith("Config") and not name.startswith("_"):
        from peftlab.methods import config_class

        value = config_class(name)
        if value is None:
            raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    else:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    from peftlab.methods import REGISTRY

    return sorted({*globals(), *_LAZY, *(m.config.__name__ for m in REGISTRY.values())})


__version__ = "0.1.0"

__all__ = [
    "ROLES", "ROLE_MAPS", "AdapterConfig", "AdapterLoadError", "AdapterNameError",
    "AdapterSaveError", "AdapterSet", "AdapterStateError",
    "ConfigError", "DataError", "NonFiniteLossError",
    "PartialTargetWarning", "PeftlabError", "Role", "RoleMap", "RoleTable", "TargetError",
    "UsageError", "adapter_checkpoints", "attach", "describe_roles", "detach", "infer_role_map",
]
