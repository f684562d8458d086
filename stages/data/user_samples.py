"""One row of a user's file -> one `Sample`, whatever the format (or a `BadRecord` saying why not).

Every format ends up in the same shape, so readers of different formats holding the same content
give equal samples (tests/test_data_declared_formats.py checks it):

    chat        messages ((role, content) with `<image>` / `<video>`), images, videos   a dialogue
    pair        images (one), text                                           an image and its caption
    text        text                                                         a document
    prompt      messages (ending on a user turn), images, answer, verifier   an RL prompt
    preference  messages (the prompt), images, chosen, rejected              a DPO pair

Message lists are read with the declaration's tags (role / content keys and the role values);
a content may be a string or OpenAI content parts, joined with "\\n" (an image part becomes
`<image>` and takes its image from the part's `image_url`, or, for a TRL `{type: image}` part,
the next entry of the images column). LLaVA moves `<image>` to the start of its turn, as
LLaVA's own preprocessing does. Checks: roles in ChatML order, no empty assistant turn, exactly
one image per `<image>` (a preference / RL prompt without markers gets them prepended, as TRL
does), image paths inside images_root, one video per `<video>` (the videos column in marker
order; a LLaVA-NeXT row's `video` is marked by `<image>`, as LLaVA writes it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moonforge.model.tokenizer import IMAGE_MARKER
from moonforge.stages.data.declared import DeclaredDataset
from moonforge.stages.data.user_images import BadRecord, ImageSource, resolve_image
from moonforge.stages.data.user_videos import VIDEO_MARKER

_MISSING = object()


@dataclass(frozen=True)
class Sample:
    """A normalized record (see the module docstring); `key` says where it came from."""

    key: str
    kind: str
    messages: tuple[tuple[str, str], ...] = ()
    images: tuple[ImageSource, ...] = ()
    text: str = ""
    videos: tuple[ImageSource, ...] = ()
    """Chat only: one per `<video>` marker, in marker order (bytes or a path, like images)."""
    answer: str = ""
    verifier: str = ""
    difficulty: float | None = None
    chosen: str = ""
    rejected: str = ""

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def same_content(self, other: Sample) -> bool:
        """Equal apart from the key and how the images are stored (pixels compared)."""
        skip = ("key", "images", "videos")
        mine = {k: v for k, v in vars(self).items() if k not in skip}
        theirs = {k: v for k, v in vars(other).items() if k not in skip}
        return (
            mine == theirs
            and len(self.images) == len(other.images)
            and all(a.same_pixels(b) for a, b in zip(self.images, other.images))
            and [v.read_bytes() for v in self.videos] == [v.read_bytes() for v in other.videos]
        )


def _get(row: Mapping, column: str) -> Any:
    node: Any = row
    for part in column.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


class RowReader:
    """Normalizes rows of one declared dataset (its format, columns, tags, images_root)."""

    def __init__(self, decl: DeclaredDataset, images_root: str | None):
        self.decl, self.images_root = decl, images_root
        self.user_mapped = set(decl.columns)

    def field(self, row: Mapping, name: str, required: bool = True) -> Any:
        col = self.decl.column(name)
        if col is None:
            return None
        value = _get(row, col)
        if value is _MISSING or (value is None and required):
            if required or name in self.user_mapped:
                have = sorted(row) if isinstance(row, Mapping) else []
                raise BadRecord(
                    "column_absent", f"column {col!r} (mapped from {name!r}) is absent; the record has {have}"
                )
            return None
        return value

    def sample(self, row: Any, key: str) -> Sample:
        """The Sample of `row`; BadRecord (with the key) if it cannot be used."""
        try:
            if not isinstance(row, Mapping):
                raise BadRecord("not_object", f"record is a {type(row).__name__}, not an object")
            return getattr(self, f"_{self.decl.kind}")(row, key)
        except BadRecord as e:
            raise e.at(key) from None

    # -- per kind ------------------------------------------------------------------------------
    def _chat(self, row: Mapping, key: str) -> Sample:
        column = self._image_list(self.field(row, "images", required=False))
        videos = self._image_list(self.field(row, "videos", required=False), "videos")
        raw = self.field(row, "messages")
        if self.decl.format == "llava" and videos and not column:
            raw = self._llava_video(raw)
        messages, images = self._messages(raw, column)
        marked = sum(c.count(VIDEO_MARKER) for _, c in messages)
        if marked != len(videos):
            raise BadRecord(
                "video_count",
                f"{marked} {VIDEO_MARKER} marker(s) but {len(videos)} video(s); give one video per marker",
            )
        system = self.field(row, "system", required=False)
        if system:
            messages = [("system", _text(system, "system"))] + messages
        if self.decl.format == "llava":
            messages = [(r, _marker_first(c)) for r, c in messages]
        _check_turns(messages, want_last="assistant")
        return Sample(key, "chat", tuple(messages), tuple(images), videos=tuple(videos))

    def _llava_video(self, value: Any) -> Any:
        """LLaVA-NeXT video rows mark their `video` with `<image>`: make those `<video>`."""
        if not isinstance(value, (list, tuple)):
            return value
        ck = self.decl.tag("content_tag")
        return [
            {**m, ck: m[ck].replace(IMAGE_MARKER, VIDEO_MARKER)}
            if isinstance(m, Mapping) and isinstance(m.get(ck), str)
            else m
            for m in value
        ]

    def _pair(self, row: Mapping, key: str) -> Sample:
        ref = self.field(row, "image", required=False)
        if ref is None and self.decl.format == "webdataset" and "image" not in self.user_mapped:
            ref = next((row[e] for e in ("jpg", "jpeg", "png", "webp") if row.get(e) is not None), None)
        if ref is None:
            self.field(row, "image")  # raises column_absent
        text = _text(self.field(row, "text"), "text").strip()
        if not text:
            raise BadRecord("empty_text", "the caption is empty")
        return Sample(key, "pair", images=(resolve_image(ref, self.images_root),), text=text)

    def _text(self, row: Mapping, key: str) -> Sample:
        text = _text(self.field(row, "text"), "text")
        if not text.strip():
            raise BadRecord("empty_text", "the text is empty")
        return Sample(key, "text", text=text)

    def _prompt(self, row: Mapping, key: str) -> Sample:
        column = self._image_list(self.field(row, "images", required=False))
        messages, images = self._messages(self.field(row, "prompt"), column, implicit=True)
        _check_turns(messages, want_last="user")
        answer = self.field(row, "ground_truth")
        answer = str(answer).strip() if isinstance(answer, (str, int, float)) else ""
        if not answer:
            raise BadRecord("no_answer", "RL prompt has no reference answer (ground truth)")
        source = self.field(row, "data_source", required=False)
        diff = self.field(row, "difficulty", required=False)
        return Sample(
            key,
            "prompt",
            tuple(messages),
            tuple(images),
            answer=answer,
            verifier=self.decl.verifier_for(None if source is None else str(source)),
            difficulty=None if diff is None else float(diff),
        )

    def _preference(self, row: Mapping, key: str) -> Sample:
        column = self._image_list(self.field(row, "images", required=False))
        prompt = self.field(row, "prompt")
        if isinstance(prompt, str):
            prompt = [
                {self.decl.tag("role_tag"): self.decl.tag("user_tag"), self.decl.tag("content_tag"): prompt}
            ]
        messages, images = self._messages(prompt, column, implicit=True)
        _check_turns(messages, want_last="user")
        chosen, rejected = (self._response(self.field(row, f), f) for f in ("chosen", "rejected"))
        return Sample(key, "preference", tuple(messages), tuple(images), chosen=chosen, rejected=rejected)

    # -- pieces --------------------------------------------------------------------------------
    def _image_list(self, value: Any, what: str = "images") -> list[ImageSource]:
        if value is None:
            return []
        if isinstance(value, (str, bytes, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise BadRecord("bad_value", f"{what} is a {type(value).__name__}, not a list")
        return [resolve_image(v, self.images_root) for v in value]

    def _role(self, value: Any, i: int) -> str:
        d = self.decl
        roles = {
            d.tag("user_tag"): "user",
            d.tag("assistant_tag"): "assistant",
            d.tag("system_tag"): "system",
        }
        if not isinstance(value, str) or value not in roles:
            raise BadRecord(
                "unknown_role",
                f"message {i}: role {value!r} is not one of {sorted(roles)} (the declaration's tags)",
            )
        return roles[value]

    def _messages(self, value: Any, column: list[ImageSource], implicit: bool = False):
        """(messages, images in marker order). A marker in a string content and a TRL
        `{type: image}` part take the next image of `column`; an `image_url` part names its own.
        `implicit`: with no marker at all, the column's images go before the first user turn."""
        if not isinstance(value, (list, tuple)) or not value:
            raise BadRecord("bad_value", "messages must be a non-empty list of message objects")
        role_key, content_key = self.decl.tag("role_tag"), self.decl.tag("content_tag")
        out: list[tuple[str, str]] = []
        images: list[ImageSource] = []
        taken = [0]  # column images consumed so far

        def take() -> ImageSource:
            if taken[0] >= len(column):
                raise BadRecord(
                    "image_count",
                    f"more {IMAGE_MARKER} markers than the {len(column)} image(s) of the record",
                )
            taken[0] += 1
            return column[taken[0] - 1]

        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or role_key not in m:
                raise BadRecord("bad_value", f"message {i} has no {role_key!r} key")
            if content_key not in m:
                raise BadRecord("column_absent", f"message {i} has no {content_key!r} key")
            role, content = self._role(m[role_key], i), m[content_key]
            if isinstance(content, (list, tuple)):
                content = self._parts(content, i, images, take)
            else:
                content = _text(content, f"message {i} content")
                images += [take() for _ in range(content.count(IMAGE_MARKER))]
            out.append((role, content))
        if implicit and not images and column:
            j = next((k for k, (r, _) in enumerate(out) if r == "user"), 0)
            out[j] = (out[j][0], (IMAGE_MARKER + "\n") * len(column) + out[j][1])
            images, taken[0] = list(column), len(column)
        if taken[0] != len(column):
            raise BadRecord(
                "image_count",
                f"{len(images)} {IMAGE_MARKER} marker(s) but "
                f"{len(column) - taken[0] + len(images)} image(s); "
                "give one image per marker",
            )
        return out, images

    def _parts(self, parts, i: int, images: list[ImageSource], take) -> str:
        texts = []
        for p in parts:
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "text":
                texts.append(_text(p.get("text"), f"message {i} text part"))
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                images.append(resolve_image(url, self.images_root))
                texts.append(IMAGE_MARKER)
            elif kind == "image":
                images.append(take())
                texts.append(IMAGE_MARKER)
            else:
                raise BadRecord(
                    "bad_value", f"message {i}: content part {p!r} is not a text, image_url or image part"
                )
        return "\n".join(texts)

    def _response(self, value: Any, name: str) -> str:
        if isinstance(value, (list, tuple)):
            msgs, _ = self._messages(value, [])
            if len(msgs) != 1 or msgs[0][0] != "assistant":
                raise BadRecord("turn_order", f"{name} must be one assistant message")
            value = msgs[0][1]
        text = _text(value, name)
        if not text.strip():
            raise BadRecord("empty_assistant", f"{name} response is empty")
        return text


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("bad_value", f"{what} is a {type(value).__name__}, not a string")
    return value


def _marker_first(content: str) -> str:
    markers = [m for m in re.findall(f"{IMAGE_MARKER}|{VIDEO_MARKER}", content)]
    if not markers:
        return content
    rest = content.replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "").strip()
    return "".join(m + "\n" for m in markers) + rest


def _check_turns(messages: list[tuple[str, str]], want_last: str) -> None:
    offset = int(bool(messages) and messages[0][0] == "system")
    turns = messages[offset:]
    if not turns:
        raise BadRecord("turn_order", "the dialogue has no user turn")
    for j, (role, content) in enumerate(turns):
        want = ("user", "assistant")[j % 2]
        if role != want:
            raise BadRecord(
                "turn_order",
                f"message {j + offset} is {role!r} where {want!r} is "
                "expected ([system], user, assistant, user, ...)",
            )
        if role == "assistant" and not content.replace(IMAGE_MARKER, "").strip():
            raise BadRecord("empty_assistant", f"message {j + offset}: the assistant turn is empty")
    if turns[-1][0] != want_last:
        raise BadRecord(
            "no_answer",
            "the dialogue must end with an assistant turn (nothing to supervise)"
            if want_last == "assistant"
            else "a prompt must end with a user turn (the model writes the answer)",
        )
