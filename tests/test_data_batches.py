"""Batch builders: image tokens line up with image features, mixtures follow their weights,
progressive resolution follows its schedule, corrupt images are skipped and counted up to a
threshold, and the eval sets are deterministic."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_data_helpers import tiny_data

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.batches import (
    caption_docs,
    grounding_text,
    image_text_batches,
    lm_batches,
    long_docs,
    qa_docs,
    text_docs,
)
from moonforge.stages.data.evalsets import (
    lm_eval_batches,
    needle_eval_items,
    retrieval_eval_batch,
    vqa_eval_items,
)
from moonforge.stages.data.images import TooManyCorruptImagesError
from moonforge.stages.data.records import (
    read_image_records,
    read_longdoc_records,
    read_text_records,
)
from moonforge.stages.data.sources import VisionSpec

P, M, CAP = 8, 2, 64
VISION = VisionSpec(P, M, CAP)


@pytest.fixture(scope="module")
def ds():
    d = tiny_data()
    return {
        "tok": Tokenizer.load(d / "tokenizer"),
        "img": read_image_records(d / "toyworld", "train"),
        "img_root": d / "toyworld" / "train",
        "text": read_text_records(d / "text", "train"),
        "long": read_longdoc_records(d / "longdoc", "train"),
    }


def _sources(ds, **extra):
    tok = ds["tok"]
    return {
        "text": text_docs(ds["text"], tok),
        "caption": caption_docs(ds["img"], ds["img_root"], tok),
        "qa": qa_docs(ds["img"], ds["img_root"], tok),
        "long": long_docs(ds["long"], tok, max_tokens=300),
        **extra,
    }


def _media_runs(row: list[int], media_pad: int) -> list[int]:
    runs, n = [], 0
    for t in row + [-1]:
        if t == media_pad:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_media_tokens_match_image_features(ds):
    tok = ds["tok"]
    it = lm_batches(
        _sources(ds),
        lambda s: {"text": 0.3, "caption": 0.3, "qa": 0.3, "long": 0.1},
        tok,
        seq_len=128,
        batch_size=4,
        seed=0,
        patch_size=P,
        merge_size=M,
        max_patches=CAP,
    )
    with_images = 0
    for _ in range(8):
        b = next(it)
        assert b.input_ids_BL.shape == b.labels_BL.shape == b.media_mask_BL.shape == (4, 128)
        if b.grid_hw is None:  # a batch of text rows only
            assert b.pixels_NP is None and int(b.media_mask_BL.sum()) == 0
            continue
        with_images += 1
        assert b.pixels_NP.shape == (int(b.grid_hw.prod(1).sum()), 3 * P * P)
        per_image = (b.grid_hw[:, 0] // M * (b.grid_hw[:, 1] // M)).tolist()
        assert int(b.media_mask_BL.sum()) == sum(per_image) == int(b.grid_hw.prod(1).sum()) // M**2
        runs = [n for row in b.input_ids_BL.tolist() for n in _media_runs(row, tok.media_pad_id)]
        assert runs == per_image  # row order of images == order of media-pad runs
        assert bool((b.labels_BL[b.media_mask_BL] == -100).all())
        assert b.num_tokens == int((b.doc_ids_BL >= 0).sum()) and 0 < b.num_targets < b.num_tokens
    assert with_images >= 4
    moved = b.to("cpu")
    assert moved.pixels_NP.dtype == torch.float32 and moved.input_ids_BL.dtype == torch.long


def test_qa_loss_is_on_the_answer_only(ds):
    tok = ds["tok"]
    src = qa_docs(ds["img"], ds["img_root"], tok)
    doc = src.doc(0, VISION)
    rec, qa = ds["img"][0], ds["img"][0].qa[0]
    supervised = [t for t, m in zip(doc.ids, doc.loss_mask) if m]
    assert supervised == tok.encode(f" {qa.answer}") + [tok.eos_id]
    assert tok.decode(doc.ids).endswith(f"Question: {qa.question}\nAnswer: {qa.answer}")
    assert doc.images[0].path == rec.image


def test_mixture_weights_are_token_shares(ds):
    tok = ds["tok"]
    it = lm_batches(
        _sources(ds),
        lambda s: {"text": 0.6, "qa": 0.25, "long": 0.15},
        tok,
        seq_len=128,
        batch_size=8,
        seed=1,
        patch_size=P,
        merge_size=M,
        max_patches=CAP,
    )
    for _ in range(40):
        next(it)
    total = sum(it.tokens_by_source.values())
    shares = {k: v / total for k, v in it.tokens_by_source.items()}
    assert shares["caption"] == 0
    assert abs(shares["text"] - 0.6) < 0.07 and abs(shares["qa"] - 0.25) < 0.06
    assert abs(shares["long"] - 0.15) < 0.06


def test_weights_follow_the_step(ds):
    tok = ds["tok"]
    it = lm_batches(
        _sources(ds),
        lambda s: {"text": 1.0} if s < 3 else {"qa": 1.0},
        tok,
        seq_len=64,
        batch_size=4,
        seed=0,
        patch_size=P,
        merge_size=M,
        max_patches=CAP,
    )
    early = [next(it) for _ in range(3)]
    assert all(b.pixels_NP is None and int(b.media_mask_BL.sum()) == 0 for b in early)
    late = [next(it) for _ in range(6)][-1]
    assert all(bool(row.any()) for row in late.media_mask_BL)  # every row now holds QA images
    with pytest.raises(ValueError, match="mixture weights"):
        next(lm_batches(_sources(ds), lambda s: {"nope": 1.0}, tok, 64, 2, 0, P, M, CAP))


def test_image_text_batches_progressive_resolution(ds):
    tok = ds["tok"]
    it = image_text_batches(
        ds["img"],
        ds["img_root"],
        tok,
        batch_size=16,
        max_patches_at=lambda s: 16 if s < 2 else 64,
        text_targets=("caption", "alt_text", "ocr", "grounding"),
        patch_size=P,
        merge_size=M,
        seed=0,
        max_text_len=24,
    )
    batches = [next(it) for _ in range(4)]
    for k, b in enumerate(batches):
        cap = 16 if k < 2 else 64
        assert b.num_images == 16 and int(b.grid_hw.prod(1).max()) <= cap
        assert b.pixels_NP.shape[0] == int(b.grid_hw.prod(1).sum())
        assert bool((b.grid_hw % M == 0).all())
        lengths = b.text_mask_BL.sum(1)
        assert b.text_ids_BL.shape[1] <= 24
        for row, n in zip(b.text_ids_BL.tolist(), lengths.tolist()):
            assert row[0] == tok.eos_id and row[n - 1] == tok.eos_id and tok.eos_id not in row[1 : n - 1]
            assert row[n:] == [tok.pad_id] * (len(row) - n)
    assert int(batches[3].grid_hw.prod(1).max()) > 16


def test_grounding_text_is_normalised(ds):
    rec = next(r for r in ds["img"] if r.kind == "shapes")
    text = grounding_text(rec, 0)
    label, coords = text.split(" at ")
    assert label == rec.boxes[0].label
    values = [int(v) for v in coords.strip("()").split(",")]
    assert len(values) == 4 and all(0 <= v <= 100 for v in values)


@pytest.fixture()
def corrupt_split(tmp_path):
    """A copy of the val split (40 images) with one PNG truncated."""
    root = tmp_path / "val"
    shutil.copytree(tiny_data() / "toyworld" / "val", root)
    recs = read_image_records(tmp_path, "val", name="toyworld")
    victim = root / recs[3].image
    victim.write_bytes(victim.read_bytes()[:100])
    return root, recs


def test_corrupt_image_is_skipped_and_counted(ds, corrupt_split):
    root, recs = corrupt_split
    it = image_text_batches(
        recs,
        root,
        ds["tok"],
        batch_size=20,
        max_patches_at=lambda s: 64,
        text_targets=("caption",),
        patch_size=P,
        merge_size=M,
        seed=0,
        max_text_len=16,
        max_corrupt_frac=0.05,
    )
    for _ in range(4):  # two epochs over 40 records
        assert next(it).num_images == 20
    assert 1 <= it.skipped <= 3 and it.loader.corrupt == {recs[3].image}
    lm = lm_batches(
        {"cap": caption_docs(recs, root, ds["tok"], max_corrupt_frac=0.05)},
        lambda s: {"cap": 1.0},
        ds["tok"],
        128,
        8,
        0,
        P,
        M,
        CAP,
    )
    for _ in range(8):
        next(lm)
    assert lm.skipped >= 1


def test_too_many_corrupt_images_raise(ds, corrupt_split):
    root, recs = corrupt_split
    it = image_text_batches(
        recs,
        root,
        ds["tok"],
        batch_size=40,
        max_patches_at=lambda s: 64,
        text_targets=("caption",),
        patch_size=P,
        merge_size=M,
        seed=0,
        max_text_len=16,
        dataset_name="toyworld/val",
    )
    with pytest.raises(TooManyCorruptImagesError, match=r"'toyworld/val': 1 of 40 images are corrupt"):
        next(it)


def test_eval_sets_are_deterministic(ds):
    d, tok = tiny_data(), ds["tok"]
    val = read_image_records(d / "toyworld", "val")
    root = d / "toyworld" / "val"
    a, b = vqa_eval_items(val, root, tok, VISION, limit=30), vqa_eval_items(val, root, tok, VISION, limit=30)
    assert len(a) == 30 and [x.prompt_ids for x in a] == [x.prompt_ids for x in b]
    assert [x.answer for x in a] == [q.answer for r in val for q in r.qa][:30]
    assert tok.decode(a[0].prompt_ids).endswith("Answer:")
    chat = vqa_eval_items(val, root, tok, VISION, limit=2, chat=True)
    assert chat[0].prompt_ids[-1] == tok.im_middle_id
    assert chat[0].prompt_ids.count(tok.media_pad_id) == (chat[0].grid_hw[0] // M) * (chat[0].grid_hw[1] // M)

    ret = retrieval_eval_batch(val, root, tok, VISION, max_text_len=32)
    captions = [tok.decode(row) for row in ret.text_ids_BL.tolist()]
    assert ret.num_images == len(captions) == len(set(captions)) > 20

    needles = needle_eval_items(read_longdoc_records(d / "longdoc", "val"), tok, max_tokens=200)
    for item, rec in zip(needles, read_longdoc_records(d / "longdoc", "val")):
        assert item.num_tokens <= 200 and rec.needle in tok.decode(item.prompt_ids)
        assert tok.decode(item.prompt_ids).endswith(f"{rec.question}\nAnswer:")

    texts = text_docs(read_text_records(d / "text", "val"), tok)
    e1, e2 = lm_eval_batches(texts, tok, 128, 4, VISION), lm_eval_batches(texts, tok, 128, 4, VISION)
    assert len(e1) > 0 and all(torch.equal(x.input_ids_BL, y.input_ids_BL) for x, y in zip(e1, e2))
