"""Context parallelism (model/context_parallel.py) on CPU with gloo, against one process.

- Model level: two ranks each keep half of a packed micro-batch (documents and an image across
  the middle, padding) through the tiny VLM; their losses equal the one-process loss and their
  gradients, summed, equal its gradients: MLA (latent gathered), MLA under activation
  checkpointing (the gathers run again in the recompute), MHA with grouped KV heads and biases.
- Stage level: the real loop under torchrun with 2 processes and launcher.context_parallel=2
  trains the same per-step loss curve as the in-process run (and the router biases move alike).
- Bad input: a degree that does not divide the ranks or a sequence, a stage whose loss cannot
  shard (RL), a context-parallel forward asked for logits, and long_context data parallelism
  pointed at context parallelism.
"""

from __future__ import annotations

import cp_check
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from moonforge.model.context_parallel import ContextParallel
from moonforge.registry import launch
from moonforge.stages.config import LauncherConfig
from moonforge.stages.recipe import load_recipe
from moonforge.stages.stage_configs import LMPretrainConfig

LOSS_TOL = 1e-6
GRAD_TOL = 1e-5
"""fp32: the sharded run sums attention and the loss in another order (measured |diff| ~1e-7
for the loss, ~1e-7 relative to the largest gradient entry)."""
CURVE_TOL = 1e-4
"""Max |loss difference| per step over 6 steps of training (as tests/test_distributed.py)."""


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    mp.start_processes(
        cp_check.parity_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn"
    )
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in cp_check.CASES}


@pytest.mark.parametrize("case", list(cp_check.CASES))
def test_two_ranks_give_the_one_process_loss_and_gradients(two_rank_results, case):
    update, recompute, late = cp_check.CASES[case]
    model = cp_check.vlm(update, recompute)
    loss, grads = cp_check.loss_and_grads(model, cp_check.packed_batch(late_images=late))
    got = two_rank_results[case]
    assert abs(float(got["loss"]) - float(loss)) < LOSS_TOL, (float(got["loss"]), float(loss))
    assert sorted(got["grads"]) == sorted(grads)  # the vision tower and every expert that ran
    scale = max(float(g.abs().max()) for g in grads.values())
    worst = max(float((got["grads"][n] - g).abs().max()) for n, g in grads.items())
    assert worst < GRAD_TOL * scale, (worst, scale)
    assert any(n.startswith("vision.") for n in grads)  # gradients reach the replicated tower


def _stage_cfg(micro_batch_size=None, **launcher):
    return LMPretrainConfig(
        micro_batch_size=micro_batch_size,
        upstream=None,
        trainable=("vision", "projector", "lm"),
        optimizer={"lr": 3e-3},
        schedule={"kind": "cosine", "warmup_steps": 2},
        seq_len=cp_check.SEQ,
        batch_size=2,
        num_steps=6,
        router_bias_update=0.01,
        launcher=launcher,
    )


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    import dist_stage

    return cp_check.cp_stage(
        None, {}, _stage_cfg(), dist_stage.toy_ctx(tmp_path_factory.mktemp("one"), "out")
    )


@pytest.mark.parametrize("engine", ["torchrun", "deepspeed"])
def test_context_parallel_two_ranks_trains_the_one_process_curve(single_run, tmp_path, engine):
    """torchrun all-reduces the group's partial gradients itself; DeepSpeed ZeRO-2 averages
    over every rank, so the loop scales the loss by the group size: both must give the curve."""
    import dist_stage

    ctx = dist_stage.toy_ctx(tmp_path, "cp")
    la = {"kind": engine, "nproc_per_node": 2, "context_parallel": 2, "zero_stage": 2}
    res = launch.launch_stage("cp_check:cp_stage", None, {}, _stage_cfg(**la), ctx)
    want, got = dist_stage.loss_curve(single_run.metrics), dist_stage.loss_curve(res.metrics)
    assert len(got) == len(want) == 6
    assert max(abs(a - b) for a, b in zip(got, want)) < CURVE_TOL, (got, want)
    assert want[-1] < want[0] - 0.5  # it learns
    # the router-bias step saw the same global expert load
    assert res.metrics["train/max_over_mean"] == pytest.approx(
        single_run.metrics["train/max_over_mean"], abs=1e-6
    )


def test_deepspeed_data_parallel_with_a_text_only_micro_batch_trains_the_one_process_curve(tmp_path):
    """Not context parallelism: plain ZeRO-2 over 2 replicas, where one rank's micro-batch has no
    image while the other's has. ZeRO reduces gradients in buckets filled as the backward
    reaches each parameter, so a rank that never reaches the vision tower crashed the job; the
    VLM's `reach_media_params` makes every rank reach it (0 x a blank image)."""
    import dist_stage

    def cfg(**launcher):
        return _stage_cfg(micro_batch_size=1, **launcher)

    single = cp_check.cp_stage(None, {}, cfg(), dist_stage.toy_ctx(tmp_path, "one"))
    la = {"kind": "deepspeed", "nproc_per_node": 2, "zero_stage": 2}
    res = launch.launch_stage("cp_check:cp_stage", None, {}, cfg(**la), dist_stage.toy_ctx(tmp_path, "ds"))
    want, got = dist_stage.loss_curve(single.metrics), dist_stage.loss_curve(res.metrics)
    assert max(abs(a - b) for a, b in zip(got, want)) < CURVE_TOL, (got, want)
    assert want[-1] < want[0] - 0.5


LAYOUTS = {
    "packed_with_padding": [[0] * 5 + [1] * 9 + [2] * 6 + [-1] * 4, [0] * 24],
    "one_doc_per_row": [[0] * 24, [0] * 24],
    "doc_starts_at_a_slice_edge": [[0] * 6 + [1] * 12 + [2] * 6, [0] * 3 + [1] * 21],
    "short_docs_and_a_padded_tail": [[0, 0, 1, 1, 1, 2] * 3 + [-1] * 6, [3] * 12 + [4] * 12],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("chunk", [512, 2])
def test_the_cp_kernel_gives_the_slice_rows_of_whole_sequence_attention(layout, size, chunk):
    """Each rank's per-document attention over the keys up to its queries equals its rows of the
    whole sequence's causal block-diagonal attention (the reference: one SDPA per document),
    with one part a piece and with many. The gather is done here by slicing the whole keys, as
    the ranks' gathers give."""
    from moonforge.model.attention import attend_reference, attention, cp_attention_meta

    doc = torch.tensor(LAYOUTS[layout])
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 24, 8, generator=g), torch.randn(2, 3, 24, 8, generator=g)
    v = torch.randn(2, 3, 24, 6, generator=g)
    whole = attend_reference(q, k, v, doc, causal=True)
    for rank in range(size):
        cp = ContextParallel(rank, size)
        meta = cp_attention_meta(doc, cp, chunk)
        k0, end = meta.keys
        assert end == cp.ranges(24)[-1][1] and k0 <= cp.ranges(24)[0][0]
        out = attention(cp.shard(q, 2), k[:, :, k0:end], v[:, :, k0:end], meta)
        torch.testing.assert_close(out, cp.shard(whole, 2), rtol=1e-5, atol=1e-6)


def test_the_zigzag_split_balances_causal_work_and_unshards_in_order():
    """Rank r keeps chunks r and 2n - 1 - r of 2n: the same (query, earlier key) pair count on
    every rank, where a contiguous split gives the last rank 2n - 1 times the first's; and
    `unshard` puts every rank's slice back in sequence order."""
    L, n = 48, 3
    ranks = [ContextParallel(r, n) for r in range(n)]
    assert [cp.ranges(L) for cp in ranks] == [((0, 8), (40, 48)), ((8, 16), (32, 40)), ((16, 32),)]
    work = [sum(sum(range(lo + 1, hi + 1)) for lo, hi in cp.ranges(L)) for cp in ranks]
    assert len(set(work)) == 1, work
    x = torch.arange(2 * L).view(2, L)
    assert torch.equal(ranks[0].unshard([cp.shard(x) for cp in ranks], dim=1), x)


def test_a_degree_that_does_not_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"context_parallel=3 does not divide the 4 ranks"):
        LauncherConfig(kind="torchrun", nproc_per_node=4, context_parallel=3)
    with pytest.raises(
        ValueError,
        match=r"seq_len=63 does not divide over launcher.context_parallel=3 ranks \(2 chunks a rank\); "
        r"set seq_len to a multiple of 6",
    ):  # 63 divides over 3 ranks, but each rank keeps two chunks
        LMPretrainConfig(
            upstream=None,
            trainable=("lm",),
            optimizer={"lr": 1e-3},
            seq_len=63,
            batch_size=2,
            num_steps=1,
            launcher={"kind": "torchrun", "nproc_per_node": 3, "context_parallel": 3},
        )
    with pytest.raises(
        ValueError, match=r"sequence length divisible by 4 \(2 chunks a rank\), got 62; set the"
    ):
        ContextParallel(0, 2).ranges(62)


def test_stages_that_cannot_shard_a_sequence_and_long_context_layouts():
    tiny = cp_check.REPO / "recipes" / "tiny.yaml"
    two = ["launcher.kind=torchrun", "launcher.nproc_per_node=2"]
    with pytest.raises(ValueError, match=r"stage 'rl': launcher.context_parallel=2, but a rl stage"):
        load_recipe(tiny, [f"stages.rl.{o}" for o in [*two, "launcher.context_parallel=2"]])
    with pytest.raises(ValueError, match=r"long_context: .*2 data-parallel ranks; .*context_parallel: 2"):
        load_recipe(tiny, [f"stages.long_context.{o}" for o in two])
    ok = load_recipe(tiny, [f"stages.long_context.{o}" for o in [*two, "launcher.context_parallel=2"]])
    lc = next(s for s in ok.stages if s.kind == "long_context")
    assert lc.launcher.data_parallel == 1 and lc.launcher.context_parallel == 2
    odd = "stages.long_context.sub_stages=[{seq_len: 1023, num_steps: 1}]"
    with pytest.raises(ValueError, match=r"sub_stages\[0\]: seq_len=1023 does not divide over .*=2 ranks"):
        load_recipe(tiny, [f"stages.long_context.{o}" for o in [*two, "launcher.context_parallel=2"]] + [odd])


def test_a_context_parallel_forward_refuses_logits_and_whole_embeddings():
    model = cp_check.vlm()
    model.lm.context_parallel = ContextParallel(0, 2)
    b = cp_check.packed_batch()
    with pytest.raises(ValueError, match="computes the training loss only .*run without context parallelism"):
        model(b.input_ids_BL, b.position_ids_BL, b.doc_ids_BL, b.media_mask_BL, b.pixels_NP, b.grid_hw)
    whole = model.embed(b.input_ids_BL)  # the whole sequence's embeddings, not this rank's slice
    with pytest.raises(
        ValueError, match=r"takes this rank's slice of the embeddings \(32 positions\) but got 64"
    ):
        model.lm(None, b.position_ids_BL, b.doc_ids_BL, inputs_embeds_BLD=whole, labels_BL=b.labels_BL)
