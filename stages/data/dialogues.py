"""Build the SFT dialogues (dataset `sft`): ChatML image and text-only dialogues, ~1:1 by tokens.

Image dialogues come from toy-world records of the same split, one per image: a single QA
("<image>\\n{question}" -> the record's short exact answer), two QAs about the same image
(multi-turn), or a description request answered with the caption. Text-only dialogues are
* arith: arithmetic word problems with an exact numeric answer;
* facts: a generated scene description and a question it answers (count, colour, shape, place);
* stdlib: instructions over real stdlib docstrings that the text itself answers (its first word,
  its number of lines, the module a named docstring comes from).
Text dialogues are added until their tokens reach `text_image_ratio` times the image
dialogues' tokens (the paper's 1:1 text:image token mix), counted with the project tokenizer and
the image token count of `params.vision`; stats.json records the measured ratio per split.

Val: image dialogues from toy-world val images; text dialogues whose question is held out by a
hash (arith, facts) or whose docstring is in the text corpus' val split (stdlib), and any val
text question that also occurs in train is dropped, so no val question is trained on.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from moonforge.model.tokenizer import Tokenizer
from moonforge.stages.data import scenes
from moonforge.stages.data.chat_records import Message, SftRecord
from moonforge.stages.data.images import num_image_tokens, patch_grid
from moonforge.stages.data.posttrain_params import SftParams
from moonforge.stages.data.problems import held_out
from moonforge.stages.data.records import (
    ImageRecord,
    TextRecord,
    read_image_records,
    read_text_records,
    write_jsonl,
)
from moonforge.stages.data.stdlib_text import stdlib_files, stdlib_root

SYSTEMS = (
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a careful assistant. Give short, exact answers.",
)
NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")

Turns = list[tuple[str, str]]
"""(user, assistant) pairs of one dialogue."""


def image_dialogue(rec: ImageRecord, rng: random.Random, params: SftParams) -> tuple[str, Turns]:
    """(style, turns) of the dialogue about `rec`; the first user turn starts with "<image>"."""
    u = rng.random()
    if u < params.caption_frac:
        ask = rng.choice(("Describe the image.", "Describe the image.", "What does the image show?"))
        return "caption", [(f"<image>\n{ask}", rec.caption)]
    if u < params.caption_frac + params.multi_turn_frac and len(rec.qa) >= 2:
        a, b = rng.sample(list(rec.qa), 2)
        return "multi_turn", [(f"<image>\n{a.question}", a.answer), (b.question, b.answer)]
    qa = rng.choice(rec.qa)
    return "qa", [(f"<image>\n{qa.question}", qa.answer)]


def word_problem(rng: random.Random) -> tuple[str, str]:
    """An arithmetic word problem of one or two steps and its exact answer."""
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    x, y = rng.randint(2, 20), rng.randint(1, 12)
    t = rng.randrange(6)
    if t == 0:
        return f"{n} has {x} {item} and buys {y} more. How many {item} does {n} have now?", str(x + y)
    if t == 1:
        x, y = max(x, y), min(x, y)
        return f"{n} has {x} {item} and gives {y} away. How many {item} are left?", str(x - y)
    x, y = rng.randint(2, 9), rng.randint(2, 9)
    if t == 2:
        return f"There are {x} boxes with {y} {item} in each box. How many {item} are there?", str(x * y)
    z = rng.randint(1, x * y - 1)
    if t == 3:
        return (
            f"{n} has {x} {item}, buys {y} more and then gives {min(z, x + y)} away. "
            f"How many {item} does {n} have now?",
            str(x + y - min(z, x + y)),
        )
    if t == 4:
        return (
            f"{x} children each have {y} {item}, and {z} more {item} lie on the table. "
            f"How many {item} are there altogether?",
            str(x * y + z),
        )
    return (
        f"{n} puts {item} in {x} rows of {y} and then takes {z} away. How many {item} are left?",
        str(x * y - z),
    )


def scene_fact(rng: random.Random) -> tuple[str, str]:
    """A generated scene description (with every shape's place) and one question it answers."""
    shapes = scenes.sample_shapes(rng)
    where = scenes.join_phrases([f"the {s.label} is at the {s.position}" for s in shapes])
    q, a, _ = rng.choice(scenes.qa_shapes(shapes, rng))
    return f"A picture shows {scenes.inventory(shapes)}; {where}.\n{q}", a


def stdlib_modules() -> frozenset[str]:
    """Dotted names of every stdlib module the text corpus reads docstrings from."""
    root = stdlib_root()
    names = set()
    for path in stdlib_files(root):
        parts = list(path.relative_to(root).with_suffix("").parts)
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return frozenset(names)


def docstring_task(rec: TextRecord, rng: random.Random, modules: frozenset[str]) -> tuple[str, str] | None:
    """An instruction over a stdlib docstring that the prompt itself answers, or None."""
    name, _, body = rec.text.partition("\n")
    lines = [ln for ln in body.strip().split("\n\n")[0].splitlines()[:6] if ln.strip()]
    para = "\n".join(ln[:100] for ln in lines)
    if not para or not name or " " in name:
        return None
    module = max((m for m in modules if name == m or name.startswith(m + ".")), key=len, default=None)
    t = rng.randrange(3)
    if t == 0 and module and not name.startswith("pydoc_topics"):
        return f"Which module is this docstring from?\n\nDocstring of {name}:\n{para}", module
    if t == 1:
        return f"How many lines does this text have?\n\n{para}", str(len(lines))
    word = para.split()[0].strip(".,:;()'\"`*")
    return (f"What is the first word of this docstring?\n\n{para}", word) if word.isalnum() else None


def _record(turns: Turns, system: str | None, images: tuple[str, ...]) -> SftRecord:
    msgs = [Message(role="system", content=system)] if system else []
    for user, assistant in turns:
        msgs += [Message(role="user", content=user), Message(role="assistant", content=assistant)]
    return SftRecord(id="pending", messages=tuple(msgs), images=images, kind="image" if images else "text")


def _num_tokens(tok: Tokenizer, rec: SftRecord, media: list[int]) -> int:
    return len(tok.encode_chat(rec.message_dicts(), media)[0])


def _image_dialogues(
    params: SftParams, split: str, records: list[ImageRecord], tok: Tokenizer, c: Counter
) -> list[SftRecord]:
    v = params.vision
    out = []
    for rec in records:
        rng = random.Random(f"sft/{params.seed}/{split}/{rec.id}")
        style, turns = image_dialogue(rec, rng, params)
        system = rng.choice(SYSTEMS) if rng.random() < params.system_frac else None
        d = _record(turns, system, (rec.image,))
        n = num_image_tokens(
            patch_grid(rec.width, rec.height, v.patch_size, v.merge_size, v.max_patches), v.merge_size
        )
        c["tokens_image"] += _num_tokens(tok, d, [n])
        c["tokens_media"] += n
        c[f"image_{style}"] += 1
        out.append(d)
    return out


def _text_dialogues(
    params: SftParams,
    split: str,
    stdlib: list[TextRecord],
    tok: Tokenizer,
    modules: frozenset[str],
    exclude: set[str],
    c: Counter,
) -> list[SftRecord]:
    """Text-only dialogues until their tokens reach text_image_ratio * the image tokens."""
    rng = random.Random(f"sft/{params.seed}/{split}/text")
    docs = list(stdlib)
    rng.shuffle(docs)

    def on_split(make: Callable[[random.Random], tuple[str, str]]) -> tuple[str, str] | None:
        for _ in range(1000):  # redraw until the question falls on this split's side
            qa = make(rng)
            if held_out(qa[0], params.val_frac) == (split == "val"):
                return qa
        return None

    makers: dict[str, Callable[[], tuple[str, str] | None]] = {
        "arith": lambda: on_split(word_problem),
        "facts": lambda: on_split(scene_fact),
        "stdlib": lambda: docstring_task(docs.pop(), rng, modules) if docs else None,
    }
    weights = {k: w for k, w in sorted(params.text_weights.items()) if w > 0}
    target = params.text_image_ratio * c["tokens_image"]
    out, seen = [], set(exclude)
    for _ in range(1000 + 200 * len(stdlib) + int(target)):
        if c["tokens_text"] >= target:
            break
        if not docs:
            weights.pop("stdlib", None)
        if not weights:
            break
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        qa = makers[kind]()
        if qa is None:
            continue
        if qa[0] in seen:
            c["text_dropped_seen"] += 1
            continue
        seen.add(qa[0])
        system = rng.choice(SYSTEMS) if rng.random() < params.system_frac else None
        d = _record([qa], system, ())
        c["tokens_text"] += _num_tokens(tok, d, [])
        c[f"text_{kind}"] += 1
        out.append(d)
    if c["tokens_text"] < 0.9 * target:
        raise ValueError(
            f"sft/{split}: ran out of text dialogues at {c['tokens_text']} of "
            f"{target:.0f} tokens; lower sft.text_image_ratio or raise text weights"
        )
    return out


def build_sft(params: SftParams, out: Path, toyworld: Path, text: Path, tokenizer: Path) -> dict:
    """Write `out/{train,val}.jsonl` and stats.json; return the stats."""
    tok = Tokenizer.load(tokenizer)
    modules = stdlib_modules()
    stats: dict[str, dict] = {}
    train_questions: set[str] = set()
    for split, num in (("train", params.max_images_train), ("val", params.max_images_val)):
        c: Counter = Counter()
        images = _image_dialogues(params, split, read_image_records(toyworld, split)[:num], tok, c)
        stdlib = [r for r in read_text_records(text, split) if r.source == "stdlib"]
        texts = _text_dialogues(params, split, stdlib, tok, modules, train_questions, c)
        if split == "train":
            train_questions = {d.messages[-2].content for d in texts}
        records = images + texts
        random.Random(f"sft/{params.seed}/{split}/order").shuffle(records)
        records = [r.model_copy(update={"id": f"sft-{split}-{i:06d}"}) for i, r in enumerate(records)]
        write_jsonl(out / f"{split}.jsonl", records)
        stats[split] = {
            "dialogues": len(records),
            "image": len(images),
            "text": len(texts),
            **dict(sorted(c.items())),
            "text_image_token_ratio": round(c["tokens_text"] / max(1, c["tokens_image"]), 4),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats
