"""A stage's video share: the clip documents of `videoworld` and their weights beside the images.

`video_sources` builds the two video document sources a `video:` section (stage_configs.VideoMix)
asks for (SFT: one, clip questions as dialogues); `with_video` moves `share` of the image
documents' weight to them, split by qa_share:
    {"caption": 0.2, "qa": 0.1} with share 0.5, qa_share 0.5
    -> {"caption": 0.1, "qa": 0.05, "video_caption": 0.075, "video_qa": 0.075}
"""

from __future__ import annotations

from collections.abc import Mapping

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.artifacts import DatasetRef
from moonforge.stages.data.sources import DocSource
from moonforge.stages.data.video_files import read_video_records
from moonforge.stages.data.video_sources import video_caption_docs, video_chat_docs, video_qa_docs

VIDEO_SOURCES = ("video_caption", "video_qa")
VIDEO_CHAT = "video_chat"
"""SFT's one video source: clip questions as dialogues (video_sources.video_chat_docs)."""


def video_sources(
    video, data: Mapping[str, DatasetRef], tok: Tokenizer, chat: bool = False
) -> dict[str, DocSource]:
    """The clip caption / QA sources of `video` (a VideoMix, or None: no sources), of its `kinds`
    of clip only when it names them; with `chat`, SFT's clip dialogues instead."""
    if video is None:
        return {}
    root = data["videoworld"].path
    recs = read_video_records(root, "train")
    if video.kinds is not None:
        recs = [r for r in recs if r.kind in video.kinds]
        if not recs:
            raise ValueError(
                f"video.kinds={list(video.kinds)}: videoworld/train has no clip of these kinds; "
                "name kinds its params.yaml kind_weights generate (or drop kinds:)"
            )
    clips, frames = root / "train", video.num_frames
    how = {"max_tokens": video.max_tokens, "fps": video.fps}
    if chat:
        return {VIDEO_CHAT: video_chat_docs(recs, clips, tok, frames, **how)}
    return {
        "video_caption": video_caption_docs(recs, clips, tok, frames, **how),
        "video_qa": video_qa_docs(recs, clips, tok, frames, **how),
    }


def with_video(
    weights: Mapping[str, float], image_names: tuple[str, ...], video, chat: bool = False
) -> dict[str, float]:
    """`weights` with `video.share` of the `image_names` sources' weight moved to the video
    sources (unchanged when video is None; a name `weights` lacks gives nothing)."""
    out = dict(weights)
    if video is None:
        return out
    moved = sum(out.get(n, 0.0) for n in image_names) * video.share
    for n in image_names:
        if n in out:
            out[n] *= 1.0 - video.share
    if chat:
        out[VIDEO_CHAT] = moved
    else:
        out["video_qa"] = moved * video.qa_share
        out["video_caption"] = moved * (1.0 - video.qa_share)
    return out
