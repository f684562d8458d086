"""State-dict adapters for Hugging Face checkpoints, one module per external format.

`adapter_for(model_type)` returns the module handling a config.json's `model_type`; anything else
raises InteropError listing what is supported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moonforge.model.adapters.base import InteropError

_MODULES = {
    "deepseek_v3": "deepseek_v3",
    "llama": "dense_lm",
    "qwen2": "dense_lm",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "kimi_vl": "kimi_vl",
}
SUPPORTED_TYPES = tuple(_MODULES)
"""Every `model_type` moonforge imports."""


def adapter_for(model_type: str | None) -> ModuleType:
    """The adapter module for `model_type`, or InteropError naming the supported types."""
    if model_type not in _MODULES:
        raise InteropError(
            f"model_type {model_type!r} is not supported; moonforge imports "
            f"{', '.join(SUPPORTED_TYPES)} (convert the checkpoint to one of these, or open an issue)"
        )
    return importlib.import_module(f"moonforge.model.adapters.{_MODULES[model_type]}")
