"""Schedulers: diffusers' DDPM (training) and DDIM (sampling) schedulers, and the per-step ᾱ table.

Notation: T = number of DDIM steps of a trajectory, k = 0..T-1 the step index (k = 0 is the
noisiest), t_k the diffusion timestep of step k, ᾱ_k = alphas_cumprod[t_k],
ᾱ_prev,k = alphas_cumprod[t_k − T_train // T] or 1 past the end (`set_alpha_to_one`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor


def make_train_scheduler(*, num_train_timesteps: int, beta_schedule: str,
                         prediction_type: str = "v_prediction") -> DDPMScheduler:
    """The training scheduler saved with every model (its `prediction_type` says what the UNet outputs)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=True)


def make_ddim_scheduler(train_config, *, num_steps: int, clip_sample: bool = True,
                        clip_range: float = 1.0) -> DDIMScheduler:
    """A DDIM sampler sharing the training scheduler's betas, with `num_steps` steps set.

    'trailing' spacing starts at t = T_train − 1, the only spacing whose first step sees pure
    noise (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
    """
    sched = DDIMScheduler.from_config(train_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      clip_sample=clip_sample, clip_sample_range=clip_range)
    sched.set_timesteps(num_steps)
    return sched


@dataclass(frozen=True)
class DDIMSchedule:
    """The per-step table of a DDIM trajectory; every tensor is (T,), ᾱ values in float64;
    `prediction_type` is what the network outputs ('epsilon' or 'v_prediction')."""
    timesteps: Tensor
    prev_timesteps: Tensor
    alpha_bar_t: Tensor
    alpha_bar_prev: Tensor
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def ddim_schedule(scheduler: DDIMScheduler) -> DDIMSchedule:
    """Read (t_k, t_prev,k, ᾱ_k, ᾱ_prev,k) off a DDIM scheduler whose timesteps are set.

    t_prev follows `DDIMScheduler.step`: t − T_train // T, with ᾱ_prev = final_alpha_cumprod below 0.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) first")
    ts = scheduler.timesteps.long().cpu()
    prev = ts - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(torch.float64).cpu()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    return DDIMSchedule(timesteps=ts, prev_timesteps=prev, alpha_bar_t=ac[ts], alpha_bar_prev=a_prev,
                        prediction_type=scheduler.config.prediction_type)


def sampler_scheduler(train_config, sampler) -> DDIMScheduler:
    """The DDIM scheduler of a `SamplerConfig` (steps, clipping) on a model's training scheduler config: the chain a
    policy samples, and the scheduler a fine-tuned model is saved with."""
    return make_ddim_scheduler(train_config, num_steps=sampler.num_steps, clip_sample=sampler.clip_sample,
                               clip_range=sampler.clip_range)


def sampler_schedule(train_config, sampler) -> DDIMSchedule:
    """The DDIM table for a `SamplerConfig` (steps, clipping) on a model's training scheduler config."""
    return ddim_schedule(sampler_scheduler(train_config, sampler))
