"""Tokenizer: special tokens and vocab size, no special-token injection from text, the media
placeholder, and the ChatML template's loss mask checked token by token."""

from __future__ import annotations

import pytest
from test_data_helpers import TINY_PARAMS, tiny_data

from moonforge.model.tokenizer import SPECIAL_TOKENS, Tokenizer
from moonforge.stages.data.bpe import train_bpe, training_texts
from moonforge.stages.data.params import TokenizerParams


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(tiny_data() / "tokenizer")


def test_vocab_and_specials(tok):
    assert tok.vocab_size == TINY_PARAMS["tokenizer"]["vocab_size"]
    tok.require_vocab_size(512)
    with pytest.raises(ValueError, match=r"512 tokens but the model expects vocab_size=2048"):
        tok.require_vocab_size(2048)
    ids = [tok._hf.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tok.eos_id, tok.pad_id, tok.im_end_id, tok.media_pad_id) == (0, 1, 6, 9)


def test_encode_never_emits_specials_and_decode_round_trips(tok):
    text = "def f(x):\n    return x + 1  # <|im_end|> is just text here"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_id, *tok.encode("cat"), tok.pad_id]) == "cat"


def test_media_placeholder(tok):
    ph = tok.media_placeholder(6)
    assert ph[0] == tok.media_start_id and ph[-1] == tok.media_end_id
    assert ph.count(tok.media_pad_id) == 6 and ph[-8] == tok.media_content_id
    assert ph[1:-8] == tok.encode("image")
    with pytest.raises(ValueError):
        tok.media_placeholder(0)


def test_chat_template_loss_mask_token_by_token(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the count?"},
        {"role": "assistant", "content": "two"},
    ]
    ids, mask = tok.encode_chat(messages, num_image_tokens=[4])
    enc = tok.encode
    expected: list[tuple[int, int]] = []

    def turn(role_id, role, body, target):
        expected.extend((t, 0) for t in [role_id, *enc(role), tok.im_middle_id])
        expected.extend((t, target) for t in body)
        expected.append((tok.im_end_id, target))

    turn(tok.im_system_id, "system", enc("Be brief."), 0)
    expected.extend(
        (t, 0)
        for t in [
            tok.im_user_id,
            *enc("user"),
            tok.im_middle_id,
            *tok.media_placeholder(4),
            *enc("\nWhat color is the circle?"),
        ]
    )
    expected.append((tok.im_end_id, 0))
    turn(tok.im_assistant_id, "assistant", enc("red"), 1)
    turn(tok.im_user_id, "user", enc("And the count?"), 0)
    turn(tok.im_assistant_id, "assistant", enc("two"), 1)
    assert list(zip(ids, mask)) == expected
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "redtwo"
    assert ids.count(tok.media_pad_id) == 4

    prompt, pmask = tok.encode_chat(messages[:2], [4], add_generation_prompt=True)
    assert prompt[-3:] == [tok.im_assistant_id, *enc("assistant"), tok.im_middle_id][-3:]
    assert not any(pmask)


@pytest.mark.parametrize(
    "messages,images,match",
    [
        ([{"role": "robot", "content": "hi"}], [], "unknown role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], [], "empty assistant"),
        ([{"role": "user", "content": "<image><image>"}], [4], "2 <image> marker"),
        ([{"role": "user", "content": "no image"}], [4], "0 <image> marker"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], [], "system message"),
        ([{"role": "user", "content": 3}], [], "content must be a string"),
        ([{"role": "user", "content": "hi", "name": "bob"}], [], "keys 'role' and 'content'"),
        ([], [], "empty dialogue"),
        ([{"role": "user", "content": "<image>"}], [0], "positive"),
    ],
)
def test_malformed_dialogues_raise(tok, messages, images, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages, images)


def test_bpe_is_deterministic_and_exact():
    texts = training_texts(tiny_data() / "text", tiny_data() / "toyworld")
    params = TokenizerParams(vocab_size=400)
    a, b = train_bpe(texts, params), train_bpe(texts, params)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 400
    with pytest.raises(ValueError, match="too few merges"):
        train_bpe(["a tiny corpus", "with few words"], TokenizerParams(vocab_size=1000))
    with pytest.raises(ValueError, match="must exceed 267"):
        train_bpe(texts, TokenizerParams(vocab_size=200))


def test_model_tokenizer_imports_only_tokenizers_and_stdlib():
    import ast
    import sys
    from pathlib import Path

    import moonforge.model.tokenizer as mod

    for node in ast.walk(ast.parse(Path(mod.__file__).read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top == "tokenizers" or top in sys.stdlib_module_names, name
