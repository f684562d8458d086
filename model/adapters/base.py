"""What every Hugging Face state-dict adapter shares: the error type, the adapter protocol, and the
shape check that names the offending tensor.

An adapter translates one external checkpoint format (a `model_type` of a HF `config.json`) to and
from moonforge's own layout, at the border only (torchtitan's StateDictAdapter): the model keeps the
layout that runs fastest and never learns a file format. Adapters are pure: dicts of tensors and
plain config dicts in, dicts of tensors and pydantic shape configs out. No file I/O here (reading
directories, shards and indexes is registry/hf_files.py's job).

Our side of every mapping uses the exact keys of `VLM.state_dict()`, prefixed by the part they
belong to: "vision.", "projector.", "lm." (the caption towers are stage-1 only and never imported).

Legend: D hidden, H heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pydantic import BaseModel
from torch import Tensor

PARTS = ("vision", "projector", "lm")
"""The model parts an import can provide, by their VLM child-module names."""


class InteropError(ValueError):
    """A checkpoint that cannot be imported or exported, with a message naming the thing and the fix."""


class Adapter(Protocol):
    """One external format. `parts` maps part name -> its shape config (VisionConfig,
    ProjectorConfig, LMConfig); a whole-VLM format provides all three."""

    MODEL_TYPES: tuple[str, ...]

    def parts_from_hf(self, hf_config: Mapping) -> dict[str, BaseModel]:
        """Shape configs from a config.json dict; raises InteropError for what we cannot represent
        (e.g. an unimplemented rope_scaling kind, named)."""
        ...

    def state_from_hf(
        self, hf_state: Mapping[str, Tensor], parts: Mapping[str, BaseModel], hf_config: Mapping
    ) -> dict[str, Tensor]:
        """Our prefixed state dict from the checkpoint's tensors. Raises InteropError naming the
        tensor and both shapes when one disagrees with the config, and naming missing tensors."""
        ...

    def hf_from_parts(self, parts: Mapping[str, BaseModel]) -> dict:
        """The config.json dict that transformers / vLLM load natively for these shapes."""
        ...

    def state_to_hf(self, state: Mapping[str, Tensor], parts: Mapping[str, BaseModel]) -> dict[str, Tensor]:
        """The checkpoint's tensors (its own names and layout) from our prefixed state dict."""
        ...


def expect_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Return `tensor` if its shape is `shape`, else raise InteropError naming both shapes."""
    if tuple(tensor.shape) != tuple(shape):
        raise InteropError(
            f"tensor {name!r} has shape {list(tensor.shape)} but the checkpoint's config.json implies "
            f"{list(shape)}; the weights and config.json disagree (re-save the checkpoint, or fix "
            "config.json)"
        )
    return tensor


def take(hf_state: Mapping[str, Tensor], name: str) -> Tensor:
    """hf_state[name], or InteropError naming the missing tensor."""
    if name not in hf_state:
        raise InteropError(
            f"checkpoint has no tensor {name!r}, which its config.json requires; "
            "the checkpoint is incomplete or of another architecture"
        )
    return hf_state[name]
