"""One MoonViT for images and video (issue 14 item 2): a clip becomes temporal patches of two
frames through the same weights; an image as a one-frame (or two identical frames) video gives
identical features; the temporal RoPE makes frame order visible to the encoder; packed clips and
images equal each encoded alone; temporal merging averages consecutive temporal patches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from moonforge.model.config import VLMConfig
from moonforge.model.vision import video_patches
from moonforge.model.vlm import build_vlm
from moonforge.stages.data.images import to_patches
from moonforge.stages.data.video_files import clip_patches

TOL = 1e-5
"""fp32: packing changes only summation order (measured < 1e-6)."""
CFG = VLMConfig.model_validate(
    yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/tiny.yaml").read_text())["model"]
)
V = CFG.vision


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(CFG, seed=0, attn_backend="sdpa").eval()


def frame(x: int, colour: str = "red", size=(48, 32)) -> Image.Image:
    """A square at column x on grey: consecutive frames of a moving shape."""
    im = Image.new("RGB", size, "grey")
    ImageDraw.Draw(im).rectangle([x, 8, x + 10, 18], fill=colour)
    return im


def clip(xs=(2, 12, 22, 32)) -> list[Image.Image]:
    return [frame(x) for x in xs]


def encode(vlm, parts, merge: int = 1):
    """Pack `parts` (each (pixels, grid, t)) as one batch, clip k in group k."""
    pixels = torch.cat([p for p, _, _ in parts])
    grid = torch.cat([g for _, g, _ in parts])
    t = torch.cat([t for _, _, t in parts])
    group = torch.cat([torch.full((len(g),), k) for k, (_, g, _) in enumerate(parts)])
    with torch.no_grad():
        return vlm.encode_media(pixels, grid, t, group, temporal_merge_size=merge)


def test_an_image_as_a_one_frame_or_still_video_gives_identical_features(vlm):
    img = frame(5)
    pixels, (h, w) = to_patches(img, V.patch_size, V.merge_size, V.max_patches)
    with torch.no_grad():
        as_image = vlm.encode_images(pixels, torch.tensor([[h, w]]))
    for frames in ([img], [img, img]):
        p, grid, t = clip_patches(frames, V.patch_size, V.merge_size, V.max_patches)
        assert grid.tolist() == [[h, w]] and t.tolist() == [0]
        assert torch.equal(encode(vlm, [(p, grid, t)]), as_image)


def test_one_parameter_set_serves_images_and_video(vlm):
    """No video-only weights: a video loss and an image loss reach the same ViT and projector
    parameters, and the model has exactly the image model's parameters."""
    assert [n for n, _ in vlm.named_parameters()] == [n for n, _ in build_vlm(CFG, seed=0).named_parameters()]
    p, grid, t = clip_patches(clip(), V.patch_size, V.merge_size, V.max_patches)
    img, (h, w) = to_patches(frame(5), V.patch_size, V.merge_size, V.max_patches)
    reached = []
    for loss in (
        lambda: vlm.encode_media(p, grid, t, torch.zeros(len(grid), dtype=torch.long)).square().mean(),
        lambda: vlm.encode_images(img, torch.tensor([[h, w]])).square().mean(),
    ):
        vlm.zero_grad(set_to_none=True)
        loss().backward()
        reached.append(
            {n for n, q in vlm.named_parameters() if q.grad is not None and q.grad.abs().sum() > 0}
        )
    vlm.zero_grad(set_to_none=True)
    encoder = {n for n, _ in vlm.named_parameters() if n.startswith(("vision.", "projector."))}
    assert reached[0] == reached[1] == encoder


def test_frame_order_reaches_the_encoder_through_the_temporal_rope(vlm):
    """Reversing a clip is not a mere reordering of its features: each temporal patch is encoded
    differently at another t. Without temporal positions (all t = 0) it would be."""
    fwd = clip_patches(clip(), V.patch_size, V.merge_size, V.max_patches)
    rev = clip_patches(clip()[::-1], V.patch_size, V.merge_size, V.max_patches)
    n = fwd[1][0].prod().item() // V.merge_size**2  # LM tokens per temporal patch
    a, b = encode(vlm, [fwd]), encode(vlm, [rev])
    swapped = torch.cat([b[n:], b[:n]])  # rev's patches are fwd's in reverse order
    assert (a - swapped).abs().max() > 10 * TOL  # 7e-4 measured at this (random, small) init
    no_t = [(p, g, torch.zeros_like(t)) for p, g, t in (fwd, rev)]
    a0, b0 = encode(vlm, [no_t[0]]), encode(vlm, [no_t[1]])
    torch.testing.assert_close(a0, torch.cat([b0[n:], b0[:n]]), atol=TOL, rtol=TOL)


def test_packed_clips_and_images_equal_each_encoded_alone(vlm):
    img = to_patches(frame(7, "blue"), V.patch_size, V.merge_size, V.max_patches)
    image = (img[0], torch.tensor([img[1]]), torch.zeros(1, dtype=torch.long))
    one = clip_patches(clip(), V.patch_size, V.merge_size, V.max_patches)
    two = clip_patches(
        clip((30, 20, 10)), V.patch_size, V.merge_size, V.max_patches
    )  # odd: last frame repeated
    parts = [image, one, two, image]
    alone = [encode(vlm, [p]) for p in parts]
    packed = encode(vlm, parts)
    torch.testing.assert_close(packed, torch.cat(alone), atol=TOL, rtol=TOL)


def test_temporal_merge_averages_consecutive_temporal_patches(vlm):
    p, grid, t = clip_patches(clip((0, 5, 10, 15, 20, 25)), V.patch_size, V.merge_size, V.max_patches)
    assert len(grid) == 3
    group = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        feats = vlm.vision(p, grid, t, group)
        n = int(grid[0].prod())
        want = torch.cat(
            [
                vlm.projector(feats[: 2 * n].view(2, n, -1).mean(0), grid[:1]),
                vlm.projector(feats[2 * n :], grid[:1]),
            ]
        )
    got = encode(vlm, [(p, grid, t)], merge=2)
    assert got.shape[0] == 2 * n // V.merge_size**2
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_the_configured_temporal_merge_sets_the_clip_tokens_in_embed_and_in_a_cp_slice():
    """vision.temporal_merge_size drives `embed` (a clip of 3 temporal patches takes 2 token
    sets at k = 2) and each context-parallel rank's slice equals the whole embedding's slice,
    with the clip's tokens across the middle and an image after it."""
    from moonforge.model.context_parallel import ContextParallel

    cfg = CFG.model_copy(update={"vision": V.model_copy(update={"temporal_merge_size": 2})})
    vlm = build_vlm(cfg, seed=0, attn_backend="sdpa").eval()
    p, grid, t = clip_patches(clip((0, 5, 10, 15, 20, 25)), V.patch_size, V.merge_size, V.max_patches)
    img, (h, w) = to_patches(frame(7), V.patch_size, V.merge_size, V.max_patches)
    pixels, grid_hw = torch.cat([p, img]), torch.cat([grid, torch.tensor([[h, w]])])
    media_t, group = torch.cat([t, torch.zeros(1, dtype=torch.long)]), torch.tensor([0, 0, 0, 1])
    n_clip, n_img = 2 * int(grid[0].prod()) // V.merge_size**2, h * w // V.merge_size**2
    L = 2 * (n_clip + n_img)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, L // 2 - n_clip // 2 : L // 2 - n_clip // 2 + n_clip + n_img] = True
    ids = torch.randint(8, 64, (1, L))
    media = (pixels, grid_hw, media_t, group)
    with torch.no_grad():
        whole = vlm.embed(ids, mask, *media)
        direct = vlm.encode_media(*media, temporal_merge_size=2)
        assert direct.shape[0] == n_clip + n_img
        torch.testing.assert_close(whole[mask], direct, atol=TOL, rtol=TOL)
        for rank in (0, 1):
            cp = ContextParallel(rank, 2)
            part = vlm.embed_slice(cp, ids, mask, *media)
            torch.testing.assert_close(part, cp.shard(whole), atol=TOL, rtol=TOL)
        unmerged = torch.zeros(1, L, dtype=torch.bool)
        unmerged[0, : 3 * n_clip // 2 + n_img] = True  # placeholders counted without the merge
        with pytest.raises(ValueError, match="placeholder count .* temporal merge"):
            vlm.embed(ids, unmerged, *media)


def test_video_patches_average_pairs_and_repeat_a_last_odd_frame():
    f = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)
    assert video_patches(f).tolist() == [[[1.0], [2.0]], [[4.0], [5.0]]]
    assert torch.equal(video_patches(f[:1]), f[:1])


def test_a_malformed_video_layout_is_refused_naming_it(vlm):
    p, grid, t = clip_patches(clip(), V.patch_size, V.merge_size, V.max_patches)
    two = (torch.cat([p, p, p]), torch.cat([grid, grid, grid]))
    with pytest.raises(ValueError, match="media_group .* splits a clip"):
        vlm.vision(*two, torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 0, 0]))
    with pytest.raises(ValueError, match="media_t must have one value per grid entry"):
        vlm.vision(p, grid, torch.zeros(3, dtype=torch.long), None)
    with pytest.raises(ValueError, match="at least one frame"):
        clip_patches([], V.patch_size, V.merge_size, V.max_patches)


def test_chat_about_a_one_frame_video_answers_as_about_the_image(tmp_path, repo_data):
    """`moonforge chat --video` path: a clip of one frame is the image, so the greedy answers
    (text, length, stop) are identical; a real clip answers too, and the same clip as an MP4
    answers the same (the tiny random model's words mean nothing, the plumbing is what is
    checked)."""
    from moonforge.model.tokenizer import Tokenizer
    from moonforge.stages.inference import chat
    from moonforge.stages.train.checkpoint import save_weights

    tok = Tokenizer.load(repo_data / "tokenizer")
    cfg = CFG.model_copy(update={"lm": CFG.lm.model_copy(update={"vocab_size": tok.vocab_size})})
    ckpt = save_weights(build_vlm(cfg, seed=1), cfg, tmp_path / "ckpt")
    still = tmp_path / "still.gif"
    frame(9).save(still, save_all=True, append_images=[frame(9)], duration=250, loop=0)
    moving = tmp_path / "moving.gif"
    clip()[0].save(moving, save_all=True, append_images=clip()[1:], duration=250, loop=0)
    png = tmp_path / "frame.png"
    frame(9).save(png)
    as_image = chat(ckpt, tok, "Where does it go?", image=png, max_new_tokens=6)
    as_video = chat(ckpt, tok, "Where does it go?", video=still, num_frames=1, max_new_tokens=6)
    assert as_video == as_image and as_image.num_tokens > 0
    about_gif = chat(ckpt, tok, "Where does it go?", video=moving, num_frames=4, max_new_tokens=6)
    assert about_gif.num_tokens > 0
    # the same clip as a (lossless) MP4: same frames by time, same answer
    import av
    import numpy as np

    from moonforge.stages.data.video_decode import read_frames

    frames = read_frames(moving, fps=4)
    with av.open(str(tmp_path / "moving.mp4"), "w") as c:
        s = c.add_stream("libx264rgb", rate=4)
        s.width, s.height, s.pix_fmt, s.options = *frames[0].size, "rgb24", {"qp": "0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")))
        c.mux(s.encode())
    mp4 = tmp_path / "moving.mp4"
    assert chat(ckpt, tok, "Where does it go?", video=mp4, num_frames=4, max_new_tokens=6) == about_gif
    with pytest.raises(ValueError, match="an image or a video, not both"):
        chat(ckpt, tok, "?", image=png, video=moving)


def test_moonforge_chat_video_flags_are_checked_before_anything_loads(tmp_path):
    from typer.testing import CliRunner

    from moonforge.flows.cli import app

    png = tmp_path / "a.png"
    frame(3).save(png)
    cases = [
        (["--image", str(png), "--video", str(png)], "--image and --video: ask about one of them"),
        (["--video", str(tmp_path / "missing.webp")], "no such file; pass a video (MP4, GIF, ...)"),
        (["--video", str(png), "--frames", "0"], "--frames 0: sample at least one frame"),
        (["--video", str(png), "--video-tokens", "0"], "--video-tokens 0: give a positive budget"),
        (["--video", str(png), "--fps", "0"], "--fps 0: give a positive rate"),
    ]
    for flags, message in cases:
        res = CliRunner().invoke(app, ["chat", "sft@1", "what moves?", *flags])
        assert res.exit_code == 1 and message in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["eval", "sft@1", "--video", "--video-tokens", "-2"])  # eval's too
    assert res.exit_code == 1 and "--video-tokens -2: give a positive budget" in res.output, res.output
