"""Load a recipe's `init:` parts (imported checkpoints or other artifacts) into a freshly built VLM.

An artifact directory holds `model.safetensors` with our prefixed keys ("vision.", "projector.",
"lm.") and says what shape each part has: `import.json` (an import: only the parts it provides)
or `model_config.json` (a stage checkpoint or whole-VLM import). A part loads only into a model
whose shape for it is the same, field by field, except the fields that do not shape the weights
(`FREE_FIELDS`); a differing vision position-grid side is resampled bicubically, as MoonViT does
for every image. A mismatch fails before training with each field, both values and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors import safe_open

from moonforge.model.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig
from moonforge.model.vlm import VLM
from moonforge.stages.artifacts import MODEL_CONFIG_FILE, WEIGHTS_FILE

IMPORT_FILE = "import.json"
PARTS = ("vision", "projector", "lm")
_PART_CONFIGS: dict[str, type[BaseModel]] = {
    "vision": VisionConfig,
    "projector": ProjectorConfig,
    "lm": LMConfig,
}
FREE_FIELDS = {
    "vision": {"max_patches", "merge_size", "pos_grid", "rope_theta", "use_rope"},
    "projector": set(),
    "lm": {"rope_theta", "max_position_embeddings"},
}
"""Fields a recipe may set differently from the artifact it starts from: they change no weight
shape (RoPE bases and lengths are what the long-context stage changes on purpose)."""


def artifact_part_configs(path: Path) -> dict[str, BaseModel]:
    """Part name -> shape config of the artifact at `path`."""
    path = Path(path)
    if (path / IMPORT_FILE).is_file():
        parts = json.loads((path / IMPORT_FILE).read_text())["parts"]
        return {k: _PART_CONFIGS[k].model_validate(v) for k, v in parts.items()}
    if (path / MODEL_CONFIG_FILE).is_file():
        cfg = VLMConfig.model_validate_json((path / MODEL_CONFIG_FILE).read_text())
        return {"vision": cfg.vision, "projector": cfg.projector, "lm": cfg.lm}
    raise FileNotFoundError(
        f"init artifact {path} has neither {IMPORT_FILE} nor "
        f"{MODEL_CONFIG_FILE}; name an imported checkpoint or a stage output"
    )


def check_part_config(part: str, have: BaseModel, want: BaseModel, source: Path) -> None:
    """Raise ValueError listing every shape field where the artifact and the recipe differ."""
    a, b = have.model_dump(), want.model_dump()
    diffs = [
        f"model.{part}.{k}: recipe {b[k]!r}, artifact {a.get(k)!r}"
        for k in b
        if k not in FREE_FIELDS[part] and a.get(k) != b[k]
    ]
    if diffs:
        fix = "; ".join(f"{k}: {a.get(k)!r}" for k in b if k not in FREE_FIELDS[part] and a.get(k) != b[k])
        raise ValueError(
            f"init {part} from {source}: its shape differs from the recipe's model.{part} ("
            + "; ".join(diffs)
            + f"). Set these in the recipe's model.{part} section ({fix}), "
            "or import a checkpoint of the recipe's shape"
        )


def resample_grid(grid_GGD: torch.Tensor, side: int) -> torch.Tensor:
    """A (G, G, D) position grid bicubically resized to (side, side, D) (align_corners False)."""
    if grid_GGD.shape[0] == side and grid_GGD.shape[1] == side:
        return grid_GGD
    x_1DGG = grid_GGD.permute(2, 0, 1)[None].float()
    out = F.interpolate(x_1DGG, size=(side, side), mode="bicubic", align_corners=False)
    return out[0].permute(1, 2, 0).to(grid_GGD.dtype).contiguous()


def part_state(path: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of `part` in the artifact at `path`, without the part prefix."""
    prefix = part + "."
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def load_init(model: VLM, model_cfg: VLMConfig, init: Mapping[str, Path]) -> list[str]:
    """Load every `init` part into `model` (strict per part); return one line per part loaded."""
    done = []
    for name, path in init.items():
        for part in PARTS if name == "vlm" else (name,):
            configs = artifact_part_configs(path)
            if part not in configs:
                raise ValueError(
                    f"init {name}: {path} holds no {part} weights (it has "
                    f"{', '.join(sorted(configs))}); point init.{part} at an "
                    f"artifact that has one"
                )
            want = getattr(model_cfg, part)
            check_part_config(part, configs[part], want, path)
            state = part_state(path, part)
            if part == "vision" and "pos_emb.weight" in state:
                state["pos_emb.weight"] = resample_grid(state["pos_emb.weight"], want.pos_grid)
            module = getattr(model, part)
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"init {part} from {path}: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}; the artifact is not a {part} of this model"
                )
            done.append(f"{part} <- {path}")
    return done
