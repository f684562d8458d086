"""The VLM as an RL policy: summed response log-probs, and sampling for partial rollouts.

`response_logprobs` scores responses after their prompts (with the prompts' images) in one
forward; the OPMD loss (logp with grad, logp_old without), DPO and the rejection-sampling SFT of
long2short all use it. `RolloutSampler` is replay.rollout_step's generate_fn over model.generate.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from moonforge.model.generate import MEDIA_PAD_ID, generate
from moonforge.model.tokenizer import Tokenizer
from moonforge.model.vlm import VLM
from moonforge.stages.data.chat import ChatPromptItem, prompt_media
from moonforge.stages.rl.opmd import sequence_logprobs
from moonforge.stages.rl.replay import ReplayBuffer


def rollout_stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """The tokenizer's stop ids plus its media pad: a sampled media pad ends the rollout
    (resumed, it would be read as an image slot)."""
    return (*tok.stop_ids, tok.media_pad_id)


def response_logprobs(
    model: VLM,
    items: Sequence[ChatPromptItem],
    responses: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]] | None = None,
    *,
    media_pad_id: int = MEDIA_PAD_ID,
) -> Tensor:
    """(B,) summed log-prob of each response (masked tokens only) after its item's prompt + images.

    Rows are prompt + response, right-padded with doc id -1 (pads attend nothing); grads flow
    unless called under no_grad. `masks[b]` marks which response tokens count (default: all).
    `media_pad_id`: the tokenizer's (tok.media_pad_id); the default is moonforge's own BPE's.
    """
    device = model.lm.embed_tokens.weight.device
    rows = [list(it.prompt_ids) + list(r) for it, r in zip(items, responses)]
    width = max(len(r) for r in rows)
    ids_BL = torch.zeros((len(rows), width), dtype=torch.long)
    resp_BL = torch.zeros((len(rows), width), dtype=torch.bool)
    real_BL = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (it, row) in enumerate(zip(items, rows)):
        ids_BL[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        real_BL[b, : len(row)] = True
        m = [True] * len(responses[b]) if masks is None else list(masks[b])
        resp_BL[b, len(it.prompt_ids) : len(row)] = torch.tensor(m, dtype=torch.bool)
    pos_BL = torch.arange(width).expand(len(rows), width)
    doc_BL = torch.where(real_BL, 0, -1)
    prompt_BL = torch.zeros_like(real_BL)
    for b, it in enumerate(items):
        prompt_BL[b, : len(it.prompt_ids)] = True
    media_BL = (ids_BL == media_pad_id) & prompt_BL  # a sampled media pad is a token, not an image
    media = prompt_media(items, device)
    ids_BL, pos_BL, doc_BL, media_BL = (t.to(device) for t in (ids_BL, pos_BL, doc_BL, media_BL))
    logits_BLV = model(ids_BL, pos_BL, doc_BL, media_BL, **media)
    return sequence_logprobs(logits_BLV, ids_BL, resp_BL.to(device))


class RolloutSampler:
    """rollout_step's generate_fn: samples from the model, with each context's prompt images.

    rollout_step passes contexts only; `expect` queues each upcoming context's item in the order
    rollout_step documents (buffered trajectories oldest first, then the new prompts), so equal
    contexts of different items (same question, other image) still get their own images.
    Stop, pad and media-pad ids are `tok`'s (`rollout_stop_ids`).
    """

    def __init__(
        self,
        model: VLM,
        items: Sequence[ChatPromptItem],
        tok: Tokenizer,
        *,
        temperature: float,
        top_p: float,
        seed: int,
        repeat_ngram: int | None,
        repeat_max: int | None,
    ) -> None:
        self.model, self.items = model, items
        self.sampling: dict[str, Any] = dict(
            temperature=temperature,
            top_p=top_p,
            repeat_ngram=repeat_ngram,
            repeat_max=repeat_max,
            stop_ids=rollout_stop_ids(tok),
            pad_id=tok.pad_id,
            media_pad_id=tok.media_pad_id,
        )
        device = model.lm.embed_tokens.weight.device
        self.generator = torch.Generator(device).manual_seed(seed)
        self.queue: dict[tuple[int, ...], deque[int]] = defaultdict(deque)
        self.num_tokens = 0

    def expect(self, buffer: ReplayBuffer, prompts: Sequence[tuple[tuple, list[int]]]) -> None:
        self.queue.clear()
        for t in buffer.drain():
            buffer.push(t)
            self.queue[tuple(t.context)].append(cast(tuple, t.prompt_id)[0])  # (prompt, it, j)
        for pid, prompt in prompts:
            self.queue[tuple(prompt)].append(pid[0])

    def __call__(self, contexts: list[list[int]], budget: int) -> list[tuple[list[int], list[float], str]]:
        items = [self.items[self.queue[tuple(c)].popleft()] for c in contexts]
        media = prompt_media(items, self.model.lm.embed_tokens.weight.device)
        out = generate(
            self.model,
            contexts,
            max_new_tokens=budget,
            **media,
            generator=self.generator,
            **self.sampling,
        )
        self.num_tokens += sum(out.lengths)
        return list(zip(out.tokens, out.logprobs, out.finish_reasons))
