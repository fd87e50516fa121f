"""The run: ``TrainConfig`` drives the optimiser and schedule, ``DataConfig`` says where tokens
come from, ``RunConfig`` holds both with the ``ModelConfig`` (everything ``looplm train`` needs).
Each section is validated when constructed and refuses unknown keys."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from looplm.config.model import MAX_SETTING, ModelConfig
from looplm.config.values import check as _check
from looplm.config.values import check_finite, dataclass_items, from_dict
from looplm.errors import LoopLMError
from looplm.precision import check_precision

OBJECTIVES = ("stage1", "last", "mean", "act")
DEPTH_SAMPLING = ("fixed", "uniform", "poisson")
PARALLEL = ("none", "ddp", "fsdp")
LOG_SINKS = ("tensorboard", "wandb")  # optional, besides metrics.jsonl (looplm.training.loggers)
OPTIMIZERS = ("adamw", "muon")
UPCYCLE_ORDERS = ("cycle", "interleave")
FITTED_TOKENIZERS = ("bpe", "word", "char", "auto")  # built from the training text itself
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


MAX_THREADS = 1024  # CPU threads a run or benchmark may ask for (OpenMP crashed at 100,000)


@dataclass
class TrainConfig:
    """Optimiser, schedule and objective (docs/MATH.md §2, §5 training recipes)."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    objective: str = "stage1"
    entropy_beta: float = 0.1
    entropy_beta_final: float | None = None
    act_ponder_weight: float = 0.01
    stage: int = 1
    init: str | None = None
    stage2_k: float = 50.0
    stage2_gamma: float = 0.005
    # Depth sampling (Huginn / Parcae): loop steps drawn per optimiser step, backprop through the last k.
    depth_sampling: str = "fixed"
    depth_mean: float | None = None
    depth_min: int = 1
    depth_max: int | None = None
    backprop_steps: int = 0
    parallel: str = "none"
    activation_checkpointing: bool = False
    spike_factor: float = 0.0
    # Distillation (looplm.training.distill): a frozen teacher checkpoint.
    distill_teacher: str | None = None
    distill_teacher_steps: int | None = None
    distill_temperature: float = 1.0
    distill_alpha: float = 0.5
    distill_loop_penalty: float = 0.0
    # Recipes: loop-step curriculum (looplm.training.curriculum), upcycling (looplm.training.upcycle),
    # optimiser choice (looplm.training.optim).
    loop_curriculum_start: int = 0
    loop_curriculum_steps: int = 0
    upcycle_from: str | None = None
    upcycle_order: str = "cycle"
    optimizer: str = "adamw"
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    eval_every: int = 200
    eval_batches: int = 4
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    # Float precision of the forward pass (looplm.precision): auto = bf16 autocast on CUDA, and on
    # CPUs with native bf16 (avx512_bf16, amx_bf16) for d_model >= 256; fp32 elsewhere.
    precision: str = "auto"
    compile: bool = False
    threads: int = 0
    # Logging (looplm.training.loggers): metrics.jsonl always; extra sinks, W&B names; MFU's denominator.
    log_to: str = ""
    wandb_project: str = "looplm"
    run_name: str | None = None
    peak_tflops: float = 0.0
    # Stage schedules: β stays entropy_beta before this step, then moves linearly to
    # entropy_beta_final at the last step; RoPE θ by step ("STEP:THETA,...", θ from each step on).
    entropy_beta_anneal_start: int = 0
    rope_theta_schedule: str = ""

    def __post_init__(self) -> None:
        check_finite(dataclass_items(self), "train")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_last"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "seq_len", "grad_accum"):  # sizes of tensors: 10**30 overflowed torch
            _check(getattr(self, name) <= MAX_SETTING,
                   f"train.{name} must be <= {MAX_SETTING}, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "threads"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.seed <= MAX_SEED, f"train.seed must be in [0, 2**32 - 1 = {MAX_SEED}], got {self.seed}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
               f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.stage in (1, 2), f"train.stage must be 1 (train the model) or 2 (train the exit gate only),"
               f" got {self.stage}")
        _check(self.stage == 1 or self.init, "train.stage=2 trains the exit gate of a trained model: give --init CKPT")
        _check(self.depth_sampling in DEPTH_SAMPLING,
               f"train.depth_sampling must be one of {', '.join(DEPTH_SAMPLING)}, got {self.depth_sampling!r}")
        _check(self.depth_min >= 1 and (self.depth_max is None or self.depth_max >= self.depth_min),
               f"train.depth_min must be >= 1 and <= train.depth_max, got {self.depth_min}, {self.depth_max}")
        _check(self.depth_mean is None or self.depth_mean > 0, f"train.depth_mean must be > 0, got {self.depth_mean}")
        _check(self.distill_temperature > 0, f"train.distill_temperature must be > 0, got {self.distill_temperature}")
        _check(0 <= self.distill_alpha <= 1, f"train.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        _check(self.distill_loop_penalty >= 0,
               f"train.distill_loop_penalty must be >= 0, got {self.distill_loop_penalty}")
        _check(self.spike_factor == 0 or self.spike_factor > 1,
               f"train.spike_factor must be 0 (off) or > 1, got {self.spike_factor}")
        _check(self.backprop_steps >= 0, f"train.backprop_steps must be >= 0 (0 = all), got {self.backprop_steps}")
        check_precision(self.precision, "train.precision")
        _check(self.parallel in PARALLEL, f"train.parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        _check(self.objective in OBJECTIVES,
               f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _check(self.entropy_beta >= 0, f"train.entropy_beta must be >= 0, got {self.entropy_beta}")
        _check(self.entropy_beta_final is None or self.entropy_beta_final >= 0,
               f"train.entropy_beta_final must be >= 0, got {self.entropy_beta_final}")
        _check(self.act_ponder_weight >= 0, f"train.act_ponder_weight must be >= 0, got {self.act_ponder_weight}")
        _check(self.stage2_k > 0, f"train.stage2_k must be > 0 (the sharpness of Stage II's gate target; a negative"
               f" one inverts it), got {self.stage2_k}")
        _check(self.stage2_gamma >= 0, f"train.stage2_gamma must be >= 0, got {self.stage2_gamma}")
        _check(self.threads <= MAX_THREADS, f"train.threads must be at most {MAX_THREADS} (0: torch's default), got"
               f" {self.threads}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.loop_curriculum_start >= 0 and (not self.loop_curriculum_start or self.loop_curriculum_steps >= 1),
               "train.loop_curriculum_start (0 = off) needs train.loop_curriculum_steps >= 1, got"
               f" {self.loop_curriculum_start}, {self.loop_curriculum_steps}")
        _check(not (self.upcycle_from and self.init),
               "give either train.init (same shape) or train.upcycle_from (another shape), not both")
        _check(self.upcycle_order in UPCYCLE_ORDERS,
               f"train.upcycle_order must be one of {', '.join(UPCYCLE_ORDERS)}, got {self.upcycle_order!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(not (self.optimizer == "muon" and self.parallel == "fsdp"),
               "train.optimizer=muon is not supported with --parallel fsdp yet (sharded Muon is untested):"
               " use adamw, or --parallel ddp")
        _check(self.muon_lr is None or self.muon_lr > 0, f"train.muon_lr must be > 0, got {self.muon_lr}")
        _check(0 <= self.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        unknown_sinks = [name for name in self.log_sinks() if name not in LOG_SINKS]
        _check(not unknown_sinks, f"train.log_to takes a comma list of {', '.join(LOG_SINKS)} (metrics.jsonl is"
               f" always written), got {self.log_to!r}")
        _check(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = look up the GPU), got {self.peak_tflops}")
        _check(self.entropy_beta_anneal_start >= 0,
               f"train.entropy_beta_anneal_start must be >= 0, got {self.entropy_beta_anneal_start}")
        self.rope_thetas()  # one-line errors for a schedule that does not parse

    def log_sinks(self) -> tuple[str, ...]:
        """train.log_to as names: "tensorboard,wandb" -> ("tensorboard", "wandb")."""
        return tuple(dict.fromkeys(name.strip().lower() for name in self.log_to.split(",") if name.strip()))

    def entropy_beta_at(self, step: int) -> float:
        """β for Stage I at optimiser step ``step``: entropy_beta until entropy_beta_anneal_start,
        then linear to entropy_beta_final at the last step (constant without a final value)."""
        if self.entropy_beta_final is None or step <= self.entropy_beta_anneal_start:
            return self.entropy_beta
        start = self.entropy_beta_anneal_start
        fraction = min((step - start) / max(self.steps - 1 - start, 1), 1.0)
        return self.entropy_beta + fraction * (self.entropy_beta_final - self.entropy_beta)

    def rope_thetas(self) -> list[tuple[int, float]]:
        """train.rope_theta_schedule as [(first step, θ)], ascending: "0:1e4,500:1e6"."""
        stages = []
        for item in filter(None, (part.strip() for part in self.rope_theta_schedule.split(","))):
            step, _, theta = item.partition(":")
            try:
                stages.append((int(step), float(theta)))
            except ValueError:
                raise LoopLMError(f"train.rope_theta_schedule takes STEP:THETA pairs separated by commas, got"
                                  f" {item!r}") from None
        steps = [step for step, _ in stages]
        _check(all(step >= 0 for step in steps) and steps == sorted(set(steps)),
               f"train.rope_theta_schedule needs distinct ascending steps >= 0, got {self.rope_theta_schedule!r}")
        _check(all(theta > 0 for _, theta in stages), f"train.rope_theta_schedule needs θ > 0, got"
               f" {self.rope_theta_schedule!r}")
        return stages

    def rope_theta_at(self, step: int, base: float) -> float:
        """RoPE θ at optimiser step ``step``: the last schedule entry at or before it, else ``base``."""
        theta = base
        for first, value in self.rope_thetas():
            if step >= first:
                theta = value
        return theta


@dataclass
class DataConfig:
    """Where training tokens come from: prepared shards, raw text files, or a built-in task."""

    path: str | None = None
    task: str | None = None
    task_options: dict = field(default_factory=dict)
    # byte, bpe (trained on the data), word / char / auto (fitted to the data: looplm.data.word_char),
    # or a tokenizer.json path.
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    text_field: str = "text"  # the field / column holding the text in .jsonl, .parquet and hf: data

    def __post_init__(self) -> None:
        check_finite(dataclass_items(self), "data")
        _check(not (self.path and self.task), "give either data.path or data.task, not both")
        _check(not (self.task and self.tokenizer in FITTED_TOKENIZERS),
               f"data.tokenizer={self.tokenizer} is fitted to text data; a task uses byte or a tokenizer.json")
        _check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(isinstance(self.text_field, str) and self.text_field != "",
               f"data.text_field must name a field, got {self.text_field!r}")


@dataclass
class RunConfig:
    """Everything ``looplm train`` needs: model, training and data sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        _check(isinstance(raw, dict), "a run config must be a mapping with model/train/data sections")
        unknown = set(raw) - {"model", "train", "data"}
        if unknown:
            raise LoopLMError(f"unknown config section {sorted(unknown)[0]!r}: use model, train or data")
        return cls(
            model=from_dict(ModelConfig, raw.get("model", {}), "model"),
            train=from_dict(TrainConfig, raw.get("train", {}), "train"),
            data=from_dict(DataConfig, raw.get("data", {}), "data"),
        )

    def to_dict(self) -> dict:
        """Flat sections: {"model": {...}, "train": {...}, "data": {...}} (run_config.json)."""
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data)}
