"""DDPM pretraining: v- or ε-prediction with L_simple, EMA weights, a skewed training mix, exact resume.

Notation: x0 a training image (B, C, H, W) in [-1, 1]; t ~ U{0..T_train−1}; ε ~ N(0, I);
x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (diffusers' `add_noise`); f_θ the UNet, predicting ε or
v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (diffusers' `get_velocity`).

`precision` fp16/bf16 runs the UNet under autocast (fp16 with torch's dynamic loss scaling: a step
whose scaled gradients overflow is skipped and the scale halved); `tf32` allows TF32 on CUDA.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch import Tensor
from tqdm.auto import tqdm

from config import Config, PretrainConfig, config_to_dict
from ddpm.pipeline import load_pipeline, save_pipeline
from ddpm.sampling import sample_model
from ddpm.schedulers import make_train_scheduler
from ddpm.unet import build_unet, count_parameters
from data.sources import load_image_set
from basics import latest_checkpoint
from utils import (RunLogger, atomic_checkpoint, autocast, image_grid, load_optimizer_state, load_state,
                   prune_checkpoints, resolve_device, resolve_path, rng_state, save_png, save_state, seed_everything,
                   set_rng_state, setup_precision)


def skew_weights(diameters_km: Tensor, *, diameter_km: float, small_fraction: float | None) -> Tensor:
    """Sampling probabilities w_i for a training mix in which a fraction f of draws are small craters.

    w_i = f / n_small for D_i < diameter_km, (1 − f) / n_large otherwise (uniform within each group);
    f = None, or a group that is empty, gives the uniform mix w_i = 1/N.
    """
    n = diameters_km.numel()
    small = diameters_km < diameter_km
    n_small = int(small.sum())
    if small_fraction is None or n_small in (0, n):
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return torch.where(small, small_fraction / n_small, (1 - small_fraction) / (n - n_small)).double()


def ddpm_loss(unet: UNet2DModel, x0: Tensor, scheduler: DDPMScheduler, *, generator: torch.Generator) -> Tensor:
    """L_simple = E_{t, ε} ‖target − f_θ(x_t, t)‖² averaged over pixels (Ho et al. 2020, eq. 14), with
    target = ε (ε-prediction) or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (v-prediction, Salimans & Ho 2022)."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    return torch.nn.functional.mse_loss(unet(x_t, t).sample, target)


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up to 1 over `warmup` steps, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Trainer:
    """Everything that changes during pretraining, i.e. everything a checkpoint must hold."""
    unet: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scheduler: DDPMScheduler
    generator: torch.Generator
    scaler: torch.amp.GradScaler  # dynamic loss scaling for fp16 (disabled, a pass-through, otherwise)
    amp_dtype: torch.dtype | None = None  # autocast dtype of the UNet (None: fp32)
    step: int = 0
    loss_window: tuple[float, int] = (0.0, 0)  # (sum, count) of losses since the last log line

    def ema_unet(self) -> UNet2DModel:
        """A copy of the UNet holding the EMA weights (what gets exported and sampled)."""
        model = copy.deepcopy(self.unet)
        self.ema.copy_to(model.parameters())
        return model.eval()


def build_trainer(cfg: Config, device: torch.device) -> Trainer:
    """A fresh trainer: the UNet from `pretrain.init_from` if set, else a new `model.preset` UNet."""
    generator = seed_everything(cfg.seed)
    if cfg.pretrain.init_from:
        unet, scheduler = load_pipeline(resolve_path(cfg.pretrain.init_from))
    else:
        unet = build_unet(cfg.model.preset, image_size=cfg.data.image_size, channels=cfg.data.channels)
        scheduler = make_train_scheduler(num_train_timesteps=cfg.model.num_train_timesteps,
                                         beta_schedule=cfg.model.beta_schedule,
                                         prediction_type=cfg.model.prediction_type)
    unet.to(device).train()
    p = cfg.pretrain
    opt = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=p.warmup_steps, total=p.steps))
    ema = EMAModel(unet.parameters(), decay=p.ema_decay)
    amp_dtype = setup_precision(cfg.precision, cfg.tf32, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return Trainer(unet=unet, ema=ema, optimizer=opt, lr_schedule=sched, scheduler=scheduler, generator=generator,
                   scaler=scaler, amp_dtype=amp_dtype)


def save_checkpoint(tr: Trainer, checkpoint_dir: Path, *, keep: int) -> Path:
    """checkpoints/step_N/: the EMA pipeline (loadable by scripts.sample and diffusers), the raw
    training UNet (`train_unet/`), and `training_state.pt` (optimizer, LR schedule, EMA, RNG, step)."""
    with atomic_checkpoint(checkpoint_dir, tr.step) as tmp:
        save_pipeline(tr.ema_unet(), tr.scheduler, tmp / "ema")
        tr.unet.save_pretrained(tmp / "train_unet", safe_serialization=True)
        save_state({"step": tr.step, "optimizer": tr.optimizer.state_dict(),
                    "lr_schedule": tr.lr_schedule.state_dict(), "ema": tr.ema.state_dict(),
                    "rng": rng_state(tr.generator), "loss_window": list(tr.loss_window),
                    "scaler": tr.scaler.state_dict()},
                   tmp / "training_state.pt")
    prune_checkpoints(checkpoint_dir, keep)
    return checkpoint_dir / f"step_{tr.step}"


def load_checkpoint(tr: Trainer, path: Path) -> None:
    """Restore a trainer in place from `save_checkpoint`'s directory."""
    state = load_state(path / "training_state.pt")
    trained = UNet2DModel.from_pretrained(path / "train_unet", local_files_only=True, use_safetensors=True)
    tr.unet.load_state_dict(trained.state_dict())
    load_optimizer_state(tr.optimizer, state["optimizer"])
    tr.lr_schedule.load_state_dict(state["lr_schedule"])
    # the config's peak learning rate, schedule and EMA decay at the restored step (changed by --apply-changes)
    tr.lr_schedule.base_lrs = [g["initial_lr"] for g in tr.optimizer.param_groups]
    for group, base, factor in zip(tr.optimizer.param_groups, tr.lr_schedule.base_lrs, tr.lr_schedule.lr_lambdas):
        group["lr"] = base * factor(tr.lr_schedule.last_epoch)
    decay = tr.ema.decay
    tr.ema.load_state_dict(state["ema"])
    tr.ema.decay = decay
    if state.get("scaler"):  # empty when the run was not fp16
        tr.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], tr.generator)
    tr.step = int(state["step"])
    tr.loss_window = (float(state["loss_window"][0]), int(state["loss_window"][1]))


def sample_grid(tr: Trainer, cfg: Config, device: torch.device, *, n: int = 64, seed: int = 1234) -> Tensor:
    """n EMA samples with the configured DDIM sampler, from a fixed seed (comparable across steps)."""
    with autocast(device, tr.amp_dtype):
        return sample_model(tr.ema_unet(), tr.scheduler.config, cfg.sampler, n=n,
                            generator=torch.Generator().manual_seed(seed), device=device)


def train_step(tr: Trainer, images: Tensor, weights: Tensor, p: PretrainConfig, device: torch.device
               ) -> tuple[Tensor, Tensor]:
    """One optimizer step of L_simple on a batch drawn from `images` (N, C, H, W) by `weights` (N,), then the LR
    schedule and the EMA; returns (loss, gradient norm before clipping)."""
    idx = torch.multinomial(weights, p.batch_size, replacement=True, generator=tr.generator)
    with autocast(device, tr.amp_dtype):
        loss = ddpm_loss(tr.unet, images[idx.to(device)], tr.scheduler, generator=tr.generator)
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.unscale_(tr.optimizer)  # clip the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.unet.parameters(), p.grad_clip)
    tr.scaler.step(tr.optimizer)  # skipped if the fp16 gradients overflowed
    tr.scaler.update()
    tr.lr_schedule.step()
    tr.ema.step(tr.unet.parameters())
    tr.step += 1
    return loss, grad_norm


def pretrain(cfg: Config, run_dir: Path, *, resume: bool, stop_at: int | None = None) -> Path | None:
    """Train the DDPM for `pretrain.steps` steps; return the directory of the final EMA pipeline.

    `stop_at` ends this invocation early, right after step `stop_at` (checkpointed, returns None),
    for time-boxed jobs and resume tests; the schedule still targets `pretrain.steps`.
    """
    device = resolve_device(cfg.device)
    data = load_image_set(cfg.data, "train")
    weights = (skew_weights(data.diameters_km, diameter_km=cfg.pretrain.skew.diameter_km,
                            small_fraction=cfg.pretrain.skew.small_fraction)
               if data.diameters_km is not None else torch.full((len(data),), 1.0 / len(data)))
    images = data.images.to(device)
    tr = build_trainer(cfg, device)
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        path = latest_checkpoint(ckpt_dir)
        tqdm.write(f"resuming from {path}")
        load_checkpoint(tr, path)
    log = RunLogger(run_dir, cfg.log, group="pretrain", hparams=config_to_dict(cfg),
                    resume_step=tr.step if resume else None)
    p = cfg.pretrain
    tqdm.write(f"pretraining {cfg.model.preset} UNet ({count_parameters(tr.unet) / 1e6:.2f}M parameters) on "
               f"{len(data)} images for {p.steps} steps (from step {tr.step}) -> {run_dir}")
    bar = tqdm(total=p.steps, initial=tr.step, desc="pretrain", dynamic_ncols=True)
    t0, (loss_sum, loss_n) = time.perf_counter(), tr.loss_window
    try:
        while tr.step < p.steps:
            loss, grad_norm = train_step(tr, images, weights, p, device)
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)
            if tr.step % p.log_every == 0 or tr.step == p.steps:
                dt = (time.perf_counter() - t0) / max(1, loss_n)
                log.log(tr.step, {"loss": loss_sum / loss_n, "lr": tr.lr_schedule.get_last_lr()[0],
                                  "grad_norm": float(grad_norm), "time_step_s": dt})
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", s_per_step=f"{dt:.2f}")
                t0, loss_sum, loss_n = time.perf_counter(), 0.0, 0
            tr.loss_window = (loss_sum, loss_n)
            if tr.step % p.sample_every == 0 or tr.step == p.steps:
                grid = image_grid(sample_grid(tr, cfg, device), scale=2)
                (run_dir / "samples").mkdir(exist_ok=True)
                save_png(grid, run_dir / "samples" / f"step_{tr.step}.png")
                log.add_image("samples", grid, tr.step)
            if tr.step % p.checkpoint_every == 0 or tr.step == p.steps or tr.step == stop_at:
                save_checkpoint(tr, ckpt_dir, keep=p.keep_checkpoints)
            if tr.step == stop_at:
                break
    finally:  # a failing step still ends the bar's line before the error, and flushes the log
        bar.close()
        log.close()
    if tr.step < p.steps:
        return None
    ema = tr.ema_unet()
    final = save_pipeline(ema, tr.scheduler, run_dir / "model")
    if p.export_dir:
        save_pipeline(ema, tr.scheduler, resolve_path(p.export_dir))
    return final
