"""`brics ae-train`: the autoencoder stage (paper Sec. 3.3-3.4, Suppl. A.2-A.4).

The encoder, grids, F_mlp and decoder (the "generator") train jointly against the discriminator:

    L_G = w_l2 * MSE + w_p * perceptual + L_adv + w_kl * KL        (Eq. 5, Suppl. A.3-A.4)
    L_D = WGAN + w_gp * gradient penalty   |   logistic + lazy R1 (the authors' code)

One step = one global batch (the recipe's `ae.train.batch`), split over ranks and, when
`micro_batch` asks for it, accumulated over several micro-batches per rank. The generator is
wrapped in DistributedDataParallel under torchrun; the discriminator's gradients are averaged by
hand because its gradient penalty differentiates through a gradient (double backward), which
DDP's reducer does not support. Everything a rerun needs to continue bit for bit -- weights, EMA,
optimiser moments, RNG states, the data position -- is in the checkpoint. Only models that pass the
divergence guard's weight check are checkpointed; on a bad streak the run rolls back to the last
checkpoint (brics_cli/train/guard.py).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli import __version__
from brics_cli.config import to_dict
from brics_cli.core import checkpoint as ckpt
from brics_cli.core.images import save_image_grid
from brics_cli.core.progress import Progress
from brics_cli.core.rng import gather_states, restore_states, seed_rank
from brics_cli.core.runtime import Runtime, seed_everything
from brics_cli.data.loader import make_loader
from brics_cli.errors import BricsError, ConfigError
from brics_cli.models.autoencoder import BRICSAutoencoder, decoder_provenance
from brics_cli.models.discriminator import Discriminator
from brics_cli.models.keycode import key_queries, tile_key_codes
from brics_cli.train.ema import EMA
from brics_cli.train.guard import (
    DivergenceGuard,
    StopRequest,
    bad_terms,
    checkpoint_or_stop,
    grad_norm,
    load_checked,
    read_resumable,
)
from brics_cli.train.losses import (
    gradient_penalty,
    kl_loss,
    logistic_discriminator_loss,
    logistic_generator_loss,
    r1_penalty,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from brics_cli.train.metrics_log import MetricsLog, Throughput
from brics_cli.train.optim import build_optimizers


@dataclass
class AETrainConfig:
    steps: int = 400_000  # optimiser steps (the paper does not state its AE budget)
    batch: int = 12  # global batch over all ranks (Suppl. C: 12 for the reconstruction stage)
    micro_batch: int | None = None  # per rank and forward pass; None: batch / ranks (no accumulation)
    ema: float = 0.999  # EMA decay of the generator, per step
    seed: int = 0
    log_every: int = 50
    sample_every: int = 2000  # inputs over EMA reconstructions of a fixed validation batch
    checkpoint_every: int = 2000
    keep: int = 3  # checkpoints kept
    val_images: int = 8  # the fixed validation batch of the sample grids
    eval_images: int = 64  # held-out images for the final EMA PSNR/SSIM (0: skip)
    bf16: bool = False  # autocast on CUDA; grids, losses and the optimiser stay fp32
    compile: bool = False  # torch.compile the generator and discriminator
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume tests)
    max_bad_steps: int = 10  # bad steps in a row (non-finite loss, or weights failing the check) before a rollback
    max_rollbacks: int = 2  # rollbacks in a row to the same checkpoint before the run stops
    r1_every: int = 16  # lazy R1 interval for loss.gan=logistic-r1

    def validate(self) -> None:
        for name in ("steps", "batch", "log_every", "sample_every", "checkpoint_every", "max_bad_steps", "r1_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ae.train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rollbacks < 0:
            raise ValueError(f"ae.train.max_rollbacks must be >= 0, got {self.max_rollbacks}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"ae.train.micro_batch must be >= 1 or null, got {self.micro_batch}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ae.train.ema must lie in [0, 1), got {self.ema}")


def accumulation(batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) so that micro * accum * ranks == batch."""
    if batch % world_size:
        raise ConfigError(f"ae.train.batch={batch} is not divisible by the {world_size} ranks")
    per_rank = batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"ae.train.micro_batch={micro} does not divide the per-rank batch {per_rank} "
            f"(= ae.train.batch {batch} / {world_size} ranks)"
        )
    return micro, per_rank // micro


# -- the trainer ----------------------------------------------------------------------------------


class AETrainer:
    """Holds the models, optimisers and state of one ae-train run; `run()` trains to `steps`."""

    def __init__(self, recipe, run_dir: Path, rt: Runtime, perceptual: nn.Module | None = None) -> None:
        self.recipe = recipe
        self.cfg: AETrainConfig = recipe.ae.train
        self.loss_cfg = recipe.ae.loss
        self.run_dir = Path(run_dir)
        self.rt = rt
        self.micro, self.accum = accumulation(self.cfg.batch, rt.world_size, self.cfg.micro_batch)
        seed_everything(self.cfg.seed, self.cfg.deterministic)
        resolution = recipe.data.resolution
        self.ae = BRICSAutoencoder(recipe.ae, resolution).to(rt.device)
        self.disc = Discriminator(recipe.ae.discriminator, resolution).to(rt.device)
        self.ema = EMA(self.ae, self.cfg.ema)
        self.g_opt, self.d_opt = build_optimizers(recipe.ae.optim, self.ae, self.disc)
        self.perceptual = perceptual
        self.gan = self.loss_cfg.gan
        self.g_model: nn.Module = self.ae
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.g_model = DDP(self.ae, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        self.d_model: nn.Module = self.disc
        if self.cfg.compile:
            self.g_model = torch.compile(self.g_model)
            self.d_model = torch.compile(self.disc)
        seed_rank(self.cfg.seed, rt.rank)  # the weights above are every rank's; the noise from here on is each rank's own
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.checkpoints = ckpt.CheckpointDir(self.run_dir / "checkpoints", self.cfg.keep)
        self.guard = DivergenceGuard(self.cfg.max_bad_steps, self.cfg.max_rollbacks,
                                     fix="lower ae.optim.lr (or ae.optim.d_lr) in a new run (--out), or check the data")
        self.guard.weights_problem(self.checked_modules(), rt, fresh=True)  # the growth test starts from the initial weights
        self.last_checkpoint: Path | None = None  # the newest checkpoint: every one passed the weight check
        self.skipped_samples = 0

    def checked_modules(self) -> dict[str, nn.Module]:
        """What the weight check covers: everything a checkpoint holds weights of."""
        return {"ae": self.ae, "ema": self.ema.module, "disc": self.disc}

    # ---- checkpoint state ----
    def state(self, rng: tuple[dict[str, Tensor], dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The checkpoint's tensors and metadata; `rng`: every rank's states (`core.rng.gather_states`)."""
        tensors: dict[str, Tensor] = {}
        for prefix, module in (("ae", self.ae), ("ema", self.ema.module), ("disc", self.disc)):
            tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        g_t, g_m = ckpt.optimizer_state(self.g_opt, "opt_g")
        d_t, d_m = ckpt.optimizer_state(self.d_opt, "opt_d")
        r_t, r_m = rng
        tensors.update(g_t | d_t | r_t)
        meta = {
            "kind": "ae",
            "step": self.step,
            "config": to_dict(self.recipe),
            "decoder": decoder_provenance(self.recipe.ae.decoder.name),
            "retrieval": self.recipe.ae.grid.retrieval,
            "brics_version": __version__,
            "torch_version": torch.__version__,
            "world_size": self.rt.world_size,
            "optim": {"g": g_m, "d": d_m},
            "rng": r_m,
            "data": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "ema_updates": self.ema.updates,
            "bad_steps": self.guard.total,
            "skipped_samples": self.skipped_samples,
        }
        return tensors, meta

    def save(self) -> str | None:
        """Checkpoint this step if the model passes the weight check; otherwise why not (nothing written)."""
        problem = self.guard.weights_problem(self.checked_modules(), self.rt)
        if problem:
            return problem
        rng = gather_states(self.rt, data={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch})  # a collective
        if self.rt.is_main:
            tensors, meta = self.state(rng)
            self.checkpoints.save(self.step, tensors, meta)
        self.rt.barrier()
        self.last_checkpoint = self.checkpoints.path(self.step)  # on every rank: the rollback target
        return None

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint; raises `UnusableCheckpoint` for a file that cannot be resumed from."""
        meta = read_resumable(path, "ae", ("step", "config", "optim", "rng", "data", "ema_updates"), self.recipe,
                              "start a new run (run.dir=... or --out)")
        if meta.get("world_size", 1) != self.rt.world_size:
            self.log(f"note: resuming a {meta.get('world_size')}-rank run on {self.rt.world_size} ranks: the ranks it had "
                     "restore their random streams, new ones start fresh; data order and noise differ from an uninterrupted run")
        load_checked(path, meta, self._load_state, self.guard, self.checked_modules(), self.rt)
        self.last_checkpoint = path

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        for prefix, module in (("ae", self.ae), ("ema", self.ema.module), ("disc", self.disc)):
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        ckpt.load_optimizer_state(self.g_opt, "opt_g", tensors, meta["optim"]["g"])
        ckpt.load_optimizer_state(self.d_opt, "opt_d", tensors, meta["optim"]["d"])
        self.step = meta["step"]
        self.epoch = meta["data"]["epoch"]
        self.batch_in_epoch = meta["data"]["batch_in_epoch"]
        mine = restore_states(tensors, meta["rng"], self.rt.rank)
        if mine is None:  # a rank the checkpoint's run did not have: fresh streams, derived from the step
            seed_rank(self.cfg.seed + self.step, self.rt.rank)
        elif "data" in mine:  # this rank's own reading position
            self.epoch, self.batch_in_epoch = mine["data"]["epoch"], mine["data"]["batch_in_epoch"]
        self.ema.updates = meta["ema_updates"]
        self.guard.total = meta.get("bad_steps", 0)
        self.skipped_samples = meta.get("skipped_samples", 0)

    def roll_back(self) -> None:
        """Reload the checkpoint the guard chose -- weights, EMA, optimisers, RNG, data position -- and say so."""
        total, message = self.guard.total, self.guard.message
        self.resume(self.guard.target)
        self.guard.rolled_back(total)
        self.log(message)

    def log(self, message: str) -> None:
        if self.rt.is_main:
            self.progress.log(message) if getattr(self, "progress", None) else print(message, file=sys.stderr)

    # ---- one step ----
    def _autocast(self):
        if self.cfg.bf16 and self.rt.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def gan_active(self) -> bool:
        return self.gan != "none" and self.step >= self.loss_cfg.gan_start

    def generator_step(self, micro_batches: list[Tensor]) -> tuple[dict[str, float], list[Tensor]]:
        lc = self.loss_cfg
        use_gan = self.gan_active()
        self.disc.requires_grad_(False)
        self.g_opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        fakes = []
        for i, x in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == len(micro_batches) - 1 or not self.rt.distributed else self.g_model.no_sync()
            with sync:
                with self._autocast():
                    out = self.g_model(x)
                recon = out.recon.float()
                terms = {"l2": F.mse_loss(recon, x)}
                loss = lc.l2 * terms["l2"]
                if self.perceptual is not None and lc.perceptual > 0:
                    terms["perceptual"] = self.perceptual(recon, x).mean()
                    loss = loss + lc.perceptual * terms["perceptual"]
                if out.kl is not None:
                    terms["kl"] = kl_loss(out.kl, x[0].numel(), out.z[0].numel(), lc.kl_normalise)  # ae.loss.kl_normalise
                    loss = loss + lc.kl * terms["kl"]
                if use_gan:
                    scores = self.d_model(recon)
                    terms["g_adv"] = wgan_generator_loss(scores) if self.gan == "wgan-gp" else logistic_generator_loss(scores)
                    loss = loss + terms["g_adv"]
                terms["g_total"] = loss
                (loss / len(micro_batches)).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(micro_batches)
            totals.setdefault("_z_mean", 0.0)
            totals["_z_mean"] += float(out.z.detach().mean()) / len(micro_batches)
            totals["_z_std"] = totals.get("_z_std", 0.0) + float(out.z.detach().std()) / len(micro_batches)
            fakes.append(recon.detach())
        self.disc.requires_grad_(True)
        return totals, fakes

    def discriminator_step(self, reals: list[Tensor], fakes: list[Tensor]) -> dict[str, float]:
        lc = self.loss_cfg
        self.d_opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        lazy_r1 = self.gan == "logistic-r1" and self.step % self.cfg.r1_every == 0
        for real, fake in zip(reals, fakes):
            with self._autocast():
                real_scores = self.d_model(real).float()
                fake_scores = self.d_model(fake).float()
            if self.gan == "wgan-gp":
                terms = {"d_adv": wgan_discriminator_loss(real_scores, fake_scores)}
                terms["gp"] = gradient_penalty(self.d_model, real, fake)
                loss = terms["d_adv"] + lc.gp * terms["gp"]
            else:
                terms = {"d_adv": logistic_discriminator_loss(real_scores, fake_scores)}
                loss = terms["d_adv"]
                if lazy_r1:  # gamma/2 * ||grad D(real)||^2, scaled by the interval (StyleGAN2)
                    terms["r1"] = r1_penalty(self.d_model, real)
                    loss = loss + lc.gp / 2 * self.cfg.r1_every * terms["r1"]
            terms["d_total"] = loss
            (loss / len(reals)).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(reals)
        return totals

    def train_step(self, micro_batches: list[Tensor]) -> dict[str, float] | None:
        """One optimiser step of G (and D). None when skipped for non-finite values. A bad step --
        a non-finite value, or weights that fail the check after it -- is counted by the guard,
        which asks for a rollback after `max_bad_steps` in a row."""
        g_terms, fakes = self.generator_step(micro_batches)
        g_params = [p for p in self.ae.parameters() if p.requires_grad]
        g_norm = grad_norm(g_params)
        values = dict(g_terms)
        values["grad_norm_g"] = g_norm
        bad_here = bad_terms({k: v for k, v in values.items() if not k.startswith("_")})
        if self.rt.any_flag(bool(bad_here)):  # every rank skips the same steps
            self.g_opt.zero_grad(set_to_none=True)
            self.guard.bad(self.step + 1, f"{', '.join(bad_here) or 'a loss on another rank'} not finite", self.last_checkpoint)
            return None
        self.g_opt.step()
        self.ema.update(self.ae)
        problem = None
        if self.gan_active():
            d_terms = self.discriminator_step(micro_batches, fakes)
            d_params = list(self.disc.parameters())
            self.rt.all_reduce_mean_([p.grad for p in d_params if p.grad is not None])
            values["grad_norm_d"] = grad_norm(d_params)
            bad_d = bad_terms(d_terms | {"grad_norm_d": values["grad_norm_d"]})
            if self.rt.any_flag(bool(bad_d)):
                self.d_opt.zero_grad(set_to_none=True)
                problem = f"{', '.join(bad_d) or 'a discriminator loss on another rank'} not finite"
            else:
                self.d_opt.step()
            values.update(d_terms)
        problem = problem or self.guard.weights_problem(self.checked_modules(), self.rt)
        if problem:
            self.guard.bad(self.step + 1, problem, self.last_checkpoint)  # numbered as checkpoints: after step + 1 steps
        else:
            self.guard.good()
        return values

    # ---- data ----
    def batches(self, loader, dataset):
        """Endless (epoch, batch index, images) stream that resumes at the recorded data position."""
        skip = self.batch_in_epoch
        while True:
            dataset.epoch = self.epoch
            produced = False
            for index, (images, _keys) in enumerate(loader):
                produced = True
                if index < skip:
                    continue
                self.batch_in_epoch = index + 1
                yield images
            if not produced:
                raise BricsError(f"data.shards: {self.recipe.data.shards} produced no training batch of {self.micro} images")
            skip = 0
            self.epoch += 1
            self.batch_in_epoch = 0
            self.skipped_samples = dataset.skipped.count

    def validation_batch(self, n: int) -> Tensor | None:
        if n <= 0:
            return None
        from dataclasses import replace

        cfg = replace(self.recipe.data, workers=0, shuffle=0, flip=False, resample=False, epoch_length=None)
        try:
            loader, _ = make_loader(cfg, n, split="val")
        except BricsError:
            loader, _ = make_loader(cfg, n, split="train")  # no val split: show training images
        for images, _ in loader:
            return images[:n].to(self.rt.device)
        return None

    @torch.no_grad()
    def write_samples(self, val: Tensor | None) -> float | None:
        """samples/step-NNNNNN.png (validation images over EMA reconstructions); returns their PSNR."""
        if val is None or not self.rt.is_main:
            return None
        with torch.random.fork_rng(devices=[]):  # previews never move the training RNG (exact resume)
            return self._write_samples(val)

    def _write_samples(self, val: Tensor) -> float:
        recon = self.ema.module.decode(self.ema.module.encode(val)[0]).float().clamp(-1, 1)
        save_image_grid(torch.cat([val, recon]), self.run_dir / "samples" / f"step-{self.step:06d}.png", per_row=len(val))
        mse = (recon - val).square().flatten(1).mean(1)
        return float((10 * torch.log10(4.0 / mse)).mean())

    @torch.no_grad()
    def code_usage(self, x: Tensor) -> float:
        """Fraction of finest-level entries the batch's key codes hit (mean over groups)."""
        with torch.random.fork_rng(devices=[]):  # the KL bottleneck samples: keep the training RNG
            z = self.ae.encode(x)[0]
        model = self.ae
        z_hat = tile_key_codes(z, (model.cfg.features.resolution,) * 2, model.cfg.code.tiling)
        return float(model.retrieval.grids.usage(key_queries(z_hat, model.cfg.code.key_channels)).mean())

    # ---- the loop ----
    def run(self, show_progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        loader, dataset = make_loader(self.recipe.data, self.micro, "train", self.rt.rank, self.rt.world_size, seed=cfg.seed)
        metrics = MetricsLog(self.run_dir, self.rt.is_main)
        metrics.truncate_after(self.step)
        val = self.validation_batch(cfg.val_images)
        self.progress = Progress(show_progress and self.rt.is_main and cfg.steps > self.step)
        bar = self.progress.task("ae-train", cfg.steps, self.step)
        stream = self.batches(loader, dataset)
        window: dict[str, float] = {}
        window_steps = 0
        throughput = Throughput()
        stopped_by: str | None = None
        val_psnr = None
        start_step = self.step
        t_start = time.perf_counter()
        try:
            with StopRequest() as stop:
                while self.step < cfg.steps or self.guard.must_roll_back:
                    if self.guard.must_roll_back:
                        self.roll_back()
                        metrics.truncate_after(self.step)  # the rolled-back steps' records go
                        stream.close()
                        stream, window, window_steps, val_psnr = self.batches(loader, dataset), {}, 0, None
                        continue
                    micro_batches = [next(stream).to(self.rt.device, non_blocking=True) for _ in range(self.accum)]
                    self.ae.train()
                    values = self.train_step(micro_batches)
                    self.step += 1
                    throughput.add(cfg.batch)
                    if values is not None:
                        for k, v in values.items():
                            window[k] = window.get(k, 0.0) + v
                        window_steps += 1
                    if self.step % cfg.sample_every == 0 or self.step == cfg.steps:
                        val_psnr = self.write_samples(val)  # logged with the next metrics record
                        metrics.image("samples", self.run_dir / "samples" / f"step-{self.step:06d}.png", self.step)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        record = {k.lstrip("_"): v / max(window_steps, 1) for k, v in window.items()}
                        record = self.rt.mean_over_ranks(record)
                        record["img_per_s"] = throughput.read()
                        record["lr"] = self.g_opt.param_groups[0]["lr"]
                        record["lr_grid"] = self.g_opt.param_groups[1]["lr"]
                        record["grid_usage"] = self.code_usage(micro_batches[0]) if self.rt.is_main else 0.0
                        if val_psnr is not None:
                            record["val_psnr_ema"] = val_psnr  # PSNR of the EMA on the fixed validation batch
                            val_psnr = None
                        record["bad_steps"] = self.guard.total
                        record["skipped_samples"] = dataset.skipped.count
                        metrics.write(self.step, record)
                        shown = {k: record[k] for k in ("l2", "perceptual", "g_adv", "d_adv") if k in record}
                        bar.update(self.step, record["img_per_s"], shown, force=True)
                        window, window_steps = {}, 0
                    stopped_by = checkpoint_or_stop(self.step, cfg.steps, cfg.checkpoint_every, stop, self.rt, self.save, self.log,
                                                    lambda why: self.guard.checkpoint_refused(self.step, why, self.last_checkpoint))
                    if stopped_by:
                        break
        finally:
            self.progress.close()
            metrics.close()
        seconds = time.perf_counter() - t_start
        in_sync = self.rt.max_rank_difference([*self.ae.parameters(), *self.disc.parameters()])
        result = {
            "run": str(self.run_dir),
            "step": self.step,
            "steps": cfg.steps,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": start_step or None,
            "stopped_by": stopped_by or None,
            "seconds": round(seconds, 2),
            "bad_steps": self.guard.total,
            "skipped_samples": dataset.skipped.count,
            "ranks": self.rt.world_size,
            "rank_param_max_diff": in_sync,  # 0.0: every rank ends with the same weights
            "micro_batch": self.micro,
            "accumulation": self.accum,
        }
        if not stopped_by and self.rt.is_main and cfg.eval_images > 0:
            result["eval"] = self.evaluate(cfg.eval_images)
        return result

    @torch.no_grad()
    def evaluate(self, n: int) -> dict[str, Any]:
        """EMA PSNR/SSIM on up to n held-out images (the val split; train split if there is none)."""
        from brics_cli.eval.recon_metrics import psnr, ssim, summarise  # the metrics of `brics reconstruct`

        images = self.validation_batch(n)
        if images is None:
            return {}
        recon = self.ema.module.decode(self.ema.module.encode(images)[0]).clamp(-1, 1)
        return {"n": images.shape[0], "psnr": summarise(psnr(recon, images)), "ssim": summarise(ssim(recon, images))}
