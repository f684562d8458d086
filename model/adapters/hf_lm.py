"""What the Hugging Face causal-LM adapters (deepseek_v3.py, dense_lm.py) share: reading RoPE
settings from a config.json, moving rotary rows between HF's rotate-half layout and moonforge's
adjacent pairs, the expected names/shapes of an LM state dict, and tensor bookkeeping that names
every missing, mis-shaped or unexpected tensor.

What is unusual:
- The expected tensors come from `MoELM` itself, built on the meta device (no memory, no I/O), so
  an adapter can never drift from the model's real parameter names and shapes.
- Rotary layouts. moonforge rotates adjacent pairs (2i, 2i+1) with frequency i (rope.py). HF
  Llama / Qwen2 (and DeepseekV3 with `rope_interleave: false`) rotate pairs (i, i + n/2). Rows of
  q / k projections that feed RoPE are permuted per head on import ([0, n/2, 1, n/2 + 1, ...])
  and back on export ([0, 2, 4, ..., 1, 3, 5, ...]). A permutation applied alike to q and k
  leaves every q.k dot product, hence the logits, unchanged.

Legend: H heads, X rows per head, N rotary dims of one head, D input dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from pydantic import ValidationError
from torch import Tensor

from moonforge.model.adapters.base import InteropError, expect_shape, take
from moonforge.model.config import LMConfig
from moonforge.model.experts import merge_all_expert_keys
from moonforge.model.lm import MoELM

DEFAULT_ROPE_THETA = 10_000.0
"""transformers' default_theta when a config names none."""
_PLAIN_ROPE = (None, "default")


def rope_theta_from_hf(hf_config: Mapping) -> float:
    """The RoPE base of a config.json, refusing what moonforge's plain RoPE cannot represent.

    Reads `rope_parameters` (transformers 5) or the legacy `rope_scaling` + top-level
    `rope_theta`, with transformers' precedence. Raises InteropError naming a scaling kind other
    than default (yarn, linear, llama3, dynamic, ...) and a partial_rotary_factor other than 1.
    """
    params = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise InteropError(f"rope settings {params!r} in config.json are not a mapping")
    kind = params.get("rope_type", params.get("type"))
    if kind not in _PLAIN_ROPE:
        raise InteropError(
            f"config.json asks for rope scaling of kind {kind!r}; moonforge implements plain RoPE "
            f"with a configurable base (rope_theta); {kind} is not implemented. Convert the "
            "checkpoint to plain RoPE or open an issue"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise InteropError(
            f"config.json sets partial_rotary_factor={partial}; moonforge rotates the whole head "
            "dim (partial rotary is not implemented)"
        )
    return float(params.get("rope_theta", hf_config.get("rope_theta", DEFAULT_ROPE_THETA)))


def pairs_from_halves(n: int) -> Tensor:
    """Row order turning rotate-half rows (i, i + n/2) into adjacent pairs: [0, n/2, 1, ...]."""
    return torch.arange(n).view(2, n // 2).t().flatten()


def halves_from_pairs(n: int) -> Tensor:
    """Inverse of `pairs_from_halves`: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.arange(n).view(n // 2, 2).t().flatten()


def permute_rows(w_HXD: Tensor, num_heads: int, lo: int, order: Tensor) -> Tensor:
    """Reorder rows [lo, lo + len(order)) of every head of a (num_heads * X, ...) weight or bias
    by `order`; returns a new tensor of w's shape (the other rows copied unchanged)."""
    heads_HX = w_HXD.reshape(num_heads, -1, *w_HXD.shape[1:])
    out_HX = heads_HX.clone()
    out_HX[:, lo : lo + len(order)] = heads_HX[:, lo : lo + len(order)][:, order]
    return out_HX.reshape(w_HXD.shape)


def lm_state_shapes(lm: LMConfig) -> dict[str, tuple[int, ...]]:
    """MoELM's state-dict keys (unprefixed) -> shapes, from a meta-device build."""
    with torch.device("meta"):
        model = MoELM(lm, backend="sdpa")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lm_config(source: str, **fields) -> LMConfig:
    """LMConfig(**fields), with a validation failure re-raised as InteropError naming `source`."""
    try:
        return LMConfig(**fields)
    except ValidationError as e:
        raise InteropError(f"{source} describes an LM moonforge cannot build: {e}") from e


def config_value(hf_config: Mapping, key: str, defaults: Mapping):
    """hf_config[key], else transformers' default for it; InteropError when there is neither."""
    if key in hf_config:
        return hf_config[key]
    if key in defaults:
        return defaults[key]
    raise InteropError(f"config.json has no {key!r}, which this architecture requires")


class TensorReader:
    """Takes tensors from a checkpoint by name with a shape check, remembering what was taken so
    `finish` can refuse the leftovers (a checkpoint of another shape or architecture)."""

    def __init__(self, hf_state: Mapping[str, Tensor]) -> None:
        self.hf_state = hf_state
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        self.used.add(name)
        return expect_shape(name, take(self.hf_state, name), shape)

    def skip(self, name: str) -> None:
        """Mark `name` as read without using it (e.g. a tied lm_head)."""
        self.used.add(name)

    def finish(self, ignorable: Callable[[str], bool]) -> None:
        """Raise InteropError naming the tensors nobody took, except `ignorable` ones."""
        left = sorted(k for k in self.hf_state if k not in self.used and not ignorable(k))
        if left:
            shown = ", ".join(repr(k) for k in left[:8])
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise InteropError(
                f"checkpoint has {len(left)} tensor(s) its config.json does not account for: "
                f"{shown}{more}; the checkpoint and config.json disagree (wrong num_hidden_layers "
                "or experts?) or it is another architecture"
            )


def our_lm_tensors(state: Mapping[str, Tensor], lm: LMConfig) -> Iterable[tuple[str, Tensor]]:
    """(unprefixed key, tensor) for every tensor MoELM(lm) has, read from our "lm."-prefixed
    `state`; InteropError for a missing or mis-shaped one and for unknown "lm." keys. A state
    saved before experts were stacked (per-expert `experts.{e}.*_proj.weight`) is read too."""
    state = merge_all_expert_keys(state)
    shapes = lm_state_shapes(lm)
    unknown = sorted(k for k in state if k.startswith("lm.") and k[3:] not in shapes)
    if unknown:
        raise InteropError(
            f"state has LM tensors the LM config does not define: "
            f"{', '.join(unknown[:8])}; the state and its LMConfig disagree"
        )
    for key, shape in shapes.items():
        if "lm." + key not in state:
            raise InteropError(f"state has no tensor 'lm.{key}', which its LMConfig requires")
        yield key, expect_shape("lm." + key, state["lm." + key], shape)
