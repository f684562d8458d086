"""Validating a declared dataset: every record read, every image decoded, and a report.

`check_set` is what `moonforge data check NAME` prints and what a stage runs before it trains on
a declared dataset (split over the data-parallel ranks, reports merged): counts by kind (chat /
pair / text / prompt / preference, with or without images), image size and token length
distributions, bad records by reason and the first few with their file, line or key and why.
Above the declaration's `max_bad_fraction` the stage stops before training with this report.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from moonforge.stages.data.user_images import REASONS, BadRecord, decode_image
from moonforge.stages.data.user_samples import Sample
from moonforge.stages.data.user_sets import DeclaredSet
from moonforge.stages.data.user_videos import ClipSampling

MAX_EXAMPLES = 10
"""Bad records listed by key in a report."""
RESERVOIR = 4096
"""Values kept (a seeded reservoir sample) per distribution for its percentiles."""


class DeclaredDataError(ValueError):
    """A declared dataset has more bad records than its max_bad_fraction allows."""


@dataclass
class Distribution:
    """min / max / mean exactly; percentiles from a seeded reservoir sample."""

    count: int = 0
    total: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    sample: list[float] = field(default_factory=list)

    def add(self, v: float, rng: random.Random) -> None:
        self.count += 1
        self.total += v
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)
        if len(self.sample) < RESERVOIR:
            self.sample.append(v)
        elif (j := rng.randrange(self.count)) < RESERVOIR:
            self.sample[j] = v

    def merge(self, other: Distribution) -> None:
        self.count += other.count
        self.total += other.total
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.sample = (self.sample + other.sample)[:RESERVOIR]

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        s = sorted(self.sample)
        pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
        return {
            "count": self.count,
            "min": self.lo,
            "p50": pct(0.5),
            "p95": pct(0.95),
            "max": self.hi,
            "mean": round(self.total / self.count, 2),
        }


@dataclass
class CheckReport:
    """What `check_set` found (JSON via to_dict, text via render)."""

    name: str
    format: str
    num_records: int = 0
    kinds: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str, str, str]] = field(default_factory=list)
    """(record id, key, reason, detail) of the first bad records."""
    widths: Distribution = field(default_factory=Distribution)
    heights: Distribution = field(default_factory=Distribution)
    tokens: Distribution = field(default_factory=Distribution)
    images: int = 0
    videos: int = 0
    max_bad_fraction: float = 0.01

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / max(self.num_records, 1)

    @property
    def ok(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def merge(self, other: CheckReport) -> None:
        self.num_records += other.num_records
        self.kinds += other.kinds
        self.bad += other.bad
        self.images += other.images
        self.videos += other.videos
        self.examples = sorted(self.examples + other.examples)[:MAX_EXAMPLES]
        for a in ("widths", "heights", "tokens"):
            getattr(self, a).merge(getattr(other, a))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "records": self.num_records,
            "valid": self.num_records - self.num_bad,
            "bad": self.num_bad,
            "bad_fraction": self.bad_fraction,
            "max_bad_fraction": self.max_bad_fraction,
            "ok": self.ok,
            "kinds": dict(sorted(self.kinds.items())),
            "bad_by_reason": dict(sorted(self.bad.items())),
            "images": self.images,
            "videos": self.videos,
            "image_width": self.widths.summary(),
            "image_height": self.heights.summary(),
            "tokens": self.tokens.summary(),
            "first_bad": [{"key": k, "reason": r, "detail": d} for _, k, r, d in self.examples],
        }

    def render(self) -> str:
        """The report as text (80 columns)."""
        d = self.to_dict()
        lines = [
            f"dataset {self.name} ({self.format}): {d['records']} records, {d['valid']} valid, "
            f"{d['bad']} bad ({d['bad_fraction']:.2%}; allowed {self.max_bad_fraction:.2%})",
            "  kinds: " + (", ".join(f"{k} {n}" for k, n in d["kinds"].items()) or "-"),
        ]
        for label, key in (
            ("image width", "image_width"),
            ("image height", "image_height"),
            ("tokens", "tokens"),
        ):
            s = d[key]
            if s.get("count"):
                lines.append(
                    f"  {label:<12} min {s['min']:g}  p50 {s['p50']:g}  p95 {s['p95']:g}  "
                    f"max {s['max']:g}  (n={s['count']})"
                )
        for reason, n in d["bad_by_reason"].items():
            lines.append(f"  bad: {reason} x{n} ({REASONS.get(reason, '')})")
        for ex in d["first_bad"]:
            lines.append(f"  - {ex['key']}: {ex['detail']}")
        if not self.ok:
            lines.append(
                f"  more than max_bad_fraction={self.max_bad_fraction:g} of the records are "
                "bad: fix them (or raise max_bad_fraction in the declaration)"
            )
        return "\n".join(lines)


def _kind(s: Sample) -> str:
    return s.kind + ("+image" if s.images else "") + ("+video" if s.videos else "")


def token_length(s: Sample, tok, vision, videos: ClipSampling = ClipSampling()) -> int:
    """Tokens the model sees for a sample (image and video placeholders expanded)."""
    from moonforge.model.tokenizer import IMAGE_MARKER
    from moonforge.stages.data.images import num_image_tokens
    from moonforge.stages.data.user_images import image_size
    from moonforge.stages.data.user_videos import VIDEO_MARKER, media_in_order

    counts = [num_image_tokens(vision.grid(*image_size(im)), vision.merge_size) for im in s.images]
    if s.videos:  # one count per marker, in marker order, a video's over its temporal patches
        counts = [
            num_image_tokens(vision.grid(*image_size(src)), vision.merge_size)
            if kind == "image"
            else videos.tokens(src, vision)
            for kind, src in media_in_order(s.messages, s.images, s.videos)
        ]
    if s.kind in ("chat", "prompt", "preference"):
        msgs = s.message_dicts() + (
            [{"role": "assistant", "content": s.chosen}] if s.kind == "preference" else []
        )
        msgs = [{**m, "content": m["content"].replace(VIDEO_MARKER, IMAGE_MARKER)} for m in msgs]
        return len(tok.encode_chat(msgs, counts)[0])
    return sum(counts) + len(tok.encode(s.text)) + 1


def check_set(
    ds: DeclaredSet, tok=None, vision=None, slot: int = 0, num_slots: int = 1, decode: bool = True
) -> CheckReport:
    """Read (and decode) every record of this slot's blocks; see the module docstring."""
    rep = CheckReport(ds.name, ds.decl.format, max_bad_fraction=ds.decl.max_bad_fraction)
    rng = random.Random(f"check/{ds.name}/{slot}")
    sampling = ClipSampling.of(ds.decl)
    for rid, rec in ds.records(slot, num_slots):
        rep.num_records += 1
        if isinstance(rec, Sample) and decode:
            try:
                for im in rec.images:
                    img = decode_image(im)
                    rep.widths.add(img.width, rng)
                    rep.heights.add(img.height, rng)
                    rep.images += 1
                for v in rec.videos:  # every frame the stage will sample decodes
                    sampling.frames(v)
                    rep.videos += 1
                if tok is not None:
                    rep.tokens.add(token_length(rec, tok, vision, sampling), rng)
            except BadRecord as e:
                rec = e.at(rec.key)
        if isinstance(rec, BadRecord):
            rep.bad[rec.reason] += 1
            if len(rep.examples) < MAX_EXAMPLES:
                rep.examples.append((rid, rec.key, rec.reason, rec.detail))
            continue
        rep.kinds[_kind(rec)] += 1
    return rep


def require_ok(rep: CheckReport, stage: str) -> None:
    """Raise DeclaredDataError with the report when too many records are bad."""
    if not rep.ok:
        raise DeclaredDataError(
            f"stage {stage!r}: declared dataset {rep.name!r} failed its check "
            f"before training:\n{rep.render()}"
        )
