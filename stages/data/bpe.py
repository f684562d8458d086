"""Train the byte-level BPE tokenizer (dataset `tokenizer`) on the corpus the model will read.

Training text: the `text` train split, plus every caption, alt text, OCR string and QA pair of
the `toyworld` train split (written as "Question: ... Answer: ...", the form the QA documents
use), plus the chat role names. Special tokens (model.tokenizer.SPECIAL_TOKENS) take ids 0..10,
the 256 byte symbols follow, then the merges. The total vocabulary must equal
`tokenizer.vocab_size` exactly, because it is the model's embedding size: a corpus too small to
supply the merges is an error, not a silently smaller vocabulary. Training runs on one thread so
that ties between equally frequent merges resolve the same way on every machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moonforge.model.tokenizer import ROLES, SPECIAL_TOKENS, Tokenizer
from moonforge.stages.data.params import TokenizerParams
from moonforge.stages.data.records import read_image_records, read_text_records


def training_texts(text_dir: Path, toyworld_dir: Path) -> list[str]:
    """The strings the BPE is fitted on, in a fixed order."""
    texts = [r.text for r in read_text_records(text_dir, "train")]
    for r in read_image_records(toyworld_dir, "train"):
        texts += [r.caption, r.alt_text, *([r.ocr] if r.ocr else [])]
        texts += [f"Question: {q.question}\nAnswer: {q.answer}" for q in r.qa]
    texts += [f"{role}\n" for role in ROLES] + ["image"]
    return texts


def train_bpe(texts: list[str], params: TokenizerParams) -> HFTokenizer:
    """Return a trained `tokenizers.Tokenizer` whose total vocabulary is `params.vocab_size`."""
    floor = len(SPECIAL_TOKENS) + 256
    if params.vocab_size <= floor:
        raise ValueError(
            f"tokenizer.vocab_size={params.vocab_size} must exceed {floor} "
            f"({len(SPECIAL_TOKENS)} specials + 256 bytes)"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # tokenizers reads this variable on every parallel call; serial training is reproducible.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != params.vocab_size:
        raise ValueError(
            f"BPE training produced {got} tokens, not tokenizer.vocab_size={params.vocab_size}: "
            f"the corpus supplies too few merges at min_frequency={params.min_frequency}; lower "
            "tokenizer.vocab_size (and model.lm.vocab_size) or min_frequency, or add text"
        )
    return tok


def build_tokenizer(params: TokenizerParams, out: Path, text_dir: Path, toyworld_dir: Path) -> dict:
    """Write `out/tokenizer.json` and a stats file; check the wrapper loads it."""
    out.mkdir(parents=True, exist_ok=True)
    texts = training_texts(text_dir, toyworld_dir)
    hf = train_bpe(texts, params)
    (out / "tokenizer.json").write_text(hf.to_str(pretty=True) + "\n", encoding="utf-8")
    tok = Tokenizer.load(out / "tokenizer.json")
    tok.require_vocab_size(params.vocab_size)
    sample = texts[: min(len(texts), 2000)]
    chars = sum(len(t) for t in sample)
    tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    stats = {
        "vocab_size": tok.vocab_size,
        "num_specials": len(SPECIAL_TOKENS),
        "chars_per_token": round(chars / max(1, tokens), 3),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats
