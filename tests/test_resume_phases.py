"""Phase-aware resume: a checkpoint records (phase, step); a rerun skips the finished phases,
continues the interrupted one and starts the later ones fresh, ending bit-for-bit where an
unbroken run ends (CPU). The crash comes from the deterministic hook
MOONFORGE_CRASH_AFTER_CHECKPOINT (raise right after a given checkpoint is complete), in each
phase of a two-phase loop, and in phase 0 of the real SFT stage (phase 1: test_resume_crash.py).
Train state holds no pickle: a crafted one is never loaded. Wall time ~30 s.
"""

from __future__ import annotations

import pickle
from itertools import count
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data_post_helpers import post_data
from test_train_machinery import FakeVLM

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import DatasetRef, ListSink, StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.train.checkpoint import (
    CRASH_ENV,
    SimulatedCrash,
    latest_train_state,
    read_train_record,
    read_train_state,
)
from moonforge.stages.train.freeze import apply_trainable
from moonforge.stages.train.loop import TrainSpec, train

PHASES = ((6, 5e-2), (5, 2e-2))
"""(steps, lr) of the two phases: global steps 1-6 are phase 0, 7-11 phase 1."""


class Batches:
    """A deterministic batch stream that counts what it hands out (and can save its place)."""

    def __init__(self, seed: int, stateful: bool):
        self.seed, self.drawn, self.stateful, self.restored = seed, 0, stateful, False

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.drawn)
        self.drawn += 1
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(1, keepdim=True) / 8

    def __getattr__(self, name):  # state_dict / load_state_dict only when stateful
        if name in ("state_dict", "load_state_dict") and self.__dict__.get("stateful"):
            return getattr(self, f"_{name}")
        raise AttributeError(name)

    def _state_dict(self):
        return {"drawn": self.drawn}

    def _load_state_dict(self, state):
        self.drawn, self.restored = state["drawn"], True


def two_phase_run(out: Path, resume: Path | None = None, stateful: bool = False):
    """A two-phase 'stage' on the shared loop; dropout in the loss draws from the global RNG."""
    torch.manual_seed(0)
    model = FakeVLM()
    params = apply_trainable(model, ("vision", "projector", "lm"))
    ctx = StageContext(out=out, model=VLMConfig(), sink=ListSink(), resume_from=resume)
    calls = count()

    def loss_fn(m, batch):
        next(calls)
        x, y = batch
        pred = torch.nn.functional.dropout(m(x), 0.2, training=True)
        return ((pred - y) ** 2).mean(), {}

    states, offset, streams = [], 0, []
    for i, (steps, lr) in enumerate(PHASES):
        spec = TrainSpec(
            num_steps=steps,
            optimizer=OptimizerConfig(lr=lr),
            schedule=ScheduleConfig(kind="cosine", warmup_steps=1),
            trainable=("vision", "projector", "lm"),
            checkpoint_every=2,
            step_offset=offset,
            phase=i,
            label=f"p{i}",
        )
        streams.append(Batches(i, stateful))
        states.append(train(model, params, streams[-1], loss_fn, spec, ctx, VLMConfig()))
        offset += states[-1].step
    return model, states, next(calls), streams


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    return two_phase_run(tmp_path_factory.mktemp("unbroken"))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("crash_at, phase, step", [(2, 0, 2), (6, 0, 6), (8, 1, 2), (11, 1, 5)])
@pytest.mark.parametrize("stateful", [False, True])
def test_a_crash_in_either_phase_resumes_to_the_same_weights(
    tmp_path, monkeypatch, unbroken, crash_at, phase, step, stateful
):
    monkeypatch.setenv(CRASH_ENV, str(crash_at))
    with pytest.raises(SimulatedCrash):
        two_phase_run(tmp_path, stateful=stateful)
    monkeypatch.delenv(CRASH_ENV)
    ckpt = latest_train_state(tmp_path)
    rec = read_train_record(ckpt)
    assert (ckpt.name, rec.phase, rec.step, rec.global_step) == (
        f"step-{crash_at:07d}",
        phase,
        step,
        crash_at,
    )
    assert set(rec.phases) == set(range(phase))  # summaries of the finished phases ride along

    model, states, loss_calls, streams = two_phase_run(tmp_path, resume=ckpt, stateful=stateful)
    ref_model, ref_states, _, ref_streams = unbroken
    same_weights(model, ref_model)
    assert loss_calls == sum(s for s, _ in PHASES) - crash_at  # only the steps not yet taken
    assert [s.step for s in states] == [s.step for s in ref_states]
    assert [s.history[-1]["loss"] for s in states] == [s.history[-1]["loss"] for s in ref_states]
    assert states[0].optimizer is None if phase == 1 else states[0].optimizer is not None
    assert [b.drawn for b in streams] == [b.drawn for b in ref_streams]
    if stateful:  # the loader's own state was saved and restored, no replay of batches
        assert streams[phase].restored


def test_a_torn_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "4")
    with pytest.raises(SimulatedCrash):
        two_phase_run(tmp_path)
    good = latest_train_state(tmp_path)
    torn = good.parent / "step-0000005"  # e.g. power lost while the next one was being written
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)
    (good.parent / ".tmp-step-0000006").mkdir()
    assert latest_train_state(tmp_path) == good
    (torn / "train_state.json").write_text((good / "train_state.json").read_text())
    assert latest_train_state(tmp_path) == good  # recorded sizes do not match: still torn


class Payload:
    """Unpickling this runs code: it creates the marker directory."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


def test_a_crafted_pickle_is_never_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "4")
    with pytest.raises(SimulatedCrash):
        two_phase_run(tmp_path)
    monkeypatch.delenv(CRASH_ENV)
    good = latest_train_state(tmp_path)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"optimizer": Payload(marker), "step": 99, "rng": None})
    (good / "train_state.pt").write_bytes(evil)  # beside a real checkpoint
    newer = good.parent / "step-0000005"  # and as an old-format (pickle) checkpoint, newer
    newer.mkdir()
    for name in ("model.safetensors", "model_config.json"):
        (newer / name).write_bytes((good / name).read_bytes())
    (newer / "train_state.pt").write_bytes(evil)
    assert latest_train_state(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete periodic checkpoint"):
        read_train_state(FakeVLM(), newer)
    model, _, _, _ = two_phase_run(tmp_path, resume=latest_train_state(tmp_path))
    assert not marker.exists()
    written = latest_train_state(tmp_path)  # what this run saved: safetensors + JSON only
    assert sorted(p.name for p in written.iterdir()) == [
        "model.safetensors",
        "model_config.json",
        "optimizer.safetensors",
        "train_state.json",
    ]


# -- the real SFT stage, crashed in phase 0 (test_resume_crash.py kills it in phase 1) ----------


@pytest.fixture(scope="module")
def sft_setup():
    import yaml

    from moonforge.model.tokenizer import Tokenizer
    from moonforge.stages.stage_configs import SFTConfig

    d = post_data()
    tok = Tokenizer.load(d / "tokenizer" / "tokenizer.json")
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml").read_text())
    raw["model"]["lm"] = {**raw["model"]["lm"], "vocab_size": tok.vocab_size, "max_position_embeddings": 512}
    mcfg = VLMConfig.model_validate(raw["model"])
    cfg = SFTConfig.model_validate(
        dict(
            upstream=None,
            data=["sft", "toyworld", "tokenizer"],
            trainable=["vision", "projector", "lm"],
            optimizer={"lr": 1e-3},
            seq_len=128,
            batch_size=4,
            micro_batch_size=2,
            checkpoint_every=2,
            eval={"num_examples": 2, "batch_size": 2},
            phases=[
                {"seq_len": 128, "lr": 1e-3, "min_lr": 1e-4, "num_steps": 4},
                {"seq_len": 256, "lr": 5e-4, "min_lr": 5e-5, "num_steps": 3, "warmup_frac": 0.34},
            ],
        )
    )
    data = {n: DatasetRef(n, d / n, f"{n}-digest") for n in ("sft", "toyworld", "tokenizer")}
    return cfg, mcfg, data


def run_sft(setup, out: Path, resume: Path | None = None):
    from moonforge.stages.sft import sft

    cfg, mcfg, data = setup
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(out=out, model=mcfg, sink=ListSink(), resume_from=resume)
    return sft(None, data, cfg, ctx)


@pytest.fixture(scope="module")
def sft_unbroken(sft_setup, tmp_path_factory):
    return run_sft(sft_setup, tmp_path_factory.mktemp("sft-unbroken"))


@pytest.mark.parametrize("crash_at", [2])  # phase 0 step 2 (phase 1: test_resume_crash.py)
def test_sft_resumed_in_phase_0_ends_bit_identical(tmp_path, monkeypatch, sft_setup, sft_unbroken, crash_at):
    ref = sft_unbroken
    monkeypatch.setenv(CRASH_ENV, str(crash_at))
    with pytest.raises(SimulatedCrash):
        run_sft(sft_setup, tmp_path / "run")
    monkeypatch.delenv(CRASH_ENV)
    ckpt = latest_train_state(tmp_path / "run")
    assert read_train_record(ckpt).phase == (0 if crash_at <= 4 else 1)
    res = run_sft(sft_setup, tmp_path / "run", resume=ckpt)
    a, b = load_file(str(ref.checkpoint.weights)), load_file(str(res.checkpoint.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in (
        "train/steps",
        "train/phase0_final_loss",
        "train/phase1_final_loss",
        "train/phase0_steps",
        "data/phase0_text_token_share",
        "eval/sft_loss",
    ):
        assert res.metrics[k] == ref.metrics[k], k
