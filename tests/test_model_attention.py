"""Packed attention: SDPA block mask vs a per-document reference, padding, no cross-doc leakage.

Legend: B batch, H heads, L length, D head dim.
"""

import pytest
import torch
import torch.nn.functional as F

from moonforge.model import attention
from moonforge.model.attention import (
    attend,
    attend_reference,
    block_mask,
    cu_seqlens_from_doc_ids,
    segment_ids,
)

DOCS_BL = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1], [5, 5, 5, 5, 5, 5, 7, 7, -1, -1, -1]])


def _qkv(B: int, H: int, L: int, D: int, Dv: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, generator=g) for _ in range(2))
    return q, k, torch.randn(B, H, L, Dv or D, generator=g)


def test_segment_ids_and_cu_seqlens():
    doc = torch.tensor([[0, 0, 1, -1, -1], [0, 0, 0, 3, 3]])
    assert segment_ids(doc).tolist() == [[0, 0, 1, 2, 3], [4, 4, 4, 5, 5]]
    cu, max_len = cu_seqlens_from_doc_ids(doc)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 3, 4, 5, 8, 10]
    assert max_len == 3


def test_repeated_doc_id_in_separate_runs_are_separate_documents():
    doc = torch.tensor([[0, 0, 1, 0]])
    mask = block_mask(doc, causal=False)[0, 0]
    assert not mask[3, 0] and mask[3, 3]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Dv", [16, 8])
def test_sdpa_matches_per_segment_reference(causal, Dv):
    q, k, v = _qkv(2, 3, DOCS_BL.shape[1], 16, Dv)
    out = attend(q, k, v, DOCS_BL, causal=causal, backend="sdpa")
    ref = attend_reference(q, k, v, DOCS_BL, causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_padding_rows_attend_to_themselves():
    q, k, v = _qkv(2, 2, DOCS_BL.shape[1], 8)
    out = attend(q, k, v, DOCS_BL, causal=True, backend="sdpa")
    pad = DOCS_BL == -1
    torch.testing.assert_close(out.transpose(1, 2)[pad], v.transpose(1, 2)[pad])


@pytest.mark.parametrize("causal", [True, False])
def test_no_cross_document_leakage(causal):
    q, k, v = _qkv(2, 2, DOCS_BL.shape[1], 8)
    out = attend(q, k, v, DOCS_BL, causal=causal, backend="sdpa")
    doc2 = DOCS_BL == 2
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t.transpose(1, 2)[doc2] += 10.0
    out2 = attend(q2, k2, v2, DOCS_BL, causal=causal, backend="sdpa")
    keep = ~doc2
    torch.testing.assert_close(out.transpose(1, 2)[keep], out2.transpose(1, 2)[keep])
    assert not torch.allclose(out.transpose(1, 2)[doc2], out2.transpose(1, 2)[doc2])


def test_auto_falls_back_to_sdpa_on_cpu():
    q, k, v = _qkv(1, 2, 6, 8)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    torch.testing.assert_close(
        attend(q, k, v, doc, True, backend="auto"), attend(q, k, v, doc, True, backend="sdpa")
    )


def test_unknown_backend_rejected():
    q, k, v = _qkv(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, k, v, torch.zeros(1, 2, dtype=torch.long), True, backend="xformers")


def _fake_flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False
):
    """flash_attn_varlen_func's contract on CPU: (T, H, D) tokens, one SDPA per cu_seqlens span."""
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert q.shape[-1] == v.shape[-1], "flash-attn needs one head dim for q, k, v"
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    cu = cu_seqlens_q.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
    out = torch.empty_like(q)
    for a, b in zip(cu, cu[1:]):
        span = [t[a:b].transpose(0, 1).float() for t in (q, k, v)]
        out[a:b] = (
            F.scaled_dot_product_attention(*span, is_causal=causal, scale=softmax_scale)
            .transpose(0, 1)
            .to(q.dtype)
        )
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_flash_plumbing_matches_sdpa_with_a_cpu_stand_in(monkeypatch, causal):
    """Token flattening, cu_seqlens and v padding of the flash path, checked on CPU in bf16."""
    monkeypatch.setattr(attention, "_flash_varlen", _fake_flash_varlen)
    q, k, v = _qkv(2, 3, DOCS_BL.shape[1], 16, 8)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), DOCS_BL, causal, backend="flash", scale=0.3)
    ref = attend(q, k, v, DOCS_BL, causal, backend="sdpa", scale=0.3)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_the_model_and_the_verifiers_import_without_torch_dynamo():
    """torch's own varlen kernel (CUDA only) is imported on first need: importing it imports
    torch._dynamo, 1.2-2 s of every process that imports the model (evals, chat, import / export).
    The dataset builders that check answers import the verifiers without torch at all (a build of
    rl_prompts took 4.5-5.3 s with the RL stage and the model imported, 0.6-0.8 s without)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import moonforge.stages.rl.verifiers\n"
        "assert 'torch' not in sys.modules, 'the verifiers imported torch'\n"
        "import moonforge.model.vlm\n"
        "assert 'torch._dynamo' not in sys.modules, 'importing the model imported torch._dynamo'\n"
        "from moonforge.model import attention\n"
        "assert attention.torch_varlen() is not None and 'torch._dynamo' in sys.modules\n"
        "from moonforge.stages.rl import rl\n"
        "assert callable(rl)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_flash_never_casts_fp32_down(monkeypatch):
    """fp32 activations are not run in bf16: the batch runs exact SDPA (with a warning)."""
    monkeypatch.setattr(attention, "_flash_varlen", _fake_flash_varlen)
    monkeypatch.setattr(attention, "_warned", set())
    q, k, v = _qkv(2, 3, DOCS_BL.shape[1], 16, 8)
    with pytest.warns(UserWarning, match="bf16 / fp16 only"):
        out = attend(q, k, v, DOCS_BL, True, backend="flash")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attend(q, k, v, DOCS_BL, True, backend="dense"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash parity needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_flash_matches_sdpa_on_gpu(causal):
    if not attention.flash_available(torch.device("cuda")):  # flash-attn, or torch >= 2.10's own
        pytest.skip("no varlen kernel: install flash-attn or use torch >= 2.10")
    q, k, v = (t.cuda().bfloat16() for t in _qkv(2, 4, DOCS_BL.shape[1], 64, 32))
    doc = DOCS_BL.cuda()
    out = attend(q, k, v, doc, causal, backend="flash").float()
    ref = attend(q.float(), k.float(), v.float(), doc, causal, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_many_short_segments_use_the_padded_segment_path_and_match_reference(causal, monkeypatch):
    """A ViT-like row: 40 images of 3..20 patches plus trailing padding in one long row."""
    import moonforge.model.attention as attn

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 21, (40,), generator=g).tolist()
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((7,), -1)])
    doc_BL = doc[None]
    L = doc_BL.shape[1]
    q, k = (torch.randn(1, 2, L, 8, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, L, 6, generator=g, requires_grad=True)
    used = []
    real = attn._sdpa_segments
    monkeypatch.setattr(attn, "_sdpa_segments", lambda *a, **kw: used.append(1) or real(*a, **kw))
    out = attend(q, k, v, doc_BL, causal=causal, backend="sdpa")
    assert used, "the padded-segment path should be chosen for many short segments"
    ref = attend_reference(q, k, v, doc_BL, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
