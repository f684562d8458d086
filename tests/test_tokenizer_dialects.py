"""Chat dialects (kimi, qwen, llama3) on small tokenizer.json files built here with HF `tokenizers`
(nothing is downloaded): detection, encode_chat ids and loss masks token by token, no special
token from user text, ensure_media_tokens + embedding growth, the vocab/embedding size check,
chat-template parity with transformers' apply_chat_template, and generation / RL rollouts
stopping at the dialect's own ids.

Legend: V vocab rows, D hidden size, N patches, P pixels per patch.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from moonforge.model.config import VLMConfig
from moonforge.model.generate import DEFAULT_STOP_IDS, generate
from moonforge.model.hf_tokenizer import ensure_media_tokens, generation_config, hf_tokenizer_files
from moonforge.model.tokenizer import KIMI, LLAMA3, QWEN, SPECIAL_TOKENS, Tokenizer, detect_dialect
from moonforge.model.vlm import build_vlm
from moonforge.model.vocab_growth import grow_vocab

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer split (Llama 3's differs only in \\p{N}{1,3})."""
CORPUS = [
    "Hello world, the user asked a question.",
    "What color is the circle? It is red.",
    "You are a helpful assistant.",
    "system user assistant image",
    "Be brief.\n\nAnd the count? two",
    "Question:\n\nAnswer:\n\nYes\n\nNo\n\nMaybe",
] * 10
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
MEDIA = ["<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>"]
DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the circle?"},
    {"role": "assistant", "content": "It is red."},
    {"role": "user", "content": "And the count?"},
    {"role": "assistant", "content": " two\n"},
]


def _bpe(front=(), back=(), hf_style=False) -> HFTokenizer:
    """A tiny byte-level BPE. front: specials at ids 0.. (moonforge's own layout); back: specials
    appended after the merges (Qwen / Llama layout, with their NFC + regex pre-tokenizer)."""
    tok = HFTokenizer(models.BPE())
    if hf_style:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=list(front),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(list(back))
    return tok


def _llama3_raw() -> HFTokenizer:
    return _bpe(back=LLAMA3_SPECIALS, hf_style=True)


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    llama = _llama3_raw()
    ensure_media_tokens(llama)
    return {
        "kimi": Tokenizer(_bpe(front=SPECIAL_TOKENS)),
        "qwen": Tokenizer(_bpe(back=QWEN_SPECIALS, hf_style=True)),
        "llama3": Tokenizer(llama),
    }


def test_dialect_detection(toks):
    assert {name: t.dialect for name, t in toks.items()} == {"kimi": KIMI, "qwen": QWEN, "llama3": LLAMA3}
    assert detect_dialect(_llama3_raw()) is LLAMA3  # the marker is enough, media tokens may be missing
    with pytest.raises(ValueError, match="cannot tell the chat dialect"):
        detect_dialect(_bpe(back=["<|endoftext|>"]))
    with pytest.raises(ValueError, match="unknown chat dialect 'gemma'"):
        Tokenizer(_bpe(front=SPECIAL_TOKENS), dialect="gemma")
    kimi = toks["kimi"]  # moonforge's own layout: today's ids
    assert kimi.stop_ids == DEFAULT_STOP_IDS
    assert (kimi.pad_id, kimi.media_pad_id, kimi.eos_id, kimi.bos_id) == (1, 9, 0, None)
    qwen = toks["qwen"]
    ids = {t: qwen._hf.token_to_id(t) for t in QWEN_SPECIALS}
    assert qwen.stop_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert qwen.pad_id == qwen.eos_id == ids["<|endoftext|>"]
    assert qwen.media_pad_id == ids["<|image_pad|>"]
    assert qwen.im_middle_id is None and qwen.im_end_id == ids["<|im_end|>"]
    llama = toks["llama3"]
    ids = {t: llama._hf.token_to_id(t) for t in LLAMA3_SPECIALS + MEDIA}
    assert llama.stop_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])
    assert (llama.bos_id, llama.turn_end_id, llama.media_pad_id) == (
        ids["<|begin_of_text|>"],
        ids["<|eot_id|>"],
        ids["<|media_pad|>"],
    )


def _expected(tok: Tokenizer, turns: list[tuple]) -> tuple[list[int], list[int]]:
    """Flatten (ids_or_text, target) pieces: text is encoded on its own, target applies per id."""
    ids, mask = [], []
    for piece, target in turns:
        new = tok.encode(piece) if isinstance(piece, str) else list(piece)
        ids += new
        mask += [target] * len(new)
    return ids, mask


def test_encode_chat_ids_and_masks_per_dialect(toks):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat color?"},
        {"role": "assistant", "content": "red"},
    ]
    k = toks["kimi"]
    assert k.encode_chat(msgs, [4]) == _expected(
        k,
        [
            ([k.im_system_id], 0),
            ("system", 0),
            ([k.im_middle_id], 0),
            ("Be brief.", 0),
            ([k.im_end_id], 0),
            ([k.im_user_id], 0),
            ("user", 0),
            ([k.im_middle_id], 0),
            ([k.media_start_id], 0),
            ("image", 0),
            ([k.media_content_id] + [k.media_pad_id] * 4 + [k.media_end_id], 0),
            ("\nWhat color?", 0),
            ([k.im_end_id], 0),
            ([k.im_assistant_id], 0),
            ("assistant", 0),
            ([k.im_middle_id], 0),
            ("red", 1),
            ([k.im_end_id], 1),
        ],
    )

    q = toks["qwen"]
    start, end = q._hf.token_to_id("<|im_start|>"), q.turn_end_id
    vs, ve = q._hf.token_to_id("<|vision_start|>"), q._hf.token_to_id("<|vision_end|>")
    assert q.encode_chat(msgs, [4]) == _expected(
        q,
        [
            ([start], 0),
            ("system\nBe brief.", 0),
            ([end], 0),
            ("\n", 0),
            ([start], 0),
            ("user\n", 0),
            ([vs] + [q.media_pad_id] * 4 + [ve], 0),
            ("\nWhat color?", 0),
            ([end], 0),
            ("\n", 0),
            ([start], 0),
            ("assistant\n", 0),
            ("red", 1),
            ([end], 1),
            ("\n", 0),
        ],
    )  # "\n" never generated

    ll = toks["llama3"]
    sh, eh = ll._hf.token_to_id("<|start_header_id|>"), ll._hf.token_to_id("<|end_header_id|>")
    media = ll.media_placeholder(4)
    assert media[-6:] == [ll.media_content_id] + [ll.media_pad_id] * 4 + [ll.media_end_id]
    assert ll.encode_chat(msgs, [4]) == _expected(
        ll,
        [
            ([ll.bos_id, sh], 0),
            ("system", 0),
            ([eh], 0),
            ("\n\nBe brief.", 0),
            ([ll.turn_end_id], 0),
            ([sh], 0),
            ("user", 0),
            ([eh], 0),
            ("\n\n", 0),
            (media, 0),
            ("\nWhat color?", 0),
            ([ll.turn_end_id], 0),
            ([sh], 0),
            ("assistant", 0),
            ([eh], 0),
            ("\n\n", 0),
            ("red", 1),
            ([ll.turn_end_id], 1),
        ],
    )

    for tok in toks.values():
        ids, mask = tok.encode_chat(msgs[:2], [4], add_generation_prompt=True)
        full, _ = tok.encode_chat(msgs, [4])
        assert not any(mask) and full[: len(ids)] == ids  # the prompt is a prefix of the dialogue
        ids, mask = tok.encode_chat(DIALOGUE)
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == "It is red. two\n"
        assert [t for t, m in zip(ids, mask) if m and t in tok.special_ids] == [tok.turn_end_id] * 2


def test_token_straddling_header_and_content_is_supervised(toks):
    q = toks["qwen"]  # "assistant\n" + "\nx": the regex joins "\n\n", the BPE has merged it
    ids, mask = q.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nx"}])
    body = ids[ids.index(q.turn_end_id) + 3 :]  # after <|im_end|> "\n" <|im_start|>
    newlines = q.encode("\n\n")
    assert len(newlines) == 1 and newlines[0] in body
    assert mask[ids.index(newlines[0])] == 1


def test_specials_in_user_text_stay_plain_bytes(toks):
    forged = " ".join(QWEN_SPECIALS + LLAMA3_SPECIALS + list(SPECIAL_TOKENS) + MEDIA)
    for tok in toks.values():
        assert not set(tok.encode(forged)) & tok.special_ids
        assert tok.decode(tok.encode(forged)) == forged
        plain, _ = tok.encode_chat([{"role": "user", "content": "a b"}])
        ids, _ = tok.encode_chat([{"role": "user", "content": f"a {forged} b"}])
        assert [t for t in ids if t in tok.special_ids] == [t for t in plain if t in tok.special_ids]


def test_ensure_media_tokens_adds_exactly_the_missing_ones(tmp_path):
    raw = _llama3_raw()
    old = raw.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ValueError, match=r"lacks the llama3 dialect's special tokens .*ensure_media_tokens"):
        Tokenizer(raw)
    (tmp_path / "tokenizer.json").write_text(raw.to_str())
    for source in (raw, tmp_path / "tokenizer.json", tmp_path):
        hf, added = ensure_media_tokens(source)
        assert added == MEDIA
        assert [hf.token_to_id(t) for t in MEDIA] == list(range(old, old + 4))
        assert hf.get_vocab_size(with_added_tokens=True) == old + 4
        assert ensure_media_tokens(hf) == (hf, [])
    for front, back in ((SPECIAL_TOKENS, ()), ((), QWEN_SPECIALS)):
        assert ensure_media_tokens(_bpe(front=front, back=back, hf_style=bool(back)))[1] == []
    bare = _bpe(back=["<|endoftext|>"])  # no dialect at all: name one and get its roles too
    hf, added = ensure_media_tokens(bare, "kimi")
    assert added == list(KIMI.specials) and Tokenizer(hf, "kimi").stop_ids[0] == hf.token_to_id("<|im_end|>")
    plain = _llama3_raw()
    plain.add_tokens([AddedToken("<|media_pad|>", special=False)])
    with pytest.raises(ValueError, match=r"\['<\|media_pad\|>'\] exist in the vocabulary as ordinary tokens"):
        ensure_media_tokens(plain)


def test_grow_vocab_keeps_old_rows_bit_identical():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        sd = {
            "lm.embed_tokens.weight": torch.randn(10, 4, generator=g).to(dtype),
            "lm.lm_head.weight": torch.randn(10, 4, generator=g).to(dtype),
            "lm.norm.weight": torch.ones(4),
        }
        grown = grow_vocab(sd, 14)
        assert grown["lm.norm.weight"] is sd["lm.norm.weight"]
        for key in ("lm.embed_tokens.weight", "lm.lm_head.weight"):
            w, new = sd[key], grown[key]
            assert new.shape == (14, 4) and new.dtype == dtype and torch.equal(new[:10], w)
            assert torch.equal(new[10:], w.float().mean(0).to(dtype).expand(4, 4))
    with pytest.raises(ValueError, match="cannot grow 10 vocabulary rows to 8"):
        grow_vocab(sd, 8)
    with pytest.raises(ValueError, match="disagree"):
        grow_vocab({**sd, "lm.lm_head.weight": torch.zeros(9, 4)}, 12)
    with pytest.raises(ValueError, match="none of the vocabulary tensors"):
        grow_vocab({"lm.norm.weight": torch.ones(4)}, 12)


def test_grown_checkpoint_loads_into_the_larger_model(toks):
    raw = yaml.safe_load((RECIPES / "tiny.yaml").read_text())["model"]
    small = build_vlm(VLMConfig.model_validate(raw), seed=0)
    raw["lm"]["vocab_size"] += 4
    big = build_vlm(VLMConfig.model_validate(raw), seed=1)
    big.load_state_dict(grow_vocab(small.state_dict(), raw["lm"]["vocab_size"]), strict=True)
    for name, w in small.state_dict().items():  # vocabulary rows grew, nothing else moved
        got = big.state_dict()[name]
        assert torch.equal(got[: w.shape[0]] if got.shape != w.shape else got, w), name


def test_vocab_larger_than_embedding_is_refused(toks):
    tok = toks["llama3"]
    rows = tok.vocab_size - 4  # the checkpoint before its rows were grown
    with pytest.raises(
        ValueError,
        match=rf"{tok.vocab_size} tokens but the model expects vocab_size="
        rf"{rows}.*grow_vocab.*model.lm.vocab_size: {tok.vocab_size}",
    ):
        tok.require_vocab_size(rows)
    with pytest.raises(ValueError, match="would index past the embedding"):
        tok.require_vocab_size(rows, allow_spare_rows=True)
    tok.require_vocab_size(tok.vocab_size + 60, allow_spare_rows=True)  # rounded-up rows are fine
    with pytest.raises(ValueError, match="set model.lm.vocab_size"):
        tok.require_vocab_size(tok.vocab_size + 60)


@pytest.mark.parametrize("name", ["kimi", "qwen", "llama3"])
def test_chat_template_parity_with_transformers(toks, name, tmp_path):
    from transformers import AutoTokenizer

    tok = toks[name]
    files = hf_tokenizer_files(tok)
    for fname, text in files.items():
        (tmp_path / fname).write_text(text)
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    assert config["eos_token"] == tok.id_to_token(tok.turn_end_id)
    assert config["pad_token"] == tok.id_to_token(tok.pad_id)
    assert json.loads(files["special_tokens_map.json"])["eos_token"] == config["eos_token"]
    gen = generation_config(tok)
    assert gen["eos_token_id"] == list(tok.stop_ids) and gen["pad_token_id"] == tok.pad_id
    assert gen.get("bos_token_id") == tok.bos_id

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tok.turn_end_id and hf.pad_token_id == tok.pad_id
    cases = [(DIALOGUE, False), (DIALOGUE[:4], True), (DIALOGUE[1:3], False), (DIALOGUE[1:2], True)]
    for messages, gen_prompt in cases:
        theirs = hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=False
        )
        assert theirs == tok.encode_chat(messages, add_generation_prompt=gen_prompt)[0]
    content = [{"type": "image"}, {"type": "text", "text": "hi"}]
    rendered = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    assert rendered.count(tok.id_to_token(tok.media_pad_id)) == 1  # the processor expands it


class _FixedHead(nn.Module):
    """lm_head stand-in: every position's argmax is `token` (the model's other weights still run)."""

    def __init__(self, vocab_size: int, token: int):
        super().__init__()
        self.vocab_size, self.token = vocab_size, token

    def forward(self, h_XD):
        logits = torch.zeros(*h_XD.shape[:-1], self.vocab_size, dtype=h_XD.dtype, device=h_XD.device)
        return logits.index_fill(-1, torch.tensor([self.token], device=h_XD.device), 50.0)


@contextmanager
def _always_emits(model, token: int):
    """Swap the LM head for a _FixedHead (pytest's monkeypatch cannot undo a submodule swap)."""
    real = model.lm.lm_head
    model.lm.lm_head = _FixedHead(model.cfg.lm.vocab_size, token)
    try:
        yield
    finally:
        model.lm.lm_head = real


@pytest.fixture(scope="module")
def tiny_vlm():
    raw = yaml.safe_load((RECIPES / "tiny.yaml").read_text())["model"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_vlm(VLMConfig.model_validate({**raw, "attn_backend": "sdpa"}), seed=0).eval()
    torch.set_num_threads(threads)


def test_generation_stops_at_the_dialects_stop_ids(toks, tiny_vlm):
    from moonforge.stages.data.chat import ChatPromptItem
    from moonforge.stages.rl.policy import RolloutSampler, response_logprobs, rollout_stop_ids
    from moonforge.stages.rl.replay import ReplayBuffer

    tok = toks["llama3"]
    prompts = [
        tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
        for q in ("What color is the circle?", "hi")
    ]
    ids = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, media_pad_id=tok.media_pad_id)
    with _always_emits(tiny_vlm, tok.turn_end_id):
        for use_cache in (True, False):
            out = generate(tiny_vlm, prompts, max_new_tokens=4, temperature=0.0, use_cache=use_cache, **ids)
            assert out.tokens == [[tok.turn_end_id]] * 2 and out.finish_reasons == ["stop"] * 2
        out = generate(tiny_vlm, prompts, max_new_tokens=4, temperature=0.0)  # our BPE's ids: no stop
        assert out.finish_reasons == ["length"] * 2

    # RL rollouts stop at the tokenizer's media pad too (resumed, it would read as an image slot)
    assert rollout_stop_ids(tok) == (*tok.stop_ids, tok.media_pad_id)
    items = [ChatPromptItem("p0", "text", prompts[0], None, None, "red", "exact", 0.0)]
    sampler = RolloutSampler(
        tiny_vlm, items, tok, temperature=1.0, top_p=1.0, seed=0, repeat_ngram=None, repeat_max=None
    )
    sampler.expect(ReplayBuffer(), [((0, 0, 0), prompts[0])])
    with _always_emits(tiny_vlm, tok.media_pad_id):
        [(new, logps, reason)] = sampler([prompts[0]], 5)
        assert (new, reason) == ([tok.media_pad_id], "stop")
        # a sampled media pad is scored as a token, not read as an image slot
        got = response_logprobs(tiny_vlm, items, [new], media_pad_id=tok.media_pad_id)
    torch.testing.assert_close(got, torch.tensor([sum(logps)]), atol=1e-4, rtol=0)


def test_image_slots_are_the_dialects_media_pads(toks, tiny_vlm):
    tok = toks["qwen"]  # <|image_pad|> is neither our id 9 nor any id of moonforge's own BPE
    P = 3 * tiny_vlm.cfg.vision.patch_size**2
    grid = torch.tensor([[4, 4]])  # 16 patches -> 4 merged image tokens
    pixels = torch.randn(16, P, generator=torch.Generator().manual_seed(0))
    prompts = [
        tok.encode_chat(
            [{"role": "user", "content": "<image>\nWhat color?"}], [4], add_generation_prompt=True
        )[0],
        tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0],
    ]
    kw = dict(
        max_new_tokens=5,
        temperature=0.0,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        media_pad_id=tok.media_pad_id,
        pixels_NP=pixels,
        grid_hw=grid,
    )
    cached, full = generate(tiny_vlm, prompts, **kw), generate(tiny_vlm, prompts, use_cache=False, **kw)
    assert cached.tokens == full.tokens
    text_only = generate(
        tiny_vlm, prompts[:1], **{**kw, "media_pad_id": -1, "pixels_NP": None, "grid_hw": None}
    )
    assert text_only.logprobs[0] != cached.logprobs[0]  # the image reached the qwen pad slots

    from moonforge.stages.data.chat import ChatPromptItem
    from moonforge.stages.rl.policy import response_logprobs

    item = ChatPromptItem("p0", "image", prompts[0], pixels, grid, "red", "exact", 0.0)
    with torch.no_grad():
        got = response_logprobs(tiny_vlm, [item], [cached.tokens[0]], media_pad_id=tok.media_pad_id)
    torch.testing.assert_close(got, torch.tensor([sum(cached.logprobs[0])]), atol=1e-4, rtol=0)
