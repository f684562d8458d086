"""Stage 1: vit_pretrain. CoCa-like ViT pretraining: L = L_siglip + caption_weight * L_caption.

The image encoder and a small text tower give SigLIP's sigmoid contrastive loss; a tiny caption
decoder predicts the target text from the image's patch features. Images arrive NaViT-packed at
native resolution, with a patch cap that rises over the stage (progressive resolution). The LM
is not involved and is carried through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from torch import Tensor, nn

from moonforge.stages.artifacts import Checkpoint, DatasetRef, StageContext, StageResult
from moonforge.stages.data.batches import image_text_batches
from moonforge.stages.data.evalsets import retrieval_eval_batch
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.user_mix import DeclaredMix
from moonforge.stages.evals import retrieval_accuracy
from moonforge.stages.stage_configs import ViTPretrainConfig
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.loop import train
from moonforge.stages.train.objectives import caption_loss, siglip_loss
from moonforge.stages.train.stage_io import (
    finish,
    open_model,
    open_tokenizer,
    require,
    train_spec,
    vision_spec,
)

if TYPE_CHECKING:
    from moonforge.model.vlm import VLM


def patch_cap(cfg: ViTPretrainConfig, step: int, max_patches: int) -> int:
    """The progressive-resolution patch cap at `step` (the last milestone reached)."""
    frac = step / max(cfg.steps, 1)
    cap = [m.max_patches for m in cfg.resolution_schedule if m.at_frac <= frac][-1]
    return min(cap, max_patches)


def coca_loss(caption_weight: float):
    def loss_fn(model: nn.Module, batch) -> tuple[Tensor, dict[str, float]]:
        vlm = cast("VLM", model)  # the loop passes the model it trains: stage 1's VLM
        feats = vlm.vision(batch.pixels_NP, batch.grid_hw)
        towers = vlm.caption
        img = towers.image_embed(feats, batch.grid_hw)
        txt = towers.text_embed(batch.text_ids_BL, batch.text_mask_BL)
        l_sig = siglip_loss(img, txt, towers.logit_scale, towers.logit_bias)
        logits = towers.caption_logits(feats, batch.grid_hw, batch.text_ids_BL)
        l_cap = caption_loss(logits, batch.text_ids_BL, batch.text_mask_BL)
        return l_sig + caption_weight * l_cap, {
            "siglip_loss": l_sig.item(),
            "caption_loss": l_cap.item(),
            "patches": float(batch.pixels_NP.shape[0]),
        }

    return loss_fn


def vit_pretrain(
    base: Checkpoint | None, data: Mapping[str, DatasetRef], cfg: ViTPretrainConfig, ctx: StageContext
) -> StageResult:
    """Return a checkpoint whose ViT and stage-1 towers are trained; retrieval accuracy in metrics."""
    model, mcfg = open_model(
        base, ctx, cfg.seed, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile
    )
    tok = open_tokenizer(data, mcfg, cfg.stage_name)
    world = require(data, "toyworld", cfg.stage_name).path
    model.caption.init_logit_params(cfg.siglip_init_logit_scale, cfg.siglip_init_logit_bias)
    v, max_len = mcfg.vision, mcfg.caption.max_text_len
    val = retrieval_eval_batch(
        read_image_records(world, "val"),
        world / "val",
        tok,
        vision_spec(mcfg),
        max_len,
        limit=cfg.eval.num_examples,
    )
    before = retrieval_accuracy(model, val)
    mix = DeclaredMix(cfg, data, tok, vision_spec(mcfg), ctx.parallel)
    par = ctx.parallel
    batches = image_text_batches(
        read_image_records(world, "train"),
        world / "train",
        tok,
        cfg.micro_batch_size or cfg.batch_size,
        lambda s: patch_cap(cfg, s // cfg.grad_accum, v.max_patches),
        cfg.text_targets,
        v.patch_size,
        v.merge_size,
        cfg.seed,
        max_len,
        rank=par.rank if par is not None else 0,
        world=par.world_size if par is not None else 1,
        extra=mix.pairs(),
    )
    state = train(
        model,
        apply_trainable(model, cfg.trainable),
        batches,
        coca_loss(cfg.caption_weight),
        train_spec(cfg),
        ctx,
        mcfg,
    )
    after = retrieval_accuracy(model, val)
    last = state.history[-1]
    metrics = {
        "eval/retrieval_acc": after["acc"],
        "eval/retrieval_acc_before": before["acc"],
        "eval/retrieval_chance": after["chance"],
        "eval/retrieval_n": after["n"],
        "train/final_loss": last["loss"],
        "train/final_siglip_loss": last["siglip_loss"],
        "train/final_caption_loss": last["caption_loss"],
        "train/steps": float(state.step),
        "data/skipped_images": float(batches.skipped),
        **mix.metrics(SimpleNamespace(docs_by_source=batches.drawn)),
    }
    return finish(model, mcfg, ctx, metrics, data)
