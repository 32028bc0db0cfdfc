"""Adapters: URAE/LoRA file formats, exact minor-component conversion, built-ins, and the resident cache."""

from urae.adapters.builtin import BUILTIN_ADAPTERS, resolve_adapter
from urae.adapters.convert import convert_minor_components, prepare_for_serving
from urae.adapters.formats import (
    AdapterFormat,
    AdapterInfo,
    inspect_adapter,
    load_adapter_layers,
    load_lora_state_dict,
    read_header,
    save_lora,
    save_minor_components,
)
from urae.adapters.manager import AdapterManager
from urae.adapters.minor_components import (
    URAE_4K_TARGETS,
    apply_minor_components,
    difference_lora,
    minor_component_targets,
    svd_split,
)

__all__ = [
    "BUILTIN_ADAPTERS",
    "URAE_4K_TARGETS",
    "AdapterFormat",
    "AdapterInfo",
    "AdapterManager",
    "apply_minor_components",
    "convert_minor_components",
    "difference_lora",
    "inspect_adapter",
    "load_adapter_layers",
    "load_lora_state_dict",
    "minor_component_targets",
    "prepare_for_serving",
    "read_header",
    "resolve_adapter",
    "save_lora",
    "save_minor_components",
    "svd_split",
]
