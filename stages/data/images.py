"""Images in, patch sequences out: loading (with corrupt-file accounting) and NaViT patching.

An image keeps its aspect ratio: it is resized so that its patch grid (h, w) has both sides a
multiple of `merge_size` (the projector's pixel shuffle merges merge x merge patches into one LM
token) and h * w <= max_patches, then cut into patch_size x patch_size patches.

Layout of `pixels_NP` (N = h * w patches, P = 3 * patch_size**2 values per patch):
  * patches in row-major order of the (h, w) grid (row 0 left to right, then row 1, ...);
  * each patch flattened channel-first, as (channel, y, x): this is the memory order of a
    Conv2d(3, D, kernel_size=p, stride=p) weight, so `conv.weight.view(D, -1)` applied as a
    Linear to a patch row equals the convolution;
  * values are RGB / 127.5 - 1, in [-1, 1].
The projector therefore finds the 2x2 merge window of merged cell (i, j) at patch rows 2i, 2i+1
and columns 2j, 2j+1 of the grid; the patches are not pre-grouped by window.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


class CorruptImageError(ValueError):
    """An image file could not be decoded (missing, truncated, not an image)."""

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"corrupt image {path}: {reason}")


class TooManyCorruptImagesError(RuntimeError):
    """More than the allowed share of a dataset's images failed to load."""

    def __init__(self, dataset: str, num_corrupt: int, num_images: int, max_frac: float):
        self.dataset, self.num_corrupt = dataset, num_corrupt
        super().__init__(
            f"dataset {dataset!r}: {num_corrupt} of {num_images} images are corrupt, more than "
            f"the allowed {max_frac:.1%}; rebuild it (`dvc repro` / `dvc pull`) or fix the files"
        )


def load_image(path: Path | str) -> Image.Image:
    """Fully decode `path` as RGB; raise CorruptImageError instead of returning a bad image."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file must fail here, not mid-batch
            return img.convert("RGB")
    except FileNotFoundError:
        raise CorruptImageError(path, "file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from None


def patch_grid(
    width: int, height: int, patch_size: int, merge_size: int, max_patches: int
) -> tuple[int, int]:
    """(h, w) in patches for a width x height image: multiples of merge_size, h * w <= max_patches.

    Example: patch_grid(64, 48, 8, 2, 64) == (6, 8); with max_patches=16 it is (2, 4).
    """
    if max_patches < merge_size**2:
        raise ValueError(
            f"max_patches={max_patches} cannot hold one {merge_size}x{merge_size} "
            "merge window; raise max_patches"
        )
    m = merge_size
    h = max(m, round(height / patch_size / m) * m)
    w = max(m, round(width / patch_size / m) * m)
    if h * w > max_patches:
        scale = math.sqrt(max_patches / (h * w))
        h, w = max(m, int(h * scale) // m * m), max(m, int(w * scale) // m * m)
    while h * w > max_patches:  # only extreme aspect ratios reach this
        if h >= w:
            h -= m
        else:
            w -= m
    return h, w


def num_image_tokens(grid_hw: tuple[int, int], merge_size: int) -> int:
    """LM tokens one image occupies: (h / merge) * (w / merge)."""
    return (grid_hw[0] // merge_size) * (grid_hw[1] // merge_size)


def to_patches(
    img: Image.Image, patch_size: int, merge_size: int, max_patches: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize `img` to its patch grid and return (pixels_NP float32 (h*w, 3*p*p), (h, w))."""
    h, w = patch_grid(img.width, img.height, patch_size, merge_size, max_patches)
    p = patch_size
    img = img.convert("RGB")
    if img.size != (w * p, h * p):
        img = img.resize((w * p, h * p), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, p, w, p, 3)
    x = x.permute(0, 2, 4, 1, 3).reshape(h * w, 3 * p * p)  # (h, w, C, py, px): channel-first
    return x.to(torch.float32) / 127.5 - 1.0, (h, w)


class ImageLoader:
    """Loads one dataset's images, skipping and counting corrupt files up to a share of them.

    `skipped` counts skip events (a corrupt image met twice counts twice); `corrupt` holds the
    distinct bad paths. When the distinct bad paths exceed max_corrupt_frac * num_images,
    TooManyCorruptImagesError names the dataset and the count.
    """

    def __init__(self, dataset: str, root: Path, num_images: int, max_corrupt_frac: float = 0.01):
        self.dataset, self.root = dataset, Path(root)
        self.num_images, self.max_corrupt_frac = num_images, max_corrupt_frac
        self.skipped = 0
        self.corrupt: set[str] = set()

    def load(self, rel_path: str) -> Image.Image | None:
        """The decoded image, or None (counted) if it is corrupt."""
        if rel_path not in self.corrupt:
            try:
                return load_image(self.root / rel_path)
            except CorruptImageError:
                self.corrupt.add(rel_path)
                if len(self.corrupt) > self.max_corrupt_frac * self.num_images:
                    raise TooManyCorruptImagesError(
                        self.dataset, len(self.corrupt), self.num_images, self.max_corrupt_frac
                    ) from None
        self.skipped += 1
        return None
