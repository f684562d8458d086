"""ZeRO's Muon client over 2 real gloo ranks: equal to single-process MuonAdamW (parameters and
the gathered optimizer state, which loads back into slices), and each rank orthogonalises only the
expert matrices its slice holds (tests/zero_muon_check.py)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import zero_muon_check as zm
from conftest import free_port

from moonforge.stages.train.optim import MuonAdamW

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_muon")
    mp.start_processes(zm.worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_sharded_steps_equal_muon_adamw(ranks):
    named = zm.named_params()
    initial = {n: p.detach().clone() for n, p in named}
    ref = MuonAdamW(named, zm.CFG)
    for step in range(zm.STEPS):
        for (_, p), g in zip(named, zm.grads(step, named), strict=True):
            p.grad = g
        ref.step()
    for name, p in named:
        got = torch.cat([r["slices"][name] for r in ranks])[: p.numel()].view(p.shape)
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(got, initial[name]), name  # every tensor was updated
    # the gathered state is MuonAdamW's, and loading it back gives each rank its slices again
    want = {
        f"{i}.{j}.{k}": v
        for i, o in enumerate(ref.state_dict()["optimizers"])
        for j, st in o["state"].items()
        for k, v in st.items()
    }
    for r in ranks:
        assert r["full_state"].keys() == want.keys() and r["reloaded"]
        for k, v in want.items():
            torch.testing.assert_close(r["full_state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_each_rank_orthogonalises_only_the_expert_matrices_in_its_slice(ranks):
    # One step, in group order: gate_up (2E = 6 matrices of F x D, 3 in each half); down (3
    # matrices of D x F whose halves split matrix 1, so each rank takes 2); the dense matrix,
    # which both slices touch. The norm is AdamW's.
    one_step = [[3, zm.F, zm.D], [2, zm.D, zm.F], [zm.F, zm.D]]
    for r in ranks:
        assert r["ns_calls"] == one_step * zm.STEPS
