"""`brics diffusion-train`: the UNet on the key codes of a trained autoencoder (Sec. 4, Suppl. A.5-A.6).

1. The dataset is encoded once with the frozen EMA autoencoder (eval mode: no relaxed-precision
   noise) and cached in `RUN.DIR/codes/<key>/`, key = hash of the AE checkpoint and the shard
   manifest, so a rerun, or another diffusion run on the same AE, reuses it. Under torchrun every
   rank encodes its share of the parts. With `data.flip` the mirrored images are encoded too.
   Codes are stored as float16 (rounding error <= 2.4e-4, far below the relaxed precision
   1/(4 r_max) the decoder was trained to tolerate).
2. The UNet learns epsilon on x0 = 2z - 1 with the recipe's schedule; Adam with warm-up + cosine
   decay; EMA. One step = one global batch (`diffusion.train.batch`), split over ranks and, with
   `micro_batch`, accumulated over micro-batches per rank; `bf16` and `compile` as in ae-train.
   Same loop contract as ae-train: resume by rerunning, atomic checkpoints, DDP under
   torchrun, the divergence guard (only models that pass its weight check are checkpointed; a bad
   streak rolls back), SIGINT/SIGTERM, metrics.jsonl, sample grids decoded through the AE. On
   resume the recipe's `diffusion.optim` wins over the checkpoint's, so a lower learning rate
   after a divergence takes effect from the last good checkpoint.
3. With `diffusion.train.eval_every`, the metric curve of Fig. 11 (eval_curve.py): a code-space
   Frechet distance, and FID when the Inception weights are there, as records {"step", "eval"} of
   metrics.jsonl (truncated on resume like the others, so the curve goes on without duplicate
   steps), TensorBoard scalars eval/* and `eval-curve.png`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from brics_cli import __version__
from brics_cli.config import to_dict
from brics_cli.core import checkpoint as ckpt
from brics_cli.core.files import atomic_write_json, remove_stale_temporaries, sha256_file
from brics_cli.core.images import save_image_grid
from brics_cli.core.progress import Progress
from brics_cli.core.rng import gather_states, rank_seed, restore_states, seed_rank
from brics_cli.core.runtime import Runtime, seed_everything
from brics_cli.data.loader import ShardDataset
from brics_cli.diffusion.config import DiffusionStageConfig, build_optimizer, lr_multiplier
from brics_cli.diffusion.loss import codes_to_x0, diffusion_loss, x0_to_codes
from brics_cli.diffusion.samplers import sample_generators
from brics_cli.diffusion.schedules import build_schedule
from brics_cli.errors import BricsError, ConfigError
from brics_cli.models.autoencoder import BRICSAutoencoder
from brics_cli.models.unet import UNet
from brics_cli.registry import SAMPLERS
from brics_cli.runs import find_checkpoint
from brics_cli.train.ema import EMA
from brics_cli.train.eval_curve import CurveEvaluator, describe_record, redraw_curve
from brics_cli.train.guard import (
    DivergenceGuard,
    StopRequest,
    bad_terms,
    checkpoint_or_stop,
    grad_norm,
    load_checked,
    read_resumable,
)
from brics_cli.train.metrics_log import MetricsLog, Throughput

PART_SIZE = 4096  # codes per cache file


# -- the code cache -------------------------------------------------------------------------------


def data_fingerprint(shards: str) -> str:
    manifest = Path(shards) / "manifest.json"
    if manifest.is_file():
        return sha256_file(manifest)
    return hashlib.sha256(shards.encode()).hexdigest()  # a shard URL pattern: its text


def codes_key(ae_checkpoint: Path, shards: str, flip: bool) -> str:
    h = hashlib.sha256()
    h.update(sha256_file(ae_checkpoint).encode())
    h.update(data_fingerprint(shards).encode())
    h.update(b"flip" if flip else b"noflip")
    return h.hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:06d}.safetensors"


def _train_count(shards: str) -> int | None:
    """The training images a `brics shard` folder's manifest counts; None for a shard URL pattern."""
    manifest = Path(shards) / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("counts", {}).get("train")


def _my_share(folder: Path, total: int | None, part_size: int, rt: Runtime) -> int | None:
    """How many images this rank will encode: its parts (p % ranks == rank) not yet on disk."""
    if total is None:
        return None
    parts = range(rt.rank, -(-total // part_size), rt.world_size)
    return sum(min(part_size, total - p * part_size) for p in parts if not (folder / part_name(p)).is_file())


@torch.no_grad()
def encode_dataset(ae, data_cfg, folder: Path, rt: Runtime, batch: int = 64, part_size: int = PART_SIZE,
                   show_progress: bool = True) -> dict:
    """Encode the training split into `folder` (part files, then done.json); returns the cache record.

    Part p holds the codes of images [p * part_size, (p + 1) * part_size) in shard order (then
    their mirror images with data.flip), float16. Every rank reads the images in that order and
    encodes the parts with p % ranks == rank, so the parts equal one process's, bit for bit, in
    1/ranks of the time. Resumable: a part already on disk is not encoded again; the temporaries
    of killed writers are removed first. A collective under torchrun: every rank calls it."""
    folder.mkdir(parents=True, exist_ok=True)
    if rt.is_main:
        remove_stale_temporaries(folder)  # a killed encoder's part and done.json temporaries, before any rank writes
    rt.barrier()
    t0 = time.perf_counter()
    cfg = replace(data_cfg, workers=0, shuffle=0, flip=False, resample=False, epoch_length=None)
    dataset = ShardDataset(cfg, "train")  # the whole split on every rank: each finds its parts by position
    label = "encode" if rt.world_size == 1 else f"encode (rank 0's share: 1/{rt.world_size} of the parts)"
    failure: Exception | None = None
    with Progress(show_progress and rt.is_main) as progress:
        task = progress.task(label, _my_share(folder, _train_count(data_cfg.shards), part_size, rt))
        try:
            count = _encode_my_parts(ae, dataset, folder, rt, part_size, batch, data_cfg.flip, task.advance)
        except Exception as exc:  # every rank must hear of it, or the others wait at the next barrier
            failure = exc
    if rt.any_flag(failure is not None):
        raise failure or BricsError(f"{folder}: another rank failed while encoding its parts (its error is above); "
                                    "rerun: the parts already written are kept")
    if count == 0:
        raise BricsError(f"data.shards: {data_cfg.shards} has no readable training images to encode")
    parts = [part_name(p) for p in range(-(-count // part_size))]
    missing = [name for name in parts if not (folder / name).is_file()]
    if missing:  # an internal invariant, but a cache with a hole must never be marked done
        raise BricsError(f"{folder}: parts {', '.join(missing[:3])} were not written; rerun to encode them")
    record = {"parts": parts, "images": count, "codes": count * (2 if data_cfg.flip else 1), "flip": data_cfg.flip,
              "corrupt_skipped": dataset.skipped.count, "ranks": rt.world_size,
              "seconds": round(time.perf_counter() - t0, 2)}
    if rt.is_main:
        atomic_write_json(folder / "done.json", record)
    rt.barrier()
    return record


def _encode_my_parts(ae, dataset, folder: Path, rt: Runtime, part_size: int, batch: int, flip: bool, advance) -> int:
    """Encode this rank's missing parts, `batch` images at a time from each part's start; returns
    how many images the split holds (every rank reads them all)."""
    plain: list[Tensor] = []
    mirrored: list[Tensor] = []
    pending: list[Tensor] = []
    count, part, mine = 0, 0, False

    def encode_pending() -> None:
        x = torch.stack(pending).to(rt.device)  # (b, 3, H, W)
        plain.append(ae.encode(x)[0].to(torch.float16).cpu())  # (b, C_z, H_z, W_z)
        if flip:
            mirrored.append(ae.encode(x.flip(-1))[0].to(torch.float16).cpu())
        advance(len(pending))
        pending.clear()

    def write_part() -> None:
        if pending:
            encode_pending()
        images = sum(len(z) for z in plain)
        ckpt.save_tensors_atomic(folder / part_name(part), {"codes": torch.cat(plain + mirrored)}, {"images": images})
        plain.clear()
        mirrored.clear()

    for image, _key in dataset:
        if count % part_size == 0:  # a part starts
            part = count // part_size
            mine = part % rt.world_size == rt.rank and not (folder / part_name(part)).is_file()
        count += 1
        if not mine:
            continue
        pending.append(image)
        if len(pending) == batch:
            encode_pending()
        if count % part_size == 0:
            write_part()
    if mine and count % part_size:  # the last, shorter part
        write_part()
    return count


def read_code_cache(folder: Path) -> tuple[Tensor, dict]:
    """The codes (N, C_z, H_z, W_z) float16 of a finished cache and its record (done.json)."""
    record = json.loads((folder / "done.json").read_text())
    return torch.cat([ckpt.load_tensors(folder / name)["codes"] for name in record["parts"]]), record


# -- the trainer ----------------------------------------------------------------------------------


def find_ae_checkpoint(recipe, ae_run: Path | None) -> Path:
    run = Path(ae_run) if ae_run is not None else Path(recipe.run.dir) / "ae"
    if not run.exists():
        raise ConfigError(f"no autoencoder run at {run}: train one with `brics ae-train` first, or pass --ae RUN_OR_CHECKPOINT")
    return find_checkpoint(run, "ae")


class DiffusionTrainer:
    """UNet + EMA + Adam/LambdaLR on cached key codes; `run()` trains to diffusion.train.steps."""

    def __init__(self, recipe, run_dir: Path, rt: Runtime, ae_checkpoint: Path, codes: Tensor, codes_info: dict) -> None:
        self.recipe = recipe
        self.cfg: DiffusionStageConfig = recipe.diffusion
        self.run_dir = Path(run_dir)
        self.rt = rt
        self.ae_checkpoint = ae_checkpoint
        self.codes_info = codes_info
        opt, tc = self.cfg.optim, self.cfg.train
        self.micro, self.accum = tc.accumulation(rt.world_size)  # micro * accum * ranks == diffusion.train.batch
        seed_everything(tc.seed)
        self.codes = codes  # (N, C, H, W) float16 on the CPU
        _, C, H, W = codes.shape
        self.shape = (C, H, W)
        self.unet = UNet(self.cfg.model, C, H).to(rt.device)
        self.schedule = build_schedule(self.cfg.schedule)
        self.ema = EMA(self.unet, opt.ema)
        self.opt, self.lr_sched = build_optimizer(opt, self.unet.parameters())
        self.model: torch.nn.Module = self.unet  # what the steps call: the UNet, in DDP under torchrun, compiled on request
        self.ddp = None
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = self.ddp = DDP(self.unet, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if tc.compile:
            self.model = torch.compile(self.model)
        seed_rank(self.cfg.train.seed, rt.rank)  # the weights above are every rank's; t, eps and the codes drawn are each rank's own
        self.data_rng = torch.Generator().manual_seed(rank_seed(self.cfg.train.seed + 1, rt.rank))  # which codes each step trains on
        self.step = 0
        self.checkpoints = ckpt.CheckpointDir(self.run_dir / "checkpoints", tc.keep)
        self.guard = DivergenceGuard(tc.max_bad_steps, tc.max_rollbacks,
                                     fix="lower diffusion.optim.lr and rerun (it continues from the last good checkpoint), or check the data")
        self.guard.weights_problem(self.checked_modules(), rt, fresh=True)  # the growth test starts from the initial weights
        self.last_checkpoint: Path | None = None  # the newest checkpoint: every one passed the weight check
        self.ae = None  # loaded lazily for sample grids and the FID of the eval curve
        self.curve: CurveEvaluator | None = None  # built by run() when diffusion.train.eval_every > 0
        self.eval_seconds = 0.0  # this process's time in evaluations

    def checked_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "ema": self.ema.module}

    def state(self, rng: tuple[dict[str, Tensor], dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The checkpoint's tensors and metadata; `rng`: every rank's states (`core.rng.gather_states`)."""
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        o_t, o_m = ckpt.optimizer_state(self.opt, "opt")
        r_t, r_m = rng
        tensors.update(o_t | r_t)
        meta = {
            "kind": "diffusion",
            "step": self.step,
            "config": to_dict(self.recipe),
            "code_shape": list(self.shape),
            "ae_checkpoint": str(self.ae_checkpoint),
            "ae_checkpoint_sha256": sha256_file(self.ae_checkpoint),
            "codes": self.codes_info,
            "brics_version": __version__,
            "torch_version": torch.__version__,
            "world_size": self.rt.world_size,
            "optim": o_m,
            "lr_scheduler": self.lr_sched.state_dict(),
            "rng": r_m,
            "ema_updates": self.ema.updates,
            "bad_steps": self.guard.total,
        }
        return tensors, meta

    def save(self) -> str | None:
        """Checkpoint this step if the model passes the weight check; otherwise why not (nothing written)."""
        problem = self.guard.weights_problem(self.checked_modules(), self.rt)
        if problem:
            return problem
        rng = gather_states(self.rt, {"data": self.data_rng})  # a collective
        if self.rt.is_main:
            tensors, meta = self.state(rng)
            self.checkpoints.save(self.step, tensors, meta)
        self.rt.barrier()
        self.last_checkpoint = self.checkpoints.path(self.step)  # on every rank: the rollback target
        return None

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint; raises `UnusableCheckpoint` for a file that cannot be resumed from."""
        meta = read_resumable(path, "diffusion", ("step", "config", "optim", "lr_scheduler", "rng", "ema_updates"), self.recipe,
                              "start a new run (--out)")
        load_checked(path, meta, self._load_state, self.guard, self.checked_modules(), self.rt)
        self.last_checkpoint = path

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        self.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ckpt.load_optimizer_state(self.opt, "opt", tensors, meta["optim"])
        self.lr_sched.load_state_dict(meta["lr_scheduler"])
        self._apply_recipe_optim()
        self.step, self.ema.updates, self.guard.total = meta["step"], meta["ema_updates"], meta.get("bad_steps", 0)
        if restore_states(tensors, meta["rng"], self.rt.rank, {"data": self.data_rng}) is None:
            seed_rank(self.cfg.train.seed + self.step, self.rt.rank)  # a rank the checkpoint's run did not have
            self.data_rng.manual_seed(rank_seed(self.cfg.train.seed + 1 + self.step, self.rt.rank))
        if meta.get("world_size", 1) != self.rt.world_size and self.rt.is_main:
            print(f"note: resuming a {meta.get('world_size')}-rank run on {self.rt.world_size} ranks: the ranks it had "
                  "restore their random streams, new ones start fresh; the codes drawn differ from an uninterrupted run",
                  file=sys.stderr)

    def _apply_recipe_optim(self) -> None:
        """`diffusion.optim` may change on resume: the recipe's lr, schedule, betas, eps and weight
        decay replace the checkpoint's (an unchanged recipe gives the same values, bit for bit)."""
        opt = self.cfg.optim
        self.lr_sched.base_lrs = [opt.lr for _ in self.opt.param_groups]  # LambdaLR: lr = base_lr * factor(step)
        lr = opt.lr * lr_multiplier(opt)(self.lr_sched.last_epoch)  # the factor of the recipe's warm-up and decay
        for group in self.opt.param_groups:
            group.update(lr=lr, initial_lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)

    def roll_back(self) -> None:
        """Reload the checkpoint the guard chose -- weights, EMA, optimiser, RNG, data order -- and say so."""
        total, message = self.guard.total, self.guard.message
        self.resume(self.guard.target)
        self.guard.rolled_back(total)
        if self.rt.is_main:
            self.progress.log(message)

    def _autocast(self):
        if self.cfg.train.bf16 and self.rt.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_batch_loss(self, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """`diffusion_loss` with t and eps given: the draws are made once for the rank's whole batch,
        so a micro-batch split changes the memory a step takes, not the step."""
        with self._autocast():
            return diffusion_loss(self.model, self.schedule, x0, t=t, eps=eps)

    def train_step(self) -> dict[str, float] | None:
        """One optimiser step on this rank's diffusion.train.batch / ranks codes, in `accum` micro-batches;
        DDP averages the gradients over ranks once, after the last one."""
        n = self.micro * self.accum
        idx = torch.randint(len(self.codes), (n,), generator=self.data_rng)
        x0 = codes_to_x0(self.codes[idx].float().to(self.rt.device))  # (n, C, H, W)
        t = torch.rand(n, device=x0.device)  # (n,)  the draws diffusion_loss makes, in its order
        eps = torch.randn(x0.shape, device=x0.device)
        self.opt.zero_grad(set_to_none=True)
        values: dict[str, float] = {}
        for i in range(self.accum):
            part = slice(i * self.micro, (i + 1) * self.micro)
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()  # all-reduce once, at the end
            with sync:
                loss, terms = self.micro_batch_loss(x0[part], t[part], eps[part])
                (loss / self.accum).backward()
            for k, v in terms.items():
                values[k] = values.get(k, 0.0) + float(v) / self.accum
        values["grad_norm"] = grad_norm(list(self.unet.parameters()))
        bad = bad_terms(values)
        if self.rt.any_flag(bool(bad)):  # every rank skips the same steps
            self.opt.zero_grad(set_to_none=True)
            self.guard.bad(self.step + 1, f"{', '.join(bad) or 'a loss on another rank'} not finite", self.last_checkpoint)
            return None
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.optim.grad_clip)
        values["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        self.ema.update(self.unet)
        problem = self.guard.weights_problem(self.checked_modules(), self.rt)
        if problem:
            self.guard.bad(self.step + 1, problem, self.last_checkpoint)  # numbered as checkpoints: after step + 1 steps
        else:
            self.guard.good()
        return values

    @torch.no_grad()
    def write_samples(self, n: int = 16) -> None:
        if not self.rt.is_main:
            return
        with torch.random.fork_rng(devices=[]):  # previews never move the training RNG (exact resume)
            self._write_samples(n)

    def autoencoder(self) -> BRICSAutoencoder:
        if self.ae is None:
            self.ae = BRICSAutoencoder.from_checkpoint(self.ae_checkpoint, ema=True, device=self.rt.device)
        return self.ae

    def _write_samples(self, n: int) -> None:
        self.autoencoder()
        s = self.cfg.sample
        sampler = SAMPLERS.get(s.sampler)
        x = sampler(self.ema.module, self.schedule, self.shape, steps=s.steps, generators=sample_generators(0, range(n)),
                    eta=s.eta, clip_x0=s.clip_x0, device=self.rt.device)
        images = self.ae.decode(x0_to_codes(x)).clamp(-1, 1)
        save_image_grid(images, self.run_dir / "samples" / f"step-{self.step:06d}.png", per_row=max(n // 2, 1))

    def start_curve(self, metrics: MetricsLog) -> str:
        """Build the evaluator (a collective: Inception and the reference statistics load here, before
        the first step); redraw eval-curve.png from the records a resumed run kept. Returns the note on FID."""
        t0 = time.perf_counter()
        self.curve = CurveEvaluator(self.cfg.train, self.schedule, self.shape, self.codes, self.cfg.sample.clip_x0,
                                    self.autoencoder, self.recipe.data.shards, self.rt)
        note = self.curve.prepare_fid()
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds  # part of what the evaluations cost this run
        if self.rt.is_main:
            self.progress.log(f"eval curve: every {self.cfg.train.eval_every} steps, {self.curve.features}; {note} "
                              f"(set up in {seconds:.1f} s)")
            redraw_curve(metrics.records(), self.run_dir / "eval-curve.png")
        return note

    def evaluate_curve(self, metrics: MetricsLog, throughput: Throughput, t_start: float) -> None:
        """One point of the curve (every rank calls it): log it, plot it, say what it cost."""
        t0 = time.perf_counter()
        record = self.curve.evaluate(self.ema.module)
        if self.rt.is_main:
            redraw_curve([*metrics.records(), {"step": self.step, "eval": record}], self.run_dir / "eval-curve.png")
        seconds = time.perf_counter() - t0
        record["seconds"] = round(seconds, 3)
        throughput.exclude(seconds)  # codes/s measures training alone
        self.eval_seconds += seconds
        if not self.rt.is_main:
            return
        metrics.write(self.step, {"eval": record}, scalars=("eval/code_fd", "eval/code_fd_data", "eval/fid", "eval/seconds"))
        elapsed = time.perf_counter() - t_start
        self.progress.log(f"eval at step {self.step}: {describe_record(record)}; {seconds:.1f} s, evaluations took "
                          f"{self.eval_seconds / max(elapsed, 1e-9):.0%} of this run's {elapsed:.0f} s so far")

    def run(self, show_progress: bool = True) -> dict[str, Any]:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.run_dir, self.rt.is_main)
        metrics.truncate_after(self.step)
        progress = self.progress = Progress(show_progress and self.rt.is_main and tc.steps > self.step)
        bar = progress.task("diffusion-train", tc.steps, self.step, unit="codes")
        start_step, t_start = self.step, time.perf_counter()
        window: dict[str, float] = {}
        count, throughput, stopped_by, fid_note = 0, Throughput(), None, None
        try:
            with StopRequest() as stop:
                if tc.eval_every and self.step < tc.steps:
                    fid_note = self.start_curve(metrics)
                    throughput = Throughput()  # the set-up is not training time
                while self.step < tc.steps or self.guard.must_roll_back:
                    if self.guard.must_roll_back:
                        self.roll_back()
                        metrics.truncate_after(self.step)  # the rolled-back steps' records go
                        if self.curve is not None and self.rt.is_main:
                            redraw_curve(metrics.records(), self.run_dir / "eval-curve.png")  # and their points
                        window, count = {}, 0
                        continue
                    self.unet.train()
                    values = self.train_step()
                    self.step += 1
                    throughput.add(tc.batch)
                    if values is not None:
                        for k, v in values.items():
                            window[k] = window.get(k, 0.0) + v
                        count += 1
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        record = self.rt.mean_over_ranks({k: v / max(count, 1) for k, v in window.items()})
                        record["codes_per_s"] = throughput.read()
                        record["bad_steps"] = self.guard.total
                        metrics.write(self.step, record)
                        bar.update(self.step, record["codes_per_s"], {k: record[k] for k in ("loss", "mse") if k in record}, force=True)
                        window, count = {}, 0
                    if self.step % tc.sample_every == 0 or self.step == tc.steps:
                        self.write_samples()
                        metrics.image("samples", self.run_dir / "samples" / f"step-{self.step:06d}.png", self.step)
                    if self.curve is not None and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                        self.evaluate_curve(metrics, throughput, t_start)
                    stopped_by = checkpoint_or_stop(self.step, tc.steps, tc.checkpoint_every, stop, self.rt, self.save, progress.log,
                                                    lambda why: self.guard.checkpoint_refused(self.step, why, self.last_checkpoint))
                    if stopped_by:
                        break
        finally:
            progress.close()
            metrics.close()
        return {
            "run": str(self.run_dir),
            "step": self.step,
            "steps": tc.steps,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": start_step or None,
            "stopped_by": stopped_by or None,
            "seconds": round(time.perf_counter() - t_start, 2),
            "bad_steps": self.guard.total,
            "ranks": self.rt.world_size,
            "ae_checkpoint": str(self.ae_checkpoint),
            "codes": self.codes_info,
            "rank_param_max_diff": self.rt.max_rank_difference(list(self.unet.parameters())),
            **({"eval_curve": {"fid": fid_note, "seconds": round(self.eval_seconds, 2)}} if self.curve is not None else {}),
        }
