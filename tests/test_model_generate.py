"""Generation: KV-cache parity with full recompute (MLA, MHA, images), logprobs against an
unpadded forward, stop ids, sampling reproducibility, top-p, repeat detection.

Legend: B prompts, L length, V vocab, R rows still generating, N patches, P pixels per patch.
"""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from moonforge.model.attention import block_mask, suffix_block_mask
from moonforge.model.config import VLMConfig
from moonforge.model.generate import (
    MEDIA_PAD_ID,
    CachedDecoder,
    FullDecoder,
    RepeatDetector,
    generate,
    left_pad,
    top_p_filter,
)
from moonforge.model.vlm import VLM, build_vlm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FIRST_TEXT_ID = 11  # ids 0..10 are the special tokens
NEW = 10


def _tiny(attention: str) -> VLM:
    raw = yaml.safe_load((RECIPES / "tiny.yaml").read_text())["model"]
    raw["lm"]["attention"] = attention
    cfg = VLMConfig.model_validate({**raw, "attn_backend": "sdpa"})
    return build_vlm(cfg, seed=0).eval()


@pytest.fixture(scope="module", params=["mla", "mha"])
def vlm(request) -> VLM:
    return _tiny(request.param)


@pytest.fixture(scope="module")
def mla() -> VLM:
    return _tiny("mla")


def _prompts(lengths=(7, 3, 12), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_TEXT_ID, 2048, (n,), generator=g).tolist() for n in lengths]


def _row_logprobs(model: VLM, prompt: list[int], new: list[int], pixels=None, grid=None):
    """log_softmax of ONE unpadded forward over prompt + new, at the generated tokens."""
    ids_1L = torch.tensor([prompt + new])
    L = ids_1L.shape[1]
    mask_1L = (ids_1L == MEDIA_PAD_ID) & (torch.arange(L) < len(prompt))
    with torch.no_grad():
        logits_1LV = model(ids_1L, torch.arange(L)[None], torch.zeros_like(ids_1L), mask_1L, pixels, grid)
    logp_LV = torch.log_softmax(logits_1LV[0, len(prompt) - 1 : -1].float(), -1)
    return logp_LV.gather(-1, torch.tensor(new)[:, None])[:, 0]


def test_left_pad_positions_start_at_each_prompt():
    ids, pos, doc = left_pad([[5, 6], [7]], pad_id=1)
    assert ids.tolist() == [[5, 6], [1, 7]]
    assert pos.tolist() == [[0, 1], [0, 0]] and doc.tolist() == [[0, 0], [-1, 0]]


def test_suffix_mask_is_last_rows_of_block_mask():
    doc = torch.tensor([[-1, -1, 0, 0, 0, 0], [0, 0, 1, 1, -1, 2]])
    for q in (1, 3, 6):
        assert torch.equal(suffix_block_mask(doc, q), block_mask(doc, causal=True)[:, :, -q:])


def test_greedy_cached_equals_uncached(vlm):
    prompts = _prompts()
    kw = dict(max_new_tokens=NEW, temperature=0.0, stop_ids=())
    cached = generate(vlm, prompts, use_cache=True, **kw)
    full = generate(vlm, prompts, use_cache=False, **kw)
    assert cached.tokens == full.tokens
    assert cached.lengths == [NEW] * 3 and cached.finish_reasons == ["length"] * 3
    torch.testing.assert_close(torch.tensor(cached.logprobs), torch.tensor(full.logprobs), atol=1e-4, rtol=0)


def test_cached_step_logits_match_full_forward(vlm):
    """Greedy by hand through both decoders; row 1 drops out after step 3 (cache compaction)."""
    prompts = _prompts()
    mask = torch.zeros(3, 12, dtype=torch.bool)
    cached = CachedDecoder(vlm, prompts, NEW, mask, None, None)
    full = FullDecoder(vlm, prompts, NEW, mask, None, None)
    with torch.no_grad():
        a, b = cached.prefill(), full.prefill()
        rows = [0, 1, 2]
        for step in range(NEW - 1):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            nxt = b.argmax(-1)
            if step == 3:
                rows, nxt = [0, 2], nxt[[0, 2]]
            a, b = cached.step(rows, nxt), full.step(rows, nxt)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_logprobs_are_unpadded_model_log_softmax(mla):
    prompts = _prompts()
    out = generate(mla, prompts, max_new_tokens=NEW, temperature=1.5, top_p=0.9, seed=1, stop_ids=())
    for p, new, lp in zip(prompts, out.tokens, out.logprobs):
        torch.testing.assert_close(torch.tensor(lp), _row_logprobs(mla, p, new), atol=1e-4, rtol=0)


def test_image_prompts_match_uncached_and_single_row(mla):
    g = torch.Generator().manual_seed(1)
    P = 3 * mla.cfg.vision.patch_size**2
    grids = [torch.tensor([[4, 4]]), torch.tensor([[2, 4]])]  # 4 and 2 image tokens
    pixels = [torch.randn(int(gr.prod()), P, generator=g) for gr in grids]
    text = _prompts((3, 5, 4), seed=2)
    prompts = [
        text[0] + [MEDIA_PAD_ID] * 4 + [99],  # image 0
        text[1],  # no image
        [7] + [MEDIA_PAD_ID] * 2 + text[2],
    ]  # image 1
    kw = dict(
        max_new_tokens=6, temperature=0.0, stop_ids=(), pixels_NP=torch.cat(pixels), grid_hw=torch.cat(grids)
    )
    cached, full = generate(mla, prompts, **kw), generate(mla, prompts, use_cache=False, **kw)
    assert cached.tokens == full.tokens
    for i, (px, gr) in zip((0, 2), zip(pixels, grids)):
        torch.testing.assert_close(
            torch.tensor(cached.logprobs[i]),
            _row_logprobs(mla, prompts[i], cached.tokens[i], px, gr),
            atol=1e-4,
            rtol=0,
        )
    no_img = generate(
        mla, prompts[:1], max_new_tokens=6, temperature=0.0, stop_ids=(), media_pad_id=-1
    )  # media pads embedded as text: the images mattered
    assert no_img.tokens[0] != cached.tokens[0]


def test_stop_id_ends_one_row_others_continue(mla):
    prompts = _prompts()
    ref = generate(mla, prompts, max_new_tokens=NEW, temperature=0.0, stop_ids=())
    stop = ref.tokens[0][3]
    out = generate(mla, prompts, max_new_tokens=NEW, temperature=0.0, stop_ids=(stop, 10**6))
    for toks, reason, full in zip(out.tokens, out.finish_reasons, ref.tokens):
        if stop in full:
            cut = full.index(stop) + 1
            assert (toks, reason) == (full[:cut], "stop")
        else:
            assert (toks, reason) == (full, "length")
    assert out.lengths[0] <= 4
    assert "length" in out.finish_reasons  # at least one row continued to the end


def test_sampling_reproducible_and_greedy_limits(mla):
    prompts = _prompts()
    kw = dict(max_new_tokens=NEW, stop_ids=())
    a = generate(mla, prompts, temperature=1.0, top_p=0.95, seed=7, **kw)
    b = generate(mla, prompts, temperature=1.0, top_p=0.95, seed=7, **kw)
    c = generate(mla, prompts, temperature=1.0, top_p=0.95, seed=8, **kw)
    d = generate(mla, prompts, temperature=1.0, top_p=0.95, seed=7, use_cache=False, **kw)
    assert a.tokens == b.tokens == d.tokens and a.tokens != c.tokens
    greedy = generate(mla, prompts, temperature=0.0, **kw)
    assert generate(mla, prompts, temperature=1.0, top_p=1e-6, seed=3, **kw).tokens == greedy.tokens
    for p, new in zip(prompts, greedy.tokens):  # argmax at every step
        ids = torch.tensor([p + new])
        with torch.no_grad():
            logits = mla(ids, torch.arange(ids.shape[1])[None], torch.zeros_like(ids))
        assert logits[0, len(p) - 1 : -1].argmax(-1).tolist() == new


def test_top_p_filter_example():
    out = top_p_filter(torch.tensor([[0.2, 0.5, 0.3]]), 0.7)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.625, 0.375]]))
    assert torch.equal(top_p_filter(torch.tensor([[0.9, 0.1]]), 0.5), torch.tensor([[1.0, 0.0]]))


def test_repeat_detector():
    det = RepeatDetector(ngram=2, max_count=3)
    assert [det.push(t) for t in [1, 2, 1, 2, 1, 2]] == [False] * 5 + [True]
    det = RepeatDetector(ngram=3, max_count=2)
    assert not any(det.push(t) for t in [1, 2, 3, 4, 5, 6, 7])
    det = RepeatDetector(ngram=2, max_count=3)  # single-token loop: overlapping 2-grams
    assert [det.push(t) for t in [5, 5, 5, 5]] == [False, False, False, True]
    with pytest.raises(ValueError, match="repeat_max"):
        RepeatDetector(2, 1)


def test_repeat_ends_a_looping_generation(mla):
    """A bigram model (attention and FFN outputs zeroed) that maps a -> b -> a loops forever."""
    loop = copy.deepcopy(mla)
    lm = loop.lm
    with torch.no_grad():
        for name, mod in lm.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                mod.weight.zero_()
        a, b = 100, 200
        lm.embed_tokens.weight[a] = 0.0
        lm.embed_tokens.weight[b] = 0.0
        lm.embed_tokens.weight[a, 0] = lm.embed_tokens.weight[b, 1] = 1.0
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[b, 0] = lm.lm_head.weight[a, 1] = 1.0
    prompts = [[300, a], _prompts((4,))[0]]
    out = generate(
        loop, prompts, max_new_tokens=30, temperature=0.0, stop_ids=(), repeat_ngram=2, repeat_max=4
    )
    assert out.tokens[0] == [b, a] * 4 and out.finish_reasons[0] == "repeat"
    plain = generate(loop, prompts[:1], max_new_tokens=12, temperature=0.0, stop_ids=())
    assert plain.finish_reasons == ["length"] and plain.tokens[0] == [b, a] * 6


def test_modes_restored_and_router_untouched(mla):
    mla.train()
    mla.vision.eval()
    moe = mla.lm.moe_layers()[0][1]
    before = moe.gate.load_counts.clone()
    generate(mla, _prompts(), max_new_tokens=3)
    assert mla.training and mla.lm.training and not mla.vision.training
    assert torch.equal(moe.gate.load_counts, before)
    mla.eval()


def test_argument_errors(mla):
    with pytest.raises(ValueError, match="both repeat_ngram and repeat_max"):
        generate(mla, [[20]], max_new_tokens=2, repeat_ngram=3)
    with pytest.raises(ValueError, match="top_p"):
        generate(mla, [[20]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(mla, [[20], []], max_new_tokens=2)
