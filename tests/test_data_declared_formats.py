"""Declared datasets: every format reads the same content into the same samples; bad input is
skipped and counted (or refused) with a reason; S3 paths go through the same readers.

Real files throughout: PNG and JPEG images written by Pillow, JSON / JSONL written by hand,
Parquet by pyarrow (HF `Image` structs `{bytes, path}`), WebDataset tars by tarfile, S3 on the
local moto endpoint (conftest `s3_env`).
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moonforge.stages.data.declared import DeclaredDataset
from moonforge.stages.data.user_check import DeclaredDataError, check_set, require_ok
from moonforge.stages.data.user_files import DatasetFormatError
from moonforge.stages.data.user_images import BadRecord
from moonforge.stages.data.user_samples import Sample
from moonforge.stages.data.user_sets import DeclaredSet

# -- the shared content -------------------------------------------------------------------------


def png_bytes() -> bytes:
    img = Image.new("RGB", (24, 16), (200, 30, 30))
    img.paste((20, 20, 220), (4, 4, 12, 12))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    img = Image.new("RGB", (20, 20), (30, 160, 40))
    img.paste((240, 240, 0), (6, 6, 14, 14))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGES = {"img0.png": png_bytes(), "img1.jpg": jpeg_bytes()}

# (system, [(user, assistant), ...], image file or None): three dialogues, one text-only
DIALOGUES = [
    (None, [("<image>\nWhat color is the square?", "blue")], "img0.png"),
    (
        "Be brief.",
        [("<image>\nDescribe the picture.", "a yellow square on green"), ("How many squares?", "1")],
        "img1.jpg",
    ),
    (None, [("What is 2 + 3?", "5")], None),
]
PAIRS = [("img0.png", "a blue square on red"), ("img1.jpg", "a yellow square on green")]
TEXTS = ["the first document", "a second, longer document about shapes"]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        path.write_text(json.dumps(data))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def _struct(name: str) -> dict:
    return {"bytes": IMAGES[name], "path": name}


def _data_uri(name: str) -> str:
    mime = "png" if name.endswith("png") else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(IMAGES[name]).decode()


def _sharegpt_msgs(system, turns, role="from", content="value", user="human", assistant="gpt"):
    msgs = [{role: "system", content: system}] if system else []
    for u, a in turns:
        msgs += [{role: user, content: u}, {role: assistant, content: a}]
    return msgs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """data/<name>/ directories holding the same content in every format."""
    base = tmp_path_factory.mktemp("declared")
    for name, data in IMAGES.items():
        _write(base / "images" / name, data)
    llava = [
        {"id": f"d{i}", **({"image": img} if img else {}), "conversations": _sharegpt_msgs(sys, turns)}
        for i, (sys, turns, img) in enumerate(DIALOGUES)
    ]
    _write(base / "llava" / "train.json", llava)
    sharegpt = [
        {
            "conversations": _sharegpt_msgs(None, turns),
            **({"system": sys} if sys else {}),
            "images": [img] if img else [],
        }
        for sys, turns, img in DIALOGUES
    ]
    _write(base / "sharegpt" / "train.jsonl", sharegpt)
    _parquet(
        base / "sharegpt_pq" / "train.parquet",
        [
            {"conversations": _sharegpt_msgs(sys, turns), "images": [_struct(img)] if img else []}
            for sys, turns, img in DIALOGUES
        ],
    )
    _write(
        base / "messages" / "train.jsonl",
        [
            {
                "messages": _sharegpt_msgs(sys, turns, "role", "content", "user", "assistant"),
                "images": [img] if img else [],
            }
            for sys, turns, img in DIALOGUES
        ],
    )
    openai = []
    for i, (sys, turns, img) in enumerate(DIALOGUES):
        msgs = [{"role": "system", "content": sys}] if sys else []
        for j, (u, a) in enumerate(turns):
            text = u.replace("<image>\n", "")
            parts = [{"type": "text", "text": text}]
            if j == 0 and img:  # dialogue 0: inline data URI; dialogue 1: TRL image marker + column
                parts.insert(
                    0,
                    {"type": "image_url", "image_url": {"url": _data_uri(img)}}
                    if i == 0
                    else {"type": "image"},
                )
            msgs += [{"role": "user", "content": parts}, {"role": "assistant", "content": a}]
        openai.append({"messages": msgs, **({"images": [img]} if i == 1 else {})})
    _write(base / "openai" / "train.jsonl", openai)
    # image-text pairs: WebDataset shard and Parquet with HF Image structs
    (base / "wds").mkdir()
    with tarfile.open(base / "wds" / "00000.tar", "w") as tf:
        for k, (img, cap) in enumerate(PAIRS):
            ext = img.rsplit(".", 1)[1]
            for member, data in (
                (f"{k:05d}.{ext}", IMAGES[img]),
                (f"{k:05d}.txt", cap.encode()),
                (f"{k:05d}.json", json.dumps({"caption": cap}).encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    _parquet(base / "pairs_pq" / "pairs.parquet", [{"image": _struct(i), "text": c} for i, c in PAIRS])
    # text: JSONL, JSON, Parquet
    _write(base / "text_jsonl" / "a.jsonl", [{"text": t} for t in TEXTS])
    _write(base / "text_json" / "a.json", [{"text": t} for t in TEXTS])
    _parquet(base / "text_pq" / "a.parquet", [{"text": t} for t in TEXTS])
    # RL prompts: verl Parquet and messages + solution JSONL
    _parquet(
        base / "verl" / "train.parquet",
        [
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": "<image>\nHow many squares?"}],
                "images": [_struct("img0.png")],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": "1"},
            },
            {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                "images": [],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": "5"},
            },
        ],
    )
    _write(
        base / "rl_messages" / "train.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image>\nHow many squares?"}],
                "images": ["img0.png"],
                "solution": "1",
                "source": "openai/gsm8k",
            },
            {
                "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                "solution": 5,
                "source": "openai/gsm8k",
            },
        ],
    )
    # preference pairs: plain TRL JSONL and conversational TRL Parquet
    _write(
        base / "pref" / "train.jsonl",
        [
            {
                "prompt": "Which color is the square?",
                "images": ["img0.png"],
                "chosen": "blue",
                "rejected": "The square in the picture is blue.",
            }
        ],
    )
    _parquet(
        base / "pref_pq" / "train.parquet",
        [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": "Which color is the square?"},
                        ],
                    }
                ],
                "chosen": [{"role": "assistant", "content": "blue"}],
                "rejected": [{"role": "assistant", "content": "The square in the picture is blue."}],
                "images": [_struct("img0.png")],
            }
        ],
    )
    return base


def _set(root: Path, **decl) -> DeclaredSet:
    decl.setdefault("name", "user_set")
    return DeclaredSet(DeclaredDataset.model_validate(decl), root)


def _samples(ds: DeclaredSet) -> list[Sample]:
    out = [ds.record(i) for i in range(len(ds))]
    bad = [r for r in out if isinstance(r, BadRecord)]
    assert not bad, bad
    return out


def _same(groups: dict[str, list[Sample]]) -> None:
    (ref_name, ref), *rest = groups.items()
    for name, got in rest:
        assert len(got) == len(ref), name
        for a, b in zip(ref, got):
            assert a.same_content(b), (ref_name, name, a, b)


def test_every_conversation_format_reads_the_same_dialogues(root):
    groups = {
        "llava": _samples(_set(root, format="llava", path="llava/train.json", images_root="images")),
        "sharegpt": _samples(
            _set(root, format="sharegpt", path="sharegpt/train.jsonl", images_root="images")
        ),
        "sharegpt.parquet": _samples(_set(root, format="sharegpt", path="sharegpt_pq")),
        "messages": _samples(
            _set(root, format="messages", path="messages/train.jsonl", images_root="images")
        ),
        "openai": _samples(_set(root, format="openai", path="openai", images_root="images")),
    }
    _same(groups)
    first = groups["llava"][1]
    assert first.messages == (
        ("system", "Be brief."),
        ("user", "<image>\nDescribe the picture."),
        ("assistant", "a yellow square on green"),
        ("user", "How many squares?"),
        ("assistant", "1"),
    )
    assert [s.kind for s in groups["openai"]] == ["chat"] * 3 and groups["openai"][2].images == ()
    # JPEG and PNG bytes arrive unchanged whichever way they were stored
    assert groups["openai"][0].images[0].read_bytes() == IMAGES["img0.png"]
    assert groups["sharegpt.parquet"][1].images[0].read_bytes() == IMAGES["img1.jpg"]


def test_image_text_pairs_text_rl_prompts_and_preferences_read_the_same(root):
    _same(
        {
            "webdataset": _samples(_set(root, format="webdataset", path="wds/*.tar")),
            "parquet": _samples(_set(root, format="parquet", path="pairs_pq")),
        }
    )
    _same(
        {
            "jsonl": _samples(_set(root, format="text", path="text_jsonl")),
            "json": _samples(_set(root, format="text", path="text_json/a.json")),
            "parquet": _samples(_set(root, format="text", path="text_pq")),
        }
    )
    rl = {
        "verl": _samples(_set(root, format="verl", path="verl")),
        "rl_messages": _samples(
            _set(
                root,
                format="rl_messages",
                path="rl_messages",
                images_root="images",
                columns={"data_source": "source"},
            )
        ),
    }
    _same(rl)
    assert [(s.answer, s.verifier) for s in rl["verl"]] == [("1", "numeric"), ("5", "numeric")]
    prefs = {
        "jsonl": _samples(_set(root, format="preference", path="pref", images_root="images")),
        "parquet": _samples(_set(root, format="preference", path="pref_pq")),
    }
    _same(prefs)
    assert prefs["jsonl"][0].messages == (("user", "<image>\nWhich color is the square?"),)


def test_verifier_from_the_recipe_wins_over_data_source(root):
    ds = _set(root, format="verl", path="verl", verifier="exact")
    assert {s.verifier for s in _samples(ds)} == {"exact"}
    ds = _set(root, format="verl", path="verl", data_source_verifiers={"openai/gsm8k": "multiple_choice"})
    assert {s.verifier for s in _samples(ds)} == {"multiple_choice"}


def test_num_samples_and_heldout(root):
    ds = _set(
        root, format="llava", path="llava/train.json", images_root="images", num_samples=2, num_heldout=1
    )
    assert len(ds) == 2 and len(ds.heldout) == 1
    order = ds.order("s")
    assert sorted(order.epoch_ids(0)) == [i for i in range(2) if i not in ds.heldout]


# -- bad input ------------------------------------------------------------------------------------


def _bad_root(tmp_path: Path) -> Path:
    for name, data in IMAGES.items():
        _write(tmp_path / "images" / name, data)
    _write(tmp_path / "images" / "truncated.png", IMAGES["img0.png"][:60])
    return tmp_path


def _one(tmp_path: Path, row: dict, fmt: str = "messages", **decl) -> Sample | BadRecord:
    _write(tmp_path / "one" / "x.jsonl", [row])
    ds = _set(tmp_path, format=fmt, path="one/x.jsonl", images_root="images", **decl)
    rec = ds.record(0)
    if isinstance(rec, Sample):  # image problems show when decoding (the check / training)
        rep = check_set(ds)
        if rep.examples:
            return BadRecord(rep.examples[0][2], rep.examples[0][3], rep.examples[0][1])
    return rec


def _msgs(user="<image>\nWhat is it?", assistant="a square", role="assistant"):
    return [{"role": "user", "content": user}, {"role": role, "content": assistant}]


@pytest.mark.parametrize(
    "row,reason,says",
    [
        ({"messages": _msgs(), "images": ["nope.png"]}, "missing_image", "no such file"),
        ({"messages": _msgs(), "images": ["truncated.png"]}, "corrupt_image", "truncated.png"),
        ({"messages": _msgs(), "images": ["img0.png", "img1.jpg"]}, "image_count", "1 <image> marker"),
        ({"messages": _msgs(user="<image><image> two?"), "images": ["img0.png"]}, "image_count", "more"),
        ({"messages": _msgs(assistant="  "), "images": ["img0.png"]}, "empty_assistant", "empty"),
        ({"messages": _msgs(role="bot"), "images": ["img0.png"]}, "unknown_role", "'bot'"),
        ({"messages": _msgs(), "images": ["../images/img0.png"]}, "path_escape", "climbs out"),
        ({"messages": _msgs(), "images": ["/etc/passwd"]}, "path_escape", "absolute"),
        ({"messages": _msgs(), "images": ["file:///etc/passwd"]}, "path_escape", "absolute"),
        ({"messages": _msgs(), "images": ["https://example.com/x.png"]}, "remote_image", "never fetches"),
        ({"conversations": _msgs()}, "column_absent", "'messages'"),
    ],
)
def test_bad_records_are_named_with_a_reason(tmp_path, row, reason, says):
    rec = _one(_bad_root(tmp_path), row)
    assert isinstance(rec, BadRecord) and rec.reason == reason and says in rec.detail, rec
    assert rec.key.startswith("one/x.jsonl:1")


def test_user_mapped_column_absent_is_bad_in_json_and_refused_in_parquet(tmp_path):
    rec = _one(_bad_root(tmp_path), {"messages": _msgs(user="hi")}, columns={"images": "pictures"})
    assert isinstance(rec, BadRecord) and rec.reason == "column_absent" and "'pictures'" in rec.detail
    _parquet(tmp_path / "pq" / "a.parquet", [{"caption": "x", "image": _struct("img0.png")}])
    with pytest.raises(
        DatasetFormatError,
        match=r"column 'text' \(mapped from 'text'\) is absent; "
        r"the file has columns \['caption', 'image'\]",
    ):
        _set(tmp_path, format="parquet", path="pq")


def test_decompression_bomb_is_a_bad_record_not_an_allocation(tmp_path):
    root = _bad_root(tmp_path)
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1  # just above Pillow's limit
    Image.new("1", (side, side)).save(root / "images" / "bomb.png")
    assert (root / "images" / "bomb.png").stat().st_size < 200_000
    rec = _one(root, {"messages": _msgs(), "images": ["bomb.png"]})
    assert isinstance(rec, BadRecord) and rec.reason == "image_bomb", rec


def test_non_utf8_line_is_one_bad_record_with_its_line_number(tmp_path):
    root = _bad_root(tmp_path)
    good = json.dumps({"messages": _msgs(user="hi")}).encode()
    (root / "one").mkdir()
    (root / "one" / "x.jsonl").write_bytes(good + b"\n\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    ds = _set(root, format="messages", path="one/x.jsonl")
    recs = [ds.record(i) for i in range(len(ds))]
    assert len(recs) == 3 and isinstance(recs[1], BadRecord) and recs[1].reason == "not_utf8"
    assert recs[1].key == "one/x.jsonl:3" and isinstance(recs[2], Sample)


def test_json_array_as_jsonl_and_jsonl_as_json_are_refused_with_the_fix(tmp_path):
    rows = [{"messages": _msgs(user="hi")}] * 2
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text(json.dumps(rows, indent=1))
    with pytest.raises(DatasetFormatError, match="a JSON array given as JSON Lines.*name it .json"):
        _set(tmp_path, format="messages", path="a/x.jsonl")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetFormatError, match="JSON Lines given as a JSON array.*name it .jsonl"):
        _set(tmp_path, format="messages", path="b/x.json")


def test_declaration_refuses_paths_outside_its_directory():
    with pytest.raises(ValueError, match="must be relative to data/<name>/"):
        DeclaredDataset(name="x", format="llava", path="../elsewhere.json")
    with pytest.raises(ValueError, match="must be relative to data/<name>/"):
        DeclaredDataset(name="x", format="llava", path="a.json", images_root="/abs/images")
    with pytest.raises(ValueError, match=r"columns \['chosen'\] do not apply to format 'llava'"):
        DeclaredDataset(name="x", format="llava", path="a.json", columns={"chosen": "c"})
    with pytest.raises(ValueError, match="generated dataset"):
        DeclaredDataset(name="toyworld", format="llava", path="a.json")


def test_bad_records_are_skipped_and_counted_up_to_max_bad_fraction(tmp_path):
    root = _bad_root(tmp_path)
    good = {"messages": _msgs(), "images": ["img0.png"]}
    rows = [good] * 98 + [
        {"messages": _msgs(role="bot"), "images": ["img0.png"]},
        {"messages": _msgs(), "images": ["missing.png"]},
    ]
    _write(root / "mix" / "x.jsonl", rows)
    rep = check_set(_set(root, format="messages", path="mix", images_root="images", max_bad_fraction=0.02))
    assert rep.ok and rep.num_records == 100 and rep.bad == {"unknown_role": 1, "missing_image": 1}
    assert rep.kinds == {"chat+image": 98} and rep.widths.summary()["max"] == 24
    strict = check_set(_set(root, format="messages", path="mix", images_root="images"))
    with pytest.raises(DeclaredDataError) as err:
        require_ok(strict, "sft")
    text = str(err.value)
    assert "failed its check before training" in text and "mix/x.jsonl:99" in text
    assert "unknown_role x1" in text and "2.00%; allowed 1.00%" in text
    assert strict.to_dict()["first_bad"][1] == {
        "key": "mix/x.jsonl:100",
        "reason": "missing_image",
        "detail": f"image {root}/images/missing.png: no such file",
    }


# -- S3 ---------------------------------------------------------------------------------------------


def test_s3_paths_read_through_the_same_readers_and_a_missing_object_is_counted(s3_env, root, tmp_path):
    endpoint, bucket, client = s3_env
    for name, data in IMAGES.items():
        client.put_object(Bucket=bucket, Key=f"set/images/{name}", Body=data)
    body = (root / "messages" / "train.jsonl").read_bytes()
    body += json.dumps({"messages": _msgs(), "images": ["gone.png"]}).encode() + b"\n"
    client.put_object(Bucket=bucket, Key="set/train.jsonl", Body=body)
    client.put_object(Bucket=bucket, Key="set/wds/00000.tar", Body=(root / "wds" / "00000.tar").read_bytes())
    s3 = _set(
        tmp_path,
        format="messages",
        path=f"s3://{bucket}/set/train.jsonl",
        images_root=f"s3://{bucket}/set/images",
        max_bad_fraction=0.5,
    )
    local = _samples(_set(root, format="messages", path="messages/train.jsonl", images_root="images"))
    assert len(s3) == 4
    for a, b in zip(local, [s3.record(i) for i in range(3)]):
        assert a.same_content(b)
    rep = check_set(s3)
    assert rep.bad == {"missing_s3_object": 1} and rep.ok
    assert "no such S3 object" in rep.examples[0][3]
    pairs = _samples(_set(tmp_path, format="webdataset", path=f"s3://{bucket}/set/wds/*.tar"))
    _same({"local": _samples(_set(root, format="webdataset", path="wds")), "s3": pairs})
    with pytest.raises(DatasetFormatError, match="missing S3 object"):
        _set(tmp_path, format="messages", path=f"s3://{bucket}/set/nothing.jsonl")
