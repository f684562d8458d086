"""The VQA control every image stage reports (stages/evals.py): the same held-out questions,
each shown another image of the same size. A model that does not read images scores the same on
both; the control really shows other pixels."""

from __future__ import annotations

import torch
from conftest import REPO
from test_data_helpers import tiny_data

from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.data.evalsets import lm_eval_batches
from moonforge.stages.data.records import read_image_records
from moonforge.stages.data.sources import VisionSpec
from moonforge.stages.evals import heldout_metrics, heldout_sets, other_image
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train.objectives import lm_forward


def test_other_image_gives_each_record_another_image_of_its_size():
    recs = read_image_records(tiny_data() / "toyworld", "val")
    swapped = other_image(recs)
    assert [r.id for r in swapped] == [r.id for r in recs] and [r.qa for r in swapped] == [r.qa for r in recs]
    sizes = {}
    for r in recs:
        sizes.setdefault((r.width, r.height), []).append(r.image)
    for r, s in zip(recs, swapped):
        group = sizes[(r.width, r.height)]
        assert s.image in group and (s.image != r.image or len(group) == 1)
    for group in sizes.values():  # within a size, a permutation: every image still shown once
        shown = sorted(s.image for s in swapped if s.image in group)
        assert shown == sorted(group)


def test_a_model_blind_to_images_scores_the_same_with_another_image():
    data, tok = tiny_data(), Tokenizer.load(tiny_data() / "tokenizer")
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    cfg = cfg.model_copy(update={"lm": cfg.lm.model_copy(update={"vocab_size": tok.vocab_size})})
    vision = VisionSpec(cfg.vision.patch_size, cfg.vision.merge_size, cfg.vision.max_patches)
    sets = heldout_sets(
        tok, None, data / "toyworld", lambda src: lm_eval_batches(src, tok, 256, 16, vision, 32)
    )
    own, other = sets.vqa[0], sets.vqa_other_image[0]
    assert torch.equal(own.input_ids_BL, other.input_ids_BL)  # the same questions and answers
    assert not torch.equal(own.pixels_NP, other.pixels_NP)  # about other pixels
    model = build_vlm(cfg, seed=0).eval()
    with torch.no_grad():  # a model that reads images answers differently about other pixels
        assert not torch.equal(lm_forward(model, own), lm_forward(model, other))
        for p in model.projector.parameters():  # blind: every image becomes the same tokens
            p.zero_()
        assert torch.equal(lm_forward(model, own), lm_forward(model, other))
    m = heldout_metrics(model, sets, "_x")
    assert m["eval/vqa_acc_other_image_x"] == m["eval/vqa_acc_x"]


def test_sfts_generated_vqa_has_the_same_control():
    """posttrain_evals.with_other_images: the image prompts, each with another prompt's pixels of
    the same grid; a blind model answers them exactly as it answers its own."""
    from test_data_post_helpers import post_data

    from moonforge.stages.data.chat import chat_prompt_items
    from moonforge.stages.data.chat_records import read_sft_records
    from moonforge.stages.posttrain_evals import answer_accuracy, with_other_images

    tok = Tokenizer.load(tiny_data() / "tokenizer")
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").model
    cfg = cfg.model_copy(update={"lm": cfg.lm.model_copy(update={"vocab_size": tok.vocab_size})})
    vision = VisionSpec(cfg.vision.patch_size, cfg.vision.merge_size, cfg.vision.max_patches)
    post = post_data()
    items = chat_prompt_items(read_sft_records(post / "sft", "val"), post / "toyworld" / "val", tok, vision)
    images = [it for it in items if it.pixels_NP is not None][:16]
    others = with_other_images(images)
    assert [o.prompt_ids for o in others] == [it.prompt_ids for it in images]
    assert all(torch.equal(o.grid_hw, it.grid_hw) for o, it in zip(others, images))
    assert (
        sum(not torch.equal(o.pixels_NP, it.pixels_NP) for o, it in zip(others, images)) >= len(images) // 2
    )
    model = build_vlm(cfg, seed=0).eval()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.zero_()
    kw = dict(max_new_tokens=6, batch_size=8, return_items=True)
    own, other = answer_accuracy(model, tok, images, **kw), answer_accuracy(model, tok, others, **kw)
    assert own["items"] == other["items"] and own["acc"] == other["acc"]
