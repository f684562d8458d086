"""Tokenizer wrapper, media placeholder and the Kimi-VL ChatML template with its loss mask.

The vocabulary is a byte-level BPE (`tokenizer.json`, built by the `tokenizer` dataset stage)
whose special tokens follow Kimi-VL's names. Two conventions matter to callers:

* `encode(text)` never produces a special token, even if `text` contains a literal
  "<|im_end|>": specials enter a sequence only through this module (`media_placeholder`,
  `encode_chat`) or by id, so user content cannot forge turn boundaries.
* An image becomes `<|media_start|> image <|media_content|> N x <|media_pad|> <|media_end|>`
  with N = (h / merge) * (w / merge); the projected vision features are scattered into the
  `<|media_pad|>` positions in order.

Chat turns are `<|im_{role}|> {role} <|im_middle|> {content} <|im_end|>`. The loss mask of
`encode_chat` is aligned with the returned ids: mask[t] = 1 means token t is a training target
(assistant content and the `<|im_end|>` closing it); everything else, including image
placeholders inside any turn, is 0.

Only `tokenizers` and the standard library are imported here (model/ does no I/O beyond load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|pad|>",
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
    "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>",
)
"""Every special token, in id order (the tokenizer build gives them ids 0..10)."""

IMAGE_MARKER = "<image>"
"""Where an image goes in a chat message's content."""

ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A loaded `tokenizer.json` plus the ids of every special token.

    Attributes: eos_id (<|endoftext|>), pad_id, im_system_id, im_user_id, im_assistant_id,
    im_middle_id, im_end_id, media_start_id, media_content_id, media_pad_id, media_end_id,
    vocab_size (including specials; equals the model's embedding rows).
    """

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # Specials in user text are encoded as plain bytes, never as control tokens.
        self._hf.encode_special_tokens = True
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; rebuild it with "
                             "`dvc repro tokenizer` (moonforge.stages.data.bpe adds them)")
        self.special_ids = frozenset(ids.values())
        self.eos_id, self.pad_id = ids["<|endoftext|>"], ids["<|pad|>"]
        self.im_system_id, self.im_user_id = ids["<|im_system|>"], ids["<|im_user|>"]
        self.im_assistant_id, self.im_middle_id = ids["<|im_assistant|>"], ids["<|im_middle|>"]
        self.im_end_id = ids["<|im_end|>"]
        self.media_start_id, self.media_content_id = ids["<|media_start|>"], ids["<|media_content|>"]
        self.media_pad_id, self.media_end_id = ids["<|media_pad|>"], ids["<|media_end|>"]
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._role_ids = {"system": self.im_system_id, "user": self.im_user_id,
                          "assistant": self.im_assistant_id}
        self._image_word = self.encode("image")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `path` (a tokenizer.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; build it with `dvc repro tokenizer`")
        return cls(HFTokenizer.from_file(str(path)))

    def require_vocab_size(self, expected: int) -> None:
        """Raise unless the vocabulary has exactly `expected` entries (the model's embedding rows)."""
        if self.vocab_size != expected:
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
        """Text of `ids`, skipping special tokens (media placeholders vanish, "image" stays)."""
        return self._hf.decode([i for i in ids if i not in self.special_ids])

    def media_placeholder(self, num_tokens: int) -> list[int]:
        """<|media_start|> image <|media_content|> num_tokens x <|media_pad|> <|media_end|>."""
        if num_tokens <= 0:
            raise ValueError(f"an image needs at least one media token, got {num_tokens}")
        return [self.media_start_id, *self._image_word, self.media_content_id,
                *([self.media_pad_id] * num_tokens), self.media_end_id]

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        num_image_tokens: Sequence[int] = (),
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a dialogue; the k-th "<image>" gets num_image_tokens[k] pads.

        Example: [{"role": "user", "content": "<image>\\nWhat color?"},
                  {"role": "assistant", "content": "red"}] with num_image_tokens=[4]
        -> <|im_user|> user <|im_middle|> [placeholder of 4] \\n What color? <|im_end|>
           <|im_assistant|> assistant <|im_middle|> red <|im_end|>
        with mask 1 only on "red" and the last <|im_end|>. `add_generation_prompt` appends an
        open assistant header (mask 0) for generation.
        """
        _check_dialogue(messages, num_image_tokens)
        ids: list[int] = []
        mask: list[int] = []
        images = iter(num_image_tokens)
        for msg in messages:
            role, target = msg["role"], int(msg["role"] == "assistant")
            header = [self._role_ids[role], *self.encode(role), self.im_middle_id]
            ids += header
            mask += [0] * len(header)
            for k, part in enumerate(msg["content"].split(IMAGE_MARKER)):
                if k > 0:
                    media = self.media_placeholder(next(images))
                    ids += media
                    mask += [0] * len(media)
                if part:
                    toks = self.encode(part)
                    ids += toks
                    mask += [target] * len(toks)
            ids.append(self.im_end_id)
            mask.append(target)
        if add_generation_prompt:
            header = [self.im_assistant_id, *self.encode("assistant"), self.im_middle_id]
            ids += header
            mask += [0] * len(header)
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
