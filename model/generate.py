"""Batched autoregressive generation from a `VLM`: KV-cached or full-recompute, with sampling,
stop ids, repeat detection and per-token logprobs (what RL rollouts need).

Prompts of different lengths are LEFT-padded into one batch: pad positions get doc id -1, so
`attention.segment_ids` isolates them (a real token never attends a pad) and every row's
positions start at 0 at its first real token. Each row is then exactly what an unpadded
single-prompt forward computes. Image prompts carry `<|media_pad|>` ids; the image tokens are
scattered at prefill by `VLM.embed`, exactly as in `VLM.forward`.

What is unusual:
- Two interchangeable decoders: `CachedDecoder` (prefill once, then one position per step over a
  `KVCache`; finished rows are dropped from the cache) and `FullDecoder` (re-runs
  `VLM.forward` over prompt + generated tokens every step; the benchmark baseline and the parity
  oracle). Both return next-token logits for the rows still generating.
- Logprobs are under the model's unmodified softmax (temperature 1, no top-p), whatever the
  sampling settings: log pi(token | prefix), the quantity policy-gradient RL needs.
- The stop token is kept in the output (and gets a logprob); the sequence ends after it.
- The model is run in eval mode (the MoE router does not count loads) under no_grad, and every
  submodule's train/eval flag is restored afterwards.

Legend: B prompts (batch rows), L padded sequence length, V vocab, R rows still generating.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moonforge.model.kv_cache import KVCache
from moonforge.model.tokenizer import SPECIAL_TOKENS
from moonforge.model.vlm import VLM

FinishReason = Literal["stop", "length", "repeat"]

# Defaults: the ids of moonforge's own BPE (its build numbers specials in SPECIAL_TOKENS order).
# A caller holding a Tokenizer passes tok.stop_ids / tok.pad_id / tok.media_pad_id instead, which
# equal these for our BPE and differ for an imported checkpoint's tokenizer (qwen, llama3).
DEFAULT_STOP_IDS = (SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>"))
"""<|im_end|> and <|endoftext|> of moonforge's own BPE (= its Tokenizer.stop_ids)."""
MEDIA_PAD_ID = SPECIAL_TOKENS.index("<|media_pad|>")
"""Id of <|media_pad|>, whose prompt positions receive image tokens (= Tokenizer.media_pad_id)."""
PAD_ID = SPECIAL_TOKENS.index("<|pad|>")
"""Fed at padding positions; its value never matters (pads are masked by doc id -1)."""


@dataclass(frozen=True)
class GenerationOutput:
    """Per prompt, in prompt order: generated ids (no prompt; a stop token is included),
    their logprobs under the unmodified model softmax, why generation ended, and the length."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    lengths: list[int]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = PAD_ID, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids_BL, position_ids_BL, doc_ids_BL) of right-aligned prompts, L = longest prompt.

    Pads get `pad_id`, position 0 and doc id -1; real tokens doc id 0 and positions 0, 1, ...
    Example: [[5, 6], [7]] -> ids [[5, 6], [pad, 7]], pos [[0, 1], [0, 0]], doc [[0, 0], [-1, 0]].
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    L = max(len(p) for p in prompts)
    ids_BL = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BL[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    num_pad_B1 = torch.tensor([[L - len(p)] for p in prompts])
    pos_BL = (torch.arange(L)[None, :] - num_pad_B1).clamp(min=0)
    doc_BL = torch.where(torch.arange(L)[None, :] < num_pad_B1, -1, 0)
    return ids_BL.to(device), pos_BL.to(device), doc_BL.to(device)


class _Decoder:
    """Left-padded prompts (ids, positions, doc ids), their media mask and images on the model's
    device: what both decoders start from."""

    def __init__(
        self,
        model: VLM,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        media_mask_BL: Tensor,
        pixels_NP: Tensor | None,
        grid_hw: Tensor | None,
        pad_id: int = PAD_ID,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> None:
        self.model, self.pad_id = model, pad_id
        device = model.lm.embed_tokens.weight.device
        self.ids_BL, self.pos_BL, self.doc_BL = left_pad(prompts, pad_id, device=device)
        self.media_mask_BL = media_mask_BL.to(device)
        self.media = {
            "pixels_NP": pixels_NP,
            "grid_hw": grid_hw,
            "media_t": media_t,
            "media_group": media_group,
        }


class CachedDecoder(_Decoder):
    """Prefill the padded prompts into a `KVCache`, then decode one position per step."""

    def __init__(
        self,
        model: VLM,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        media_mask_BL: Tensor,
        pixels_NP: Tensor | None,
        grid_hw: Tensor | None,
        pad_id: int = PAD_ID,
        media_t: Tensor | None = None,
        media_group: Tensor | None = None,
    ) -> None:
        super().__init__(
            model, prompts, max_new_tokens, media_mask_BL, pixels_NP, grid_hw, pad_id, media_t, media_group
        )
        device = self.ids_BL.device
        B, L = self.ids_BL.shape
        self.cache = KVCache(len(model.lm.layers), B, L + max_new_tokens, device)
        self.rows = list(range(B))
        self.next_pos_R = self.pos_BL[:, -1] + 1

    def prefill(self) -> Tensor:
        """Logits (B, V) for the first new token of every prompt."""
        h_BLD = self.model.embed(self.ids_BL, self.media_mask_BL, **self.media)
        h_BLD = self.model.lm.hidden_cached(h_BLD, self.pos_BL, self.doc_BL, self.cache)
        return self.model.lm.logits(h_BLD[:, -1])

    def step(self, rows: Sequence[int], next_ids_R: Tensor) -> Tensor:
        """Append `next_ids_R` to prompts `rows` (a shrinking, increasing subset of the batch);
        returns their next-token logits (R, V)."""
        if list(rows) != self.rows:
            where = {r: i for i, r in enumerate(self.rows)}
            keep_R = torch.tensor([where[r] for r in rows], device=next_ids_R.device)
            self.cache.keep(keep_R)
            self.next_pos_R = self.next_pos_R[keep_R]
            self.rows = list(rows)
        lm = self.model.lm
        h_R1D = lm.hidden_cached(
            lm.embed(next_ids_R[:, None]),
            self.next_pos_R[:, None],
            torch.zeros_like(next_ids_R)[:, None],
            self.cache,
        )
        self.next_pos_R = self.next_pos_R + 1
        return lm.logits(h_R1D[:, 0])


class FullDecoder(_Decoder):
    """No cache: every step runs `VLM.forward` over the whole padded batch (finished rows get
    doc-id -1 pads, which touch nothing) and reads the last position's logits."""

    def prefill(self) -> Tensor:
        """Logits (B, V) for the first new token of every prompt."""
        return self.model(self.ids_BL, self.pos_BL, self.doc_BL, self.media_mask_BL, **self.media)[:, -1]

    def step(self, rows: Sequence[int], next_ids_R: Tensor) -> Tensor:
        """As `CachedDecoder.step`, recomputing everything."""
        rows_R = torch.tensor(list(rows), device=self.ids_BL.device)
        ids_B = torch.full_like(self.ids_BL[:, -1], self.pad_id).index_copy(0, rows_R, next_ids_R)
        doc_B = torch.full_like(self.doc_BL[:, -1], -1).index_fill(0, rows_R, 0)
        pos_B = self.pos_BL.max(dim=1).values + 1
        self.ids_BL = torch.cat([self.ids_BL, ids_B[:, None]], dim=1)
        self.pos_BL = torch.cat([self.pos_BL, pos_B[:, None]], dim=1)
        self.doc_BL = torch.cat([self.doc_BL, doc_B[:, None]], dim=1)
        no_media_B1 = torch.zeros_like(ids_B[:, None], dtype=torch.bool)
        self.media_mask_BL = torch.cat([self.media_mask_BL, no_media_B1], dim=1)
        logits_BLV = self.model(self.ids_BL, self.pos_BL, self.doc_BL, self.media_mask_BL, **self.media)
        return logits_BLV[rows_R, -1]


def top_p_filter(probs_RV: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p`, then
    renormalise (the most likely token is always kept). Example: [0.5, 0.3, 0.2], top_p 0.7
    -> [0.625, 0.375, 0]."""
    if top_p >= 1.0:
        return probs_RV
    sorted_RV, order_RV = probs_RV.sort(dim=-1, descending=True)
    mass_before_RV = sorted_RV.cumsum(-1) - sorted_RV
    sorted_RV = sorted_RV.masked_fill(mass_before_RV >= top_p, 0.0)
    kept_RV = torch.zeros_like(probs_RV).scatter(-1, order_RV, sorted_RV)
    return kept_RV / kept_RV.sum(-1, keepdim=True)


def sample(logits_RV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token ids (R,): argmax when temperature == 0, else a draw from
    top_p_filter(softmax(logits / temperature))."""
    if temperature == 0:
        return logits_RV.argmax(-1)
    probs_RV = torch.softmax(logits_RV.float() / temperature, dim=-1)
    return torch.multinomial(top_p_filter(probs_RV, top_p), 1, generator=generator)[:, 0]


class RepeatDetector:
    """Flags a generation stuck in a loop: the n-gram just completed (size `ngram`) has now
    occurred `max_count` times in this generation (overlapping occurrences count).

    A loop of any period p triggers after about (max_count - 1) * p + ngram tokens; a single
    repeated token after ngram + max_count - 1. O(1) per token.
    Example: ngram 2, max_count 3: pushing 1 2 1 2 1 2 flags at the last 2.
    """

    def __init__(self, ngram: int, max_count: int) -> None:
        if ngram < 1 or max_count < 2:
            raise ValueError(
                f"repeat_ngram={ngram} must be >= 1 and repeat_max={max_count} "
                ">= 2 (one occurrence is not a repeat)"
            )
        self.ngram, self.max_count = ngram, max_count
        self.tail: list[int] = []
        self.counts: Counter[tuple[int, ...]] = Counter()

    def push(self, token: int) -> bool:
        """Add one generated token; True when the generation should end as "repeat"."""
        self.tail = (self.tail + [token])[-self.ngram :]
        if len(self.tail) < self.ngram:
            return False
        key = tuple(self.tail)
        self.counts[key] += 1
        return self.counts[key] >= self.max_count


def _check_args(
    max_new_tokens: int, temperature: float, top_p: float, repeat_ngram: int | None, repeat_max: int | None
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if (repeat_ngram is None) != (repeat_max is None):
        raise ValueError("set both repeat_ngram and repeat_max to detect repeats, or neither")


@torch.no_grad()
def generate(
    model: VLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
    pixels_NP: Tensor | None = None,
    grid_hw: Tensor | None = None,
    media_t: Tensor | None = None,
    media_group: Tensor | None = None,
    media_pad_id: int = MEDIA_PAD_ID,
    pad_id: int = PAD_ID,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    repeat_ngram: int | None = None,
    repeat_max: int | None = None,
) -> GenerationOutput:
    """Continue every prompt by up to `max_new_tokens` tokens.

    prompts: token id lists of any lengths (batched with left padding). Images: the prompts'
    `media_pad_id` positions receive the tokens of `pixels_NP` / `grid_hw` (all images of all
    prompts, in prompt order), as in `VLM.forward`; with `media_t` / `media_group` some grid
    entries are temporal patches of video clips (`VLM.embed`). temperature 0 is greedy; otherwise tokens
    are drawn from top_p_filter(softmax(logits / temperature)) with `generator` (or a fresh one
    seeded with `seed`; neither -> torch's global RNG). A row ends at its first `stop_ids` token
    ("stop", token kept), at `max_new_tokens` ("length"), or when `RepeatDetector(repeat_ngram,
    repeat_max)` fires ("repeat"). `use_cache=False` recomputes the full forward every step.
    Token ids: pass the tokenizer's (stop_ids=tok.stop_ids, pad_id=tok.pad_id,
    media_pad_id=tok.media_pad_id); the defaults are those of moonforge's own BPE.
    Example: generate(vlm, [[3, 17, 42]], max_new_tokens=8, temperature=0).tokens[0]
    """
    _check_args(max_new_tokens, temperature, top_p, repeat_ngram, repeat_max)
    device = model.lm.embed_tokens.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    ids_BL, _, doc_BL = left_pad(prompts, pad_id)
    media_mask_BL = (ids_BL == media_pad_id) & (doc_BL >= 0)
    decoder_cls = CachedDecoder if use_cache else FullDecoder
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        decoder = decoder_cls(
            model, prompts, max_new_tokens, media_mask_BL, pixels_NP, grid_hw, pad_id, media_t, media_group
        )
        return _decode_loop(
            decoder,
            len(prompts),
            max_new_tokens,
            temperature,
            top_p,
            frozenset(stop_ids),
            generator,
            repeat_ngram,
            repeat_max,
        )
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def _decode_loop(
    decoder: CachedDecoder | FullDecoder,
    B: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: frozenset[int],
    generator: torch.Generator | None,
    repeat_ngram: int | None,
    repeat_max: int | None,
) -> GenerationOutput:
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    reasons: list[FinishReason] = ["length"] * B
    detectors = (
        [RepeatDetector(repeat_ngram, repeat_max) for _ in range(B)]
        if repeat_ngram is not None and repeat_max is not None
        else None
    )
    rows = list(range(B))
    logits_RV = decoder.prefill()
    for _ in range(max_new_tokens):
        next_R = sample(logits_RV, temperature, top_p, generator)
        logp_R = torch.log_softmax(logits_RV.float(), -1).gather(-1, next_R[:, None])[:, 0]
        still, keep = [], []  # prompt indices still generating, and their places in `rows`
        for i, (r, tok, lp) in enumerate(zip(rows, next_R.tolist(), logp_R.tolist())):
            tokens[r].append(tok)
            logprobs[r].append(lp)
            if tok in stop_ids:
                reasons[r] = "stop"
            elif detectors is not None and detectors[r].push(tok):
                reasons[r] = "repeat"
            elif len(tokens[r]) < max_new_tokens:
                still.append(r)
                keep.append(i)
        if not still:
            break
        rows = still
        logits_RV = decoder.step(rows, next_R[torch.tensor(keep, device=next_R.device)])
    return GenerationOutput(tokens, logprobs, reasons, [len(t) for t in tokens])
