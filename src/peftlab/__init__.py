"""peftlab: parameter-efficient fine-tuning beyond LoRA, on any transformers model.

    import peftlab
    adapters = peftlab.attach(model)
    adapters.add("sst2", peftlab.LoRAConfig(r=8, alpha=16))
    adapters.activate("sst2")
    adapters.train("sst2", also=("classifier",))
"""

from peftlab.adapter_set import AdapterSet, attach, detach
from peftlab.config import AdapterConfig
from peftlab.errors import (
    AdapterLoadError,
    AdapterNameError,
    AdapterSaveError,
    AdapterStateError,
    ConfigError,
    PeftlabError,
    TargetError,
)
from peftlab.methods.bottleneck import BottleneckConfig
from peftlab.methods.compacter import CompacterConfig
from peftlab.methods.fusion import FusionConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.lora import LoRAConfig
from peftlab.roles import ROLE_MAPS, ROLES, Role, RoleMap

__version__ = "0.1.0"

__all__ = [
    "ROLES", "ROLE_MAPS", "AdapterConfig", "AdapterLoadError", "AdapterNameError",
    "AdapterSaveError", "AdapterSet", "AdapterStateError", "BottleneckConfig", "CompacterConfig",
    "ConfigError", "FusionConfig", "IA3Config", "LoRAConfig", "PeftlabError", "Role", "RoleMap",
    "TargetError", "attach", "detach",
]
