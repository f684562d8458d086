"""Stages 8 (rl) and 9 (long2short) on a tiny random VLM, CPU, with deterministic rewards.

Checks the k1.5 iteration contract through the stage function: the optimizer is re-created every
iteration that trains, logp_old comes from the iteration-start weights, the logged loss equals
opmd_loss recomputed from the logged quantities, partial rollouts resume across iterations; bad
input fails naming the stage; long2short picks the most token-efficient candidate in tolerance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import moonforge.stages.long2short as l2s
import moonforge.stages.rl.opmd_loop as loop
import moonforge.stages.rl.opmd_update as update
import moonforge.stages.rl.stage as stage
from moonforge.model.config import VLMConfig
from moonforge.model.vlm import build_vlm
from moonforge.stages.artifacts import DatasetRef, ListSink, StageContext
from moonforge.stages.rl import rl
from moonforge.stages.rl.dpo import Sample
from moonforge.stages.rl.opmd import opmd_loss
from moonforge.stages.rl.stage import prompt_items
from moonforge.stages.stage_configs import Long2ShortConfig, RLConfig
from moonforge.stages.train.checkpoint import save_weights
from moonforge.stages.train.stage_io import open_tokenizer, vision_spec

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"  # replaced by the session's built datasets (repo_data) in _built
MODEL = VLMConfig.model_validate(yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["model"])
COMMON = dict(
    upstream=None,
    data=("rl_prompts", "toyworld", "tokenizer"),
    trainable=("vision", "projector", "lm"),
    optimizer={"lr": 1e-3},
    schedule={"kind": "constant"},
    seq_len=64,
    batch_size=8,
    eval={"num_examples": 4, "batch_size": 4},
)


@pytest.fixture(scope="module", autouse=True)
def _built(repo_data):
    """The datasets these tests read, built once per session (real dvc repro, in a copy)."""
    global DATA
    DATA = repo_data


def _lines(split: str, n: int) -> list[str]:
    return (DATA / "rl_prompts" / f"{split}.jsonl").read_text().splitlines()[:n]


def _no_answer_line() -> str:
    return json.dumps({**json.loads(_lines("train", 1)[0]), "answer": ""})


def _data(tmp: Path, train: list[str] | None = None) -> dict[str, DatasetRef]:
    """Real tokenizer and toy world, a small rl_prompts copy (train lines replaceable)."""
    rl_dir = tmp / "rl_prompts"
    rl_dir.mkdir(parents=True, exist_ok=True)
    (rl_dir / "train.jsonl").write_text(
        "".join(x + "\n" for x in (train if train is not None else _lines("train", 12)))
    )
    (rl_dir / "val.jsonl").write_text("".join(x + "\n" for x in _lines("val", 8)))
    paths = {"rl_prompts": rl_dir, "toyworld": DATA / "toyworld", "tokenizer": DATA / "tokenizer"}
    return {n: DatasetRef(n, p, "test") for n, p in paths.items()}


def _digest(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _even_reward(verifier, response, reference, stats, *a):
    stats.num_calls += 1
    return float(len(response) % 2 == 0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_weights(build_vlm(MODEL, seed=0), MODEL, tmp_path_factory.mktemp("base"))


def test_rl_iteration_contract_and_partial_rollouts(tmp_path, base, monkeypatch):
    made, at_start, at_logp_old = [], {}, {}

    class CountingOpt(update.MuonAdamW):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    real_rollout, real_logp = loop.rollout_step, update.response_logprobs

    def rollout(prompts, buffer, gen, it, cfg):
        at_start[it] = _digest(gen.model)
        return real_rollout(prompts, buffer, gen, it, cfg)

    def logp(model, *a, **k):
        if not torch.is_grad_enabled():
            at_logp_old[len(at_start) - 1] = _digest(model)
        return real_logp(model, *a, **k)

    monkeypatch.setattr(update, "MuonAdamW", CountingOpt)
    monkeypatch.setattr(loop, "rollout_step", rollout)
    monkeypatch.setattr(update, "response_logprobs", logp)
    monkeypatch.setattr(loop, "score", _even_reward)
    cfg = RLConfig(
        **COMMON,
        num_steps=6,
        num_iterations=3,
        prompts_per_iteration=2,
        samples_per_prompt=3,
        max_new_tokens=6,
        rollout_token_budget=3,
        length_penalty_warmup_iters=1,
    )
    sink = ListSink()
    res = rl(base, _data(tmp_path), cfg, StageContext(out=tmp_path / "out", model=MODEL, sink=sink))
    rows = [json.loads(x) for x in (tmp_path / "out" / "rl_rollouts.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("loss")]
    assert len(made) == len(trained) >= 1  # a fresh optimizer in every iteration that trains
    for r in trained:
        it = r["iteration"]
        assert at_logp_old[it] == at_start[it]  # logp_old under the iteration-start weights
        assert len(r["loss"]) == cfg.steps_per_iteration
        loss, _ = opmd_loss(
            torch.tensor(r["logp"]),
            torch.tensor(r["logp_old"]),
            torch.tensor(r["rewards"]),
            r["group_ids"],
            cfg.tau,
        )
        assert math.isclose(loss.item(), r["loss"][0], rel_tol=1e-4, abs_tol=1e-5)
        assert r["l2_loss"][0] == pytest.approx(0.0, abs=1e-6)  # first step: pi == pi_i
    assert at_start[1] != at_start[0] or not rows[0].get("loss")
    # partial rollouts: budget 3 < 6, so groups finish in a later iteration than they started
    buffered = [v for _, v in sink.series("rl/buffered")]
    assert buffered[0] > 0
    assert any(int(g.split("@")[1]) < r["iteration"] for r in trained for g in r["group_ids"])
    assert any(n > 3 for r in trained for n in r["lengths"])
    assert (tmp_path / "out" / "rl_curves.png").stat().st_size > 0
    assert {"eval/acc", "eval/acc_before", "eval/mean_len", "eval/image_acc"} <= set(res.metrics)
    assert {"eval/sampled_acc", "eval/sampled_acc_before", "eval/sampled_mean_len"} <= set(res.metrics)
    gain = res.metrics["eval/sampled_acc"] - res.metrics["eval/sampled_acc_before"]
    assert res.metrics["eval/sampled_acc_gain"] == pytest.approx(gain)
    assert res.checkpoint.weights.exists()


def _eval_inputs(tmp_path):
    data = _data(tmp_path)
    tok = open_tokenizer(data, MODEL, "rl")
    return build_vlm(MODEL, seed=0).eval(), tok, prompt_items(data, tok, vision_spec(MODEL), "val", "rl")


def test_sampled_eval_averages_k_distinctly_seeded_passes_at_the_rollout_temperature(tmp_path, monkeypatch):
    model, tok, items = _eval_inputs(tmp_path)
    cfg = RLConfig(
        **COMMON, num_steps=1, num_iterations=1, max_new_tokens=6, temperature=0.7, top_p=0.9, eval_samples=3
    )
    calls = []

    def fake(model, tok, items, **kw):
        calls.append(kw)
        return {"acc": [0.25, 0.5, 1.0][len(calls) - 1], "mean_len": float(len(calls))}

    monkeypatch.setattr(stage, "answer_accuracy", fake)
    out = stage.sampled_metrics(model, tok, items, cfg, "_before", (8, 4))
    assert out == {"eval/sampled_acc_before": pytest.approx(1.75 / 3), "eval/sampled_mean_len_before": 2.0}
    assert [(c["temperature"], c["top_p"], c["repeat_ngram"]) for c in calls] == [(0.7, 0.9, 8)] * 3
    assert len({c["seed"] for c in calls}) == 3  # k passes, not one pass counted k times
    assert stage.sampled_metrics(model, tok, items, cfg.model_copy(update={"eval_samples": 0})) == {}


def test_sampled_eval_is_seeded_and_samples(tmp_path, monkeypatch):
    seen: list[str] = []

    def record(verifier, response, reference, stats, *a):
        seen.append(response)
        return _even_reward(verifier, response, reference, stats)

    monkeypatch.setattr("moonforge.stages.rl.verifiers.score", record)
    model, tok, items = _eval_inputs(tmp_path)
    cfg = RLConfig(**COMMON, num_steps=1, num_iterations=1, max_new_tokens=8, eval_samples=2)
    first = stage.sampled_metrics(model, tok, items, cfg)
    sampled, seen[:] = list(seen), []
    assert stage.sampled_metrics(model, tok, items, cfg) == first  # a resumed run's "before" is the same
    assert seen == sampled
    seen.clear()
    stage.answer_metrics(model, tok, items, 8, 4)
    n = len(items)
    assert len(sampled) == 2 * n and sampled[:n] != sampled[n:]  # two passes, two draws
    assert seen != sampled[:n]  # not the greedy answers


def test_rl_nan_reward_names_the_stage(tmp_path, base, monkeypatch):
    monkeypatch.setattr(loop, "score", lambda *a: float("nan"))
    cfg = RLConfig(
        **COMMON,
        num_steps=1,
        num_iterations=1,
        prompts_per_iteration=1,
        samples_per_prompt=2,
        max_new_tokens=3,
    )
    with pytest.raises(ValueError, match=r"stage 'rl'.*non-finite rewards"):
        rl(base, _data(tmp_path), cfg, StageContext(out=tmp_path / "out", model=MODEL))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("empty", r"stage 'rl'.*no records"),
        ("no_answer", r"stage 'rl'.*answer"),
    ],
)
def test_rl_bad_prompt_sets_name_the_stage(tmp_path, base, case, pattern):
    train = [] if case == "empty" else [_no_answer_line()]  # read at run time, after the build
    cfg = RLConfig(**COMMON, num_steps=1, num_iterations=1, max_new_tokens=3)
    with pytest.raises(ValueError, match=pattern):
        rl(base, _data(tmp_path, train), cfg, StageContext(out=tmp_path / "out", model=MODEL))


def test_choose_picks_most_efficient_within_tolerance():
    table = {
        "long": {"acc": 0.50, "mean_len": 100.0},
        "merge": {"acc": 0.49, "mean_len": 60.0},
        "dpo": {"acc": 0.40, "mean_len": 10.0},
        "rl": {"acc": 0.485, "mean_len": 50.0},
    }
    assert l2s.choose(table, 0.02) == "rl"
    assert l2s.choose(table, 0.0) == "long"
    assert l2s.choose(table, 0.2) == "dpo"


def _fake_samples(model, tok, items, questions, cfg):
    """Per question: a short correct, a longer wrong and a 2x-longer correct response."""
    ids = tok.encode("Step 1: 2+3 = 5. Answer: 5")
    return {
        q: [Sample(ids[:4], 4, True), Sample(ids[:6], 6, False), Sample(ids[:8], 8, True)] for q in questions
    }


def _l2s_cfg(**kw) -> Long2ShortConfig:
    return Long2ShortConfig(
        **{**COMMON, "upstream": "rl"},
        num_steps=1,
        num_questions=3,
        num_samples=4,
        sample_max_new_tokens=8,
        max_new_tokens=4,
        rl_iterations=1,
        rl_prompts_per_iteration=2,
        rl_samples_per_prompt=2,
        rl_steps_per_iteration=1,
        **kw,
    )


def test_long2short_candidates_and_choice(tmp_path, base, monkeypatch):
    monkeypatch.setattr(l2s, "sample_responses", _fake_samples)
    monkeypatch.setattr(loop, "score", _even_reward)
    cfg = _l2s_cfg()
    res = l2s.long2short(base, _data(tmp_path), cfg, StageContext(out=tmp_path / "out", model=MODEL))
    table = json.loads((tmp_path / "out" / "long2short.json").read_text())
    assert set(table["candidates"]) == {"long", "merge", "shortest_rs", "dpo", "rl"}
    for m in cfg.methods:
        assert (tmp_path / "out" / m / "model.safetensors").exists()
    assert table["chosen"] == l2s.choose(table["candidates"], cfg.acc_tolerance)
    assert res.metrics[f"chosen/{table['chosen']}"] == 1.0
    assert {"eval/mean_len_before", "eval/acc_before", "cand/rl/acc_per_1k_tokens"} <= set(res.metrics)
    assert res.metrics["dpo/pairs"] == 2 * cfg.num_questions
    assert res.metrics["shortest_rs/target_mean_len"] == 4
    assert res.checkpoint.weights.exists()


def test_long2short_killed_after_a_method_resumes_at_the_next_to_the_same_result(tmp_path, base, monkeypatch):
    """Killed right after merge (checkpoint 2 of 5: samples, merge, shortest_rs, dpo, rl) and
    resumed into a fresh staging dir as run_stage does: no method runs twice, nothing is sampled
    again, and every candidate, the choice and the metrics equal an unbroken run's, bit for bit."""
    from safetensors.torch import load_file

    from moonforge.stages.train.checkpoint import CRASH_ENV, SimulatedCrash, latest_train_state
    from moonforge.stages.train.train_record import read_train_record

    monkeypatch.setattr(l2s, "sample_responses", _fake_samples)
    monkeypatch.setattr(loop, "score", _even_reward)
    cfg, data = _l2s_cfg(), _data(tmp_path)

    def run(out: Path, resume: Path | None = None):
        return l2s.long2short(base, data, cfg, StageContext(out=out, model=MODEL, resume_from=resume))

    unbroken = run(tmp_path / "unbroken")
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(SimulatedCrash):
        run(tmp_path / "killed")
    monkeypatch.delenv(CRASH_ENV)
    ckpt = latest_train_state(tmp_path / "killed")
    record = read_train_record(ckpt)
    assert (record.global_step, record.num_steps) == (2, 5)
    assert record.extra["long2short"]["done"] == ["merge"]

    trained = []
    monkeypatch.setattr(l2s, "sample_responses", lambda *a: pytest.fail("resumed run sampled again"))
    real_train = l2s._train
    monkeypatch.setattr(
        l2s, "_train", lambda m, c, x, label, *a: trained.append(label) or real_train(m, c, x, label, *a)
    )
    resumed = run(tmp_path / "resumed", resume=ckpt)
    assert trained == ["long2short_dpo"]  # shortest_rs reuses the short model merge trained
    assert resumed.metrics == unbroken.metrics
    tables = [json.loads((tmp_path / d / "long2short.json").read_text()) for d in ("unbroken", "resumed")]
    assert tables[0] == tables[1]
    for name in ("", *cfg.methods):
        a = load_file(str(tmp_path / "unbroken" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name or "returned"


def test_long2short_refuses_a_resume_point_of_another_method_list(tmp_path, base, monkeypatch):
    from moonforge.stages.train.checkpoint import CRASH_ENV, SimulatedCrash, latest_train_state

    monkeypatch.setattr(l2s, "sample_responses", _fake_samples)
    data = _data(tmp_path)
    monkeypatch.setenv(CRASH_ENV, "1")
    with pytest.raises(SimulatedCrash):
        l2s.long2short(base, data, _l2s_cfg(methods=("dpo",)), StageContext(out=tmp_path / "a", model=MODEL))
    monkeypatch.delenv(CRASH_ENV)
    ctx = StageContext(out=tmp_path / "b", model=MODEL, resume_from=latest_train_state(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"methods \['dpo'\].*delete it"):
        l2s.long2short(base, data, _l2s_cfg(methods=("merge", "dpo")), ctx)
    assert not (tmp_path / "b" / "merge").exists()


def test_rl_killed_in_an_iteration_resumes_there_to_the_same_weights(tmp_path, base, monkeypatch):
    """A crash right after iteration 2's checkpoint (of 4), resumed into a fresh staging dir as
    run_stage does: the replay buffer, sampler and RNGs come back, so the final weights, the
    rollout log and the metrics equal an unbroken run's, bit for bit on CPU."""
    from safetensors.torch import load_file

    from moonforge.stages.train.checkpoint import CRASH_ENV, SimulatedCrash, latest_train_state
    from moonforge.stages.train.train_record import read_train_record

    monkeypatch.setattr(loop, "score", _even_reward)
    cfg = RLConfig(
        **COMMON,
        num_steps=8,
        num_iterations=4,
        prompts_per_iteration=2,
        samples_per_prompt=3,
        max_new_tokens=6,
        rollout_token_budget=3,  # partial rollouts: the buffer holds trajectories at the crash
        length_penalty_warmup_iters=1,
        checkpoint_every=1,
    )
    data = _data(tmp_path)

    def run(out: Path, resume: Path | None = None):
        ctx = StageContext(out=out, model=MODEL, sink=ListSink(), resume_from=resume)
        return rl(base, data, cfg, ctx)

    unbroken = run(tmp_path / "unbroken")
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(SimulatedCrash):
        run(tmp_path / "killed")
    monkeypatch.delenv(CRASH_ENV)
    ckpt = latest_train_state(tmp_path / "killed")
    record = read_train_record(ckpt)
    assert (record.step, record.num_steps) == (2, 4)
    state = record.extra["opmd"]
    assert state["iterations_done"] == 2 and state["buffer"], "the crash point must hold buffered rollouts"
    resumed = run(tmp_path / "resumed", resume=ckpt)
    a, b = load_file(str(unbroken.checkpoint.weights)), load_file(str(resumed.checkpoint.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / d / "rl_rollouts.jsonl").read_text() for d in ("unbroken", "resumed")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 4
    timing = ("seconds",)
    for k, v in unbroken.metrics.items():
        if not k.endswith(timing):
            assert resumed.metrics[k] == v, k


def test_rl_refuses_a_checkpoint_of_another_run_or_prompt_set():
    """A resume point that is not this OPMD run's state (another stage's checkpoint, or taken
    over another prompt set) fails naming the fix instead of resuming wrongly."""
    from moonforge.stages.rl import loop_state
    from moonforge.stages.rl.replay import ReplayBuffer
    from moonforge.stages.rl.sampling import PromptSampler, SamplerConfig
    from moonforge.stages.rl.verifiers import VerifyStats

    sampler = PromptSampler([0.0, 1.0], SamplerConfig(), seed=0)
    parts = (sampler, ReplayBuffer(), {}, VerifyStats(), None)
    with pytest.raises(ValueError, match="holds no state of this OPMD run.*remove it to start over"):
        loop_state.restore({}, "rl", *parts)
    state = {"format": loop_state.FORMAT, "label": "rl", "sampler": {"rate": [0.0] * 3}}
    with pytest.raises(ValueError, match="taken over 3 prompts, this run has 2"):
        loop_state.restore(state, "rl", *parts)
    assert sampler.tracker.rate == [0.0, 0.0]  # nothing was changed before refusing
