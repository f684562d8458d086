"""Video documents (stages/data/video_sources.py): videoworld clips as LM documents beside images.

A clip document holds one placeholder run for all its temporal patches, its pixels are exactly
`chat --video`'s (read_frames + clip_patches), and a packed batch carries media_t / media_group
so the encoder sees each clip as one document; a batch of images only carries neither (the
image path is untouched). A corrupt clip is skipped and counted. The tiny VLM learns video QA
answers from such batches.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_data_helpers import tiny_data

from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.data.batches import lm_batches, load_doc_images
from moonforge.stages.data.build import build
from moonforge.stages.data.images import CorruptImageError, num_image_tokens
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.sources import VisionSpec, caption_docs
from moonforge.stages.data.video_decode import read_frames
from moonforge.stages.data.video_files import clip_patches, read_video_records
from moonforge.stages.data.video_sources import VideoLoader, video_caption_docs, video_qa_docs
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train.objectives import lm_loss

REPO = Path(__file__).resolve().parent.parent
VISION = VisionSpec(patch_size=8, merge_size=2, max_patches=64)  # the tiny recipe's
FRAMES = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videoworld")
    params = {"seed": 1, "num_train": 24, "num_val": 4, "frames": [3, 8], "fps": [2, 4]}
    (root / "params.yaml").write_text(yaml.safe_dump({"videoworld": params}))
    build("videoworld", root / "params.yaml", root / "data" / "videoworld")
    return root / "data" / "videoworld"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(tiny_data() / "tokenizer")


def _mixed(world: Path, tok: Tokenizer, rows: int = 4):
    videos = video_qa_docs(read_video_records(world, "train"), world / "train", tok, FRAMES)
    toy = tiny_data() / "toyworld"
    images = caption_docs(read_image_records(toy, "train"), toy / "train", tok)
    return lm_batches(
        {"video_qa": videos, "caption": images},
        lambda step: {"video_qa": 0.5, "caption": 0.5},
        tok,
        256,
        rows,
        0,
        VISION.patch_size,
        VISION.merge_size,
        VISION.max_patches,
    )


@pytest.mark.parametrize("frames", [FRAMES, 3])
def test_a_clip_document_is_one_placeholder_run_of_chat_video_pixels(world, tok, frames):
    recs = read_video_records(world, "train")
    src = video_caption_docs(recs, world / "train", tok, frames)
    doc = src.doc(0, VISION)
    media = load_doc_images(doc, VISION)
    assert media is not None and [m.t for m in media] == list(range(math.ceil(frames / 2)))
    assert {m.clip for m in media} == {0}
    pixels, grid, t = clip_patches(read_frames(world / "train" / recs[0].video, num_frames=frames), 8, 2, 64)
    assert torch.equal(torch.cat([m.pixels_NP for m in media]), pixels)
    assert [m.grid_hw for m in media] == [tuple(g) for g in grid.tolist()]
    per_patch = num_image_tokens(media[0].grid_hw, 2)
    assert doc.ids.count(tok.media_pad_id) == per_patch * len(t)  # one run for the whole clip
    assert tok.decode(doc.ids[per_patch * len(t) :]).strip().startswith(recs[0].caption[:10])


@pytest.mark.parametrize("merge, budget", [(1, 6), (2, None), (2, 6)])
def test_temporal_merge_and_a_token_budget_shape_clips_alike_in_training_and_in_chat(
    world, tok, merge, budget
):
    """The model's vision.temporal_merge_size and a stage's video.max_tokens decide a clip's
    placeholder run: a budget shrinks each frame (never the frame count) and the documents,
    a packed batch the model trains on, and `chat --video` / `eval --video` (clip_prompt) all
    agree on the tokens and pixels."""
    from moonforge.stages import inference

    vision = VisionSpec(8, 2, 64, temporal_merge=merge)
    recs = read_video_records(world, "train")
    full = video_qa_docs(recs, world / "train", tok, FRAMES).doc(0, VISION).ids.count(tok.media_pad_id)
    doc = video_qa_docs(recs, world / "train", tok, FRAMES, max_tokens=budget).doc(0, vision)
    count = doc.ids.count(tok.media_pad_id)
    assert count == full // merge if budget is None else count <= budget < full
    media = load_doc_images(doc, vision)
    assert media is not None and len(media) == math.ceil(FRAMES / 2)  # frames kept, not dropped

    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    cfg = cfg.model_copy(
        update={
            "vision": cfg.vision.model_copy(update={"temporal_merge_size": merge}),
            "lm": cfg.lm.model_copy(update={"vocab_size": tok.vocab_size}),
        }
    )
    model = build_vlm(cfg, seed=0).eval()
    frames = read_frames(world / "train" / recs[0].video, num_frames=FRAMES)
    ids, asked = inference.clip_prompt(tok, VisionSpec.of(cfg.vision), frames, recs[0].qa[0].question, budget)
    assert ids.count(tok.media_pad_id) == count
    assert torch.equal(asked["pixels_NP"], torch.cat([m.pixels_NP for m in media]))

    docs = video_qa_docs(recs, world / "train", tok, FRAMES, max_tokens=budget)
    b = next(lm_batches({"v": docs}, lambda s: {"v": 1.0}, tok, 256, 2, 0, 8, 2, 64, temporal_merge=merge))
    loss, _ = lm_loss(model, b)  # placeholders and the encoder's tokens agree
    assert torch.isfinite(loss)


def test_fps_sampling_gives_each_clip_the_frames_of_its_own_length(world, tok):
    """video: {fps: 2, num_frames: 8}: a clip shows its frames at 2 per second from t=0, at most
    8, so clips of different lengths take different token counts, counted before decoding from
    the record's length and equal to what `chat --video --fps 2` decodes."""
    from moonforge.stages.data.video_decode import sample_clip, sampled_count

    recs = read_video_records(world, "train")[:8]
    src = video_qa_docs(recs, world / "train", tok, 8, fps=2.0)
    counts = set()
    for i, rec in enumerate(r for r in recs for _ in r.qa):
        doc = src.doc(i, VISION)
        (ref,) = doc.images
        assert ref.num_frames == sampled_count(rec.num_frames * 1000 / rec.fps, 8, 2.0)
        media = load_doc_images(doc, VISION)
        pixels, grid, _ = clip_patches(sample_clip(world / "train" / rec.video, 8, 2.0), 8, 2, 64)
        assert media is not None and torch.equal(torch.cat([m.pixels_NP for m in media]), pixels)
        assert doc.ids.count(tok.media_pad_id) == len(grid) * num_image_tokens(tuple(grid[0].tolist()), 2)
        counts.add(ref.num_frames)
    assert len(counts) > 1, counts  # the clips' lengths differ, and so do their frame counts


def test_a_token_budget_too_small_for_the_frames_names_the_fix(world, tok):
    recs = read_video_records(world, "train")
    src = video_qa_docs(recs, world / "train", tok, 8, max_tokens=3)  # 8 frames: 4 temporal groups
    with pytest.raises(ValueError, match="budget of 3 cannot show 8 frames.*raise the budget to >= 4"):
        src.doc(0, VISION)


def test_packed_batches_carry_each_clip_as_one_group(world, tok):
    b = next(_mixed(world, tok))
    assert b.media_t is not None and b.media_group is not None and b.grid_hw is not None
    assert int(b.media_mask_BL.sum()) == sum(num_image_tokens(tuple(g), 2) for g in b.grid_hw.tolist())
    groups = b.media_group.tolist()
    assert groups == sorted(groups) and sorted(set(groups)) == list(range(len(set(groups))))
    sizes = [groups.count(g) for g in sorted(set(groups))]
    assert 1 in sizes and max(sizes) == FRAMES // 2  # images and 2-patch clips side by side
    for g in set(groups):  # a clip's temporal patches count up from 0; an image is t = 0
        assert [t for t, gg in zip(b.media_t.tolist(), groups) if gg == g] == list(range(groups.count(g)))
    model = build_vlm(load_recipe(REPO / "recipes" / "tiny.yaml").model, seed=0)
    with torch.no_grad():  # the VLM takes the layout as the encoder needs it
        feats = model.encode_media(b.pixels_NP, b.grid_hw, b.media_t, b.media_group)
        h = model.embed(b.input_ids_BL, b.media_mask_BL, b.pixels_NP, b.grid_hw, b.media_t, b.media_group)
    assert torch.equal(h[b.media_mask_BL], feats)


def test_a_batch_of_images_only_has_no_clip_layout(tok):
    toy = tiny_data() / "toyworld"
    images = caption_docs(read_image_records(toy, "train"), toy / "train", tok)
    b = next(lm_batches({"caption": images}, lambda s: {"caption": 1.0}, tok, 256, 2, 0, 8, 2, 64))
    assert b.grid_hw is not None and b.media_t is None and b.media_group is None


def test_a_corrupt_clip_is_skipped_and_counted(world, tok, tmp_path):
    copy = tmp_path / "videoworld"
    shutil.copytree(world, copy)
    recs = read_video_records(copy, "train")
    (copy / "train" / recs[0].video).write_bytes(b"not a webp")
    src = video_caption_docs(recs, copy / "train", tok, FRAMES, max_corrupt_frac=0.1)
    assert load_doc_images(src.doc(0, VISION), VISION) is None
    assert src.loader is not None and src.loader.skipped == 1
    assert load_doc_images(src.doc(1, VISION), VISION) is not None


def test_a_clip_read_again_comes_from_the_cache_exactly_and_the_cache_keeps_its_budget(world, tok, tmp_path):
    """A clip read again (its next question, its next epoch) is not decoded again: with its file
    gone the cached patches still come back, equal to the first read; patched differently it is
    decoded again. The least recently used clips leave when the budget is reached, and a clip
    larger than the budget is never kept."""
    copy = tmp_path / "videoworld"
    shutil.copytree(world, copy)
    recs = read_video_records(copy, "train")
    src = video_qa_docs(recs, copy / "train", tok, FRAMES, max_corrupt_frac=0.5)
    loader = src.loader
    assert isinstance(loader, VideoLoader)
    first = load_doc_images(src.doc(0, VISION), VISION)
    assert first is not None
    (copy / "train" / recs[0].video).unlink()
    again = load_doc_images(src.doc(0, VISION), VISION)  # from the cache: the file is gone
    assert again is not None and loader.skipped == 0
    assert all(torch.equal(a.pixels_NP, b.pixels_NP) and a.grid_hw == b.grid_hw for a, b in zip(first, again))
    other = VisionSpec(patch_size=8, merge_size=2, max_patches=16)  # another patching: decoded
    fresh = video_qa_docs(recs, copy / "train", tok, FRAMES, max_corrupt_frac=0.5)
    assert load_doc_images(fresh.doc(0, VISION), VISION) is None  # a new loader has no cache
    assert loader.patches(recs[0].video, FRAMES, None, other, 16) is None and loader.skipped == 1

    size = {
        i: clip_patches(read_frames(copy / "train" / recs[i].video, num_frames=FRAMES), 8, 2, 64)[0].nbytes
        for i in (1, 2, 3)
    }
    small = VideoLoader("videoworld", copy / "train", len(recs), cache_bytes=size[2] + size[3])
    for rec in recs[1:4]:
        assert small.patches(rec.video, FRAMES, None, VISION, 64) is not None
    assert [k[0] for k in small._cache] == [recs[2].video, recs[3].video]
    assert small._cached_bytes == size[2] + size[3]
    tiny = VideoLoader("videoworld", copy / "train", len(recs), cache_bytes=size[1] - 1)
    assert tiny.patches(recs[1].video, FRAMES, None, VISION, 64) is not None and not tiny._cache


def test_a_clip_whose_frames_disagree_with_its_record_stops_the_stage_naming_it(world, tok, tmp_path):
    """A record whose size does not match its clip would give the document the wrong number of
    placeholder tokens: the stage stops with the clip's path and why, rather than skip it (the
    manifest is wrong, not the clip, so every clip would go)."""
    import json

    copy = tmp_path / "videoworld"
    shutil.copytree(world, copy)
    lines = (copy / "train" / "records.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["width"], rec["height"] = rec["width"] + 16, rec["height"] + 16
    (copy / "train" / "records.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    src = video_caption_docs(read_video_records(copy, "train"), copy / "train", tok, FRAMES)
    with pytest.raises(CorruptImageError, match="manifest and clips disagree") as err:
        load_doc_images(src.doc(0, VISION), VISION)
    assert rec["video"] in str(err.value)
    assert load_doc_images(src.doc(1, VISION), VISION) is not None
    # sampled by fps, a record claiming a longer clip promises more frames than the clip gives
    rec = {**json.loads(lines[0]), "num_frames": json.loads(lines[0])["num_frames"] + 4}
    (copy / "train" / "records.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    recs = read_video_records(copy, "train")
    src = video_caption_docs(recs, copy / "train", tok, 16, fps=float(recs[0].fps))
    with pytest.raises(CorruptImageError, match="samples but its record says .* the manifest and clips"):
        load_doc_images(src.doc(0, VISION), VISION)


def test_the_tiny_vlm_learns_video_answers(world, tok, one_thread):
    model = build_vlm(load_recipe(REPO / "recipes" / "tiny.yaml").model, seed=0)
    videos = video_qa_docs(read_video_records(world, "train"), world / "train", tok, FRAMES)
    it = lm_batches({"video_qa": videos}, lambda s: {"video_qa": 1.0}, tok, 256, 4, 0, 8, 2, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss, _ = lm_loss(model, next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0, losses


def test_joint_pretrain_mixes_clips_in_by_their_share(world, tmp_path, one_thread):
    """The stage with `video: {share: 0.5}` draws clip documents for about half of the
    multimodal tokens and still trains; without videoworld in its data the recipe is refused;
    without `video:` it draws none."""
    from moonforge.stages.artifacts import DatasetRef, StageContext
    from moonforge.stages.joint_pretrain import joint_pretrain
    from moonforge.stages.stage_configs import JointPretrainConfig

    names = ("text", "toyworld", "tokenizer")
    data = {n: DatasetRef(n, tiny_data() / n, "test") for n in names}
    data["videoworld"] = DatasetRef("videoworld", world, "test")
    fields = dict(
        upstream=None,
        trainable=("vision", "projector", "lm"),
        optimizer={"lr": 2e-3},
        seq_len=256,
        batch_size=4,
        num_steps=6,
        multimodal_ramp={"text_only_frac": 0.0, "ramp_end_frac": 0.01, "final_ratio": 0.6},
        video={"share": 0.5, "num_frames": FRAMES},
        eval={"num_examples": 8, "batch_size": 8},
    )
    with pytest.raises(ValueError, match="does not list videoworld; add videoworld"):
        JointPretrainConfig(data=names, **fields)
    cfg = JointPretrainConfig(data=(*names, "videoworld"), **fields)
    tiny = load_recipe(REPO / "recipes" / "tiny.yaml").model
    model = tiny.model_copy(update={"lm": tiny.lm.model_copy(update={"vocab_size": 512})})
    (tmp_path / "out").mkdir()
    res = joint_pretrain(None, data, cfg, StageContext(out=tmp_path / "out", model=model))
    m = res.metrics
    assert 0.15 < m["data/video_token_share"] < 0.45, m  # 0.6 x 0.5 of the tokens by weight
    assert m["data/multimodal_token_share"] > m["data/video_token_share"] > 0
    assert m["train/steps"] == 6 and res.checkpoint.weights.exists()
    plain = JointPretrainConfig(data=names, **{**fields, "video": None})  # the tiny recipe's way
    (tmp_path / "plain").mkdir()
    m = joint_pretrain(None, data, plain, StageContext(out=tmp_path / "plain", model=model)).metrics
    assert m["data/video_token_share"] == 0.0 and m["data/multimodal_token_share"] > 0


# -- users' video formats -------------------------------------------------------------------------


def _user_sets(world: Path, root: Path):
    """The same two video dialogues as an ms-swift `messages` file (videos column, `<video>`
    tags) and as LLaVA-NeXT video rows (`video` key, the video marked by `<image>`), plus a
    text-only dialogue, over two videoworld clips copied into `root/media`."""
    import json

    from moonforge.stages.data.declared import DeclaredDataset
    from moonforge.stages.data.user_sets import DeclaredSet

    recs = read_video_records(world, "train")[:2]
    (root / "media").mkdir(parents=True)
    for r in recs:
        shutil.copy(world / "train" / r.video, root / "media" / Path(r.video).name)
    talks = [(Path(r.video).name, r.qa[0].question, r.qa[0].answer) for r in recs]
    swift = [
        {
            "messages": [
                {"role": "user", "content": f"<video>\n{q}"},
                {"role": "assistant", "content": a},
            ],
            "videos": [name],
        }
        for name, q, a in talks
    ] + [{"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]}]
    llava = [
        {
            "id": str(i),
            "video": name,
            "conversations": [{"from": "human", "value": f"{q}\n<image>"}, {"from": "gpt", "value": a}],
        }
        for i, (name, q, a) in enumerate(talks)
    ] + [{"id": "2", "conversations": [{"from": "human", "value": "2 + 3?"}, {"from": "gpt", "value": "5"}]}]
    (root / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swift))
    (root / "llava.json").write_text(json.dumps(llava))
    decl = {"images_root": "media", "video_frames": FRAMES}
    sets = [
        DeclaredSet(
            DeclaredDataset.model_validate(
                {"name": "swift", "format": "messages", "path": "swift.jsonl", **decl}
            ),
            root,
        ),
        DeclaredSet(
            DeclaredDataset.model_validate(
                {"name": "nextvid", "format": "llava", "path": "llava.json", **decl}
            ),
            root,
        ),
    ]
    return sets, recs


def test_users_video_dialogues_load_alike_from_swift_and_llava_next_rows(world, tok, tmp_path):
    from moonforge.stages.data.user_check import check_set
    from moonforge.stages.data.user_mix import DeclaredDocSource

    (swift, llava), recs = _user_sets(world, tmp_path)
    a, b = ([rec for _, rec in ds.records()] for ds in (swift, llava))
    assert len(a) == len(b) == 3 and all(x.same_content(y) for x, y in zip(a, b))
    assert a[0].messages[0] == ("user", f"<video>\n{recs[0].qa[0].question}") and len(a[0].videos) == 1
    for ds in (swift, llava):
        rep = check_set(ds, tok, VISION)
        assert rep.ok and rep.videos == 2 and dict(rep.kinds) == {"chat+video": 2, "chat": 1}
    src = DeclaredDocSource(swift, tok)
    doc = src.doc(0, VISION)
    media = load_doc_images(doc, VISION)
    assert media is not None and [m.t for m in media] == [0, 1] and {m.clip for m in media} == {0}
    pixels, _, _ = clip_patches(
        read_frames(tmp_path / "media" / Path(recs[0].video).name, num_frames=FRAMES), 8, 2, 64
    )
    assert torch.equal(torch.cat([m.pixels_NP for m in media]), pixels)  # chat --video's pixels
    assert doc.ids.count(tok.media_pad_id) == 2 * num_image_tokens(media[0].grid_hw, 2)
    b = next(lm_batches({"swift": src}, lambda s: {"swift": 1.0}, tok, 256, 3, 0, 8, 2, 64))
    groups = b.media_group.tolist()  # every clip two temporal patches, one group each
    assert b.media_t is not None and groups == sorted(groups) and {groups.count(g) for g in groups} == {2}


def test_a_users_mp4_trains_on_exactly_the_pixels_of_the_same_clip_as_webp(world, tok, tmp_path):
    """Users' video sets are MP4 (LLaVA-Video, ShareGPT4Video): a record pointing at the clip
    re-encoded as lossless H.264 gives the same document and pixels as the WebP original."""
    import json

    import av
    import numpy as np

    from moonforge.stages.data.user_mix import DeclaredDocSource
    from moonforge.stages.data.user_sets import DeclaredSet

    (swift, _), recs = _user_sets(world, tmp_path)
    rec = recs[0]
    webp = tmp_path / "media" / Path(rec.video).name
    with av.open(str(tmp_path / "media" / "clip.mp4"), "w") as c:
        s = c.add_stream("libx264rgb", rate=rec.fps)
        s.width, s.height, s.pix_fmt, s.options = rec.width, rec.height, "rgb24", {"qp": "0"}
        for f in read_frames(webp, fps=rec.fps):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")))
        c.mux(s.encode())
    as_webp = DeclaredDocSource(swift, tok).doc(0, VISION)
    rows = [json.loads(line) for line in (tmp_path / "swift.jsonl").read_text().splitlines()]
    rows[0]["videos"] = ["clip.mp4"]
    (tmp_path / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    as_mp4 = DeclaredDocSource(DeclaredSet(swift.decl, tmp_path), tok).doc(0, VISION)
    media = load_doc_images(as_mp4, VISION)
    pixels, grid, _ = clip_patches(read_frames(webp, num_frames=FRAMES), 8, 2, 64)
    assert media is not None and [m.t for m in media] == [0, 1]
    assert torch.equal(torch.cat([m.pixels_NP for m in media]), pixels)
    assert as_mp4.ids == as_webp.ids


def test_a_declared_video_token_budget_shrinks_users_clips_and_their_checked_length(world, tok, tmp_path):
    from moonforge.stages.data.declared import DeclaredDataset
    from moonforge.stages.data.user_check import token_length
    from moonforge.stages.data.user_mix import DeclaredDocSource
    from moonforge.stages.data.user_sets import DeclaredSet
    from moonforge.stages.data.user_videos import ClipSampling

    (swift, _), _ = _user_sets(world, tmp_path)
    free = DeclaredDocSource(swift, tok).doc(0, VISION)
    decl = DeclaredDataset.model_validate({**swift.decl.model_dump(), "video_max_tokens": 3})
    capped = DeclaredSet(decl, tmp_path)
    doc = DeclaredDocSource(capped, tok).doc(0, VISION)
    assert doc.ids.count(tok.media_pad_id) <= 3 < free.ids.count(tok.media_pad_id)
    media = load_doc_images(doc, VISION)
    assert media is not None and len(media) == FRAMES // 2  # both temporal patches, smaller
    (_, rec), *_ = capped.records()
    sampling = ClipSampling(FRAMES, None, 3)
    assert token_length(rec, tok, VISION, sampling) == len(doc.ids)  # `data check`'s length


def test_declared_video_fps_samples_users_videos_by_their_duration(world, tok, tmp_path):
    from moonforge.stages.data.declared import DeclaredDataset
    from moonforge.stages.data.user_check import token_length
    from moonforge.stages.data.user_mix import DeclaredDocSource
    from moonforge.stages.data.user_sets import DeclaredSet
    from moonforge.stages.data.user_videos import ClipSampling
    from moonforge.stages.data.video_decode import sample_clip, sampled_count

    (swift, _), recs = _user_sets(world, tmp_path)
    decl = DeclaredDataset.model_validate({**swift.decl.model_dump(), "video_frames": 8, "video_fps": 2.0})
    sampled = DeclaredSet(decl, tmp_path)
    for i, rec in enumerate(recs):
        doc = DeclaredDocSource(sampled, tok).doc(i, VISION)
        (ref,) = doc.images
        assert ref.num_frames == sampled_count(rec.num_frames * 1000 / rec.fps, 8, 2.0)
        media = load_doc_images(doc, VISION)
        clip = tmp_path / "media" / Path(rec.video).name
        pixels, _, _ = clip_patches(sample_clip(clip, 8, 2.0), 8, 2, 64)
        assert media is not None and torch.equal(torch.cat([m.pixels_NP for m in media]), pixels)
        (_, sample), *_ = list(sampled.records())[i:]
        assert token_length(sample, tok, VISION, ClipSampling.of(decl)) == len(doc.ids)


def test_bad_user_videos_are_counted_by_reason(world, tok, tmp_path):
    import json

    from moonforge.stages.data.user_check import check_set
    from moonforge.stages.data.user_sets import DeclaredSet

    (swift, _), recs = _user_sets(world, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "swift.jsonl").read_text().splitlines()]
    (tmp_path / "media" / "broken.webp").write_bytes(b"RIFF0000WEBPnot really")
    (tmp_path / "media" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42, cut short")
    rows += [
        {**rows[0], "videos": []},  # a <video> marker without its video
        {**rows[0], "videos": ["missing.webp"]},
        {**rows[0], "videos": ["broken.webp"]},
        {**rows[0], "videos": ["broken.mp4"]},  # FFmpeg's side
    ]
    (tmp_path / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = check_set(DeclaredSet(swift.decl, tmp_path), tok, VISION)
    assert dict(rep.bad) == {"video_count": 1, "missing_video": 1, "corrupt_video": 2}
    assert rep.videos == 2 and not rep.ok  # 4 of 7 bad
    details = {reason: detail for _, _, reason, detail in rep.examples if "mp4" in detail}
    assert "broken.mp4: not a video FFmpeg can read" in details["corrupt_video"]


def test_video_qa_counts_the_majority_per_type_and_shuffles_every_clip(world, tok, tmp_path):
    """The eval asks every question of its clips; the majority baseline is each type's most
    common answer; the shuffled control puts every clip's frames in another order."""
    from collections import Counter

    from moonforge.stages.train.checkpoint import save_weights
    from moonforge.stages.video_evals import shuffled, video_qa

    tiny = load_recipe(REPO / "recipes" / "tiny.yaml").model
    cfg = tiny.model_copy(update={"lm": tiny.lm.model_copy(update={"vocab_size": 512})})
    ckpt = save_weights(build_vlm(cfg, seed=0), cfg, tmp_path / "ckpt")
    m = video_qa(ckpt, tok, world, num_clips=2, num_frames=FRAMES, max_new_tokens=3)
    recs = read_video_records(world, "val")[:2]
    asked = [(q.type, q.answer) for r in recs for q in r.qa]
    assert m["eval/video_qa_n"] == len(asked)
    top = sum(Counter(a for tt, a in asked if tt == t).most_common(1)[0][1] for t in {t for t, _ in asked})
    assert m["eval/video_qa_majority"] == top / len(asked)
    options = {t: len({a for tt, a in asked if tt == t}) for t, _ in asked}  # uniform guessing
    assert m["eval/video_qa_chance"] == pytest.approx(sum(1 / options[t] for t, _ in asked) / len(asked))
    assert all(m[f"eval/video_qa_{t}_chance"] == 1 / k for t, k in options.items())
    assert 0 <= m["eval/video_qa_acc"] <= 1 and 0 <= m["eval/video_qa_acc_shuffled"] <= 1
    per_type = Counter(t for t, _ in asked)  # the per-type rows add up to the overall ones
    for key in ("acc", "acc_shuffled"):
        total = sum(m[f"eval/video_qa_{t}_{key}"] * k for t, k in per_type.items())
        assert total == pytest.approx(m[f"eval/video_qa_{key}"] * len(asked))
    for r in read_video_records(world, "val"):
        frames = read_frames(world / "val" / r.video, num_frames=FRAMES)
        mixed = shuffled(frames, f"video-qa/{r.id}")
        assert [id(f) for f in mixed] != [id(f) for f in frames]
        assert sorted(map(id, mixed)) == sorted(map(id, frames))


def test_video_qa_batches_give_each_clip_the_answer_it_gets_alone(world, tok, one_thread):
    """Video QA generates its questions in batches (clip_answers): every answer, in-order and
    shuffled frames alike, is the text `chat --video` (answer_clip) gives that clip alone."""
    from moonforge.stages.inference import answer_clip
    from moonforge.stages.video_evals import clip_answers, shuffled

    tiny = load_recipe(REPO / "recipes" / "tiny.yaml").model
    cfg = tiny.model_copy(update={"lm": tiny.lm.model_copy(update={"vocab_size": 512})})
    model = build_vlm(cfg, seed=0).eval()
    asks = []
    for r in read_video_records(world, "val"):
        frames = read_frames(world / "val" / r.video, num_frames=FRAMES)
        asks += [(frames, q.question) for q in r.qa] + [(shuffled(frames, r.id), r.qa[0].question)]
    alone = [answer_clip(model, tok, frames, question, 6).text for frames, question in asks]
    assert len(set(alone)) > 1  # the random model's answers depend on what it is shown
    assert clip_answers(model, tok, asks, 6, batch_size=5) == alone
    budget = [answer_clip(model, tok, frames, question, 6, max_tokens=8).text for frames, question in asks]
    assert clip_answers(model, tok, asks, 6, video_tokens=8, batch_size=3) == budget


def test_sft_trains_on_clip_dialogues_asked_as_eval_video_asks(world, tok, tmp_path, one_thread):
    """SFT's clip dialogues start with exactly the prompt `eval --video` / `chat --video`
    generate from, and the sft stage with `video:` trains on them and reports eval --video's
    numbers before and after. A phase's own `video:` and text ratio replace the stage's for that
    phase only (a motion-clips-only first phase, then the stage's mix)."""
    from test_data_post_helpers import post_data

    from moonforge.stages.artifacts import DatasetRef, StageContext
    from moonforge.stages.data.video_sources import video_chat_docs
    from moonforge.stages.sft import sft
    from moonforge.stages.stage_configs import SFTConfig

    recs = read_video_records(world, "train")
    doc = video_chat_docs(recs, world / "train", tok, FRAMES).doc(0, VISION)
    per_clip = doc.ids.count(tok.media_pad_id)
    turn = [{"role": "user", "content": f"<image>\n{recs[0].qa[0].question}"}]
    prompt, _ = tok.encode_chat(turn, [per_clip], add_generation_prompt=True)
    assert doc.ids[: len(prompt)] == prompt and sum(doc.loss_mask[: len(prompt)]) == 0
    assert (
        tok.decode([i for i, m in zip(doc.ids, doc.loss_mask) if m]).strip().startswith(recs[0].qa[0].answer)
    )

    post = post_data()
    data = {n: DatasetRef(n, post / n, "test") for n in ("sft", "toyworld", "tokenizer")}
    data["videoworld"] = DatasetRef("videoworld", world, "test")
    tiny = load_recipe(REPO / "recipes" / "tiny.yaml")
    fields = {
        **tiny.stage("sft").model_dump(exclude={"kind", "name", "upstream", "data"}),
        "phases": [
            {
                "seq_len": 256,
                "lr": 1e-3,
                "min_lr": 1e-3,
                "num_steps": 2,
                "text_image_token_ratio": 0.01,
                "video": {"share": 1.0, "num_frames": FRAMES, "kinds": ["motion"]},
            },
            {"seq_len": 256, "lr": 1e-3, "min_lr": 1e-4, "num_steps": 2},
        ],
        "eval": {"num_examples": 4, "batch_size": 4},
        "video": {"share": 0.5, "num_frames": FRAMES},
    }
    cfg = SFTConfig.model_validate({**fields, "upstream": None, "data": [*data]})
    model = tiny.model.model_copy(
        update={"lm": tiny.model.lm.model_copy(update={"vocab_size": tok.vocab_size})}
    )
    (tmp_path / "out").mkdir()
    res = sft(None, data, cfg, StageContext(out=tmp_path / "out", model=model))
    # phase 0: clips alone but for 1% text; phase 1, the stage's mix: text : image dialogues
    # 1 : 1, half of the image weight to clips, so about a quarter of the tokens
    assert res.metrics["data/phase0_video_token_share"] > 0.9, res.metrics
    assert 0.1 < res.metrics["data/phase1_video_token_share"] < 0.45, res.metrics
    assert res.metrics["train/steps"] == 4 and res.checkpoint.weights.exists()
    asked = sum(len(r.qa) for r in read_video_records(world, "val")[:4])  # eval.num_examples clips
    for suffix in ("_before", ""):  # eval --video's numbers, before and after training
        assert res.metrics[f"eval/video_qa_n{suffix}"] == asked, res.metrics
        for key in ("acc", "acc_shuffled", "majority"):
            assert 0 <= res.metrics[f"eval/video_qa_{key}{suffix}"] <= 1
    assert (tmp_path / "out" / "video_qa.png").stat().st_size > 5_000


def test_video_kinds_keep_only_those_clips_and_bad_kinds_or_phases_name_the_fix(world, tok, tmp_path):
    """`video.kinds` keeps the clips of those kinds only (every motion clip asks its direction);
    kinds the data has no clip of, or a phase's video on a stage without video:, are refused."""
    from moonforge.stages.artifacts import DatasetRef
    from moonforge.stages.data.video_mix import VIDEO_CHAT, video_sources
    from moonforge.stages.stage_configs import SFTConfig, VideoMix

    data = {"videoworld": DatasetRef("videoworld", world, "test")}
    recs = read_video_records(world, "train")
    motion = [r for r in recs if r.kind == "motion"]
    assert 0 < len(motion) < len(recs)  # the fixture's world has other kinds too
    src = video_sources(VideoMix(share=1.0, num_frames=FRAMES, kinds=("motion",)), data, tok, chat=True)[
        VIDEO_CHAT
    ]
    assert len(src) == sum(len(r.qa) for r in motion)
    asked = {tok.decode(src.doc(i, VISION).ids) for i in range(len(src))}
    assert all("Which way does the" in text for text in asked), sorted(asked)[:3]  # motion's question
    with pytest.raises(ValueError, match="literal_error|Input should be"):
        VideoMix(share=1.0, kinds=("spin",))
    root = tmp_path / "motion_only"
    params = {"seed": 1, "num_train": 2, "num_val": 1, "kind_weights": {"motion": 1.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"videoworld": params}))
    build("videoworld", tmp_path / "params.yaml", root)
    with pytest.raises(ValueError, match=r"kinds=\['order'\]: videoworld/train has no clip of these kinds"):
        video_sources(
            VideoMix(share=1.0, kinds=("order",)), {"videoworld": DatasetRef("videoworld", root, "t")}, tok
        )
    stage = load_recipe(REPO / "recipes" / "tiny.yaml").stage("sft").model_dump(exclude={"kind", "name"})
    phase = {"seq_len": 256, "lr": 1e-3, "min_lr": 1e-3, "num_steps": 2, "video": {"share": 1.0}}
    with pytest.raises(ValueError, match=r"phases\[0\]\.video: .* add video: to the stage"):
        SFTConfig.model_validate({**stage, "video": None, "phases": [phase]})
    assert SFTConfig.model_validate({**stage, "phases": [phase]}).phases[0].video == VideoMix(share=1.0)


def test_users_video_prompts_are_asked_as_chat_video_asks_and_batch_clip_by_clip(
    world, tok, tmp_path, one_thread
):
    """A declared set's video prompts (eval held-out sets, RL prompts, preference prompts) carry
    their clip's temporal patches: the prompt and pixels are `chat --video`'s, and a batch of
    several video, image and text prompts scores each one as it scores alone (each clip its own
    group in the encoder)."""
    from dataclasses import replace

    from PIL import Image

    from moonforge.stages.data.chat import ChatPromptItem, prompt_media
    from moonforge.stages.data.images import to_patches
    from moonforge.stages.data.user_mix import prompt_item
    from moonforge.stages.data.user_videos import ClipSampling
    from moonforge.stages.inference import answer_clip
    from moonforge.stages.posttrain_evals import generate_responses, with_other_images
    from moonforge.stages.rl.policy import response_logprobs
    from moonforge.stages.sft import declared_eval

    (swift, _), recs = _user_sets(world, tmp_path)
    sampling = ClipSampling.of(swift.decl)
    items = [prompt_item(rec, tok, VISION, sampling) for _, rec in swift.records()]
    assert [it.kind for it in items] == ["video", "video", "text"]
    model = build_vlm(load_recipe(REPO / "recipes" / "tiny.yaml").model, seed=0).eval()
    for it, rec in zip(items, recs):
        frames = read_frames(tmp_path / "media" / Path(rec.video).name, num_frames=FRAMES)
        pixels, grid, t = clip_patches(frames, 8, 2, 64)
        assert torch.equal(it.pixels_NP, pixels) and torch.equal(it.grid_hw, grid)
        assert it.media_t.tolist() == t.tolist() == [0, 1] and it.media_group.tolist() == [0, 0]
        alone = answer_clip(model, tok, frames, rec.qa[0].question, max_new_tokens=6)
        ((text, _, _),) = generate_responses(model, tok, [it], max_new_tokens=6, batch_size=1)
        assert text.strip() == alone.text  # the prompt chat --video builds, the same answer
    scored = declared_eval(model, tok, {"swift": items}, batch_size=4)
    assert scored["eval/swift_n"] == 3 and {"eval/swift_video_acc", "eval/swift_text_acc"} <= set(scored)

    toy = tiny_data() / "toyworld"
    image = next(r for r in read_image_records(toy, "val") if r.kind == "shapes")
    img_pixels, (h, w) = to_patches(Image.open(toy / "val" / image.image).convert("RGB"), 8, 2, 64)
    ids, _ = tok.encode_chat(
        [{"role": "user", "content": "<image>\nWhat is it?"}], [h * w // 4], add_generation_prompt=True
    )
    image_item = ChatPromptItem("img", "image", ids, img_pixels, torch.tensor([[h, w]]), "x", "exact", None)
    batch = [items[0], image_item, items[2], items[1]]
    media = prompt_media(batch)
    assert media["media_group"].tolist() == [0, 0, 1, 2, 2]  # clip, image, clip: three groups
    assert media["media_t"].tolist() == [0, 1, 0, 0, 1]
    response = tok.encode(" left") + [tok.turn_end_id]
    with torch.no_grad():
        together = response_logprobs(model, batch, [response] * 4, media_pad_id=tok.media_pad_id)
        each = torch.cat(
            [response_logprobs(model, [b], [response], media_pad_id=tok.media_pad_id) for b in batch]
        )
    torch.testing.assert_close(together, each, rtol=0, atol=1e-5)
    twin = replace(items[0], record_id="twin", pixels_NP=items[0].pixels_NP.flip(0))
    swapped = with_other_images([items[0], image_item, twin])  # the control: same-layout clips
    assert torch.equal(swapped[0].pixels_NP, twin.pixels_NP)  # trade pixels,
    assert torch.equal(swapped[2].pixels_NP, items[0].pixels_NP)
    assert torch.equal(swapped[1].pixels_NP, image_item.pixels_NP)  # an image never takes a clip's


def test_eval_scores_a_users_video_set_and_counts_what_it_cannot_ask(world, tok, tmp_path, one_thread):
    """`moonforge eval REF --dataset NAME` (stages/inference.evaluate_declared): every record of
    a set that holds none out, asked as the stages ask it, per kind; a record whose video does
    not decode is counted, not fatal; a text set has nothing to ask and says so."""
    import json

    from moonforge.stages.data.declared import DeclaredDataset
    from moonforge.stages.data.user_sets import DeclaredSet
    from moonforge.stages.inference import evaluate_declared
    from moonforge.stages.train.checkpoint import save_weights

    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    ckpt = save_weights(build_vlm(cfg, seed=0), cfg, tmp_path / "ckpt")
    (swift, _), _ = _user_sets(world, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "swift.jsonl").read_text().splitlines()]
    (tmp_path / "media" / "broken.webp").write_bytes(b"RIFF0000WEBPnot really")
    rows.append({**rows[0], "videos": ["broken.webp"]})
    (tmp_path / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = evaluate_declared(ckpt, tok, DeclaredSet(swift.decl, tmp_path), max_new_tokens=4)
    assert m["eval/swift_n"] == 3 and m["eval/swift_skipped"] == 1
    assert {"eval/swift_video_acc", "eval/swift_text_acc"} <= set(m)
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "no question here"}) + "\n")
    notes = DeclaredDataset.model_validate({"name": "notes", "format": "text", "path": "notes.jsonl"})
    with pytest.raises(ValueError, match="'notes' is a text set .* eval takes chat, prompt or preference"):
        evaluate_declared(ckpt, tok, DeclaredSet(notes, tmp_path))
