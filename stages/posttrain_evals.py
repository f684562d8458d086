"""Post-training evals: answer accuracy of generated responses (SFT, long-CoT SFT, RL, long2short).

`answer_accuracy` continues chat prompts (`chat_prompt_items`: prompt ids ending in the open
assistant header, plus the prompt's image patches) with KV-cached generation, decodes each
response, and scores it with the item's verifier on the extracted final answer
(`verifiers.score`: text after the last "Answer:", else the last non-empty line). Greedy
(temperature 0) by default, so it is deterministic; a sampled eval (temperature, top_p) is seeded.

Result keys (floats unless noted):
    acc                 mean 0/1 reward over the items
    mean_len            mean generated tokens per response, the stop token included
    acc_per_1k_tokens   acc / (mean_len / 1000) (efficiency.accuracy_per_1k_tokens)
    n                   number of items scored
    verifier_errors     verifier calls that raised (each scored 0)
    by_kind             dict kind -> accuracy ("text" / "image" / "video"; only kinds present)
    items               list[ItemResult] in input order (only with return_items=True)
`as_metrics` flattens a result into metric names for a sink / StageResult.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from moonforge.model.generate import generate
from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data.chat import ChatPromptItem, prompt_media

if TYPE_CHECKING:
    from moonforge.stages.rl.verifiers import VerifyStats

KINDS = ("text", "image")


@dataclass(frozen=True)
class ItemResult:
    """One scored generation."""

    record_id: str
    kind: str
    response: str
    """Decoded generated text (special tokens dropped)."""
    answer: str
    """The reference answer."""
    reward: float
    length: int
    """Generated tokens, the stop token included."""
    finish_reason: str


def generate_responses(
    model,
    tokenizer: Tokenizer,
    items: Sequence[ChatPromptItem],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    repeat_ngram: int | None = None,
    repeat_max: int | None = None,
) -> list[tuple[str, int, str]]:
    """(decoded response, generated length, finish reason) per item, in input order.

    Items are batched in order of prompt length (less left padding); each row is exactly its
    unpadded generation, so the batching does not change greedy results.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = model.lm.embed_tokens.weight.device
    order = sorted(range(len(items)), key=lambda i: (len(items[i].prompt_ids), i))
    out: list[tuple[str, int, str] | None] = [None] * len(items)
    with _one_thread_on_cpu(device):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [items[i] for i in idx]
            media = prompt_media(batch, device)
            gen = generate(
                model,
                [it.prompt_ids for it in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                **media,
                seed=seed + start,
                use_cache=True,
                stop_ids=tokenizer.stop_ids,
                pad_id=tokenizer.pad_id,
                media_pad_id=tokenizer.media_pad_id,
                repeat_ngram=repeat_ngram,
                repeat_max=repeat_max,
            )
            for j, i in enumerate(idx):
                out[i] = (tokenizer.decode(gen.tokens[j]), gen.lengths[j], gen.finish_reasons[j])
    return out  # type: ignore[return-value]


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Decode steps are tiny ops: on CPU extra intra-op threads only add sync cost (10x slower on
    a busy 2-core machine), so generation runs on one thread and restores the setting."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def answer_accuracy(
    model,
    tokenizer: Tokenizer,
    items: Sequence[ChatPromptItem],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    verifier_stats: VerifyStats | None = None,
    seed: int = 0,
    repeat_ngram: int | None = None,
    repeat_max: int | None = None,
    return_items: bool = False,
) -> dict:
    """Generate an answer for every item and score it with the item's verifier.

    Returns {"acc", "mean_len", "acc_per_1k_tokens", "n", "verifier_errors", "by_kind"} (+ "items"
    with return_items). `verifier_stats`, when given, accumulates the verifier calls and errors.
    Example: answer_accuracy(vlm, tok, items, max_new_tokens=16, batch_size=8)["acc"] -> 0.42
    """
    if not items:
        raise ValueError("answer_accuracy needs at least one item (the eval set is empty)")
    gens = generate_responses(
        model,
        tokenizer,
        items,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repeat_ngram=repeat_ngram,
        repeat_max=repeat_max,
    )
    return score_responses(items, gens, verifier_stats, return_items)


def score_responses(
    items: Sequence[ChatPromptItem],
    gens: Sequence[tuple[str, int, str]],
    verifier_stats: VerifyStats | None = None,
    return_items: bool = False,
) -> dict:
    """The answer_accuracy result of already generated (response, length, finish_reason)s."""
    # Imported here: the rl package imports this module (its stages use answer_accuracy).
    from moonforge.stages.rl.efficiency import accuracy_per_1k_tokens
    from moonforge.stages.rl.verifiers import VerifyStats, score

    if len(items) != len(gens) or not items:
        raise ValueError(f"need one generation per item; got {len(gens)} for {len(items)} items")
    stats = verifier_stats if verifier_stats is not None else VerifyStats()
    errors_before = stats.num_errors
    results = [
        ItemResult(
            it.record_id, it.kind, text, it.answer, score(it.verifier, text, it.answer, stats), length, reason
        )
        for it, (text, length, reason) in zip(items, gens)
    ]
    acc = sum(r.reward for r in results) / len(results)
    mean_len = sum(r.length for r in results) / len(results)
    by_kind = {}
    for kind in sorted({r.kind for r in results}):
        rs = [r.reward for r in results if r.kind == kind]
        by_kind[kind] = sum(rs) / len(rs)
    out = {
        "acc": acc,
        "mean_len": mean_len,
        "acc_per_1k_tokens": accuracy_per_1k_tokens(acc, mean_len),
        "n": float(len(results)),
        "verifier_errors": float(stats.num_errors - errors_before),
        "by_kind": by_kind,
    }
    if return_items:
        out["items"] = results
    return out


def as_metrics(result: dict, prefix: str = "eval/", suffix: str = "") -> dict[str, float]:
    """Flatten an answer_accuracy result: {prefix}acc{suffix}, ..., {prefix}{kind}_acc{suffix}.

    Example: as_metrics(r, "eval/", "_before") -> {"eval/acc_before": .., "eval/text_acc_before": ..}
    """
    out = {
        f"{prefix}{k}{suffix}": float(result[k])
        for k in ("acc", "mean_len", "acc_per_1k_tokens", "n", "verifier_errors")
    }
    out.update({f"{prefix}{kind}_acc{suffix}": v for kind, v in result["by_kind"].items()})
    return out


def answer_budget(tok: Tokenizer, items, margin: int = 2) -> int:
    """max_new_tokens for an eval set: its longest reference answer + <|im_end|> + margin."""
    return max(len(tok.encode(it.answer)) for it in items) + 1 + margin


def set_metrics(
    model,
    tok: Tokenizer,
    name: str,
    items: Sequence[ChatPromptItem],
    batch_size: int,
    suffix: str = "",
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """eval/<name>_acc{suffix} and eval/<name>_n{suffix}: greedy answers to a declared set's
    prompts, each scored by its verifier (a chat's last answer by exact match), with
    answer_budget new tokens unless `max_new_tokens` says; a set mixing text, image and video
    prompts also gets eval/<name>_<kind>_acc{suffix} per kind."""
    budget = max_new_tokens or answer_budget(tok, items)
    res = answer_accuracy(model, tok, items, max_new_tokens=budget, batch_size=batch_size)
    out = {f"eval/{name}_acc{suffix}": res["acc"], f"eval/{name}_n{suffix}": res["n"]}
    if len(res["by_kind"]) > 1:
        out.update({f"eval/{name}_{k}_acc{suffix}": v for k, v in res["by_kind"].items()})
    return out


def with_other_images(items: Sequence[ChatPromptItem]) -> list[ChatPromptItem]:
    """The image (and video) items, each with the pixels of the next such item whose patch grids
    and clip layout are the same (an item no other shares keeps its own): the control that tells
    a model reading its images from one answering from the question alone (evals.other_image is
    the teacher-forced one)."""

    def layout(it: ChatPromptItem) -> tuple:  # grids, and for a video which entries are one clip
        per = (it.grid_hw, it.media_t, it.media_group)
        return tuple(tuple(t.flatten().tolist()) if t is not None else () for t in per)

    shown = [(it, layout(it)) for it in items if it.pixels_NP is not None and it.grid_hw is not None]
    by_grid: dict[tuple[int, ...], list[int]] = {}
    for i, (_, grids) in enumerate(shown):
        by_grid.setdefault(grids, []).append(i)
    out = []
    for i, (it, grids) in enumerate(shown):
        same = by_grid[grids]
        other = shown[same[(same.index(i) + 1) % len(same)]][0]
        out.append(replace(it, pixels_NP=other.pixels_NP))
    return out


def split_by_kind(items: Sequence[ChatPromptItem], per_kind: int) -> list[ChatPromptItem]:
    """The first `per_kind` items of each kind ("text" then "image"), a balanced eval set."""
    out: list[ChatPromptItem] = []
    for kind in KINDS:
        out.extend([it for it in items if it.kind == kind][:per_kind])
    return out
