"""Activation checkpointing applied from outside: the same loss and gradients (fp32 CPU) for the LM,
the ViT and the stage-1 towers, router loads counted once, plain forwards under no_grad, the frozen
eval-mode LM of align still checkpointed, and a clear error for a part without blocks.

Legend: B rows, L length, N patches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moonforge.model.vlm import build_vlm
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train import activation_ckpt
from moonforge.stages.train.activation_ckpt import apply_ac, is_checkpointed

REPO = Path(__file__).resolve().parents[1]
GRAD_TOL = 1e-6
"""fp32: recomputation replays the same ops, so gradients agree to float rounding (measured:
bitwise equal); this bounds |a - b| relative to each gradient's largest magnitude."""


def _model():
    return build_vlm(load_recipe(REPO / "recipes" / "tiny.yaml").model, seed=0)


def _batch(vocab: int, patch: int):
    g = torch.Generator().manual_seed(0)
    B, L = 2, 48
    ids_BL = torch.randint(0, vocab, (B, L), generator=g)
    doc_BL = torch.tensor([[0] * 20 + [1] * 28, [0] * 40 + [-1] * 8])
    pos_BL = torch.tensor([list(range(20)) + list(range(28)), list(range(40)) + [0] * 8])
    grid = torch.tensor([[4, 4], [2, 4]])
    pixels_NP = torch.rand(24, 3 * patch * patch, generator=g)
    media_BL = torch.zeros(B, L, dtype=torch.bool)
    media_BL[0, 2:6] = True
    media_BL[1, 3:5] = True
    return ids_BL, pos_BL, doc_BL, media_BL, pixels_NP, grid


def _vlm_loss(model, batch):
    ids_BL, pos_BL, doc_BL, media_BL, pixels_NP, grid = batch
    logits = model(ids_BL, pos_BL, doc_BL, media_BL, pixels_NP, grid)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids_BL[:, 1:].flatten())


def _caption_loss(model, batch):
    *_, pixels_NP, grid = batch
    feats = model.vision(pixels_NP, grid)
    caps = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(caps, dtype=torch.bool)
    logits = model.caption.caption_logits(feats, grid, caps)
    txt = model.caption.text_embed(caps, mask)
    img = model.caption.image_embed(feats, grid)
    return (
        F.cross_entropy(logits[:, :-1].flatten(0, 1), caps[:, 1:].flatten())
        + model.caption.siglip_logits(img, txt).square().mean()
    )


def _grads(model, loss_fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_fn", [_vlm_loss, _caption_loss])
def test_same_loss_and_gradients_with_and_without(loss_fn):
    plain, ckpt = _model().train(), _model().train()
    assert apply_ac(ckpt, ("lm", "vision", "caption")) == 3 + 2 + 2 + 2
    cfg = plain.cfg
    batch = _batch(cfg.lm.vocab_size, cfg.vision.patch_size)
    loss_a, grads_a = _grads(plain, loss_fn, batch)
    loss_b, grads_b = _grads(ckpt, loss_fn, batch)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n, g in grads_a.items():
        assert (g - grads_b[n]).abs().max() <= GRAD_TOL * g.abs().max().clamp(min=1e-12), n
    # names and state are untouched: optimizers, freezing and checkpoints see the same model
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    assert plain.state_dict().keys() == ckpt.state_dict().keys()


def test_router_loads_are_counted_once():
    plain, ckpt = _model().train(), _model().train()
    apply_ac(ckpt, ("lm",))
    batch = _batch(plain.cfg.lm.vocab_size, plain.cfg.vision.patch_size)
    for model in (plain, ckpt):
        _vlm_loss(model, batch).backward()
    for (_, a), (_, b) in zip(plain.lm.moe_layers(), ckpt.lm.moe_layers()):
        assert torch.equal(a.gate.load_counts, b.gate.load_counts)
        assert a.gate.load_counts.sum() > 0 and b.gate.counting


def test_gated_on_grad_mode_not_on_train_mode(monkeypatch):
    """No recomputation under no_grad; still recomputed for a frozen eval-mode LM that gradients
    flow through (align)."""
    model = _model()
    apply_ac(model, ("lm",))
    calls = []
    real = activation_ckpt.checkpoint
    monkeypatch.setattr(activation_ckpt, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    batch = _batch(model.cfg.lm.vocab_size, model.cfg.vision.patch_size)
    with torch.no_grad():
        _vlm_loss(model.eval(), batch)
    assert not calls
    for p in model.lm.parameters():
        p.requires_grad_(False)
    model.lm.eval()
    _vlm_loss(model, batch).backward()
    assert len(calls) == 3
    assert model.projector.linear_1.weight.grad is not None


def test_a_part_without_blocks_fails_clearly():
    model = _model()
    with pytest.raises(ValueError, match="'projector' has none"):
        apply_ac(model, ("projector",))
    with pytest.raises(ValueError, match="no lm.layers block list"):
        apply_ac(torch.nn.Module(), ("lm",))
    assert not any(is_checkpointed(b) for b in model.lm.layers)


def test_deep_copy_keeps_checkpointing_on_the_copy():
    import copy

    model = _model()
    apply_ac(model, ("lm",))
    clone = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in clone.lm.layers)
    assert clone.lm.layers[0].forward.__self__ is clone.lm.layers[0]
