"""The shared training machinery: schedules, the Muon/AdamW split, freezing, NaN, resume."""

from itertools import count

import pytest
import torch
from torch import nn

from moonforge.model.config import VLMConfig
from moonforge.stages.artifacts import ListSink, StageContext
from moonforge.stages.config import OptimizerConfig, ScheduleConfig
from moonforge.stages.train.checkpoint import latest_train_state
from moonforge.stages.train.freeze import apply_trainable, group_digest
from moonforge.stages.train.loop import NonFiniteLossError, TrainSpec, train
from moonforge.stages.train.muon import Muon
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.schedule import lr_multiplier


class FakeVLM(nn.Module):
    """Four groups shaped like the VLM's, small enough to train in milliseconds."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.projector = nn.Linear(8, 8)
        self.lm = nn.ModuleDict({"embed_tokens": nn.Embedding(4, 8), "out": nn.Linear(8, 1)})
        self.caption = nn.Linear(8, 8)

    def forward(self, x):
        return self.lm["out"](self.projector(self.vision(x)) + self.lm["embed_tokens"].weight[0])


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g) / 8**0.5
    for _ in count():
        x = torch.randn(32, 8, generator=g)
        yield x, x @ w


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(), {}


def _spec(**kw):
    base = dict(
        num_steps=60,
        optimizer=OptimizerConfig(lr=5e-2),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=2),
        trainable=("vision", "projector", "lm"),
    )
    base.update(kw)
    return TrainSpec(**base)


def _ctx(tmp_path):
    return StageContext(out=tmp_path, model=VLMConfig(), sink=ListSink())


def test_schedules():
    c = ScheduleConfig(kind="cosine", warmup_steps=10, min_ratio=0.1)
    assert lr_multiplier(0, 100, c) == 0.0 and lr_multiplier(5, 100, c) == pytest.approx(0.5)
    assert lr_multiplier(10, 100, c) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, c) == pytest.approx(0.1)
    lin = ScheduleConfig(kind="linear", start_ratio=1.0, min_ratio=0.0)
    assert lr_multiplier(0, 11, lin) == 1.0 and lr_multiplier(10, 11, lin) == pytest.approx(0.0)
    assert lr_multiplier(5, 11, lin) == pytest.approx(0.5)
    const = ScheduleConfig(kind="constant", warmup_frac=0.1)
    assert lr_multiplier(50, 100, const) == 1.0 and lr_multiplier(5, 100, const) == pytest.approx(0.5)


def test_muon_takes_hidden_matrices_adamw_the_rest():
    m = FakeVLM()
    params = apply_trainable(m, ("vision", "projector", "lm"))
    opt = MuonAdamW(params, OptimizerConfig(lr=1e-3))
    muon, adamw = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(m.vision[0].weight) in muon_ids and id(m.projector.weight) in muon_ids
    assert id(m.lm["embed_tokens"].weight) not in muon_ids  # embeddings go to AdamW
    assert id(m.vision[0].bias) not in muon_ids
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    only_adamw = MuonAdamW(params, OptimizerConfig(lr=1e-3, use_muon=False))
    assert len(only_adamw.optimizers) == 1 and only_adamw.num_muon == 0


def test_training_reduces_loss_and_frozen_groups_do_not_move(tmp_path):
    torch.manual_seed(0)
    m = FakeVLM()
    frozen_before = group_digest(m, "caption")
    params = apply_trainable(m, ("vision", "projector", "lm"))
    state = train(m, params, _batches(), _mse, _spec(), _ctx(tmp_path), VLMConfig())
    losses = [h["loss"] for h in state.history]
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    assert group_digest(m, "caption") == frozen_before
    assert not any(p.requires_grad for p in m.caption.parameters())


def test_nan_loss_fails_clearly_and_keeps_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = FakeVLM()
    params = apply_trainable(m, ("vision", "projector", "lm"))
    calls = count()

    def poisoned(model, batch):
        loss, extra = _mse(model, batch)
        return (loss * float("nan") if next(calls) == 7 else loss), extra

    with pytest.raises(NonFiniteLossError, match="step 7"):
        train(m, params, _batches(), poisoned, _spec(checkpoint_every=3), _ctx(tmp_path), VLMConfig())
    kept = latest_train_state(tmp_path)
    assert kept is not None and kept.name == "step-0000006"


def test_resume_matches_an_unbroken_run(tmp_path):
    class Killed(Exception):
        pass

    def run(out, resume=None, die_at=None):
        torch.manual_seed(0)
        m = FakeVLM()
        params = apply_trainable(m, ("vision", "projector", "lm"))
        calls = count()

        def loss_fn(model, batch):
            if next(calls) == die_at:
                raise Killed
            return _mse(model, batch)

        ctx = StageContext(out=out, model=VLMConfig(), resume_from=resume)
        train(m, params, _batches(), loss_fn, _spec(num_steps=8, checkpoint_every=4), ctx, VLMConfig())
        return m

    full = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", die_at=5)  # dies after its step-4 checkpoint
    resumed = run(tmp_path / "c", resume=latest_train_state(tmp_path / "b"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_weighted_micro_batches_step_on_the_weighted_loss():
    """train_step(weights=w) steps on sum_i w_i * loss_i (RL weights its forwards by prompt
    groups): the gradient equals that sum's, and equal weights equal the default mean."""
    from moonforge.stages.train.loop import TrainState, train_step

    batches = _batches(3)
    micro = [next(batches) for _ in range(3)]
    weights = [0.5, 0.125, 0.375]

    def grads(weights, lr=0.0):
        torch.manual_seed(0)
        model = FakeVLM()
        named = apply_trainable(model, ("vision", "projector", "lm"))
        ocfg = OptimizerConfig(lr=1e-3, grad_clip=None, use_muon=False)  # Muon edits grads in place
        state = TrainState(model, MuonAdamW(named, ocfg), _spec(optimizer=ocfg))
        _, m = train_step(state, micro, _mse, "cpu", weights=weights, lr=lr)
        return {n: p.grad.clone() for n, p in named}, m

    got, m = grads(weights, lr=0.0)
    torch.manual_seed(0)
    model = FakeVLM()
    named = apply_trainable(model, ("vision", "projector", "lm"))
    losses = [_mse(model, mb)[0] for mb in micro]
    sum(w * loss for w, loss in zip(weights, losses)).backward()
    for n, p in named:
        torch.testing.assert_close(got[n], p.grad, rtol=1e-6, atol=1e-7)
    assert m["loss"] == pytest.approx(sum(w * loss.item() for w, loss in zip(weights, losses)), rel=1e-6)
    assert m["lr"] == 0.0  # the caller's lr, not the spec's schedule
    equal, _ = grads([1 / 3] * 3)
    mean, _ = grads(None)
    for n in mean:
        torch.testing.assert_close(equal[n], mean[n], rtol=1e-6, atol=1e-7)
