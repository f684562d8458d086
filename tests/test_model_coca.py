"""Stage-1 towers: embedding shapes and norms, caption alignment and per-image independence.

Legend: N patches, Dv ViT width, B captions, L caption length, V vocab, E embed width.
"""

import math

import pytest
import torch

from moonforge.model.coca import CaptionTowers
from moonforge.model.config import CaptionTowerConfig

CFG = CaptionTowerConfig(
    hidden_size=32, num_text_layers=2, num_decoder_layers=2, num_heads=4, embed_dim=24, max_text_len=10
)
GRID = torch.tensor([[2, 3], [4, 4]])


def _towers() -> CaptionTowers:
    torch.manual_seed(0)
    return CaptionTowers(CFG, vision_dim=16, vocab_size=50, backend="sdpa").eval()


def _feats() -> torch.Tensor:
    return torch.randn(6 + 16, 16, generator=torch.Generator().manual_seed(1))


def test_embeddings_are_unit_norm_with_right_shapes():
    t = _towers()
    img = t.image_embed(_feats(), GRID)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    txt = t.text_embed(ids, mask)
    assert img.shape == (2, 24) and txt.shape == (3, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert t.siglip_logits(img, txt).shape == (2, 3)


def test_text_embed_ignores_padding_tokens():
    t = _towers()
    ids = torch.randint(0, 50, (1, 7))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    ids2 = ids.clone()
    ids2[0, 4:] = 0
    torch.testing.assert_close(t.text_embed(ids, mask), t.text_embed(ids2, mask))


def test_image_embed_and_captions_do_not_mix_images():
    t = _towers()
    feats = _feats()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        both_img = t.image_embed(feats, GRID)
        both_cap = t.caption_logits(feats, GRID, ids)
        first_img = t.image_embed(feats[:6], GRID[:1])
        first_cap = t.caption_logits(feats[:6], GRID[:1], ids[:1])
    torch.testing.assert_close(both_img[:1], first_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both_cap[:1], first_cap, atol=1e-5, rtol=1e-5)


def test_caption_logits_are_next_token_aligned():
    t = _towers()
    feats = _feats()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        a = t.caption_logits(feats, GRID, ids)
        ids2 = ids.clone()
        ids2[:, 3:] = (ids2[:, 3:] + 1) % 50
        b = t.caption_logits(feats, GRID, ids2)
    assert a.shape == (2, 6, 50)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # logits[:, t] sees ids[:, :t+1] only
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_logit_params_init_and_length_checks():
    t = _towers()
    assert math.isclose(t.logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    assert t.logit_bias.item() == -10.0
    t.init_logit_params(0.0, -5.0)
    assert t.logit_scale.item() == 0.0 and t.logit_bias.item() == -5.0
    with pytest.raises(ValueError, match="max_text_len"):
        t.text_embed(torch.zeros(1, 11, dtype=torch.long), torch.ones(1, 11))
    with pytest.raises(ValueError, match="one per image"):
        t.caption_logits(_feats(), GRID, torch.zeros(3, 4, dtype=torch.long))


def test_logit_params_are_one_element_vectors_and_old_scalars_still_load():
    """1-element like HF's SiglipModel (DeepSpeed ZeRO cannot hold a 0-dim parameter); state
    dicts written when they were 0-dim load into them unchanged in value."""
    t = _towers()
    assert t.logit_scale.shape == t.logit_bias.shape == (1,)
    old = {k: v.clone() for k, v in t.state_dict().items()}
    old["logit_scale"], old["logit_bias"] = torch.tensor(0.5), torch.tensor(-3.0)
    t2 = _towers()
    t2.load_state_dict(old, strict=True)
    assert t2.logit_scale.tolist() == [0.5] and t2.logit_bias.tolist() == [-3.0]
