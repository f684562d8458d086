"""Streaming order, per-rank sharding and exact resume of the training data.

In process: ShardOrder (seeded block shuffle) gives slots disjoint shares that add up to each
epoch, restores at any position (an epoch boundary included) and reproduces the generated
sources' old order; LMBatchIterator state round-trips mid-stream, and two ranks' iterators build
disjoint halves. Launched: a 2-process torchrun job (tests/dist_data_stage.py: a declared JSONL
dataset through DeclaredMix, lm_stream and the real loop) is killed deterministically three
times (mid-epoch, again in the same epoch, at an epoch boundary) and resumed each time from its
periodic checkpoint; the documents each rank trained on equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moonforge.registry import launch
from moonforge.stages.artifacts import DatasetRef, StageContext
from moonforge.stages.data.batches import OPEN_ROWS, lm_batches
from moonforge.stages.data.records import TextRecord
from moonforge.stages.data.shard_order import ShardOrder
from moonforge.stages.data.sources import text_docs
from moonforge.stages.recipe import load_recipe
from moonforge.stages.stage_configs import LMPretrainConfig
from moonforge.stages.train.stage_io import lm_stream, vision_spec

REPO = Path(__file__).resolve().parents[1]
STAGE = "dist_data_stage:data_stage"


# -- ShardOrder -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,block,slots,exclude",
    [
        ([25], 2, 2, ()),
        ([7, 1, 12], 3, 3, (4, 9)),
        ([5, 5], 1, 1, ()),
        ([40], 64, 1, (0,)),
    ],
)
def test_slots_are_disjoint_and_add_up_to_each_epoch(sizes, block, slots, exclude):
    orders = [ShardOrder(sizes, block, "t", s, slots, exclude) for s in range(slots)]
    everything = sorted(set(range(sum(sizes))) - set(exclude))
    for epoch in range(3):
        shares = [o.epoch_ids(epoch) for o in orders]
        assert sorted(i for s in shares for i in s) == everything
        drawn = [[o.next() for _ in range(len(s))] for o, s in zip(orders, shares)]
        assert drawn == shares  # the stream walks exactly its epoch share, then the next epoch
    assert orders[0].epoch_ids(0) != orders[0].epoch_ids(1)  # reshuffled every epoch


def test_state_restores_anywhere_including_an_epoch_boundary():
    ref = ShardOrder([13, 9], 4, "seed", 1, 2)
    share = len(ref.epoch_ids(0))
    stream = [ref.next() for _ in range(3 * share)]
    for cut in (0, 1, 5, share, share + 1, 2 * share):  # share, 2*share: exactly at a boundary
        o = ShardOrder([13, 9], 4, "seed", 1, 2)
        for _ in range(cut):
            o.next()
        state = json.loads(json.dumps(o.state_dict()))
        again = ShardOrder([13, 9], 4, "seed", 1, 2)
        again.load_state_dict(state)
        assert [again.next() for _ in range(len(stream) - cut)] == stream[cut:], cut
        resumed_twice = ShardOrder([13, 9], 4, "seed", 1, 2)
        resumed_twice.load_state_dict(again.state_dict())  # at the end: keeps going
        assert resumed_twice.next() == again.next()
    with pytest.raises(ValueError, match=r"\[records, block, slots, slot\]"):
        ShardOrder([13, 9], 4, "seed", 0, 2).load_state_dict(ref.state_dict())


def test_one_file_one_slot_block_one_is_the_old_per_epoch_permutation():
    o = ShardOrder([50], 1, "lm_batches/0/text")
    for epoch in range(2):
        want = list(range(50))
        random.Random(f"lm_batches/0/text/{epoch}").shuffle(want)
        assert [o.next() for _ in range(50)] == want


def test_too_few_blocks_for_the_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot give each of 4 data-parallel ranks x workers a block"):
        ShardOrder([5], 2, "s", 0, 4)


# -- LMBatchIterator ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(repo_data):
    from moonforge.model.tokenizer import Tokenizer

    return Tokenizer.load(repo_data / "tokenizer" / "tokenizer.json")


def _texts(n: int) -> list[TextRecord]:
    rng = random.Random(0)
    words = "alpha beta gamma delta shape circle square red blue green".split()
    return [
        TextRecord(
            text=f"rec {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))),
            source="generated",
            quality="high",
        )
        for i in range(n)
    ]


def _batches(tok, rank=0, world=1, open_rows=OPEN_ROWS):
    src = {"a": text_docs(_texts(40), tok, name="a"), "b": text_docs(_texts(25)[::-1], tok, name="b")}
    return lm_batches(
        src,
        lambda s: {"a": 0.6, "b": 0.4},
        tok,
        seq_len=48,
        batch_size=3,
        seed=1,
        patch_size=8,
        merge_size=2,
        max_patches=64,
        rank=rank,
        world=world,
        open_rows=open_rows,
    )


def _same(x, y) -> bool:
    return (x is None and y is None) or (
        x is not None
        and y is not None
        and all(
            (getattr(x, f) is None and getattr(y, f) is None) or getattr(x, f).equal(getattr(y, f))
            for f in ("input_ids_BL", "labels_BL", "position_ids_BL", "doc_ids_BL")
        )
    )


@pytest.mark.parametrize("cut", [0, 1, 7])
def test_batch_iterator_state_round_trips_mid_stream(tok, cut):
    ref = _batches(tok)
    for _ in range(cut):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))
    assert len(json.dumps(state)) < 4000  # positions and tags, not tokens
    again = _batches(tok)
    again.load_state_dict(state)
    for _ in range(12):
        assert _same(next(ref), next(again))
    assert again.tokens_by_source == ref.tokens_by_source


def test_a_state_with_several_open_rows_and_one_the_next_fit_packer_saved_both_resume(tok):
    ref = _batches(tok)
    for _ in range(4):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))
    assert len(state["open"]) > 1  # rows still filling at the cut, each listed
    again = _batches(tok)
    again.load_state_dict(state)
    assert all(_same(next(ref), next(again)) for _ in range(8))
    old = _batches(tok, open_rows=1)  # next-fit; before best fit, "open" was one row's tags
    for _ in range(4):
        next(old)
    state = json.loads(json.dumps(old.state_dict()))
    assert len(state["open"]) == 1
    state["open"] = state["open"][0]
    again = _batches(tok, open_rows=1)
    again.load_state_dict(state)
    assert all(_same(next(old), next(again)) for _ in range(8))


def test_two_ranks_build_disjoint_halves_and_none_for_each_other(tok):
    ranks = [_batches(tok, r, 2) for r in range(2)]
    for step in range(8):
        got = [next(it) for it in ranks]
        assert (got[0] is None) == (step % 2 == 1) and (got[1] is None) == (step % 2 == 0)
    seen = [set() for _ in ranks]
    for r, it in enumerate(ranks):
        for name, o in it.orders.items():
            seen[r] |= {(name, i) for i in o.epoch_ids(0)}
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 65
    # a state saved at world size 2 restores per rank
    both = {"ranks": [it.state_dict() for it in ranks]}
    again = _batches(tok, 1, 2)
    again.load_state_dict(json.loads(json.dumps(both)))
    for _ in range(6):
        assert _same(next(ranks[1]), next(again))


# -- 2-process torchrun: sharding, kills and exact resume -------------------------------------

N, SEQ, BATCH, STEPS = 25, 32, 4, 10
"""25 one-row documents in blocks of 2 over 2 ranks: 13 blocks, so one rank has an odd share of
an epoch and the other an even one (an uneven tail); 2 rows per rank per step."""


def _one_row_texts(tok) -> list[str]:
    """Documents of SEQ/2 < tokens (with eos) <= SEQ, so each fills one packed row alone."""
    rng, out = random.Random(3), []
    words = "the red circle sits left of a blue square near green lines".split()
    for i in range(N):
        text = f"rec {i}"
        while len(tok.encode(text)) + 1 <= SEQ // 2 + 2:
            text += " " + rng.choice(words)
        assert SEQ // 2 < len(tok.encode(text)) + 1 <= SEQ
        out.append(text)
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory, tok, repo_data):
    root = tmp_path_factory.mktemp("shard") / "user_text"
    root.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _one_row_texts(tok)))
    decl = {"name": "user_text", "format": "text", "path": "docs.jsonl", "shuffle_block": 2}
    cfg = LMPretrainConfig.model_validate(
        dict(
            upstream=None,
            data=["user_text", "tokenizer"],
            trainable=["lm"],
            optimizer={"lr": 1e-2},
            seq_len=SEQ,
            batch_size=BATCH,
            micro_batch_size=1,
            num_steps=STEPS,
            checkpoint_every=1,
            mixture={"user_text": 1.0},
            declared=[decl],
            launcher={"kind": "torchrun", "nproc_per_node": 2},
        )
    )
    data = {
        "user_text": DatasetRef("user_text", root, "test"),
        "tokenizer": DatasetRef("tokenizer", repo_data / "tokenizer", "test"),
    }
    return cfg, data


def _simulated(cfg, data, tok):
    """What each rank of an uninterrupted 2-process run draws (the same stream objects, built per
    rank in this process: the data order does not depend on training), and each rank's share of
    the first epoch."""
    from dist_data_stage import doc_numbers

    from moonforge.stages.data.user_mix import DeclaredMix
    from moonforge.stages.train.distributed import Parallel

    model = load_recipe(REPO / "recipes" / "tiny.yaml").model
    draws, shares = [], []
    for rank in range(2):
        par = Parallel(rank=rank, world_size=2, engine="torchrun")
        mix = DeclaredMix(cfg, data, tok, vision_spec(model), None)
        it = lm_stream(mix.sources(), mix.weights({}), tok, cfg, model, par=par)
        shares.append(it.orders["user_text"].epoch_ids(0))
        rows = []
        for micro in range(STEPS * cfg.grad_accum):
            b = next(it)
            if b is not None:
                rows.append((micro, doc_numbers(b, tok)))
        draws.append(rows)
    return draws, shares


def _launch(
    cfg, data, log: Path, out: Path, monkeypatch, kill_at: int | None, resume: Path | None
) -> Path | None:
    out.mkdir()
    ctx = StageContext(out=out, model=load_recipe(REPO / "recipes" / "tiny.yaml").model, resume_from=resume)
    monkeypatch.setenv("MOONFORGE_TEST_DATA_LOG", str(log))
    log.mkdir()
    if kill_at is None:
        monkeypatch.delenv("MOONFORGE_TEST_KILL_AT", raising=False)
        launch.launch_stage(STAGE, None, data, cfg, ctx)
        return None
    monkeypatch.setenv("MOONFORGE_TEST_KILL_AT", str(kill_at))
    with pytest.raises(launch.LaunchFailed, match=r"killed by SIGKILL"):
        launch.launch_stage(STAGE, None, data, cfg, ctx)
    ckpt = out / "train_state" / f"step-{kill_at:07d}"
    assert (ckpt / "train_state.json").is_file(), sorted(p.name for p in out.rglob("*"))
    return ckpt


def test_two_ranks_shard_kill_and_resume_exactly(job, tok, tmp_path, monkeypatch):
    cfg, data = job
    want, shares = _simulated(cfg, data, tok)
    # per-rank shares of the first epoch: disjoint, together every record exactly once, uneven
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(N))
    assert len(shares[0]) != len(shares[1])
    for rows, share in zip(want, shares):  # what a rank trains on walks its share first
        assert [d for _, docs in rows for d in docs][: len(share)] == share
    # killed right after the checkpoints of steps 2 and 4 (mid-epoch, twice in one epoch) and of
    # the step where one rank's first epoch ends exactly; resumed from each; the last run ends
    boundary = next(len(s) // 2 for s in shares if len(s) % 2 == 0)
    cuts = [2, 4, boundary]
    resume = None
    for i, kill in enumerate(cuts + [None]):
        resume = _launch(cfg, data, tmp_path / f"log{i}", tmp_path / f"run{i}", monkeypatch, kill, resume)
    saved = json.loads((tmp_path / "run0/train_state/step-0000002/train_state.json").read_text())
    ranks = saved["extra"]["batches"]["ranks"]  # every rank's own position, restored per rank
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["orders"] != ranks[1]["orders"]
    bounds = [0, *[c * cfg.grad_accum for c in cuts], STEPS * cfg.grad_accum]
    for rank in range(2):
        got = []
        for i in range(len(cuts) + 1):
            path = tmp_path / f"log{i}" / f"rank{rank}.jsonl"
            rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
            # a killed run may have drawn part of the next step before it died: not trained on
            got += [(r["micro"], r["docs"]) for r in rows if bounds[i] <= r["micro"] < bounds[i + 1]]
        assert got == [(m, d) for m, d in want[rank]], rank


# -- loader workers -------------------------------------------------------------------------------


def _worker_stream(tok, rank=0, world=1, workers=2):
    from moonforge.stages.data.loader_workers import WorkerStream

    src = {"a": text_docs(_texts(40), tok, name="a"), "b": text_docs(_texts(25)[::-1], tok, name="b")}

    def make(w, n):
        return lm_batches(
            src,
            lambda s: {"a": 0.6, "b": 0.4},
            tok,
            seq_len=48,
            batch_size=3,
            seed=1,
            patch_size=8,
            merge_size=2,
            max_patches=64,
            rank=rank,
            world=world,
            worker=w,
            num_workers=n,
        )

    return WorkerStream(make, rank, world, workers), make


def test_loader_workers_build_disjoint_shares_and_resume_exactly(tok):
    stream, make = _worker_stream(tok)
    # what the two workers build, taken in turn, is exactly what the stream hands out
    direct = [make(w, 2) for w in range(2)]
    want = []
    for k in range(8):
        it = direct[k % 2]
        b = next(it)
        while b is None:
            b = next(it)
        want.append(b)
    got = [next(stream) for _ in range(8)]
    assert all(_same(a, b) for a, b in zip(got, want))
    shares = [set(it.orders["a"].epoch_ids(0)) for it in direct]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 40
    # resume at an odd count: the restored workers pick up with the right one
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    again, _ = _worker_stream(tok)
    again.load_state_dict(state)
    for _ in range(5):
        assert _same(next(stream), next(again))
    assert again.docs_by_source == stream.docs_by_source
