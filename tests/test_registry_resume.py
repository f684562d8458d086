"""A NaN loss fails the stage clearly, keeps its last good checkpoint (`status` shows it as
resumable work), and a rerun resumes from it."""

from __future__ import annotations

from itertools import count

import pytest
import torch
from torch import nn

from moonforge.registry.errors import StageFailed
from moonforge.registry.run_stage import run_stage, stage_status
from moonforge.registry.store import open_store
from moonforge.registry.tracking import NullTracker
from moonforge.stages.artifacts import StageResult
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train.checkpoint import save_weights
from moonforge.stages.train.loop import NonFiniteLossError, TrainSpec, train


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision, self.projector = nn.Linear(4, 4), nn.Linear(4, 4)
        self.lm, self.caption = nn.Linear(4, 1), nn.Linear(1, 1)


class TrainingStage:
    """A stage running the real loop; its loss turns NaN at `nan_at` (a call index) once."""

    def __init__(self, nan_at: int | None):
        self.nan_at, self.resumed_from, self.steps_run = nan_at, [], 0

    def __call__(self, base, data, cfg, ctx):
        self.resumed_from.append(ctx.resume_from)
        torch.manual_seed(0)
        net = TinyNet()
        calls = count()

        def loss_fn(model, x):
            self.steps_run += 1
            loss = model.lm(model.projector(model.vision(x))).pow(2).mean()
            return (loss * float("nan") if next(calls) == self.nan_at else loss), {}

        def batches():
            g = torch.Generator().manual_seed(1)
            while True:
                yield torch.randn(8, 4, generator=g)

        params = [(n, p) for n, p in net.named_parameters() if not n.startswith("caption")]
        spec = TrainSpec(
            num_steps=cfg.steps,
            optimizer=cfg.optimizer,
            schedule=cfg.schedule,
            trainable=("vision", "projector", "lm"),
            checkpoint_every=4,
        )
        train(net, params, batches(), loss_fn, spec, ctx, ctx.model)
        return StageResult(save_weights(net, ctx.model, ctx.out), {"train/steps": float(cfg.steps)})


def test_nan_keeps_last_checkpoint_and_rerun_resumes(tmp_project, monkeypatch):
    from moonforge.stages import catalog

    recipe = load_recipe(tmp_project / "recipes" / "mini.yaml", ["stages.lm_pretrain.num_steps=10"])
    broken = TrainingStage(nan_at=9)  # steps 4 and 8 were checkpointed; step 9 goes NaN
    monkeypatch.setattr(catalog, "stage_function", lambda kind: broken)
    with pytest.raises(StageFailed, match=r"(?s)NonFiniteLossError.*step 9.*last good checkpoint kept") as ei:
        run_stage(recipe, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert isinstance(ei.value.__cause__, NonFiniteLossError) and not ei.value.transient
    store = open_store(tmp_project)
    assert store.versions("lm_pretrain") == []  # nothing partial is visible as an artifact
    fp_dirs = list((tmp_project / ".moonforge/store/lm_pretrain").glob(".partial-*"))
    assert len(fp_dirs) == 1 and (fp_dirs[0] / "train_state" / "step-0000008").is_dir()
    row = stage_status(recipe, tmp_project)[0]  # `moonforge status` shows the resumable work
    assert (row["stage"], row["state"], row["partial"]["step"]) == ("lm_pretrain", "missing", 8)
    assert row["partial"]["running"] is None
    assert "resumable: phase 0 step 8/10 (global step 8); a rerun continues from there" in row["reasons"]

    fixed = TrainingStage(nan_at=None)
    monkeypatch.setattr(catalog, "stage_function", lambda kind: fixed)
    out = run_stage(recipe, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert out.ref == "lm_pretrain@1" and not out.cache_hit
    assert fixed.resumed_from[0].name == "step-0000008" and fixed.steps_run == 2  # steps 9, 10 only
    assert not list((tmp_project / ".moonforge/store/lm_pretrain").glob(".partial-*"))
    assert not (out_path := store.latest("lm_pretrain").path / "train_state").exists(), out_path
