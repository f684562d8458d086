"""The LM's own next-token loss (model/lm_loss.py): only the labelled tokens get logits; below the
chunk size it equals computing every token's logits and then the cross-entropy (bit-identical
when every token is labelled, else up to the rounding of the sums); above it, chunked with
recompute, it equals the plain loss and its gradients (fp32, tolerance stated), ignored labels
included."""

from __future__ import annotations

import pytest
import torch

from moonforge.model import lm_loss
from moonforge.model.config import LMConfig
from moonforge.model.lm import MoELM
from moonforge.stages.train.objectives import token_ce

CFG = LMConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    head_dim=8,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    first_k_dense=1,
    dense_intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    max_position_embeddings=64,
)
TOL = 1e-6
"""fp32: the chunked sum differs from one mean in summation order only."""


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = torch.randint(0, 97, (3, 20), generator=g)
    labels[0, :5] = labels[2, -3:] = -100  # a prompt and a document end
    pos = torch.arange(20).expand(3, 20)
    return ids, pos, torch.zeros(3, 20, dtype=torch.long), labels


def _loss_and_grads(tie: bool, chunked: bool, monkeypatch):
    torch.manual_seed(0)
    lm = MoELM(CFG.model_copy(update={"tie_word_embeddings": tie}), backend="sdpa")
    ids, pos, doc, labels = _batch()
    if chunked:  # 60 tokens x 97 entries: chunks of 7 tokens, the last one short
        monkeypatch.setattr(lm_loss, "CE_CHUNK_ELEMS", 7 * 97)
        assert lm_loss.chunk_tokens(97) == 7
    loss = lm(ids, pos, doc, labels_BL=labels)
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_unchunked_loss_equals_every_tokens_logits_then_cross_entropy(tie, monkeypatch):
    loss, grads = _loss_and_grads(tie, False, monkeypatch)
    torch.manual_seed(0)
    lm = MoELM(CFG.model_copy(update={"tie_word_embeddings": tie}), backend="sdpa")
    ids, pos, doc, labels = _batch()
    ref, n = token_ce(lm(ids, pos, doc), labels)
    ref.backward()
    assert n == 52
    torch.testing.assert_close(loss, ref.detach(), atol=TOL, rtol=TOL)
    for k, p in lm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, atol=TOL, rtol=1e-5, msg=k)


def test_every_token_labelled_is_bit_identical_to_logits_then_cross_entropy():
    torch.manual_seed(0)
    lm = MoELM(CFG, backend="sdpa")
    ids, pos, doc, labels = _batch()
    labels = torch.randint(0, 97, labels.shape, generator=torch.Generator().manual_seed(1))
    loss = lm(ids, pos, doc, labels_BL=labels)
    ref, n = token_ce(lm(ids, pos, doc), labels)
    assert n == 60 and torch.equal(loss, ref)


def test_only_labelled_tokens_get_logits(monkeypatch):
    """The lm_head runs on the 52 labelled of 60 tokens (SFT's prompts and media pads, ~90% of
    its tokens, cost nothing there), chunked or not."""
    torch.manual_seed(0)
    lm = MoELM(CFG, backend="sdpa")
    ids, pos, doc, labels = _batch()
    rows: list[int] = []
    head = lm.logits
    monkeypatch.setattr(lm, "logits", lambda h: rows.append(h.shape[0]) or head(h))
    lm(ids, pos, doc, labels_BL=labels)
    assert rows == [52]
    rows.clear()
    monkeypatch.setattr(lm_loss, "CE_CHUNK_ELEMS", 7 * 97)
    lm(ids, pos, doc, labels_BL=labels)
    assert rows == [7] * 7 + [3]


def test_a_part_without_labelled_tokens_is_zero_and_still_reaches_the_model():
    """A context-parallel rank whose slice holds no labelled token adds 0 to the loss, through a
    graph that still reaches the LM (its backward must run like the other ranks')."""
    h = torch.randn(6, 32, requires_grad=True)
    head = torch.nn.Linear(32, 97)
    part = lm_loss.cross_entropy_from_hidden(h, head, torch.full((6,), -100), 97, denominator=torch.tensor(4))
    part.backward()
    assert part.item() == 0.0 and h.grad is not None and not h.grad.any()


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tie, monkeypatch):
    plain, g_plain = _loss_and_grads(tie, False, monkeypatch)
    chunked, g_chunked = _loss_and_grads(tie, True, monkeypatch)
    torch.testing.assert_close(chunked, plain, atol=TOL, rtol=TOL)
    assert g_chunked.keys() == g_plain.keys()
    for k in g_plain:
        torch.testing.assert_close(g_chunked[k], g_plain[k], atol=TOL, rtol=1e-5, msg=k)


def test_a_batch_without_labelled_tokens_is_refused_naming_the_loss_mask():
    from types import SimpleNamespace

    from moonforge.stages.train.objectives import lm_loss

    ids, pos, doc, labels = _batch()
    batch = SimpleNamespace(
        input_ids_BL=ids,
        position_ids_BL=pos,
        doc_ids_BL=doc,
        media_mask_BL=None,
        pixels_NP=None,
        grid_hw=None,
        labels_BL=torch.full_like(labels, -100),
    )
    with pytest.raises(ValueError, match="no labelled tokens.*check the loss mask"):
        lm_loss(None, batch)  # refused before any model runs
