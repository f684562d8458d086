"""Per-stage config classes: each lifecycle stage's defining knobs, validated with fix-it messages.

They live together (not in each stage module) so that a recipe validates, and `moonforge plan`
runs, without importing torch or the training code. Each stage module imports its own class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from moonforge.stages.config import Frozen, StageConfig
from moonforge.stages.data.declared import DeclaredDataset, check_mixture
from moonforge.stages.data.params import VideoKind


class MixtureStage(StageConfig):
    """Fields every stage kind has for users' own data (the recipe's `datasets:` section)."""

    mixture: dict[str, PositiveFloat] = {}
    """Declared datasets mixed into this stage's training data: name -> share (of the training
    tokens; of the prompts for rl / long2short). The shares add up to at most 1 and the stage's
    generated sources share the rest in their usual proportions. Each stage kind accepts the
    formats in stages/data/declared.py ACCEPTS."""
    declared: tuple[DeclaredDataset, ...] = ()
    """The declarations of the `mixture` names, copied in from the recipe's `datasets:` when the
    recipe loads (so they count in the fingerprint); anything written here is replaced."""

    @model_validator(mode="after")
    def _check_mixture(self) -> MixtureStage:
        check_mixture(self.kind, self.stage_name, self.mixture, {d.name: d for d in self.declared})
        return self

    def declaration(self, name: str) -> DeclaredDataset:
        return next(d for d in self.declared if d.name == name)


class LMPretrainConfig(MixtureStage):
    """Pre-stage: text-only LM pretraining (Moonlight's 5.2T tokens, which Kimi-VL branches from).

    Not one of the nine lifecycle stages; recipes declare it first so that alignment has a
    language model to align to. Only the LM trains; the vision tower is carried along untouched.
    """

    kind: Literal["lm_pretrain"] = "lm_pretrain"


class ResolutionMilestone(Frozen):
    """From `at_frac` of the stage on, images are capped at `max_patches` patches (NaViT)."""

    at_frac: float = Field(ge=0.0, lt=1.0)
    max_patches: PositiveInt


class ViTPretrainConfig(MixtureStage):
    """Stage 1: CoCa-like ViT pretraining, L = L_siglip + caption_weight * L_caption."""

    kind: Literal["vit_pretrain"] = "vit_pretrain"

    caption_weight: NonNegativeFloat = 2.0
    """lambda in L_siglip + lambda * L_caption (Kimi-VL: 2)."""
    siglip_init_logit_scale: float = 2.302585092994046
    """t' at init (t = exp(t') = 10)."""
    siglip_init_logit_bias: float = -10.0
    """b at init."""
    text_targets: tuple[Literal["caption", "alt_text", "ocr", "grounding"], ...] = (
        "caption",
        "alt_text",
        "ocr",
        "grounding",
    )
    """Which text fields of an image record serve as targets (sampled per example)."""
    resolution_schedule: tuple[ResolutionMilestone, ...] = (
        ResolutionMilestone(at_frac=0.0, max_patches=256),
        ResolutionMilestone(at_frac=0.4, max_patches=1024),
        ResolutionMilestone(at_frac=0.8, max_patches=4096),
    )
    """Progressive resolution: patch caps rising over the stage."""

    @property
    def context_parallel_ok(self) -> bool:
        return False  # image-text pairs, no long sequence to shard

    @model_validator(mode="after")
    def _milestones(self) -> ViTPretrainConfig:
        fr = [m.at_frac for m in self.resolution_schedule]
        if not fr or fr[0] != 0.0 or fr != sorted(fr):
            raise ValueError(
                "vit_pretrain.resolution_schedule must start at at_frac: 0.0 and be sorted by at_frac"
            )
        return self


class AlignConfig(MixtureStage):
    """Stage 2: ViT-LLM alignment; only vision + projector train, the LM stays bit-identical."""

    kind: Literal["align"] = "align"

    @model_validator(mode="after")
    def _lm_frozen(self) -> AlignConfig:
        if "lm" in self.trainable:
            raise ValueError(
                "align.trainable must not include 'lm' (the LM is frozen during alignment); "
                "use trainable: [vision, projector]"
            )
        return self


class MultimodalRamp(Frozen):
    """Text-only first, then a linear ramp of the multimodal share, then hold."""

    text_only_frac: float = Field(default=0.02, ge=0.0, lt=1.0)
    """Leading fraction of steps with only text."""
    ramp_end_frac: float = Field(default=0.5, gt=0.0, le=1.0)
    """Fraction of steps at which the multimodal share reaches final_ratio."""
    final_ratio: float = Field(default=0.3, ge=0.0, le=1.0)
    """Final multimodal share of sequences (k1.5: 30%)."""

    @model_validator(mode="after")
    def _order(self) -> MultimodalRamp:
        if self.ramp_end_frac <= self.text_only_frac:
            raise ValueError("multimodal_ramp.ramp_end_frac must be > text_only_frac")
        return self

    def ratio_at(self, frac: float) -> float:
        """Multimodal share at a fraction of the stage's steps."""
        if frac < self.text_only_frac:
            return 0.0
        span = self.ramp_end_frac - self.text_only_frac
        return self.final_ratio * min(1.0, (frac - self.text_only_frac) / span)


class VideoMix(Frozen):
    """Video in a stage's multimodal share: `videoworld` clips as caption and QA documents
    (stages/data/video_sources.py), taking `share` of the image documents' weight."""

    share: float = Field(gt=0.0, le=1.0)
    """Share of the multimodal weight given to video (the rest stays images)."""
    num_frames: PositiveInt = 8
    """Frames sampled evenly per clip: ceil(num_frames / 2) temporal patches of its grid."""
    fps: PositiveFloat | None = None
    """Sample each clip at fps from t=0 instead, at most num_frames frames (a longer clip is
    sampled evenly as num_frames: Qwen2-VL's fps with max_frames); clips of different lengths
    then take different token counts."""
    qa_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """Within video, QA documents vs captions."""
    max_tokens: PositiveInt | None = None
    """LM tokens per clip at most: the frames keep their count and each frame's resolution
    shrinks to fit (Qwen2.5-VL's video pixel budget); None = the model's max_patches per frame.
    Evals of the stage (SFT's video QA) ask with the same budget."""
    kinds: tuple[VideoKind, ...] | None = Field(default=None, min_length=1)
    """Only clips of these kinds (None = every kind): e.g. an SFT phase of motion clips alone."""


class _WithVideo(MixtureStage):
    """A mixture stage that may mix video in (`video:`)."""

    video: VideoMix | None = None
    """Video documents in the multimodal share; None = images only. Needs `videoworld` in data."""

    @model_validator(mode="after")
    def _video_data(self) -> _WithVideo:
        if self.video is not None and "videoworld" not in self.data:
            raise ValueError(
                f"stage {self.stage_name!r}: video: mixes clips in, but its data does not list "
                "videoworld; add videoworld to the stage's data (or drop video:)"
            )
        return self


class JointPretrainConfig(_WithVideo):
    """Stage 3: everything trains; text-only first, then a rising multimodal ratio."""

    kind: Literal["joint_pretrain"] = "joint_pretrain"
    multimodal_ramp: MultimodalRamp = MultimodalRamp()


class CooldownConfig(_WithVideo):
    """Stage 4: high-quality subset plus a low ratio of synthetic QA, decaying LR, bias frozen."""

    kind: Literal["cooldown"] = "cooldown"
    qa_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of sequences that are synthetic QA."""
    multimodal_ratio: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of (non-QA) sequences that carry images."""
    high_quality_only: bool = True
    """Read only records marked quality: high."""
    router_bias_update: NonNegativeFloat = 0.0


class SubStage(Frozen):
    """One long-context sub-stage: its context length and budget."""

    seq_len: PositiveInt
    num_steps: PositiveInt | None = None
    num_tokens: PositiveFloat | None = None

    @model_validator(mode="after")
    def _budget(self) -> SubStage:
        if (self.num_steps is None) == (self.num_tokens is None):
            raise ValueError("long_context.sub_stages[*]: set exactly one of num_steps or num_tokens")
        return self


class LongContextConfig(MixtureStage):
    """Stage 5: RoPE base reset, then sub-stages of x4 context each, 25% long / 75% replay."""

    kind: Literal["long_context"] = "long_context"
    rope_theta: PositiveFloat = 800000.0
    """New RoPE base (Kimi-VL: 50,000 -> 800,000)."""
    sub_stages: tuple[SubStage, ...]
    """Ordered sub-stages; each seq_len should be 4x the previous (8K -> 32K -> 128K)."""
    long_ratio: float = Field(default=0.25, gt=0.0, le=1.0)
    """Share of long data per sub-stage; the rest is replay of the previous stage's data."""
    needle_eval_docs: PositiveInt = 32
    """Held-out needle documents scored at the base and the final length (one forward each)."""

    @model_validator(mode="after")
    def _check_budget(self) -> LongContextConfig:
        # The budget lives in sub_stages; a stage-level one would be ambiguous.
        if self.num_steps is not None or self.num_tokens is not None:
            raise ValueError(
                "long_context: put num_steps / num_tokens in each sub_stages entry, not on the stage"
            )
        la = self.launcher
        if la.data_parallel > 1:  # one micro-batch per step: only its sequence can be shared
            raise ValueError(
                f"long_context: each sub-stage step is one micro-batch, which cannot be shared by "
                f"{la.data_parallel} data-parallel ranks; shard its sequence instead with "
                f"launcher.context_parallel: {la.world_size} (or run it in process)"
            )
        for i, sub in enumerate(self.sub_stages):
            if sub.seq_len % (2 * la.context_parallel):  # two zig-zag chunks a rank
                raise ValueError(
                    f"long_context.sub_stages[{i}]: seq_len={sub.seq_len} does not divide over "
                    f"launcher.context_parallel={la.context_parallel} ranks (2 chunks a rank); use "
                    f"a multiple of {2 * la.context_parallel}"
                )
        return self

    def sub_stage_steps(self, sub: SubStage) -> int:
        if sub.num_steps is not None:
            return sub.num_steps
        assert sub.num_tokens is not None  # SubStage's validator requires one of the two
        return max(1, round(sub.num_tokens / (self.sub_stage_batch(sub) * sub.seq_len)))

    def sub_stage_batch(self, sub: SubStage) -> int:
        """Sequences per step in a sub-stage: the base tokens-per-step held constant."""
        return max(1, (self.batch_size * self.seq_len) // sub.seq_len)

    @property
    def steps(self) -> int:
        return sum(self.sub_stage_steps(s) for s in self.sub_stages)

    @model_validator(mode="after")
    def _lengths(self) -> LongContextConfig:
        prev = self.seq_len
        for i, s in enumerate(self.sub_stages):
            if s.seq_len <= prev:
                raise ValueError(
                    f"long_context.sub_stages[{i}].seq_len={s.seq_len} must exceed the previous "
                    f"length {prev} (each sub-stage extends context, x4 in the paper)"
                )
            prev = s.seq_len
        if not self.sub_stages:
            raise ValueError("long_context.sub_stages must list at least one sub-stage")
        return self


class SFTPhase(Frozen):
    """One SFT epoch-phase: its length and LR range (phase 2 re-warms)."""

    seq_len: PositiveInt
    lr: PositiveFloat
    min_lr: PositiveFloat
    num_steps: PositiveInt | None = None
    num_epochs: PositiveFloat | None = None
    warmup_frac: float = Field(default=0.02, ge=0.0, lt=1.0)
    video: VideoMix | None = None
    """This phase's video in place of the stage's `video:` (None = the stage's): e.g. a first
    phase of motion clips alone at a constant LR, which the tiny VLM needs before the mixed
    dialogues to read frame order at all (README). Needs the stage's `video:`."""
    text_image_token_ratio: PositiveFloat | None = None
    """This phase's text-only : image dialogue tokens (None = the stage's)."""


class SFTConfig(_WithVideo):
    """Stage 6: ChatML SFT, loss on assistant answers + closing specials, packed, two phases."""

    kind: Literal["sft"] = "sft"
    phases: tuple[SFTPhase, ...] = ()
    """Phase 1 at the base length, phase 2 at 4x with re-warm (Kimi-VL: 2e-5->2e-6, 1e-5->1e-6)."""
    text_image_token_ratio: PositiveFloat = 1.0
    """Text-only : image dialogue tokens (about 1:1)."""

    @model_validator(mode="after")
    def _check_budget(self) -> SFTConfig:
        if not self.phases:
            raise ValueError("sft.phases: list at least one phase (seq_len, lr, min_lr, num_steps)")
        if self.num_steps is not None or self.num_tokens is not None:
            raise ValueError("sft: put the budget (num_steps / num_epochs) in each phase, not on the stage")
        for i, p in enumerate(self.phases):
            if (p.num_steps is None) == (p.num_epochs is None):
                raise ValueError(f"sft.phases[{i}]: set exactly one of num_steps or num_epochs")
            if p.video is not None and self.video is None:
                raise ValueError(
                    f"sft.phases[{i}].video: a phase's video replaces the stage's, but the stage "
                    "has no video: (its clips and video QA eval); add video: to the stage"
                )
        world, cp = self.launcher.data_parallel, self.launcher.context_parallel
        for i, p in enumerate(self.phases):  # each phase has its own micro-batches per step
            if cp > 1 and p.seq_len % (2 * cp):  # two zig-zag chunks a rank
                raise ValueError(
                    f"sft.phases[{i}]: seq_len={p.seq_len} does not divide over "
                    f"launcher.context_parallel={cp} ranks (2 chunks a rank); use a multiple of {2 * cp}"
                )
            micro, accum = self.phase_rows(p)
            if world > 1 and accum % world:
                fits = [
                    mb
                    for mb in range(self.batch_size, 0, -1)
                    if self.batch_size % mb == 0
                    and all(self.phase_rows(q, mb)[1] % world == 0 for q in self.phases)
                ]
                fix = (
                    f"set micro_batch_size: {fits[0]}"
                    if fits
                    else f"use a world size that divides {micro * accum} (its rows per step), a "
                    "larger batch_size, or launcher.context_parallel to share each sequence"
                )
                raise ValueError(
                    f"sft.phases[{i}] (seq_len {p.seq_len}): {accum} micro-batch(es) of {micro} "
                    f"rows per step cannot be shared by {world} ranks (launcher.nproc_per_node x "
                    f"nnodes); {fix}"
                )
        return self

    def phase_rows(self, phase: SFTPhase, micro_batch_size: int | None = None) -> tuple[int, int]:
        """(rows per micro-batch, micro-batches per step) of a phase: tokens per step stay
        batch_size * seq_len, micro-batches hold micro_batch_size * seq_len tokens."""
        rows = max(1, self.batch_size * self.seq_len // phase.seq_len)
        mb = micro_batch_size or self.micro_batch_size or self.batch_size
        micro = max(1, min(rows, mb * self.seq_len // phase.seq_len))
        return micro, max(1, rows // micro)

    @property
    def steps(self) -> int:
        """Steps of the phases with a step budget (epoch budgets resolve against the data)."""
        return sum(p.num_steps or 0 for p in self.phases)


class LongCoTSFTConfig(MixtureStage):
    """Stage 7: a small set of verified long reasoning traces, same masked loss as SFT."""

    kind: Literal["long_cot_sft"] = "long_cot_sft"
    num_epochs: PositiveFloat = 2.0


class RLConfig(MixtureStage):
    """Stage 8: k1.5 online policy mirror descent with verifiable rewards.

    The StageConfig budget `num_steps` is the total number of gradient steps; they are split
    evenly over the iterations (num_steps // num_iterations per iteration, optimizer reset each).
    `micro_batch_size or batch_size` is the rows per log-prob forward (whole prompt groups).
    """

    kind: Literal["rl"] = "rl"

    num_iterations: PositiveInt = 8
    samples_per_prompt: PositiveInt = 8
    """k samples per prompt from the iteration's reference policy."""
    prompts_per_iteration: PositiveInt = 16
    tau: PositiveFloat = 0.5
    """KL / l2 regularisation strength."""
    baseline: Literal["mean", "logmeanexp"] = "mean"
    """Reward baseline: group mean (k1.5 in practice) or tau * log-mean-exp(r / tau)."""
    length_penalty_weight: NonNegativeFloat = 0.2
    length_penalty_warmup_iters: int = Field(default=2, ge=0)
    max_new_tokens: PositiveInt = 256
    """Cap on a response over all its segments (also the eval generation length)."""
    rollout_token_budget: PositiveInt | None = None
    """Per-iteration output budget per trajectory (partial rollouts); None = no truncation."""
    max_segment_age: int | None = Field(default=None, ge=0)
    """Replayed segments older than this many iterations are excluded from the loss; None keeps all."""
    curriculum_switch_iter: int = Field(default=4, ge=0)
    """Iterations sampling uniformly over all prompts before the curriculum keeps only hard ones."""
    use_curriculum: bool = True
    """Easy -> hard curriculum by difficulty label (k1.5 sec. 2.3.4)."""
    hard_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """A prompt is hard when its difficulty >= this (used after curriculum_switch_iter)."""
    use_priority: bool = True
    """Prioritized sampling, P(i) proportional to 1 - running success rate."""
    temperature: PositiveFloat = 1.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling for rollouts (1 = plain temperature sampling)."""
    repeat_detection: bool = True
    """Stop a rollout whose tail loops (in-segment n-gram counter + cross-segment periodic tail)."""
    repeat_ngram: PositiveInt = 8
    """n-gram size of the in-generation repeat detector."""
    repeat_max: int = Field(default=4, ge=2)
    """Occurrences of one n-gram that end a rollout as "repeat"."""
    repeat_penalty: NonNegativeFloat = 0.0
    """Subtracted from the reward of a rollout cut for repeating."""
    max_verifier_error_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    """Fail the stage when more than this share of verifier calls raise (a broken verifier)."""
    eval_samples: NonNegativeInt = 4
    """Seeded samples per held-out prompt for eval/sampled_acc: pass@1 estimated from k samples at
    the rollout temperature and top_p (DeepSeek-R1's protocol), the accuracy of the policy RL
    optimises. 0 = the greedy eval only."""

    @property
    def context_parallel_ok(self) -> bool:
        return False  # log-probs of sampled rollouts, not a sharded next-token loss

    @model_validator(mode="after")
    def _rl_budget(self) -> RLConfig:
        if self.steps < self.num_iterations:
            raise ValueError(
                f"rl: num_steps={self.steps} is the total gradient steps and must be "
                f">= num_iterations={self.num_iterations} (>= 1 step per iteration)"
            )
        if self.rollout_token_budget and self.rollout_token_budget > self.max_new_tokens:
            raise ValueError(
                f"rl: rollout_token_budget={self.rollout_token_budget} exceeds "
                f"max_new_tokens={self.max_new_tokens}; lower it or set null"
            )
        return self

    @property
    def steps_per_iteration(self) -> int:
        """Gradient steps per OPMD iteration (after each optimizer reset)."""
        return self.steps // self.num_iterations


class Long2ShortConfig(MixtureStage):
    """Stage 9: merge, shortest rejection sampling, DPO, and long2short RL.

    Each method yields a candidate; the returned checkpoint is the most token-efficient candidate
    (acc per 1k tokens on rl_prompts/val) whose accuracy is within acc_tolerance of the best
    candidate's (the long base counts as a candidate). `num_steps` = SFT / DPO gradient steps.
    """

    kind: Literal["long2short"] = "long2short"

    methods: tuple[Literal["merge", "shortest_rs", "dpo", "rl"], ...] = ("merge", "shortest_rs", "dpo", "rl")
    merge_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    """theta = w * theta_long + (1 - w) * theta_short; the short model is the shortest_rs one."""
    num_samples: PositiveInt = 8
    """Responses sampled per question for shortest rejection sampling and DPO pairs."""
    num_questions: PositiveInt = 64
    """rl_prompts/train questions sampled from for rejection sampling and DPO."""
    sample_temperature: PositiveFloat = 1.0
    """Temperature of those samples."""
    sample_max_new_tokens: PositiveInt = 256
    """Length cap of those samples and of every candidate's eval (the long model's budget)."""
    dpo_beta: PositiveFloat = 0.1
    dpo_long_factor: PositiveFloat = 1.5
    max_new_tokens: PositiveInt = 128
    """Reduced rollout cap for long2short RL."""
    rl_iterations: PositiveInt = 4
    """OPMD iterations of long2short RL (length penalty on from iteration 0)."""
    rl_prompts_per_iteration: PositiveInt = 8
    rl_samples_per_prompt: PositiveInt = 8
    rl_steps_per_iteration: PositiveInt = 2
    rl_tau: PositiveFloat = 0.5
    length_penalty_weight: NonNegativeFloat = 0.5
    """w_len of long2short RL (constant, no warm-up)."""
    acc_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """Candidates within this accuracy of the best one compete on acc per 1k tokens."""

    @property
    def context_parallel_ok(self) -> bool:
        return False  # rollouts and DPO log-probs, not a sharded next-token loss

    @model_validator(mode="after")
    def _methods(self) -> Long2ShortConfig:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError("long2short.methods: list each method once, e.g. [merge, shortest_rs, dpo, rl]")
        if self.max_new_tokens > self.sample_max_new_tokens:
            raise ValueError("long2short.max_new_tokens (the RL cap) must be <= sample_max_new_tokens")
        return self


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    c.model_fields["kind"].default: c
    for c in (
        LMPretrainConfig,
        ViTPretrainConfig,
        AlignConfig,
        JointPretrainConfig,
        CooldownConfig,
        LongContextConfig,
        SFTConfig,
        LongCoTSFTConfig,
        RLConfig,
        Long2ShortConfig,
    )
}
"""Canonical stage kind -> its config class, in lifecycle order."""
