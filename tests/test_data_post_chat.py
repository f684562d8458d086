"""ChatML loaders: chat_docs' loss mask is exactly the assistant content + its <|im_end|> (token
by token), packed rows keep dialogues apart, and chat_prompt_items end in the assistant header."""

from __future__ import annotations

import pytest
import torch
from test_data_post_helpers import post_data

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.batches import lm_batches
from moonforge.stages.data.chat import chat_docs, chat_prompt_items
from moonforge.stages.data.chat_records import (
    SftRecord,
    read_reasoning_records,
    read_rl_prompt_records,
    read_sft_records,
)
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.sources import VisionSpec

P, M, CAP = 8, 2, 64
VISION = VisionSpec(P, M, CAP)


@pytest.fixture(scope="module")
def ds():
    d = post_data()
    return {
        "tok": Tokenizer.load(d / "tokenizer"),
        "root": d / "toyworld" / "train",
        "val_root": d / "toyworld" / "val",
        "sft": read_sft_records(d / "sft", "train"),
        "img": read_image_records(d / "toyworld", "train"),
    }


def test_loss_mask_token_by_token(ds):
    tok, rec_img = ds["tok"], ds["img"][0]
    rec = SftRecord.model_validate(
        {
            "id": "t",
            "kind": "image",
            "images": [rec_img.image],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>\nHow many shapes?"},
                {"role": "assistant", "content": "3"},
                {"role": "user", "content": "And the colour?"},
                {"role": "assistant", "content": "red"},
            ],
        }
    )
    doc = chat_docs([rec], ds["root"], tok).doc(0, VISION)
    grid = VISION.grid(rec_img.width, rec_img.height)
    assert [(r.path, r.grid_hw) for r in doc.images] == [(rec_img.image, grid)]
    enc, expected = tok.encode, []

    def turn(role_id, role, parts, target):
        expected.extend((t, 0) for t in [role_id, *enc(role), tok.im_middle_id])
        for p in parts:
            expected.extend(
                (t, 0 if isinstance(p, list) else target) for t in (p if isinstance(p, list) else enc(p))
            )
        expected.append((tok.im_end_id, target))

    turn(tok.im_system_id, "system", ["Be brief."], 0)
    turn(
        tok.im_user_id,
        "user",
        [tok.media_placeholder(grid[0] // M * (grid[1] // M)), "\nHow many shapes?"],
        0,
    )
    turn(tok.im_assistant_id, "assistant", ["3"], 1)
    turn(tok.im_user_id, "user", ["And the colour?"], 0)
    turn(tok.im_assistant_id, "assistant", ["red"], 1)
    assert list(zip(doc.ids, doc.loss_mask)) == expected
    assert tok.decode([t for t, m in zip(doc.ids, doc.loss_mask) if m]) == "3red"


def _assistant_mask(ids: list[int], tok: Tokenizer) -> list[int]:
    """1 on tokens after an assistant header up to and including its <|im_end|> (parsed from ids)."""
    header = [tok.im_assistant_id, *tok.encode("assistant"), tok.im_middle_id]
    mask, inside = [0] * len(ids), False
    for t in range(len(ids)):
        if inside:
            mask[t] = 1
            inside = ids[t] != tok.im_end_id
        elif t + 1 >= len(header) and ids[t + 1 - len(header) : t + 1] == header:
            inside = True
    return mask


def test_packed_dialogues_stay_separate(ds):
    tok = ds["tok"]
    it = lm_batches(
        {"sft": chat_docs(ds["sft"], ds["root"], tok)},
        lambda s: {"sft": 1.0},
        tok,
        seq_len=256,
        batch_size=4,
        seed=0,
        patch_size=P,
        merge_size=M,
        max_patches=CAP,
    )
    segments = 0
    for _ in range(3):
        b = next(it)
        for ids, labels, pos, docs in zip(
            b.input_ids_BL.tolist(), b.labels_BL.tolist(), b.position_ids_BL.tolist(), b.doc_ids_BL.tolist()
        ):
            for d in sorted(set(docs) - {-1}):
                span = [t for t, x in enumerate(docs) if x == d]
                seg, lab = [ids[t] for t in span], [labels[t] for t in span]
                segments += 1
                assert [pos[t] for t in span] == list(range(len(span)))  # positions restart
                assert seg[0] in (tok.im_system_id, tok.im_user_id) and seg[-1] == tok.im_end_id
                mask = _assistant_mask(seg, tok)
                want = [seg[t + 1] if mask[t + 1] else -100 for t in range(len(seg) - 1)] + [-100]
                assert lab == want  # targets only inside this dialogue's assistant turns
    assert segments > 3 * 4  # several dialogues per row


def test_rl_prompts_are_not_training_documents(ds):
    recs = read_rl_prompt_records(post_data() / "rl_prompts", "train")
    with pytest.raises(ValueError, match="without an assistant turn"):
        chat_docs(recs, ds["root"], ds["tok"])


def test_prompt_items_end_in_the_assistant_header(ds):
    tok, d = ds["tok"], post_data()
    header = [tok.im_assistant_id, *tok.encode("assistant"), tok.im_middle_id]
    rl = read_rl_prompt_records(d / "rl_prompts", "val")
    items = chat_prompt_items(rl, ds["val_root"], tok, VISION)
    assert len(items) == len(rl) and {i.kind for i in items} == {"text", "image"}
    for item, rec in zip(items, rl):
        assert item.prompt_ids[-len(header) :] == header
        assert (item.answer, item.verifier, item.difficulty) == (rec.answer, rec.verifier, rec.difficulty)
        if rec.images:
            n = int((item.grid_hw[:, 0] // M * (item.grid_hw[:, 1] // M)).sum())
            assert item.prompt_ids.count(tok.media_pad_id) == n
            assert item.pixels_NP.shape == (int(item.grid_hw.prod(1).sum()), 3 * P * P)
            assert item.grid_hw.dtype == torch.long
        else:
            assert item.pixels_NP is None and item.grid_hw is None
    sft = chat_prompt_items(ds["sft"], ds["root"], tok, VISION, limit=5)
    assert [i.answer for i in sft] == [r.messages[-1].content for r in ds["sft"][:5]]
    assert all(i.prompt_ids[-len(header) :] == header and i.verifier == "exact" for i in sft)
    reasoning = read_reasoning_records(d / "reasoning", "val")
    items = chat_prompt_items(reasoning, ds["val_root"], tok, VISION, limit=4)
    assert [(i.answer, i.verifier) for i in items] == [(r.answer, r.verifier) for r in reasoning[:4]]
    assert all("Answer:" not in tok.decode(i.prompt_ids) for i in items)  # the trace is not in it
