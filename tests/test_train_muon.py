"""Our Muon is torch.optim.Muon's update: bit-identical in bf16, close in fp32, rejects non-2-D."""

import pytest
import torch

from moonforge.stages.train.muon import Muon, newton_schulz


def _run(opt_cls, steps=4, **kw):
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(12, 20)), torch.nn.Parameter(torch.randn(30, 8))]
    opt = opt_cls(ws, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=g)
        opt.step()
    return [w.detach().clone() for w in ws]


def test_bf16_matches_torch_muon_bit_for_bit():
    ours = _run(Muon, ns_dtype=torch.bfloat16)
    ref = _run(torch.optim.Muon)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_fp32_newton_schulz_is_close_to_bf16_and_orthogonalises():
    ours, ref = _run(Muon, ns_dtype=torch.float32), _run(torch.optim.Muon)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    g = torch.randn(16, 40)
    o = newton_schulz(g, 5, 1e-7, torch.float32)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5  # quintic NS: singular values ~ U(0.5, 1.5), not 1


def test_cpu_defaults_to_fp32_and_rejects_non_matrices():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = Muon([w])
    assert opt.param_groups[0]["ns_dtype"] is None  # auto: fp32 on CPU, bf16 on CUDA
    with pytest.raises(ValueError, match="only 2-D"):
        Muon([torch.nn.Parameter(torch.randn(4))])
