"""The `diffusion` section of a recipe: UNet, schedule, optimiser, training and sampling (Suppl. A.5-A.6).

    diffusion:
      model:    {model_channels: 256, channel_mult: [1, 2, 3, 4], ...}     brics_cli/models/unet.py
      schedule: {name: cosine-variant, start: 0.2, end: 1.0, tau: 1.5}     a SCHEDULES entry
      optim:    {lr: 8.0e-4, warmup_steps: 10000, decay_steps: 1000000, ema: 0.9999}
      train:    {steps, batch: 64, micro_batch, bf16, compile, log_every, sample_every, checkpoint_every,
                 eval_every: 0, eval_samples, eval_sampler, eval_steps, eval_batch, eval_seed}
      sample:   {sampler: ddpm, steps: 1000, eta: 0.0, clip_x0: true}      a SAMPLERS entry

`schedule` is resolved through the registry by its `name` like `ae.decoder`: its other keys are the
registered schedule's own Config dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from brics_cli.errors import ConfigError, RegistryError
from brics_cli.models.unet import UNetConfig
from brics_cli.registry import SAMPLERS, SCHEDULES


def _default_schedule() -> Any:
    return SCHEDULES.get("cosine-variant").Config()  # Table 4's config (b), the paper's default


@dataclass
class DiffusionOptimConfig:
    """Adam with linear warm-up and cosine decay, EMA of the weights (Suppl. A.6)."""

    lr: float = 8e-4  # the paper; the authors' code trains with 8e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 10_000  # linear warm-up over the first 1e4 iterations
    decay_steps: int = 1_000_000  # cosine decay over 1e6 iterations (training stops at 400k in the paper)
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    ema: float = 0.9999  # EMA decay of the weights used for sampling; 0 = no EMA
    grad_clip: float | None = None  # max global gradient norm; null = no clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"diffusion.optim.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"diffusion.optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError("diffusion.optim.warmup_steps must be >= 0 and decay_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"diffusion.optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"diffusion.optim.ema must lie in [0, 1), got {self.ema}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"diffusion.optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class DiffusionTrainConfig:
    steps: int = 400_000  # the paper's 400k iterations
    batch: int = 64  # global batch over all ranks (Suppl. A.6), as ae.train.batch
    micro_batch: int | None = None  # per rank and forward pass; None: batch / ranks (no accumulation)
    bf16: bool = False  # autocast on CUDA; the loss, the optimiser and the EMA stay fp32
    compile: bool = False  # torch.compile the training model (the DDP-wrapped UNet under torchrun)
    seed: int = 0
    keep: int = 3  # checkpoints kept
    log_every: int = 100
    sample_every: int = 10_000  # write a grid of samples from the EMA model
    checkpoint_every: int = 10_000
    max_bad_steps: int = 10  # bad steps in a row (non-finite loss, or weights failing the check) before a rollback
    max_rollbacks: int = 2  # rollbacks in a row to the same checkpoint before the run stops
    # Metrics while training (Fig. 11; brics_cli/train/eval_curve.py). Off by default: one evaluation
    # costs eval_samples x eval_steps UNet passes (+ a decode and an Inception pass for FID): 50k
    # passes with the defaults, the compute of a few hundred training steps of batch 64.
    eval_every: int = 0  # steps between evaluations (and one at the last step); 0 = off
    eval_samples: int = 1000  # codes sampled with the EMA UNet per evaluation (the paper's curve: 5000)
    eval_sampler: str = "ddim"  # a SAMPLERS entry, run deterministically (eta = 0)
    eval_steps: int = 50  # sampler steps of each evaluation
    eval_batch: int = 64  # codes per sampler / decoder / Inception batch (whole batches per rank)
    eval_seed: int = 0  # the noise of sample i (the same at every evaluation) and the reference codes drawn

    def validate(self) -> None:
        if min(self.steps, self.log_every, self.sample_every, self.checkpoint_every, self.max_bad_steps) < 1:
            raise ValueError("diffusion.train.steps, max_bad_steps and the *_every intervals must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"diffusion.train.eval_every must be >= 0 (0 = off), got {self.eval_every}")
        if self.eval_samples < 2:
            raise ValueError(f"diffusion.train.eval_samples must be >= 2 (a covariance needs two), got {self.eval_samples}")
        if self.eval_steps < 1 or self.eval_batch < 1:
            raise ValueError(f"diffusion.train.eval_steps and eval_batch must be >= 1, got {self.eval_steps} and {self.eval_batch}")
        if self.eval_sampler not in SAMPLERS:
            try:
                SAMPLERS.get(self.eval_sampler)
            except RegistryError as exc:  # lists what exists and the closest name
                raise ValueError(f"diffusion.train.eval_sampler: {exc}") from None
        if self.batch < 1:
            raise ValueError(f"diffusion.train.batch must be >= 1, got {self.batch}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"diffusion.train.micro_batch must be >= 1 or null, got {self.micro_batch}")
        if self.max_rollbacks < 0:
            raise ValueError(f"diffusion.train.max_rollbacks must be >= 0, got {self.max_rollbacks}")

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro-batch per rank, accumulation steps) so that micro * accum * ranks == batch (as ae.train)."""
        if self.batch % world_size:
            raise ConfigError(f"diffusion.train.batch={self.batch} is not divisible by the {world_size} ranks")
        per_rank = self.batch // world_size
        micro = self.micro_batch or per_rank
        if per_rank % micro:
            raise ConfigError(f"diffusion.train.micro_batch={micro} does not divide the per-rank batch {per_rank} "
                              f"(= diffusion.train.batch {self.batch} / {world_size} ranks)")
        return micro, per_rank // micro


NO_ETA_SAMPLERS = ("ddpm", "dpm-solver++", "heun")  # the built-ins without an eta (ddim has one)


@dataclass
class DiffusionSampleConfig:
    # A SAMPLERS entry: ddpm (ancestral), ddim, dpm-solver++ (2M) or heun (EDM); brics_cli/diffusion/samplers.py
    sampler: str = "ddpm"
    steps: int = 1000  # the authors sample with 1000 ancestral steps; heun: intervals, ~2 UNet calls each
    eta: float = 0.0  # ddim only: 0 = deterministic, 1 = ancestral
    clip_x0: bool = True  # clamp each x0 prediction to [-1, 1]

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            try:
                SAMPLERS.get(self.sampler)
            except RegistryError as exc:  # lists what exists and the closest name
                raise ValueError(f"diffusion.sample.sampler: {exc}") from None
        if self.steps < 1:
            raise ValueError(f"diffusion.sample.steps must be >= 1, got {self.steps}")
        if self.eta < 0 or (self.sampler in NO_ETA_SAMPLERS and self.eta != 0):
            raise ValueError(f"diffusion.sample.eta must be >= 0 and applies to ddim only (got {self.eta} for {self.sampler})")


@dataclass
class DiffusionStageConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: Any = field(default_factory=_default_schedule, metadata={"registry": SCHEDULES})
    optim: DiffusionOptimConfig = field(default_factory=DiffusionOptimConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    sample: DiffusionSampleConfig = field(default_factory=DiffusionSampleConfig)

    # What a resumed run must share with its checkpoint; optim, train and sample may change.
    RESUME_MUST_MATCH: ClassVar[tuple[str, ...]] = ("model", "schedule")


def lr_multiplier(cfg: DiffusionOptimConfig) -> Callable[[int], float]:
    """step -> factor on cfg.lr, for `torch.optim.lr_scheduler.LambdaLR`.

    Linear warm-up times a cosine over `decay_steps` counted from step 0, as the authors' trainer
    composes them (a warm-up dampening on top of CosineAnnealingLR); flat at min_lr_ratio after.
    """

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        progress = min(step, cfg.decay_steps) / cfg.decay_steps
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return warmup * cosine

    return factor


def build_optimizer(cfg: DiffusionOptimConfig, params: Any) -> tuple[Any, Any]:
    """(Adam, LambdaLR) for the UNet's parameters; call `scheduler.step()` after every optimiser step."""
    import torch

    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
