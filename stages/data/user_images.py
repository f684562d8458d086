"""Images of users' records: where a reference points, and decoding it safely.

A record names its images as paths relative to the declaration's `images_root` (LLaVA,
ShareGPT, ms-swift), as `data:` URIs (OpenAI content parts), or carries the bytes (a Parquet HF
`Image` struct `{bytes, path}`, a WebDataset tar member). `resolve_image` turns a reference into
an `ImageSource` or raises `BadRecord`: an absolute path, a `..` that climbs out of images_root,
a `file://` or `http(s)://` URL (never fetched) are refused. `decode_image` decodes with Pillow
under its decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`; the warning above it counts as a
bomb too), so a bad image is a counted bad record, never a crash or a huge allocation.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath
import warnings
from dataclasses import dataclass

from PIL import Image


class BadRecord(Exception):
    """One record that cannot be used: `reason` is a short slug (counted), `detail` says why."""

    def __init__(self, reason: str, detail: str, key: str = ""):
        self.reason, self.detail, self.key = reason, detail, key
        super().__init__(f"{key + ': ' if key else ''}{detail}")

    def at(self, key: str) -> BadRecord:
        return BadRecord(self.reason, self.detail, key)


REASONS = {
    "not_utf8": "line is not UTF-8",
    "not_json": "not valid JSON",
    "not_object": "record is not a JSON object",
    "column_absent": "a mapped column is absent",
    "bad_value": "a field has the wrong type",
    "unknown_role": "a message role is not one of the tags",
    "turn_order": "turns are not [system], user, assistant, ...",
    "empty_assistant": "an assistant turn is empty",
    "no_answer": "nothing to supervise or no reference answer",
    "image_count": "<image> markers do not match the images",
    "path_escape": "an image path is absolute or leaves images_root",
    "remote_image": "an image URL would need the network",
    "no_images_root": "a relative image path but no images_root",
    "missing_image": "an image file does not exist",
    "missing_s3_object": "an S3 object does not exist",
    "corrupt_image": "an image does not decode (corrupt, truncated, not an image)",
    "image_bomb": "an image is larger than Pillow's decompression-bomb limit",
    "empty_text": "the text is empty",
    "video_count": "<video> markers do not match the videos",
    "missing_video": "a video file or S3 object does not exist",
    "corrupt_video": "a video does not decode (corrupt, not animated WebP / GIF)",
}
"""Every reason a record is skipped, with what it means (the check report's legend)."""


@dataclass(frozen=True)
class ImageSource:
    """One image of a record: its bytes, or the local path / s3:// URI that holds them."""

    uri: str
    data: bytes | None = None

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            if self.uri.startswith("s3://"):
                import fsspec

                with fsspec.open(self.uri, "rb") as f:
                    return f.read()
            with open(self.uri, "rb") as f:
                return f.read()
        except FileNotFoundError:
            if self.uri.startswith("s3://"):
                raise BadRecord("missing_s3_object", f"image {self.uri}: no such S3 object") from None
            raise BadRecord("missing_image", f"image {self.uri}: no such file") from None
        except OSError as e:
            raise BadRecord("missing_image", f"image {self.uri}: {e}") from None

    def same_pixels(self, other: ImageSource) -> bool:
        a, b = decode_image(self), decode_image(other)
        return a.size == b.size and a.tobytes() == b.tobytes()


def _join(root: str, rel: str) -> str:
    if root.startswith("s3://"):
        return root.rstrip("/") + "/" + rel
    return posixpath.join(root, rel)


def resolve_image(ref, images_root: str | None) -> ImageSource:
    """An ImageSource for one image reference of a record (see the module docstring).

    `ref` is a path / URI string, raw bytes, or an HF Image struct {"bytes", "path"}.
    `images_root` is already resolved (an absolute local directory or an s3:// URI).
    """
    if isinstance(ref, (bytes, bytearray)):
        return ImageSource("(inline bytes)", bytes(ref))
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        if ref.get("bytes"):
            return ImageSource(str(ref.get("path") or "(inline bytes)"), bytes(ref["bytes"]))
        ref = ref.get("path")
    if not isinstance(ref, str) or not ref.strip():
        raise BadRecord(
            "bad_value",
            f"image reference {ref!r} is not a path, a data: URI or an HF Image struct {{bytes, path}}",
        )
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise BadRecord("corrupt_image", f"data URI {head!r} is not base64")
        try:
            return ImageSource(head, base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise BadRecord("corrupt_image", f"data URI {head!r}: invalid base64") from None
    if ref.startswith(("http://", "https://")):
        raise BadRecord(
            "remote_image",
            f"image {ref!r} is a web URL; moonforge never fetches them: download the images into images_root",
        )
    if (
        ref.startswith("file://")
        or posixpath.isabs(ref)
        or (ref.startswith("s3://") and not (images_root or "").startswith("s3://"))
    ):
        raise BadRecord(
            "path_escape", f"image path {ref!r} is absolute; records must name images relative to images_root"
        )
    if images_root is None:
        raise BadRecord(
            "no_images_root", f"image {ref!r} is a relative path but the declaration has no images_root"
        )
    if ref.startswith("s3://"):
        if not ref.startswith(images_root.rstrip("/") + "/"):
            raise BadRecord("path_escape", f"image {ref!r} is outside images_root {images_root}")
        return ImageSource(ref)
    norm = posixpath.normpath(ref.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise BadRecord("path_escape", f"image path {ref!r} climbs out of images_root")
    return ImageSource(_join(images_root, norm))


def _open(src: ImageSource) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(src.read_bytes()))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadRecord("image_bomb", f"image {src.uri}: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadRecord("corrupt_image", f"image {src.uri}: {type(e).__name__}: {e}") from None


def image_size(src: ImageSource) -> tuple[int, int]:
    """(width, height) from the header (no pixel decode); BadRecord if unreadable or a bomb."""
    with _open(src) as img:
        return img.size


def decode_image(src: ImageSource) -> Image.Image:
    """The fully decoded RGB image; BadRecord (corrupt_image / image_bomb / missing_*) if not."""
    img = _open(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()  # decode now: a truncated file must fail here, not mid-batch
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise BadRecord("corrupt_image", f"image {src.uri}: {type(e).__name__}: {e}") from None
        finally:
            img.close()
