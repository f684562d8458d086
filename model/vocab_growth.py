"""Grow a checkpoint's vocabulary rows so the embedding agrees with a tokenizer that gained tokens
(`hf_tokenizer.ensure_media_tokens` appends them at the end of the vocabulary).

New rows of both the input embedding and the untied lm_head are the MEAN of the existing rows
(the common choice, Hewitt 2021 "Initializing new word embeddings for pretrained language
models"): a new input token starts as an "average" token instead of a random direction, and a
new output row gives the new token an average logit, so the grown model's distribution over the
old tokens barely moves and no new token is sampled absurdly often before training. Old rows
are kept bit-identical. The mean is taken in float32 and cast to the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

VOCAB_KEYS = (
    "lm.embed_tokens.weight",
    "lm.lm_head.weight",
    "caption.tok_embed.weight",
    "caption.caption_head.weight",
)
"""The (V, D) tensors of a moonforge VLM state dict indexed by token id: the LM's embedding and
lm_head (absent when tied) and the CoCa caption towers' (absent in imported checkpoints)."""


def grow_vocab(
    state_dict: Mapping[str, Tensor], num_rows: int, keys: Sequence[str] = VOCAB_KEYS
) -> dict[str, Tensor]:
    """A copy of `state_dict` whose `keys` tensors have `num_rows` rows (new ones = mean row).

    Keys the state dict lacks are skipped (a tied lm_head, no caption towers). Raises ValueError
    when it has none of them, the tensors disagree on their row count, or `num_rows` is smaller
    than it (shrinking would drop trained rows).
    Example: grow_vocab(sd, tok.vocab_size) after ensure_media_tokens added 4 tokens.
    """
    keys = [k for k in keys if k in state_dict]
    if not keys:
        raise ValueError(
            "state dict has none of the vocabulary tensors; pass keys= naming its embedding and lm_head"
        )
    rows = {k: state_dict[k].shape[0] for k in keys}
    if len(set(rows.values())) != 1:
        raise ValueError(f"vocabulary tensors disagree on their row count: {rows}")
    old = next(iter(rows.values()))
    if num_rows < old:
        raise ValueError(
            f"cannot grow {old} vocabulary rows to {num_rows}: that would drop "
            "trained rows; use a tokenizer with at least as many tokens"
        )
    out = dict(state_dict)
    for k in keys:
        w = state_dict[k]
        mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
        out[k] = torch.cat([w, mean.expand(num_rows - old, -1)], dim=0)
    return out
