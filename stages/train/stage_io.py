"""What every training stage does at its edges: open the model and tokenizer, close with a checkpoint.

Opening: the upstream checkpoint's model config and weights (or a fresh init from the recipe's
shape), the tokenizer checked against the embedding size, and the VisionSpec used to patch images.
Closing: weights + config + eval.json under ctx.out, and the StageResult.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from moonforge.model.config import VLMConfig
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import VLM, build_vlm
from moonforge.stages.artifacts import EVAL_FILE, Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.config import StageConfig
from moonforge.stages.data.batches import lm_batches
from moonforge.stages.data.evalsets import lm_eval_batches
from moonforge.stages.data.loader_workers import WorkerStream
from moonforge.stages.data.records import require_dataset
from moonforge.stages.data.sources import DocSource, VisionSpec
from moonforge.stages.train.activation_ckpt import apply_ac
from moonforge.stages.train.checkpoint import PERIODIC_DIR, load_weights, save_weights
from moonforge.stages.train.compile_blocks import apply_compile
from moonforge.stages.train.init_parts import load_init
from moonforge.stages.train.loop import TrainSpec


def require(data: Mapping[str, DatasetRef], name: str, stage: str) -> DatasetRef:
    """The dataset `name`, or an error naming the stage's `data:` list and the fix."""
    if name not in data:
        raise KeyError(
            f"stage {stage!r} needs dataset {name!r} but its recipe `data:` list gives "
            f"{sorted(data)}; add {name} to the stage's data list"
        )
    require_dataset(data[name].path, name)
    return data[name]


def open_model(
    base: Checkpoint | None,
    ctx: StageContext,
    seed: int,
    model_cfg: VLMConfig | None = None,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> tuple[VLM, VLMConfig]:
    """Build the VLM (seeded), load `base`'s weights, then the recipe's `init:` parts
    (ctx.init); `model_cfg` overrides the shape's runtime-settable fields (e.g. the long-context
    RoPE base). `activation_checkpointing` (the stage's Runtime field) then checkpoints every
    LM, ViT and stage-1 tower block, and `compile` (another) compiles every LM block."""
    cfg = model_cfg or (base.model_config() if base is not None else ctx.model)
    torch.manual_seed(seed)
    model = build_vlm(cfg, device=ctx.device, seed=seed)
    if base is not None:
        load_weights(model, base)
    if ctx.init:  # the recipe's init: parts override the upstream's weights for those parts
        load_init(model, cfg, ctx.init)
    if activation_checkpointing:
        apply_ac(model, ("lm", "vision", "caption"))
    if compile:  # after checkpointing: a checkpointed block compiles inside its checkpoint
        apply_compile(model)
    return model, cfg


def open_tokenizer(data: Mapping[str, DatasetRef], model_cfg: VLMConfig, stage: str) -> Tokenizer:
    ref = require(data, "tokenizer", stage)
    tok = Tokenizer.load(ref.path / "tokenizer.json")
    # An imported tokenizer (digest import:<fp>) may have fewer tokens than the checkpoint's
    # embedding rows (vendors round the table up); the DVC BPE must match it exactly.
    tok.require_vocab_size(model_cfg.lm.vocab_size, allow_spare_rows=ref.digest.startswith("import:"))
    return tok


def vision_spec(model_cfg: VLMConfig, max_patches: int | None = None) -> VisionSpec:
    return VisionSpec.of(model_cfg.vision, max_patches)


def finish(
    model: VLM,
    model_cfg: VLMConfig,
    ctx: StageContext,
    metrics: dict[str, float],
    data: Mapping[str, DatasetRef],
) -> StageResult:
    """Write the final checkpoint and eval.json under ctx.out; return the StageResult."""
    # Periodic checkpoints only matter for an unfinished run; the artifact is the final weights.
    shutil.rmtree(ctx.out / PERIODIC_DIR, ignore_errors=True)
    ckpt = save_weights(model, model_cfg, ctx.out)
    (ctx.out / EVAL_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    ctx.sink.log(max(1, int(metrics.get("train/steps", 1))), metrics)
    ctx.sink.flush()
    return StageResult(checkpoint=ckpt, metrics=metrics, data_used=tuple(sorted(data)))


def train_spec(cfg: StageConfig, **override) -> TrainSpec:
    """The loop's spec from a stage config (override num_steps / schedule / label per phase)."""
    base: dict[str, Any] = dict(
        num_steps=cfg.steps,
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        trainable=tuple(cfg.trainable),
        grad_accum=cfg.grad_accum,
        router_bias_update=cfg.router_bias_update,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        label=cfg.stage_name,
    )
    base.update(override)
    return TrainSpec(**base)


def lm_stream(
    sources: Mapping[str, DocSource],
    weights_at,
    tok: Tokenizer,
    cfg: StageConfig,
    model_cfg: VLMConfig,
    seq_len: int | None = None,
    rows: int | None = None,
    par=None,
):
    """Infinite packed micro-batches from a re-weighted source mixture; `par` (ctx.parallel):
    this rank builds only its own (its replica's) micro-batches, from its share of every source; with
    cfg.num_workers > 0 loader processes build them (stages/data/loader_workers.py)."""
    v = model_cfg.vision
    micro = rows or (cfg.micro_batch_size or cfg.batch_size)
    # the ranks of a context-parallel group read the same micro-batches: share by replica
    rank, world = (par.dp_rank, par.dp_size) if par is not None else (0, 1)

    def make(worker: int = 0, num_workers: int = 1):
        return lm_batches(
            sources,
            weights_at,
            tok,
            seq_len or cfg.seq_len,
            micro,
            cfg.seed,
            v.patch_size,
            v.merge_size,
            v.max_patches,
            rank,
            world,
            worker,
            num_workers,
            temporal_merge=v.temporal_merge_size,
        )

    if cfg.num_workers:  # loader processes, each with its own share of every source
        return WorkerStream(make, rank, world, cfg.num_workers)
    return make()


def eval_batches(
    source: DocSource,
    tok: Tokenizer,
    cfg: StageConfig,
    model_cfg: VLMConfig,
    seq_len: int | None = None,
    rows: int | None = None,
) -> list:
    """Held-out batches of `source` in index order (cfg.eval.num_examples documents)."""
    return lm_eval_batches(
        source,
        tok,
        seq_len or cfg.seq_len,
        rows or cfg.eval.batch_size,
        vision_spec(model_cfg),
        max_docs=cfg.eval.num_examples,
    )
