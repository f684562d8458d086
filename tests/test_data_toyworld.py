"""Toy world: records validate, images match their records, facts are verifiable, builds are
byte-deterministic; manifests fail loudly; image loading and patching keep their contracts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from test_data_helpers import tiny_data, tree_digest

from moonforge.stages.data import scenes
from moonforge.stages.data.images import (
    CorruptImageError,
    load_image,
    num_image_tokens,
    patch_grid,
    to_patches,
)
from moonforge.stages.data.params import ToyworldParams, load_params
from moonforge.stages.data.records import (
    DatasetMissingError,
    ImageRecord,
    ManifestError,
    read_image_records,
)
from moonforge.stages.data.toyworld import build_toyworld


@pytest.fixture(scope="module")
def toyworld():
    return tiny_data() / "toyworld"


def test_records_and_images_agree(toyworld):
    records = read_image_records(toyworld, "train")
    assert len(records) == 300 and len(read_image_records(toyworld, "val")) == 40
    assert {r.kind for r in records} == {"shapes", "ocr", "chart", "arith", "doc"}
    assert {r.quality for r in records} == {"high", "web"}
    for r in records[:60]:
        img = Image.open(toyworld / "train" / r.image)
        assert img.mode == "RGB" and img.size == (r.width, r.height)
        assert r.width % 16 == 0 and r.height % 16 == 0 and 32 <= min(r.width, r.height)
        for box in r.boxes:
            x0, y0, x1, y1 = box.bbox
            assert 0 <= x0 < x1 <= r.width and 0 <= y0 < y1 <= r.height
        assert r.qa and all(q.answer.strip() == q.answer for q in r.qa)


def test_captions_name_what_is_drawn(toyworld):
    """Every shape's colour and kind is in the caption: retrieval has something to match."""
    for r in read_image_records(toyworld, "train"):
        if r.kind == "shapes":
            for box in r.boxes:
                color, shape = box.label.split()
                assert color in r.caption and shape in r.caption, (r.caption, box.label)
        if r.kind in ("ocr", "arith"):
            assert r.ocr in r.caption
        assert len(r.alt_text) <= len(r.caption)


def test_qa_answers_follow_from_the_facts(toyworld):
    for r in read_image_records(toyworld, "train"):
        for qa in r.qa:
            if qa.type == "arith":
                assert str(eval(r.ocr.removesuffix("=?"))) == qa.answer  # noqa: S307 (digits only)
            if qa.type == "count" and qa.question == "How many shapes are there?":
                assert int(qa.answer) == len(r.boxes)
            if qa.type == "color":
                assert qa.answer in scenes.COLORS
            if qa.type == "ocr" and r.kind == "ocr":
                assert qa.answer == r.ocr


def test_build_is_byte_deterministic(tmp_path):
    params = ToyworldParams(num_train=40, num_val=8)
    build_toyworld(params, tmp_path / "a")
    build_toyworld(params, tmp_path / "b")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    build_toyworld(ToyworldParams(num_train=40, num_val=8, seed=1), tmp_path / "c")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_params_reject_unknown_keys_and_odd_sizes(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("toyworld: {num_train: 4, num_val: 2, num_trian: 5}\n")
    with pytest.raises(ValueError, match="toyworld.num_trian"):
        load_params(path, "toyworld")
    with pytest.raises(ValueError, match="multiples of 16"):
        ToyworldParams(num_train=4, num_val=2, sizes=(40,))


def test_malformed_manifest_names_file_line_and_field(tmp_path, toyworld):
    good = (toyworld / "val" / "records.jsonl").read_text().splitlines()
    bad = json.loads(good[1])
    bad["quality"] = "excellent"
    split = tmp_path / "toyworld" / "val"
    split.mkdir(parents=True)
    (split / "records.jsonl").write_text("\n".join([good[0], json.dumps(bad), good[2]]) + "\n")
    with pytest.raises(ManifestError, match=r"records.jsonl:2: field 'quality'"):
        read_image_records(tmp_path / "toyworld", "val")
    (split / "records.jsonl").write_text(good[0] + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"records.jsonl:2: not valid JSON"):
        read_image_records(tmp_path / "toyworld", "val")
    with pytest.raises(ValidationError, match="extra"):
        ImageRecord.model_validate({**json.loads(good[0]), "colour": "red"})


def test_missing_dataset_names_it_and_the_fix(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"'toyworld'.*dvc repro"):
        read_image_records(tmp_path / "toyworld", "train")


def test_truncated_png_raises_corrupt_image_error(tmp_path, toyworld):
    src = toyworld / "train" / "images" / "train-000000.png"
    data = src.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(CorruptImageError):
        load_image(tmp_path / "junk.png")
    with pytest.raises(CorruptImageError, match="not found"):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize(
    "size,cap", [((64, 48), 64), ((64, 48), 16), ((32, 64), 36), ((640, 24), 64), ((17, 500), 24)]
)
def test_patch_grid_is_even_and_capped(size, cap):
    h, w = patch_grid(*size, patch_size=8, merge_size=2, max_patches=cap)
    assert h % 2 == 0 and w % 2 == 0 and h * w <= cap and h >= 2 and w >= 2


def test_to_patches_layout_is_row_major_channel_first():
    p = 8
    img = Image.new("RGB", (2 * p, 2 * p))
    px = img.load()
    for y in range(2 * p):
        for x in range(2 * p):
            px[x, y] = (x, y, 200)
    pixels, (h, w) = to_patches(img, patch_size=p, merge_size=2, max_patches=4)
    assert (h, w) == (2, 2) and pixels.shape == (4, 3 * p * p) and pixels.dtype == torch.float32
    raw = ((pixels + 1.0) * 127.5).round().view(4, 3, p, p)  # (patch, channel, y, x)
    assert raw[1, 0, 0, 0] == p and raw[1, 1, 0, 0] == 0  # patch 1 = grid (0, 1): x starts at p
    assert raw[2, 0, 0, 0] == 0 and raw[2, 1, 0, 0] == p  # patch 2 = grid (1, 0): y starts at p
    assert raw[0, 0, 0, 3] == 3 and raw[0, 1, 5, 0] == 5 and bool((raw[:, 2] == 200).all())
    assert -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert num_image_tokens((h, w), 2) == 1


def test_ocr_text_fits_and_is_legible_size(toyworld):
    for r in read_image_records(toyworld, "val"):
        if r.ocr:
            for line in r.ocr.splitlines():
                assert re.fullmatch(r"[a-z0-9 +\-*=?]+", line)
                assert len(line) * 6 <= r.width
