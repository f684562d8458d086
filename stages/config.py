"""Config building blocks every stage shares: the StageConfig base, optimizer and LR schedule.

`Runtime[T]` marks a field as runtime-only (workers, logging cadence, device): it is excluded from
the fingerprint, so changing it never creates a new artifact version. Every other field counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)


class _RuntimeMarker:
    """Metadata tag read by `runtime_field_paths` / the fingerprint."""

    def __repr__(self) -> str:
        return "Runtime"


RUNTIME = _RuntimeMarker()


if TYPE_CHECKING:  # the same alias, spelled so type checkers see `Runtime[T]` as T
    _T = TypeVar("_T")
    Runtime = Annotated[_T, RUNTIME]
else:

    class Runtime:
        """`Runtime[int]` == `Annotated[int, RUNTIME]`: a field that never changes a fingerprint."""

        def __class_getitem__(cls, item: Any) -> Any:
            return Annotated[item, RUNTIME]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


ModuleGroup = Literal["vision", "projector", "lm", "caption"]
"""Trainable/frozen unit: MoonViT, the projector, the MoE LM, the stage-1 text tower + decoder."""


class MuonConfig(Frozen):
    """Muon for 2-D weight matrices (torch.optim.Muon)."""

    momentum: float = Field(default=0.95, ge=0.0, lt=1.0)
    """Nesterov momentum mu."""
    ns_steps: PositiveInt = 5
    """Newton-Schulz iterations."""
    adjust_lr_fn: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """Moonlight's 0.2*sqrt(max(A,B)) scaling, so AdamW's lr and wd carry over."""
    ns_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Newton-Schulz precision; auto = bf16 on CUDA (as torch.optim.Muon), fp32 on CPU."""


class AdamWConfig(Frozen):
    """AdamW for everything Muon cannot take (embeddings, lm_head, norms, biases, conv, pos grid)."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8


class OptimizerConfig(Frozen):
    """Muon + AdamW sharing one peak LR and decoupled weight decay (Moonlight)."""

    lr: PositiveFloat
    """Peak learning rate (the schedule scales it)."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay, applied with the unadjusted lr."""
    muon: MuonConfig = MuonConfig()
    adamw: AdamWConfig = AdamWConfig()
    use_muon: bool = True
    """False sends every parameter to AdamW (an ablation / baseline switch)."""
    grad_clip: PositiveFloat | None = 1.0
    """Global grad-norm clip; None disables it."""


class ScheduleConfig(Frozen):
    """LR multiplier over the stage: linear warmup, then constant / cosine / linear decay.

    A re-warm (SFT phase 2) is simply a new phase with its own warmup from `start_ratio`.
    """

    kind: Literal["constant", "cosine", "linear"] = "cosine"
    """Shape after warmup."""
    warmup_steps: NonNegativeInt = 0
    """Steps of linear warmup from start_ratio * lr to lr."""
    warmup_frac: NonNegativeFloat | None = None
    """Alternative to warmup_steps: warmup as a fraction of the stage's steps (full-scale recipes)."""
    start_ratio: NonNegativeFloat = 0.0
    """LR multiplier at step 0 (the warmup's starting point)."""
    min_ratio: NonNegativeFloat = 0.1
    """Final multiplier for cosine / linear decay (e.g. 4.2e-5 / 4.2e-4 = 0.1)."""

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.warmup_frac is not None and self.warmup_steps:
            raise ValueError("schedule: set warmup_steps or warmup_frac, not both")
        if self.warmup_frac is not None and self.warmup_frac >= 1:
            raise ValueError("schedule.warmup_frac must be < 1 (a fraction of the stage's steps)")
        return self


class EvalConfig(Frozen):
    """How much held-out data a stage's closing eval reads."""

    num_examples: PositiveInt = 128
    """Held-out items per eval set."""
    batch_size: PositiveInt = 32
    """Items per eval forward."""


class LauncherConfig(Frozen):
    """Where a stage's training runs: in the flow's own process, or data-parallel in child processes
    started by `torchrun`, training with gradients all-reduced (DDP semantics; kind `torchrun`) or
    under DeepSpeed's ZeRO engine (kind `deepspeed`).

    The global batch is fixed: `batch_size` counts sequences per optimizer step summed over all
    ranks; each rank takes every world_size-th micro-batch of the step and gradients are averaged
    over ranks, so on the generated datasets an update equals the single-process update up to float
    summation order (tests/test_distributed.py pins the loss-curve tolerance). Users' streaming
    datasets are read in per-rank block shares, so their sample order depends on the world size
    (stages/data/shard_order.py). The whole section is still Runtime, as in torchtitan: the world
    size and ZeRO stage are how a run is executed, not what it trains, and never make a new
    artifact version.
    """

    kind: Literal["inprocess", "torchrun", "deepspeed"] = "inprocess"
    """inprocess: train in the calling process (the tiny default); torchrun / deepspeed: launch."""
    nproc_per_node: PositiveInt = 1
    """Training processes per machine (one per GPU on a cluster; gloo processes on a CPU)."""
    nnodes: PositiveInt = 1
    """Machines. With more than one, each node runs one launcher and they meet at a c10d
    rendezvous (registry/launch.py); under Slurm `srun` starts them, elsewhere each node runs
    `python -m moonforge.registry.launch node JOB.json`."""
    node_rank: NonNegativeInt | None = None
    """The flow's node when the scheduler names none (its SLURM_NODEID, a Kubernetes indexed Job's
    JOB_COMPLETION_INDEX or NODE_RANK win). Node 0 hosts the rendezvous and writes the artifact."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous (node 0's address); None: MASTER_ADDR:MASTER_PORT from the
    scheduler (infra/slurm/flow-run.sbatch exports them), else the Slurm allocation's first node."""
    rdzv_timeout_s: PositiveInt = 600
    """Seconds a node waits for the rendezvous and the other nodes before it fails, naming it."""
    node_selector: dict[str, str] = {}
    """Kubernetes node labels the stage's training pods must match, e.g.
    {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3} (infra/k8s/training_job.py)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (kind: deepspeed only): 1 shards optimizer state, 2 also gradients,
    3 also parameters (CUDA only)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend; auto = nccl on CUDA, gloo on CPU."""
    context_parallel: PositiveInt = 1
    """Ranks that share one sequence (model/context_parallel.py): each keeps 1/n of every
    sequence's activations and the attention layers gather keys and values; data parallelism
    runs over world_size / n replicas. For the long-sequence stages (long_context, long SFT);
    only stages trained by next-token loss can use it."""

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def data_parallel(self) -> int:
        """Replicas that read different micro-batches: world_size / context_parallel."""
        return self.world_size // self.context_parallel

    @model_validator(mode="after")
    def _check(self) -> LauncherConfig:
        if self.kind == "inprocess" and self.world_size > 1:
            raise ValueError(
                f"launcher: nproc_per_node={self.nproc_per_node} x nnodes={self.nnodes} needs a "
                "launcher; set launcher.kind to torchrun or deepspeed"
            )
        if self.world_size % self.context_parallel:
            raise ValueError(
                f"launcher.context_parallel={self.context_parallel} does not divide the "
                f"{self.world_size} ranks (nproc_per_node x nnodes); use a divisor of "
                f"{self.world_size} (within one node's processes is best)"
            )
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(
                f"launcher.node_rank={self.node_rank} is not below nnodes={self.nnodes}; "
                f"nodes are numbered 0..{self.nnodes - 1}"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"launcher.rdzv_endpoint={self.rdzv_endpoint!r}: use host:port, "
                    "e.g. node0.cluster:29400 (node 0's address, a port every node reaches)"
                )
        return self


class InitConfig(Frozen):
    """Weights a stage loads into its model before training: refs to imported checkpoints
    (`moonforge import`) or other artifacts, per part (`vlm` = vision + projector + LM).

    Example: `init: {vision: siglip@latest, lm: moonlight@latest}`. Each part's shape must match
    the recipe's `model:` section (the vision position grid is resampled when only its side
    differs). Loaded after the upstream checkpoint, so init wins over it for the parts it names.
    """

    vlm: str | None = None
    """A whole-VLM artifact (e.g. an imported Kimi-VL): all three parts."""
    vision: str | None = None
    """MoonViT weights (e.g. an imported SigLIP vision tower)."""
    projector: str | None = None
    """Projector weights."""
    lm: str | None = None
    """LM weights (e.g. an imported DeepSeek-V3 / Moonlight, Llama or Qwen2)."""

    @model_validator(mode="after")
    def _check(self) -> InitConfig:
        named = self.parts()
        if not named:
            raise ValueError(
                "init: name at least one of vlm, vision, projector, lm (a ref such as moonlight@latest)"
            )
        if self.vlm is not None and len(named) > 1:
            raise ValueError(
                "init: vlm already covers vision, projector and lm; give vlm alone or the parts alone"
            )
        return self

    def parts(self) -> dict[str, str]:
        """Part name -> ref, for the parts that are set."""
        return {
            k: v
            for k, v in (
                ("vlm", self.vlm),
                ("vision", self.vision),
                ("projector", self.projector),
                ("lm", self.lm),
            )
            if v is not None
        }


class StageConfig(Frozen):
    """Fields every stage has. Subclasses add their mechanism's fields and fix `kind`."""

    kind: str
    """Which stage function runs (a canonical stage name)."""
    name: str | None = None
    """Instance name in the recipe; defaults to `kind` (recipes may run a kind twice)."""
    upstream: str | None
    """Name of the stage whose artifact this one starts from; None = from scratch / init."""
    data: tuple[str, ...] = ()
    """Datasets (dvc.yaml outputs) this stage reads, by name."""
    trainable: tuple[ModuleGroup, ...]
    """Module groups that receive gradients; all others are frozen (requires_grad=False)."""
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    seq_len: PositiveInt
    """Packed sequence length in tokens (LM) for this stage."""
    batch_size: PositiveInt
    """Sequences (or image-text pairs) per optimizer step, summed over micro-batches and ranks."""
    micro_batch_size: PositiveInt | None = None
    """Sequences per forward; batch_size / micro_batch_size micro-batches are accumulated."""
    num_steps: PositiveInt | None = None
    """Optimizer steps. Set this or num_tokens."""
    num_tokens: PositiveFloat | None = None
    """Token budget (e.g. 2.0e12); steps = num_tokens / (batch_size * seq_len)."""
    router_bias_update: NonNegativeFloat = 1e-3
    """Aux-loss-free balancing: bias step u per optimizer step (0 freezes the bias)."""
    seed: NonNegativeInt = 0
    """Seed for init, data order and sampling."""
    eval: EvalConfig = EvalConfig()

    log_every: Runtime[PositiveInt] = 10
    """Steps between metric flushes."""
    checkpoint_every: Runtime[PositiveInt | None] = None
    """Steps between periodic checkpoints (None: only the final one)."""
    num_workers: Runtime[NonNegativeInt] = 0
    """Data-loader worker processes."""
    activation_checkpointing: Runtime[bool] = False
    """Recompute each LM / ViT / stage-1 tower block's activations in the backward instead of
    keeping them (stages/train/activation_ckpt.py): much less activation memory for ~1/3 more
    compute; the same gradients, so not part of the fingerprint."""
    compile: Runtime[bool] = False
    """torch.compile every LM decoder block (stages/train/compile_blocks.py): the first step
    pays the compile, later ones run fused (1.1x on the CPU benchmark's LM); off by default,
    since the tiny stages are too short to earn the compile back. Same math, not fingerprinted."""
    launcher: Runtime[LauncherConfig] = LauncherConfig()
    """How training is launched (in process, torchrun, deepspeed); never changes the math."""
    init: Runtime[InitConfig | None] = None
    """Weights to start from per part (see InitConfig). Runtime only as written: the refs are
    resolved and the fingerprints of the artifacts they name enter the fingerprint as `init`,
    so `siglip@latest` and `siglip@3` are the same input when they name the same artifact."""

    @model_validator(mode="after")
    def _check_budget(self) -> StageConfig:
        if (self.num_steps is None) == (self.num_tokens is None):
            raise ValueError(
                f"stage {self.stage_name!r}: set exactly one of num_steps or num_tokens (e.g. num_steps: 200)"
            )
        mb = self.micro_batch_size
        if mb is not None and self.batch_size % mb:
            raise ValueError(
                f"stage {self.stage_name!r}: batch_size={self.batch_size} is not a multiple of "
                f"micro_batch_size={mb}; pick a micro-batch that divides it"
            )
        cp = self.launcher.context_parallel
        if cp > 1 and not self.context_parallel_ok:
            raise ValueError(
                f"stage {self.stage_name!r}: launcher.context_parallel={cp}, but a {self.kind} "
                "stage has no sharded-sequence loss (only stages trained by next-token loss do); "
                "set launcher.context_parallel: 1"
            )
        if cp > 1 and self.seq_len % (2 * cp):  # two zig-zag chunks a rank
            raise ValueError(
                f"stage {self.stage_name!r}: seq_len={self.seq_len} does not divide over "
                f"launcher.context_parallel={cp} ranks (2 chunks a rank); set seq_len to a "
                f"multiple of {2 * cp}"
            )
        world = self.launcher.data_parallel  # replicas: a context-parallel group reads together
        if world > 1 and self.batch_size % world:
            raise ValueError(
                f"stage {self.stage_name!r}: batch_size={self.batch_size} does not divide over "
                f"{world} ranks (launcher.nproc_per_node x nnodes); the global batch stays fixed, "
                f"so set batch_size to a multiple of {world} or change launcher.nproc_per_node"
            )
        if world > 1 and self.grad_accum % world:
            raise ValueError(
                f"stage {self.stage_name!r}: {self.grad_accum} micro-batch(es) of "
                f"{self.micro_batch_size or self.batch_size} per step cannot be shared by {world} "
                f"ranks; set micro_batch_size to {self.batch_size // world} (or a divisor of it)"
            )
        return self

    @property
    def stage_name(self) -> str:
        return self.name or self.kind

    @property
    def context_parallel_ok(self) -> bool:
        """Whether this kind of stage can shard its sequences (overridden by the stages that
        cannot: contrastive pretraining, RL, long2short)."""
        return True

    @property
    def steps(self) -> int:
        """Optimizer steps this stage runs (from num_steps or the token budget)."""
        if self.num_steps is not None:
            return self.num_steps
        assert self.num_tokens is not None  # the validator requires exactly one of the two
        return max(1, round(self.num_tokens / (self.batch_size * self.seq_len)))

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)
