"""Stages 6-7 (sft, long_cot_sft) and the post-training answer-accuracy eval, on CPU.

The SFT loss mask on real packed batches is exactly assistant content + its closing <|im_end|>;
phases run at their seq_len with constant tokens/step and a re-warmed LR; a malformed dialogue
fails with file:line; a batch with nothing to supervise raises; short stage runs return the eval
keys. Data: the shared tiny post-training build (test_data_post_helpers.post_data).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_data_post_helpers import post_data

import moonforge.stages.posttrain_evals as pe
import moonforge.stages.sft as sft_mod
from moonforge.model.config import VLMConfig
from moonforge.model.generate import GenerationOutput
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import build_vlm
from moonforge.stages.artifacts import DatasetRef, ListSink, StageContext
from moonforge.stages.data.chat import chat_prompt_items
from moonforge.stages.data.chat_records import read_rl_prompt_records, read_sft_records
from moonforge.stages.data.records import ManifestError
from moonforge.stages.long_cot_sft import long_cot_sft
from moonforge.stages.stage_configs import LongCoTSFTConfig, SFTConfig
from moonforge.stages.train.stage_io import lm_stream, vision_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def d() -> Path:
    return post_data()


@pytest.fixture(scope="module")
def tok(d) -> Tokenizer:
    return Tokenizer.load(d / "tokenizer" / "tokenizer.json")


@pytest.fixture(scope="module")
def mcfg(tok) -> VLMConfig:
    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["model"]
    raw["lm"] = {**raw["lm"], "vocab_size": tok.vocab_size, "max_position_embeddings": 512}
    return VLMConfig.model_validate(raw)


def _sft_cfg(**kw) -> SFTConfig:
    base = dict(
        upstream=None,
        data=("sft", "toyworld", "tokenizer"),
        trainable=("vision", "projector", "lm"),
        optimizer={"lr": 1e-3},
        seq_len=128,
        batch_size=4,
        log_every=1,
        eval={"num_examples": 4, "batch_size": 4},
        phases=[
            {"seq_len": 128, "lr": 1e-3, "min_lr": 1e-4, "num_steps": 3},
            {"seq_len": 256, "lr": 5e-4, "min_lr": 5e-5, "num_steps": 3, "warmup_frac": 0.34},
        ],
    )
    return SFTConfig.model_validate({**base, **kw})


def _data(d: Path, names, **paths) -> dict[str, DatasetRef]:
    return {n: DatasetRef(n, paths.get(n, d / n), "test") for n in names}


def _items(d, tok, mcfg, n=6):
    recs = read_sft_records(d / "sft", "val")
    return pe.split_by_kind(chat_prompt_items(recs, d / "toyworld" / "val", tok, vision_spec(mcfg)), n // 2)


def _assistant_mask(ids: list[int], tok: Tokenizer) -> list[int]:
    """1 after each assistant header up to and including its <|im_end|> (parsed from ids)."""
    header = [tok.im_assistant_id, *tok.encode("assistant"), tok.im_middle_id]
    mask, inside = [0] * len(ids), False
    for t in range(len(ids)):
        if inside:
            mask[t] = 1
            inside = ids[t] != tok.im_end_id
        elif ids[max(0, t + 1 - len(header)) : t + 1] == header:
            inside = True
    return mask


def test_sft_loss_mask_on_packed_batch_is_assistant_content_and_im_end(d, tok, mcfg):
    cfg = _sft_cfg()
    sources = sft_mod.chat_sources(read_sft_records(d / "sft", "train"), d / "toyworld" / "train", tok, "sft")
    weights = sft_mod.mix_weights(sources, cfg.text_image_token_ratio)
    assert set(sources) == {"text", "image"} and weights == {"text": 0.5, "image": 0.5}
    batch = next(lm_stream(sources, lambda s: weights, tok, cfg, mcfg, seq_len=256, rows=4))
    segments = 0
    for ids, labels, docs in zip(
        batch.input_ids_BL.tolist(), batch.labels_BL.tolist(), batch.doc_ids_BL.tolist()
    ):
        for seg_id in sorted(set(docs) - {-1}):
            span = [t for t, x in enumerate(docs) if x == seg_id]
            seg, lab = [ids[t] for t in span], [labels[t] for t in span]
            mask = _assistant_mask(seg, tok)
            # labels are shifted: position t predicts seg[t + 1] iff that token is supervised
            assert lab == [seg[t + 1] if mask[t + 1] else -100 for t in range(len(seg) - 1)] + [-100]
            supervised = [seg[t + 1] for t in range(len(seg) - 1) if mask[t + 1]]
            assert supervised[-1] == tok.im_end_id and tok.media_pad_id not in supervised
            segments += 1
    assert segments > 4  # several dialogues per row
    loss, metrics = sft_mod.sft_loss(build_vlm(mcfg, seed=0), batch)
    assert torch.isfinite(loss) and 0 < metrics["supervised_frac"] < 1


def test_batch_without_supervised_tokens_raises(d, tok, mcfg):
    sources = sft_mod.chat_sources(read_sft_records(d / "sft", "val"), d / "toyworld" / "val", tok, "sft")
    batch = next(lm_stream(sources, lambda s: {"text": 1.0}, tok, _sft_cfg(), mcfg, rows=2))
    batch.labels_BL.fill_(-100)
    with pytest.raises(sft_mod.NoSupervisedTokensError, match="no supervised"):
        sft_mod.sft_loss(build_vlm(mcfg, seed=0), batch)


def test_answer_accuracy_keys_and_batching_invariance(d, tok, mcfg):
    model, items = build_vlm(mcfg, seed=0), _items(d, tok, mcfg)
    res = pe.answer_accuracy(model, tok, items, max_new_tokens=4, batch_size=4, return_items=True)
    assert {"acc", "mean_len", "acc_per_1k_tokens", "n", "verifier_errors", "by_kind", "items"} <= set(res)
    assert res["n"] == len(items) == 6 and set(res["by_kind"]) == {"text", "image"}
    assert 1 <= res["mean_len"] <= 4 and [r.record_id for r in res["items"]] == [i.record_id for i in items]
    again = pe.answer_accuracy(model, tok, items, max_new_tokens=4, batch_size=1, return_items=True)
    assert [r.response for r in again["items"]] == [r.response for r in res["items"]]
    flat = pe.as_metrics(res, "eval/", "_before")
    assert {"eval/acc_before", "eval/text_acc_before", "eval/image_acc_before"} <= set(flat)


def test_oracle_responses_score_one(d, tok, mcfg, monkeypatch):
    items = _items(d, tok, mcfg)
    by_prompt = {tuple(i.prompt_ids): tok.encode(f"Answer: {i.answer}") + [tok.im_end_id] for i in items}

    def oracle(model, prompts, **kw):
        toks = [by_prompt[tuple(p)] for p in prompts]
        return GenerationOutput(
            toks, [[0.0] * len(t) for t in toks], ["stop"] * len(toks), [len(t) for t in toks]
        )

    monkeypatch.setattr(pe, "generate", oracle)
    res = pe.answer_accuracy(build_vlm(mcfg, seed=0), tok, items, max_new_tokens=64, batch_size=4)
    assert res["acc"] == 1.0 and res["by_kind"] == {"image": 1.0, "text": 1.0}
    mean = sum(len(v) for v in by_prompt.values()) / len(items)
    assert res["mean_len"] == pytest.approx(mean)
    assert res["acc_per_1k_tokens"] == pytest.approx(1000 / mean)
    wrong = pe.score_responses(items[:1], [("Answer: definitely not it", 5, "stop")])
    assert wrong["acc"] == 0.0 and wrong["verifier_errors"] == 0


def test_malformed_dialogue_names_file_and_line(d, tok, mcfg, tmp_path):
    bad = tmp_path / "sft"
    shutil.copytree(d / "sft", bad)
    train = bad / "train.jsonl"
    n = len(train.read_text().splitlines())
    with open(train, "a") as f:
        f.write('{"id": "bad", "kind": "text", "messages": [{"role": "assistant", "content": "hi"}]}\n')
    ctx = StageContext(out=tmp_path / "out", model=mcfg)
    with pytest.raises(ManifestError, match=rf"train\.jsonl:{n + 1}: .*role"):
        sft_mod.sft(None, _data(d, ("sft", "toyworld", "tokenizer"), sft=bad), _sft_cfg(), ctx)


def test_sft_phases_seq_len_rewarm_and_eval_keys(d, mcfg, tmp_path, monkeypatch):
    shapes = []
    real_loss = sft_mod.sft_loss

    def spy(model, batch):
        shapes.append(tuple(batch.input_ids_BL.shape))
        return real_loss(model, batch)

    monkeypatch.setattr(sft_mod, "sft_loss", spy)
    sink = ListSink()
    ctx = StageContext(out=tmp_path / "out", model=mcfg, sink=sink)
    res = sft_mod.sft(None, _data(d, ("sft", "toyworld", "tokenizer")), _sft_cfg(), ctx)
    assert shapes == [(4, 128)] * 3 + [(2, 256)] * 3  # tokens per step constant
    lr1 = [v for _, v in sink.series("sft/128/lr")]
    lr2 = [v for _, v in sink.series("sft/256/lr")]
    assert lr1 == pytest.approx([1e-3, 5.5e-4, 1e-4])  # 2% warmup of 3 steps = none; cosine
    assert lr2 == pytest.approx([0.0, 5e-4, 5e-5])  # re-warm from 0 to the new peak, decay
    assert lr2[1] > lr1[-1]
    assert [s for s, _ in sink.series("sft/256/lr")] == [4, 5, 6]  # one global step axis
    for k in (
        "eval/vqa_acc",
        "eval/vqa_acc_before",
        "eval/text_acc",
        "eval/text_acc_before",
        "eval/mean_len",
        "eval/sft_loss",
        "eval/sft_loss_before",
        "train/steps",
    ):
        assert k in res.metrics, k
    assert res.metrics["train/steps"] == 6 and res.checkpoint.weights.is_file()
    assert res.data_used == ("sft", "tokenizer", "toyworld")


def test_long_cot_sft_short_run(d, mcfg, tmp_path):
    cfg = LongCoTSFTConfig.model_validate(
        dict(
            upstream=None,
            data=("reasoning", "rl_prompts", "toyworld", "tokenizer"),
            trainable=("vision", "projector", "lm"),
            optimizer={"lr": 1e-3},
            seq_len=256,
            batch_size=2,
            num_steps=2,
            eval={"num_examples": 4, "batch_size": 4},
        )
    )
    ctx = StageContext(out=tmp_path / "out", model=mcfg)
    res = long_cot_sft(None, _data(d, cfg.data), cfg, ctx)
    for k in (
        "eval/reasoning_acc",
        "eval/reasoning_acc_before",
        "eval/mean_len",
        "eval/mean_len_before",
        "eval/cot_loss",
        "train/epochs",
    ):
        assert k in res.metrics, k
    assert res.metrics["eval/n"] == 4 and res.metrics["train/steps"] == 2
    assert len(read_rl_prompt_records(d / "rl_prompts", "val")) >= 4
