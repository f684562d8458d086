"""Hugging Face tokenizer interop: complete an imported `tokenizer.json` for moonforge, and write
the tokenizer files and generation settings an exported checkpoint needs.

* Import: a checkpoint's tokenizer may lack tokens its chat dialect needs (Llama 3 has no image
  tokens). `ensure_media_tokens` appends them as special tokens at the END of the vocabulary, so
  every existing id (and embedding row) keeps its meaning; the caller grows the embedding to the
  new size (`vocab_growth.grow_vocab`) and records the added tokens in lineage.
* Export: `hf_tokenizer_files` writes `tokenizer.json`, `tokenizer_config.json` (with a Jinja
  `chat_template` reproducing the dialect, so transformers' `apply_chat_template` gives exactly
  `Tokenizer.encode_chat`'s ids for text dialogues) and `special_tokens_map.json`;
  `generation_config` the matching stop / pad / bos ids. No `auto_map`: no remote code is needed.

Only `tokenizers` and the standard library are imported.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from moonforge.model.tokenizer import ChatDialect, Tokenizer, detect_dialect, special_token_ids


def ensure_media_tokens(
    source: HFTokenizer | str | Path, dialect: ChatDialect | str | None = None
) -> tuple[HFTokenizer, list[str]]:
    """(tokenizer, added): add the dialect's missing special tokens (media and role) at the end.

    `source` is a `tokenizers.Tokenizer` (changed in place) or a path to a tokenizer.json or its
    directory. `added` lists the new tokens in id order (empty when nothing was missing); their
    ids are old_size .. old_size + len(added) - 1, and the model needs
    `tokenizer.get_vocab_size(with_added_tokens=True)` embedding rows afterwards.
    Example: a Llama 3 tokenizer gains ["<|media_start|>", "<|media_content|>", "<|media_pad|>",
    "<|media_end|>"].
    """
    if isinstance(source, HFTokenizer):
        hf = source
    else:
        path = Path(source)
        hf = HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    d = detect_dialect(hf, dialect)
    have = special_token_ids(hf)
    missing = [t for t in d.specials if t not in have]
    if not missing:
        return hf, []
    registered = [t for t in missing if hf.token_to_id(t) is not None]
    if registered:
        raise ValueError(
            f"{registered} exist in the vocabulary as ordinary tokens, so user text "
            "could produce them; re-register them as special tokens in tokenizer.json "
            '(added_tokens, "special": true) before importing'
        )
    first = hf.get_vocab_size(with_added_tokens=True)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    ids = [hf.token_to_id(t) for t in missing]
    if ids != list(range(first, first + len(missing))):
        raise ValueError(
            f"added tokens {missing} got ids {ids}, not {first}.. at the end of the "
            "vocabulary (the vocabulary has holes); fix the tokenizer.json ids first"
        )
    return hf, missing


def _lit(text: str) -> str:
    """A Jinja string literal (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def chat_template(dialect: ChatDialect) -> str:
    """A Jinja chat template rendering `dialect` exactly as `Tokenizer.encode_chat` does.

    String content is written as is; list content (transformers' multimodal form) writes its
    text items and one image placeholder with a single media pad per image item, the form
    image processors (vLLM, transformers) expand to the real count.
    """

    def header(role: str) -> str:  # e.g. "<|im_start|>" + message['role'] + "\n"
        return f" + {role} + ".join(_lit(p) for p in dialect.header.split("{role}"))

    pre, post = dialect.image.split("{pads}")
    image = _lit(pre + dialect.media_pad + post)
    lines = [
        "{{- " + _lit(dialect.bos) + " -}}" if dialect.bos else "",
        "{%- for message in messages -%}",
        "{{- " + header("message['role']") + " -}}",
        "{%- if message['content'] is string -%}{{- message['content'] -}}",
        "{%- else -%}{%- for item in message['content'] -%}",
        "{%- if item['type'] == 'text' -%}{{- item['text'] -}}",
        "{%- elif item['type'] == 'image' -%}{{- " + image + " -}}{%- endif -%}",
        "{%- endfor -%}{%- endif -%}",
        "{{- " + _lit(dialect.turn_end + dialect.turn_sep) + " -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + header(_lit("assistant")) + " -}}{%- endif -%}",
    ]
    return "\n".join(line for line in lines if line)


def hf_tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """File name -> text of the tokenizer files of an exported checkpoint directory.

    `AutoTokenizer.from_pretrained(dir)` loads them (as PreTrainedTokenizerFast / transformers
    5's TokenizersBackend). eos_token is the turn end (what a chat model stops at; the other stop
    ids are in `generation_config`), pad_token the dialect's pad.
    """
    special = {"eos_token": tok.id_to_token(tok.turn_end_id), "pad_token": tok.id_to_token(tok.pad_id)}
    if tok.bos_id is not None:
        special["bos_token"] = tok.id_to_token(tok.bos_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(tok.dialect),
        "bos_token": special.get("bos_token"),
        "eos_token": special["eos_token"],
        "pad_token": special["pad_token"],
        "add_bos_token": False,  # the chat template writes bos itself
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {
        "tokenizer.json": tok.to_json() + "\n",
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(special),
    }


def generation_config(tok: Tokenizer) -> dict:
    """The token-id part of an exported `generation_config.json`: every stop id as
    eos_token_id (turn end first), pad_token_id, and bos_token_id when the dialect has one."""
    out: dict = {"eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}
    if tok.bos_id is not None:
        out["bos_token_id"] = tok.bos_id
    return out
