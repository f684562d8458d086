"""Declared datasets in recipes, DVC versions, stages and lineage.

The recipe's `datasets:` section reaches the stages that mix a set in (declaration copied into the
stage config, name added to its data list, fingerprint changed); a format the stage kind does not
accept, an undeclared name or shares above 1 fail when the recipe loads. `data/<name>.dvc` is the
version (real `dvc add`, and `dvc import-url --no-download` from the moto S3 endpoint). A stage
checks its declared sets before training and stops with the report; the mixing helpers give each
source its share (LM tokens, ViT examples, RL prompts, DPO pairs); lineage records what was read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO
from test_data_declared_formats import IMAGES, _write
from test_data_post_helpers import post_data

from moonforge.registry.data_versions import ensure_datasets, read_lock
from moonforge.registry.errors import DatasetError
from moonforge.registry.fingerprint import fingerprint, fingerprint_inputs
from moonforge.registry.lineage import dataset_counts, render_tree
from moonforge.stages.artifacts import DatasetRef, StageContext
from moonforge.stages.data.batches import image_text_batches
from moonforge.stages.data.declared import DeclaredDataset
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.user_check import DeclaredDataError
from moonforge.stages.data.user_mix import DeclaredMix, DeclaredPairs, preference_pairs, weighted_pool
from moonforge.stages.data.user_sets import DeclaredSet
from moonforge.stages.recipe import RecipeError, load_recipe

LLAVA = {"name": "my_llava", "format": "llava", "path": "a.json", "images_root": "images"}
PAIRS = {"name": "my_pairs", "format": "webdataset", "path": "*.tar"}


def _recipe(tmp_path: Path, datasets: list, **sft) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    raw["datasets"] = datasets
    stage = next(s for s in raw["stages"] if s["kind"] == "sft")
    stage.update(sft)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_recipe_copies_declarations_into_the_stages_that_mix_them(tmp_path):
    plain = load_recipe(_recipe(tmp_path, [LLAVA]))
    mixed = load_recipe(_recipe(tmp_path, [LLAVA, PAIRS], mixture={"my_llava": 0.5}))
    sft = mixed.stage("sft")
    assert sft.declared == (DeclaredDataset.model_validate(LLAVA),) and "my_llava" in sft.data
    assert mixed.stage("cooldown").declared == () and plain.stage("sft").declared == ()
    fp = lambda r: fingerprint(fingerprint_inputs(r.stage("sft"), r.model, None, {}, "code"))  # noqa: E731
    assert fp(plain) != fp(mixed)
    columns = load_recipe(
        _recipe(tmp_path, [{**LLAVA, "columns": {"images": "img"}}], mixture={"my_llava": 0.5})
    )
    assert fp(columns) != fp(mixed)  # the mapping is part of the stage's identity
    # set on the command line
    cli = load_recipe(_recipe(tmp_path, [LLAVA]), ["stages.sft.mixture.my_llava=0.3"])
    assert cli.stage("sft").mixture == {"my_llava": 0.3} and cli.stage("sft").declared[0].name == "my_llava"


@pytest.mark.parametrize(
    "datasets,sft,says",
    [
        (
            [PAIRS],
            {"mixture": {"my_pairs": 0.5}},
            "format 'webdataset', which stage kind 'sft' does not accept; it accepts: llava, sharegpt, "
            "messages, openai",
        ),
        ([LLAVA], {"mixture": {"other": 0.5}}, "does not declare.*moonforge data add other"),
        ([LLAVA, {**LLAVA, "name": "b"}], {"mixture": {"my_llava": 0.7, "b": 0.6}}, "add up to 1.3 > 1"),
        ([LLAVA, LLAVA], {}, "declared more than once"),
        ([{**LLAVA, "format": "csv"}], {}, "datasets"),
    ],
)
def test_recipe_refuses_bad_declarations_before_anything_runs(tmp_path, datasets, sft, says):
    with pytest.raises(RecipeError, match=says):
        load_recipe(_recipe(tmp_path, datasets, **sft))


# -- DVC versions -----------------------------------------------------------------------------


def test_declared_dataset_version_is_its_dvc_file(tmp_project):
    root = tmp_project
    _write(root / "data" / "my_llava" / "a.json", [{"conversations": []}])
    subprocess.run([DVC, "add", "-q", "data/my_llava"], cwd=root, check=True)
    md5 = yaml.safe_load((root / "data" / "my_llava.dvc").read_text())["outs"][0]["md5"]
    assert (
        read_lock(root)["my_llava"].digest
        == md5
        == ensure_datasets(root, ["my_llava", "text"])["my_llava"].digest
    )
    (root / "data" / "my_llava" / "a.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"changed since it was tracked.*dvc add data/my_llava"):
        ensure_datasets(root, ["my_llava"])
    with pytest.raises(
        DatasetError,
        match=r"no data/nothing.dvc: add your own data with "
        r"`moonforge data add nothing PATH --format F`",
    ):
        ensure_datasets(root, ["nothing"])


def test_s3_import_is_versioned_without_download(tmp_project, s3_env):
    from moonforge.registry.user_data import add_dataset

    _, bucket, client = s3_env
    body = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3))
    client.put_object(Bucket=bucket, Key="texts/a.jsonl", Body=body.encode())
    recipe = tmp_project / "recipes" / "mini.yaml"
    decl = add_dataset(tmp_project, "s3_text", f"s3://{bucket}/texts/*.jsonl", "text", None, recipe)
    assert decl["records"] == 3 and not (tmp_project / "data" / "s3_text").exists()
    ref = ensure_datasets(tmp_project, ["s3_text"])["s3_text"]
    assert ref.digest.endswith(".dir")
    assert yaml.safe_load(recipe.read_text())["datasets"][0]["path"] == f"s3://{bucket}/texts/*.jsonl"


# -- stages ---------------------------------------------------------------------------------------


def _declared_root(tmp_path: Path, rows: list) -> Path:
    root = tmp_path / "my_llava"
    for name, data in IMAGES.items():
        _write(root / "images" / name, data)
    _write(root / "a.json", rows)
    return root


def test_stage_stops_before_training_when_too_many_records_are_bad(tmp_path):
    from test_stage_sft import _sft_cfg

    import moonforge.stages.sft as sft_mod
    from moonforge.model.config import VLMConfig

    d = post_data()
    good = {
        "image": "img0.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}],
    }
    bad = {**good, "image": "../../etc/passwd"}
    root = _declared_root(tmp_path, [good] * 8 + [bad] * 2)
    cfg = _sft_cfg(mixture={"my_llava": 0.5}, declared=[LLAVA])
    data = {n: DatasetRef(n, d / n, "test") for n in ("sft", "toyworld", "tokenizer")}
    data["my_llava"] = DatasetRef("my_llava", root, "test")
    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["model"]
    from moonforge.model.tokenizer import Tokenizer

    vocab = Tokenizer.load(d / "tokenizer" / "tokenizer.json").vocab_size
    raw["lm"] = {**raw["lm"], "vocab_size": vocab}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DeclaredDataError, match=r"(?s)failed its check before training.*path_escape x2"):
        sft_mod.sft(None, data, cfg, StageContext(out=out, model=VLMConfig.model_validate(raw)))
    assert not list(out.rglob("*"))  # nothing trained, nothing written


def _tok():
    from moonforge.model.tokenizer import Tokenizer

    return Tokenizer.load(post_data() / "tokenizer" / "tokenizer.json")


def test_vit_pretrain_mixes_declared_pairs_by_example_share_and_resumes(tmp_path):
    import io
    import tarfile

    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    with tarfile.open(pairs_dir / "00000.tar", "w") as tf:
        for k in range(12):
            for member, blob in (
                (f"{k:05d}.png", IMAGES["img0.png"]),
                (f"{k:05d}.txt", f"pair {k}".encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    ds = DeclaredSet(DeclaredDataset.model_validate({**PAIRS, "shuffle_block": 4}), pairs_dir)
    world = post_data() / "toyworld"
    tok = _tok()

    def make():
        return image_text_batches(
            read_image_records(world, "train"),
            world / "train",
            tok,
            8,
            lambda s: 16,
            ("caption",),
            8,
            2,
            0,
            16,
            extra={"my_pairs": (DeclaredPairs(ds), 0.25)},
        )

    it = make()
    for _ in range(3):
        next(it)
    assert it.drawn == {"": 18, "my_pairs": 6}
    state = json.loads(json.dumps(it.state_dict()))
    again = make()
    again.load_state_dict(state)
    for _ in range(2):
        a, b = next(it), next(again)
        assert a.text_ids_BL.equal(b.text_ids_BL) and a.pixels_NP.equal(b.pixels_NP)


def test_rl_and_dpo_pools_follow_the_shares():
    own = [("own", i) for i in range(30)]
    pool = weighted_pool(own, {"mine": [("mine", i) for i in range(4)]}, {"mine": 0.25}, "s")
    assert len(pool) == 40 and sum(p[0] == "mine" for p in pool) == 10
    only = weighted_pool([], {"a": [1, 2], "b": [3]}, {"a": 0.5, "b": 0.5}, "s")
    assert sorted(only) == [1, 2, 3, 3]  # b's one prompt repeated to match a's two
    assert weighted_pool(own, {}, {}, "s") == own


def test_preference_pairs_encode_prompt_chosen_and_rejected(tmp_path):
    root = tmp_path / "pref"
    for name, data in IMAGES.items():
        _write(root / "images" / name, data)
    _write(
        root / "p.jsonl",
        [
            {
                "prompt": "Which colour?",
                "images": ["img0.png"],
                "chosen": "blue",
                "rejected": "It is a blue square on a red picture.",
            }
        ],
    )
    decl = {"name": "prefs", "format": "preference", "path": "p.jsonl", "images_root": "images"}

    class Cfg:
        stage_name, mixture = "long2short", {"prefs": 0.5}
        declaration = staticmethod(lambda n: DeclaredDataset.model_validate(decl))

    from moonforge.stages.data.sources import VisionSpec

    tok = _tok()
    mix = DeclaredMix(Cfg, {"prefs": DatasetRef("prefs", root, "t")}, tok, VisionSpec(8, 2, 64))
    [(item, chosen, rejected)] = preference_pairs(mix, "prefs")
    assert chosen == tok.encode("blue") + [tok.turn_end_id] and len(rejected) > len(chosen)
    assert item.kind == "image" and item.pixels_NP is not None and item.prompt_ids[-1] == tok.im_middle_id


def test_lineage_records_what_was_read():
    metrics = {
        "data/my_llava/records": 240.0,
        "data/my_llava/records_used": 300.0,
        "data/my_llava/heldout": 32.0,
        "data/my_llava/skipped": 2.0,
        "data/my_llava/skipped/missing_image": 2.0,
        "eval/acc": 0.5,
    }
    counts = dataset_counts("my_llava", metrics)
    assert counts == {
        "records": 240,
        "records_used": 300,
        "heldout": 32,
        "skipped": 2,
        "skipped_by_reason": {"missing_image": 2},
    }
    assert dataset_counts("toyworld", metrics) == {}
    from rich.console import Console

    tree = render_tree(
        [
            {
                "stage": "sft",
                "ref": "sft@1",
                "fingerprint": "f" * 16,
                "datasets": [{"name": "my_llava", "digest": "abc", "path": "data/my_llava", **counts}],
            }
        ]
    )
    console = Console(record=True, width=200)
    console.print(tree)
    assert "used 300 of 240, skipped 2 missing_image:2" in console.export_text()


def test_declarations_append_to_the_recipe_text_and_keep_its_comments(tmp_path):
    from moonforge.registry.user_data import declare_in_recipe

    path = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    path.write_text(text)
    declare_in_recipe(path, dict(LLAVA))
    declare_in_recipe(path, {**LLAVA, "name": "second"})
    new = path.read_text()
    assert new.startswith(text.rstrip("\n")) and new.count("datasets:") == 1
    assert [d.name for d in load_recipe(path).datasets] == ["my_llava", "second"]
    with pytest.raises(DatasetError, match="already declares a dataset 'second'"):
        declare_in_recipe(path, {**LLAVA, "name": "second"})
    # a block in the middle of a recipe grows in place
    path.write_text("datasets: []\n" + text)
    declare_in_recipe(path, dict(LLAVA))
    assert load_recipe(path).datasets[0].name == "my_llava" and path.read_text().endswith(text)
