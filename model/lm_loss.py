"""Next-token cross-entropy from the final hidden states, over chunks of tokens when the logits
would be big.

At a large vocabulary the (T, V) logits dominate a long micro-batch's activations: 8K tokens x
164K vocab keep 21.5 GB in bf16 (the logits, their fp32 copy, the log-probabilities and the
backward's two gradient buffers). Above `CE_CHUNK_ELEMS` logit entries the loss runs chunk by
chunk, each chunk under activation checkpointing: the forward keeps no logits, and the backward
rebuilds one chunk's at a time (one more lm_head matmul per token). At or below it, one plain
cross-entropy over the tokens.

Only labelled tokens get logits: the hidden states of tokens labelled -100 (prompts and media pads
in SFT, 96% of the tiny recipe's motion-clip phase; media pads, padding and document ends
elsewhere) are dropped before the lm_head, whose matmul at the tiny recipe's 2,048-token
vocabulary costs about half as much as the rest of its LM per token. The loss is the same mean
over the same tokens, bit-identical when every token is labelled; otherwise only the rounding of
the sums can differ, as the dropped tokens' exact zeros no longer take part in them.

Legend: T tokens, D hidden, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CE_CHUNK_ELEMS = 1 << 28
"""Logit entries (tokens x vocab) per chunk: 1 GiB of fp32 logits. Tiny models never reach it."""


def cross_entropy_from_hidden(
    h_TD: Tensor,
    logits_fn: Callable[[Tensor], Tensor],
    labels_T: Tensor,
    vocab_size: int,
    chunk_elems: int | None = None,
    denominator: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy over the labelled tokens (labels != -100) of `logits_fn(h_TD)`, in
    fp32; NaN when no token is labelled (callers check first). `chunk_elems` defaults to
    CE_CHUNK_ELEMS (read at call time). With `denominator`, the sum of the token losses divided
    by it instead (a context-parallel rank's part of a longer sequence's mean; 0 when none of
    its tokens is labelled)."""
    keep_T = labels_T != IGNORE
    if 0 < int(keep_T.sum()) < len(keep_T):  # with none labelled, keep all: the graph still reaches the LM
        h_TD, labels_T = h_TD[keep_T], labels_T[keep_T]
    T = h_TD.shape[0]
    chunk_elems = chunk_elems or CE_CHUNK_ELEMS
    if T * vocab_size <= chunk_elems:
        if denominator is not None:
            return _chunk_ce_sum(logits_fn, h_TD, labels_T) / denominator
        return F.cross_entropy(logits_fn(h_TD).float(), labels_T, ignore_index=IGNORE)
    C = chunk_tokens(vocab_size, chunk_elems)
    sums = [
        checkpoint(_chunk_ce_sum, logits_fn, h_TD[lo : lo + C], labels_T[lo : lo + C], use_reentrant=False)
        for lo in range(0, T, C)
    ]
    return sum(sums[1:], sums[0]) / (denominator if denominator is not None else (labels_T != IGNORE).sum())


def chunk_tokens(vocab_size: int, chunk_elems: int | None = None) -> int:
    """Tokens per chunk at `vocab_size` (at least one)."""
    return max(1, (chunk_elems or CE_CHUNK_ELEMS) // vocab_size)


def _chunk_ce_sum(logits_fn: Callable[[Tensor], Tensor], h_CD: Tensor, labels_C: Tensor) -> Tensor:
    return F.cross_entropy(logits_fn(h_CD).float(), labels_C, ignore_index=IGNORE, reduction="sum")
