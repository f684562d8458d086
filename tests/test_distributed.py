"""Launchers and Muon under data parallelism, on CPU (gloo, 2 processes).

A purpose-built tiny stage (tests/dist_stage.py: the real loop, Muon + AdamW) trains in process,
under torchrun with 2 processes and under DeepSpeed ZeRO-2 with 2 processes; the per-step loss
curves must agree within LOSS_TOL (the updates are the same math; only float summation order
differs, and we measured |diff| < 1e-5 over 8 steps). Bad input: a killed launcher, a world size
that does not divide the batch, ZeRO-3 on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import dist_stage
import pytest
import torch

from moonforge.registry import launch
from moonforge.registry.errors import StageFailed
from moonforge.registry.run_stage import run_stage
from moonforge.registry.store import open_store
from moonforge.registry.tracking import NullTracker
from moonforge.stages.artifacts import ListSink
from moonforge.stages.config import OptimizerConfig
from moonforge.stages.recipe import load_recipe
from moonforge.stages.train.checkpoint import CRASH_ENV
from moonforge.stages.train.optim import MuonAdamW
from moonforge.stages.train.zero_muon import ZeroMuonAdamW

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-4
"""Max |loss difference| per step between world sizes 1 and 2 (CE loss around 4.2 -> 2)."""
STAGE = "dist_stage:toy_stage"


_cfg, _ctx, _curve = dist_stage.toy_cfg, dist_stage.toy_ctx, dist_stage.loss_curve


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process reference run (the inprocess launcher: today's code path)."""
    ctx = _ctx(tmp_path_factory.mktemp("single"), "out")
    return dist_stage.toy_stage(None, {}, _cfg(), ctx)


def _assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 8
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff < LOSS_TOL, (diff, got, want)
    assert want[-1] < want[0] - 0.5  # it learns


def test_torchrun_two_processes_match_single_process(single, tmp_path):
    ctx = _ctx(tmp_path, "out")
    ctx.sink = ListSink()
    res = launch.launch_stage(STAGE, None, {}, _cfg(kind="torchrun", nproc_per_node=2), ctx)
    _assert_same_curve(_curve(res.metrics), _curve(single.metrics))
    assert res.checkpoint.weights.exists() and not list(ctx.out.glob("rank*"))
    assert [s for s, _ in ctx.sink.series("toy/loss")] == list(range(1, 9))  # rank 0's rows


def test_deepspeed_zero2_two_processes_match_single_process(single, tmp_path):
    ctx = _ctx(tmp_path, "out")
    res = launch.launch_stage(STAGE, None, {}, _cfg(kind="deepspeed", nproc_per_node=2, zero_stage=2), ctx)
    _assert_same_curve(_curve(res.metrics), _curve(single.metrics))


def test_zero_muon_without_sharding_is_muon_adamw():
    """The ZeRO client optimizer's math equals MuonAdamW's on whole tensors (world size 1)."""
    torch.manual_seed(0)
    nets = [dist_stage.ToyLM() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = OptimizerConfig(lr=1e-2)
    named = [[(n, p) for n, p in net.named_parameters() if n.startswith("lm.")] for net in nets]
    opts = [MuonAdamW(named[0], cfg), ZeroMuonAdamW(named[1], cfg)]
    data = dist_stage.batches(4, 12, 0)
    for _ in range(3):
        x = next(data)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            dist_stage.lm_loss(net, x)[0].backward()
            opt.step()
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # its gathered state is MuonAdamW's state dict, so checkpoints move between the two
    sd = opts[1].full_state_dict()
    ref = opts[0].state_dict()
    for o_ref, o in zip(ref["optimizers"], sd["optimizers"]):
        assert o_ref["state"].keys() == o["state"].keys()
        for i in o_ref["state"]:
            for k, v in o_ref["state"][i].items():
                torch.testing.assert_close(o["state"][i][k], v, rtol=1e-5, atol=1e-6)
    fresh = MuonAdamW(named[0], cfg)
    fresh.load_state_dict(sd)


def test_world_size_that_does_not_divide_the_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size=8 does not divide over 3 ranks.*multiple of 3"):
        _cfg(kind="torchrun", nproc_per_node=3)
    with pytest.raises(
        ValueError,
        match=r"4 micro-batch\(es\) of 2 per step cannot be shared by "
        r"8 ranks; set micro_batch_size to 1",
    ):
        _cfg(kind="torchrun", nproc_per_node=8)
    with pytest.raises(ValueError, match="needs a launcher; set launcher.kind"):
        _cfg(nproc_per_node=2)


def test_sft_phases_and_long_context_that_cannot_share_a_step_are_refused_at_load():
    """Their own micro-batching escapes the stage-level check; a rank left without a micro-batch
    would reach the step's all-reduces out of order and hang the job (seen under Slurm)."""
    tiny = ["stages.sft.launcher.kind=torchrun", "stages.sft.launcher.nproc_per_node=2"]
    with pytest.raises(
        ValueError,
        match=r"sft.phases\[0\] \(seq_len 256\): 1 micro-batch\(es\) of 8 "
        r"rows per step cannot be shared by 2 ranks.*"
        r"set micro_batch_size: 4",
    ):
        load_recipe(REPO / "recipes" / "tiny.yaml", tiny)
    ok = load_recipe(REPO / "recipes" / "tiny.yaml", [*tiny, "stages.sft.micro_batch_size=2"])
    sft = next(s for s in ok.stages if s.kind == "sft")
    assert [sft.phase_rows(p) for p in sft.phases] == [(2, 4), (2, 4), (1, 2)]
    with pytest.raises(
        ValueError,
        match=r"sft.phases\[1\] \(seq_len 131072\): 64 micro-batch\(es\) "
        r"of 1 rows per step cannot be shared by 128 ranks.*use a "
        r"world size that divides 64",
    ):
        load_recipe(
            REPO / "recipes" / "kimi-vl-a3b.yaml",
            [
                "stages.sft.launcher.kind=deepspeed",
                "stages.sft.launcher.nnodes=16",
                "stages.sft.launcher.nproc_per_node=8",
            ],
        )
    with pytest.raises(
        ValueError,
        match=r"long_context: each sub-stage step is one micro-batch, "
        r"which cannot be shared by 2 data-parallel ranks",
    ):
        load_recipe(
            REPO / "recipes" / "tiny.yaml",
            ["stages.long_context.launcher.kind=torchrun", "stages.long_context.launcher.nproc_per_node=2"],
        )


def test_a_step_whose_micro_batches_do_not_divide_over_the_ranks_fails_instead_of_hanging():
    from moonforge.stages.train.distributed import Parallel

    par = Parallel(rank=1, world_size=2, engine="torchrun")
    assert par.my_share(["a", "b", "c", "d"]) == ["b", "d"]
    with pytest.raises(ValueError, match=r"1 micro-batch\(es\) per step cannot be shared by 2 ranks"):
        par.my_share(["a"])


def test_zero3_on_cpu_is_refused_with_the_fix(tmp_path):
    with pytest.raises(
        launch.LauncherUnavailable, match=r"zero_stage=3 .*CUDA.*set launcher.zero_stage to 2"
    ):
        launch.launch_stage(
            STAGE, None, {}, _cfg(kind="deepspeed", nproc_per_node=2, zero_stage=3), _ctx(tmp_path, "out")
        )
    with pytest.raises(launch.LauncherUnavailable, match="backend=nccl needs CUDA"):
        launch.check_launcher(_cfg(kind="torchrun", nproc_per_node=2, backend="nccl").launcher, "cpu")


def test_killed_launcher_fails_clearly_keeps_checkpoint_and_resumes_at_world_size_1(
    tmp_project, monkeypatch, single
):
    """DeepSpeed ZeRO-2 at world size 2 checkpoints (gathered, single-process format) at step 3,
    and the rank that wrote it SIGKILLs itself right after (the checkpoint hook's kill-self, no
    polling); the stage fails naming the signal, the checkpoint survives, and a rerun
    in process (world size 1; the launcher is Runtime, so the same version) resumes from it and
    continues the single-process loss curve."""
    from moonforge.stages import catalog

    monkeypatch.setattr(catalog, "stage_function", lambda kind: dist_stage.toy_stage)
    monkeypatch.setenv(CRASH_ENV, "3:kill-self")  # inherited by the launched ranks
    toy = [
        "optimizer.lr=0.01",
        "schedule.kind=cosine",
        "schedule.warmup_steps=2",
        "seq_len=12",
        "batch_size=8",
        "micro_batch_size=2",
        "num_steps=8",
        "checkpoint_every=3",
    ]
    sets = [f"stages.lm_pretrain.{s}" for s in toy]
    dist = load_recipe(
        tmp_project / "recipes" / "mini.yaml",
        sets + ["stages.lm_pretrain.launcher.kind=deepspeed", "stages.lm_pretrain.launcher.nproc_per_node=2"],
    )
    with pytest.raises(
        StageFailed,
        match=r"(?s)LaunchFailed.*deepspeed launcher \(2 processes\) "
        r"failed.*(rank \d was|ranks [\d, ]+ were) killed.*last good checkpoint kept",
    ):
        run_stage(dist, "lm_pretrain", tmp_project, tracker=NullTracker())
    store = open_store(tmp_project)
    assert store.versions("lm_pretrain") == []
    kept = list((tmp_project / ".moonforge/store/lm_pretrain").glob(".partial-*/train_state/step-*"))
    assert [p.name for p in kept] == ["step-0000003"]

    monkeypatch.delenv(CRASH_ENV)
    one = load_recipe(tmp_project / "recipes" / "mini.yaml", sets)
    out = run_stage(one, "lm_pretrain", tmp_project, tracker=NullTracker())
    assert out.ref == "lm_pretrain@1"
    resumed = _curve(out.metrics)
    assert len(resumed) == 5  # steps 4..8 only
    want = _curve(single.metrics)[3:]
    assert max(abs(a - b) for a, b in zip(resumed, want)) < LOSS_TOL, (resumed, want)


def test_deepspeed_refuses_a_0_dim_parameter_by_name():
    """ZeRO re-points parameters at its flat buffer with the shapes it saw at start-up, so a
    scalar's backward fails after the first step with an autograd shape error; moonforge names
    the parameter before DeepSpeed starts."""
    from moonforge.stages.train.distributed import DeepSpeedOptimizer

    model = torch.nn.Linear(2, 2)
    model.temperature = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"0-dim parameters \(temperature\).*1-element vectors"):
        DeepSpeedOptimizer(model, list(model.named_parameters()), OptimizerConfig(lr=1e-3), None, 1)  # type: ignore[arg-type]


def test_a_step_whose_share_differs_from_the_engines_accumulation_is_refused():
    """A DeepSpeed engine steps its optimizer every `per_rank` backwards. RL and long2short once
    passed it the per-rank count where build_optimizer takes the step's total, so the engine
    stepped twice per update on half-accumulated gradients (or, with 2 micro-batches over 2
    ranks, failed to start with a batch size of 0). train_step now refuses the mismatch before
    any backward."""
    from moonforge.stages.config import ScheduleConfig
    from moonforge.stages.train.distributed import Parallel
    from moonforge.stages.train.loop import TrainSpec, TrainState, train_step

    class EngineStandIn:  # the loop's interface of DeepSpeedOptimizer, built for 1 per rank
        per_rank = 1

        def set_lr(self, lr: float) -> None: ...

        def zero_grad(self) -> None: ...

    spec = TrainSpec(1, OptimizerConfig(lr=1e-3), ScheduleConfig(kind="constant"), ("lm",), label="rl")
    state = TrainState(torch.nn.Linear(2, 2), EngineStandIn(), spec)
    par = Parallel(rank=0, world_size=2, engine="deepspeed")
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="rl: this rank has 2 micro-batch.*accumulate 1"):
        train_step(state, [1, 2, 3, 4], lambda m, mb: calls.append(mb), "cpu", par)  # type: ignore[arg-type]
    assert calls == []
