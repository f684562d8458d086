"""Tokenizer wrapper: a `tokenizer.json` plus the chat dialect its special tokens speak.

The vocabulary is either moonforge's own byte-level BPE (built by the `tokenizer` dataset stage,
specials named as Kimi-VL's, ids 0..10) or an imported Hugging Face checkpoint's
`tokenizer.json`. moonforge's chat and media roles (turn header, turn end, image placeholder,
stop, pad) are mapped onto the tokenizer's OWN special tokens through a `ChatDialect`, detected
from the vocabulary: `kimi` (ours and Kimi-VL), `qwen`, `llama3`. Conventions callers rely on:

* `encode(text)` never produces a special token, even if `text` contains a literal
  "<|im_end|>": specials enter a sequence only through this module (`media_placeholder`,
  `encode_chat`) or by id, so user content cannot forge turn boundaries.
* An image becomes the dialect's placeholder with N media pads, N = (h / merge) * (w / merge)
  (kimi: `<|media_start|> image <|media_content|> N x <|media_pad|> <|media_end|>`); the
  projected vision features are scattered into the `media_pad_id` positions in order.
* `encode_chat` tokenizes exactly as Hugging Face's `apply_chat_template` does with the chat
  template `hf_tokenizer.chat_template` writes: the text between two special tokens is encoded
  as ONE string (so header text such as qwen's "user\\n" and the content share a pre-tokenizer
  pass). Its loss mask is aligned with the ids: mask[t] = 1 on assistant content and the turn-end
  special closing an assistant turn; 0 elsewhere (headers, qwen's "\\n" between turns, image
  placeholders inside any turn). A token straddling header text and content (e.g. "\\n " when
  content starts with a space) counts as content, so no content character goes unsupervised.

Only `tokenizers` and the standard library are imported here (model/ does no I/O beyond load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|pad|>",
    "<|im_system|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_middle|>",
    "<|im_end|>",
    "<|media_start|>",
    "<|media_content|>",
    "<|media_pad|>",
    "<|media_end|>",
)
"""Every special token of moonforge's own BPE, in id order (the build gives them ids 0..10)."""

IMAGE_MARKER = "<image>"
"""Where an image goes in a chat message's content."""

ROLES = ("system", "user", "assistant")

_SPECIAL_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
"""Dialect templates write special tokens as <|name|>; everything else in them is plain text."""


@dataclass(frozen=True)
class ChatDialect:
    """How one model family writes a dialogue, as token strings.

    `header` opens a turn ("{role}" is the role name); `turn_end` (one special) closes it and is
    the supervised end of an assistant turn; `turn_sep` is plain text after it (never supervised,
    never generated: generation stops at turn_end). `image` is the placeholder, "{pads}" standing
    for N x `media_pad`. `bos` is written once before the first turn. `stops`, `eos` and `pad`
    are candidates in preference order; those present in the vocabulary are used.
    """

    name: str
    marker: str
    """A special token only this dialect has: its presence in a vocabulary selects the dialect."""
    header: str
    turn_end: str
    image: str
    media_pad: str
    stops: tuple[str, ...]
    """Extra stop tokens after turn_end (every one present ends generation)."""
    eos: tuple[str, ...]
    """Document-end token (appended to pretraining documents), first present wins."""
    pad: tuple[str, ...]
    """Fed at padding positions (value never matters: pads are masked), first present wins."""
    turn_sep: str = ""
    bos: str | None = None

    def __post_init__(self) -> None:
        if "{pads}" not in self.image or "{role}" not in self.header:
            raise ValueError(f"dialect {self.name}: image needs '{{pads}}' and header '{{role}}'")

    @property
    def specials(self) -> tuple[str, ...]:
        """Every special token the templates write, in first-use order (all are required)."""
        text = "".join(
            [
                self.bos or "",
                *(self.header.format(role=r) for r in ROLES),
                self.turn_end,
                self.image.format(pads=self.media_pad),
            ]
        )
        return tuple(dict.fromkeys(_SPECIAL_RE.findall(text)))


KIMI = ChatDialect(
    name="kimi",
    marker="<|im_middle|>",
    header="<|im_{role}|>{role}<|im_middle|>",
    turn_end="<|im_end|>",
    image="<|media_start|>image<|media_content|>{pads}<|media_end|>",
    media_pad="<|media_pad|>",
    stops=("<|endoftext|>", "[EOS]"),
    eos=("<|endoftext|>", "[EOS]"),
    pad=("<|pad|>", "[PAD]", "<|endoftext|>", "[EOS]"),
)
"""moonforge's own BPE and Kimi-VL: no newlines between turns; our eos is <|endoftext|>,
Kimi-VL's [EOS]."""

QWEN = ChatDialect(
    name="qwen",
    marker="<|im_start|>",
    header="<|im_start|>{role}\n",
    turn_end="<|im_end|>",
    turn_sep="\n",
    image="<|vision_start|>{pads}<|vision_end|>",
    media_pad="<|image_pad|>",
    stops=("<|endoftext|>",),
    eos=("<|endoftext|>",),
    pad=("<|endoftext|>",),
)
"""Qwen2 / Qwen2-VL ChatML (no default system prompt is inserted)."""

LLAMA3 = ChatDialect(
    name="llama3",
    marker="<|start_header_id|>",
    bos="<|begin_of_text|>",
    header="<|start_header_id|>{role}<|end_header_id|>\n\n",
    turn_end="<|eot_id|>",
    image="<|media_start|>image<|media_content|>{pads}<|media_end|>",
    media_pad="<|media_pad|>",
    stops=("<|end_of_text|>", "<|eom_id|>"),
    eos=("<|end_of_text|>",),
    pad=("<|finetune_right_pad_id|>", "<|end_of_text|>"),
)
"""Llama 3 (content not trimmed); no native image tokens: `ensure_media_tokens` adds kimi's."""

DIALECTS = {d.name: d for d in (KIMI, QWEN, LLAMA3)}


def special_token_ids(hf: HFTokenizer) -> dict[str, int]:
    """Content -> id of every token the tokenizer registers as special."""
    return {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}


def detect_dialect(hf: HFTokenizer, dialect: ChatDialect | str | None = None) -> ChatDialect:
    """The dialect named (by object or name), else the one whose marker the vocabulary has."""
    if isinstance(dialect, ChatDialect):
        return dialect
    if dialect is not None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown chat dialect {dialect!r}; use one of {sorted(DIALECTS)}")
        return DIALECTS[dialect]
    have = special_token_ids(hf)
    found = [d for d in DIALECTS.values() if d.marker in have]
    if len(found) != 1:
        markers = {d.name: d.marker for d in DIALECTS.values()}
        raise ValueError(
            f"cannot tell the chat dialect: the vocabulary has special markers of "
            f"{[d.name for d in found] or 'none'} (markers {markers}); pass dialect="
        )
    return found[0]


def _first_present(candidates: Sequence[str], have: Mapping[str, int]) -> int | None:
    return next((have[c] for c in candidates if c in have), None)


class Tokenizer:
    """A loaded `tokenizer.json`, its chat dialect and the ids moonforge needs.

    Generic attributes: dialect, vocab_size (including specials; equals the model's embedding
    rows), special_ids, eos_id (document end), pad_id, bos_id (None unless the dialect writes
    one), turn_end_id, stop_ids (turn end first: what generation stops at), media_pad_id.
    Kimi names, each the id of that exact token or None where the vocabulary lacks it:
    im_system_id, im_user_id, im_assistant_id, im_middle_id, im_end_id, media_start_id,
    media_content_id, media_end_id.
    """

    def __init__(self, hf: HFTokenizer, dialect: ChatDialect | str | None = None):
        self._hf = hf
        # Specials in user text are encoded as plain bytes, never as control tokens.
        self._hf.encode_special_tokens = True
        self.dialect = d = detect_dialect(hf, dialect)
        have = special_token_ids(hf)
        eos, pad = _first_present(d.eos, have), _first_present(d.pad, have)
        missing = [t for t in d.specials if t not in have]
        missing += [f"one of {c}" for c, i in ((d.eos, eos), (d.pad, pad)) if i is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the {d.name} dialect's special tokens {missing}; moonforge's "
                "own: rebuild it with `dvc repro tokenizer` (moonforge.stages.data.bpe adds them); "
                "an imported one: add them with moonforge.model.hf_tokenizer.ensure_media_tokens "
                "and grow the embedding rows to match (moonforge.model.vocab_growth.grow_vocab)"
            )
        assert eos is not None and pad is not None  # a missing one is in `missing`, refused above
        self._special = have
        self.special_ids = frozenset(have.values())
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.pad_id = eos, pad
        self.bos_id = have[d.bos] if d.bos else None
        self.turn_end_id, self.media_pad_id = have[d.turn_end], have[d.media_pad]
        extra_stops = [have[s] for s in d.stops if s in have]
        self.stop_ids = tuple(dict.fromkeys([self.turn_end_id, *extra_stops]))
        self.im_system_id, self.im_user_id = have.get("<|im_system|>"), have.get("<|im_user|>")
        self.im_assistant_id = have.get("<|im_assistant|>")
        self.im_middle_id, self.im_end_id = have.get("<|im_middle|>"), have.get("<|im_end|>")
        self.media_start_id = have.get("<|media_start|>")
        self.media_content_id = have.get("<|media_content|>")
        self.media_end_id = have.get("<|media_end|>")
        self._headers = {role: self._pieces(d.header.format(role=role)) for role in ROLES}
        pre, post = d.image.split("{pads}")
        self._image = (self._pieces(pre), self._pieces(post))

    @classmethod
    def load(cls, path: str | Path, dialect: ChatDialect | str | None = None) -> Tokenizer:
        """Load `path` (a tokenizer.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; build it with `dvc repro tokenizer`")
        return cls(HFTokenizer.from_file(str(path)), dialect)

    def _pieces(self, template: str) -> list[int | str]:
        """A rendered template as special ids and plain-text runs (e.g. [id, "user\\n"])."""
        specials = _SPECIAL_RE.findall(template)
        out: list[int | str] = []
        for k, part in enumerate(_SPECIAL_RE.split(template)):
            if k > 0:
                out.append(self._special[specials[k - 1]])
            if part:
                out.append(part)
        return out

    def require_vocab_size(self, expected: int, *, allow_spare_rows: bool = False) -> None:
        """Raise unless the vocabulary has exactly `expected` entries (the model's embedding rows).

        allow_spare_rows: accept fewer tokens than rows (imported checkpoints often round the
        embedding up to a multiple of 64 or 128); more tokens than rows is always an error.
        """
        if self.vocab_size > expected:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model expects vocab_size="
                f"{expected}: ids {expected}..{self.vocab_size - 1} would index past the embedding. "
                f"Grow the checkpoint's lm.embed_tokens / lm.lm_head rows to {self.vocab_size} "
                "(moonforge.model.vocab_growth.grow_vocab, needed after ensure_media_tokens added "
                f"tokens) and set model.lm.vocab_size: {self.vocab_size}, or use the tokenizer the "
                "checkpoint was trained with"
            )
        if self.vocab_size < expected and not allow_spare_rows:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model expects vocab_size="
                f"{expected}; set model.lm.vocab_size: {self.vocab_size} in the recipe or "
                f"rebuild the tokenizer with tokenizer.vocab_size: {expected} in params.yaml"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping special tokens (media placeholders vanish, kimi's "image" stays)."""
        return self._hf.decode([i for i in ids if i not in self.special_ids])

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of `token_id` (e.g. "<|im_end|>")."""
        token = self._hf.id_to_token(token_id)
        if token is None:
            raise ValueError(f"id {token_id} is outside the vocabulary of {self.vocab_size}")
        return token

    def to_json(self) -> str:
        """The `tokenizer.json` text (what Hugging Face `tokenizers` and transformers load)."""
        return self._hf.to_str(pretty=True)

    def media_placeholder(self, num_tokens: int) -> list[int]:
        """The dialect's image placeholder with `num_tokens` media pads, e.g. (kimi)
        <|media_start|> image <|media_content|> num_tokens x <|media_pad|> <|media_end|>."""
        if num_tokens <= 0:
            raise ValueError(f"an image needs at least one media token, got {num_tokens}")
        return self._encode_pieces([(p, 0) for p in self._image_pieces(num_tokens)])[0]

    def _image_pieces(self, num_tokens: int) -> list[int | str]:
        pre, post = self._image
        return [*pre, *([self.media_pad_id] * num_tokens), *post]

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        num_image_tokens: Sequence[int] = (),
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a dialogue; the k-th "<image>" gets num_image_tokens[k] pads.

        Example (kimi): [{"role": "user", "content": "<image>\\nWhat color?"},
                         {"role": "assistant", "content": "red"}] with num_image_tokens=[4]
        -> <|im_user|> user <|im_middle|> [placeholder of 4] \\n What color? <|im_end|>
           <|im_assistant|> assistant <|im_middle|> red <|im_end|>
        with mask 1 only on "red" and the last <|im_end|>. `add_generation_prompt` appends an
        open assistant header (mask 0) for generation.
        """
        _check_dialogue(messages, num_image_tokens)
        pieces: list[tuple[int | str, int]] = []  # (special id or text, target)
        if self.bos_id is not None:
            pieces.append((self.bos_id, 0))
        images = iter(num_image_tokens)
        for msg in messages:
            role, target = msg["role"], int(msg["role"] == "assistant")
            pieces += [(p, 0) for p in self._headers[role]]
            for k, part in enumerate(msg["content"].split(IMAGE_MARKER)):
                if k > 0:
                    pieces += [(p, 0) for p in self._image_pieces(next(images))]
                if part:
                    pieces.append((part, target))
            pieces.append((self.turn_end_id, target))
            if self.dialect.turn_sep:
                pieces.append((self.dialect.turn_sep, 0))
        if add_generation_prompt:
            pieces += [(p, 0) for p in self._headers["assistant"]]
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces: Sequence[tuple[int | str, int]]) -> tuple[list[int], list[int]]:
        """Specials by id; each maximal run of text encoded as one string (as HF does with a
        rendered template), a token a target when it overlaps target text."""
        ids: list[int] = []
        mask: list[int] = []
        run: list[str] = []
        spans: list[tuple[int, int]] = []  # character spans of target text inside the run

        def flush() -> None:
            text = "".join(run)
            if text:
                enc = self._hf.encode(text, add_special_tokens=False)
                ids.extend(enc.ids)
                mask.extend(int(any(s < b and e > a for a, b in spans)) for s, e in enc.offsets)
            run.clear()
            spans.clear()

        for piece, target in pieces:
            if isinstance(piece, int):
                flush()
                ids.append(piece)
                mask.append(target)
                continue
            start = sum(len(r) for r in run)
            if target:
                spans.append((start, start + len(piece)))
            run.append(piece)
        flush()
        return ids, mask


def _check_dialogue(messages: Sequence[Mapping[str, str]], num_image_tokens: Sequence[int]) -> None:
    """Raise ValueError naming the message and the fix for any malformed dialogue."""
    if not messages:
        raise ValueError("empty dialogue: pass at least one message")
    markers = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or set(msg) - {"role", "content"} or "role" not in msg:
            raise ValueError(f"message {i} must be a mapping with keys 'role' and 'content', got {msg!r}")
        role, content = msg["role"], msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if role == "assistant" and not content.replace(IMAGE_MARKER, "").strip():
            raise ValueError(f"message {i}: empty assistant turn; give it text to supervise")
        markers += content.count(IMAGE_MARKER)
    if markers != len(num_image_tokens):
        raise ValueError(
            f"dialogue has {markers} {IMAGE_MARKER} marker(s) but {len(num_image_tokens)} image(s) "
            f"were given; pass one num_image_tokens entry per marker"
        )
    bad = [n for n in num_image_tokens if int(n) <= 0]
    if bad:
        raise ValueError(f"num_image_tokens must be positive, got {list(num_image_tokens)}")
