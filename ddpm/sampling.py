"""Batched trajectory sampling: the first (no-grad) pass of the RL algorithms, and plain sampling.

A trajectory of T DDIM steps visits states s_0 = x_T (pure noise), s_1, ..., s_T = x̂ (the image).
Step k takes x_t = s_k to x_prev = s_{k+1}; `Trajectory` stores the T+1 states once and exposes
`x_t` and `x_prev` as views, so nothing is kept twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from ddpm.ddim import Reduction, ddim_step_logprob
from ddpm.schedulers import DDIMSchedule, sampler_schedule

# the network output (ε̂ or v̂, see DDIMSchedule.prediction_type): output_fn(x_t (B, C, H, W), t (B,) long) -> (B, C, H, W)
OutputFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Trajectory:
    """B sampled trajectories of T steps.

    states:    (T+1, B, C, H, W)  s_0 = x_T noise ... s_T = final sample (unclamped)
    logp:      (T, B)             log π_old(s_{k+1} | s_k) under the sampling parameters
    timesteps: (T,)               t_k of each step (long); ᾱ in `schedule`
    images:    (B, C, H, W)       final samples clamped to [-1, 1], on the model's device (for a latent
                                  model: the decoded images, whose shape differs from the states')
    prompt_ids: (B,) long or None the prompt of each trajectory (conditional models)
    """
    states: Tensor
    logp: Tensor
    schedule: DDIMSchedule
    images: Tensor
    prompt_ids: Tensor | None = None

    def prompts_of(self, idx: Tensor) -> Tensor | None:
        """The prompt ids of trajectories idx, or None for an unconditional model."""
        return None if self.prompt_ids is None else self.prompt_ids[idx]

    @property
    def timesteps(self) -> Tensor:
        """(T,) t_k of each step (long)."""
        return self.schedule.timesteps

    @property
    def x_t(self) -> Tensor:
        """(T, B, C, H, W) state before each step."""
        return self.states[:-1]

    @property
    def x_prev(self) -> Tensor:
        """(T, B, C, H, W) state after each step."""
        return self.states[1:]

    @property
    def num_steps(self) -> int:
        return self.logp.shape[0]

    @property
    def batch_size(self) -> int:
        return self.logp.shape[1]


def unet_output_fn(unet) -> OutputFn:
    """The output of a diffusers UNet2DModel: unet(x_t, t).sample (ε̂ or v̂)."""
    return lambda x, t: unet(x, t).sample.float()  # fp32 for the DDIM update, also under autocast


def concat_trajectories(trajs: list[Trajectory]) -> Trajectory:
    """Trajectories sampled in chunks (same schedule) as one batch, in order."""
    if len(trajs) == 1:
        return trajs[0]
    ids = [t.prompt_ids for t in trajs]
    return Trajectory(states=torch.cat([t.states for t in trajs], dim=1), logp=torch.cat([t.logp for t in trajs], dim=1),
                      schedule=trajs[0].schedule, images=torch.cat([t.images for t in trajs]),
                      prompt_ids=None if ids[0] is None else torch.cat(ids))


@torch.no_grad()
def sample_trajectory(
    output_fn: OutputFn,
    schedule: DDIMSchedule,
    *,
    shape: tuple[int, int, int, int],
    eta: float | Tensor,
    sigma_floor: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    keep_on: Literal["cpu", "device"] = "cpu",
    clip_range: float | None = 1.0,
    reduction: Reduction = "mean",
    shift_fn: OutputFn | None = None,
    noise_scale: Tensor | None = None,
    step_scales: Tensor | None = None,
) -> Trajectory:
    """Sample B = shape[0] DDIM trajectories and record every state and log-prob.

    `shift_fn(x_t, t)` (B, C, H, W), if given, is added to every step's mean (the latent-drift policy);
    `noise_scale` (B,) multiplies every step's injected noise, and `eta` may be (B,) too (the schedule
    policy: one sampler setting per trajectory). `step_scales` (T,) multiplies the std of each step k
    (SAC's learned noise scales e^ζ_k), in the noise drawn and in the recorded log-probs.

    All noise (x_T and each step's z) is drawn on the CPU from `generator`, so a seed gives the
    same trajectories on any device. `keep_on='cpu'` moves the cached states off the accelerator
    as they are produced (memory stays O(B) on the device, O(T·B) on the host).
    """
    device = torch.device(device)
    store = torch.device("cpu") if keep_on == "cpu" else device
    x = torch.randn(shape, generator=generator).to(device)
    states, logps = [x.to(store)], []
    for k in range(schedule.num_steps):
        t = schedule.timesteps[k]
        out = output_fn(x, t.expand(shape[0]).to(device)).float()
        noise = None
        if noise_scale is not None:  # drawn as ddim_step_logprob would, then scaled per trajectory
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
            noise = noise * noise_scale.to(noise).reshape(-1, *([1] * (noise.ndim - 1)))
        step = ddim_step_logprob(
            out, x, alpha_bar_t=schedule.alpha_bar_t[k], alpha_bar_prev=schedule.alpha_bar_prev[k],
            eta=eta, sigma_floor=sigma_floor, generator=generator, noise=noise, clip_range=clip_range,
            reduction=reduction, prediction_type=schedule.prediction_type,
            mean_shift=None if shift_fn is None else shift_fn(x, t.expand(shape[0]).to(device)).float(),
            noise_scale=None if step_scales is None else step_scales[k],
        )
        x = step.x_prev
        states.append(x.to(store))
        logps.append(step.logp.to(store))
    return Trajectory(states=torch.stack(states), logp=torch.stack(logps), schedule=schedule, images=x.clamp(-1, 1))


@torch.no_grad()
def image_batches(output_fn: OutputFn, schedule: DDIMSchedule, *, n: int, batch_size: int,
                  shape: tuple[int, int, int], eta: float, generator: torch.Generator, device: torch.device | str = "cpu",
                  clip_range: float | None = 1.0, progress: bool = False, step_scales: Tensor | None = None
                  ) -> Iterator[Tensor]:
    """Draw n images in batches, yielding each (b, C, H, W) in [-1, 1] on the CPU as it is done and keeping no
    trajectory (`step_scales`: see `sample_trajectory`)."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False):
        b = min(batch_size, n - start)
        # sigma_floor only enters the log-probs, which are discarded here.
        traj = sample_trajectory(output_fn, schedule, shape=(b, *shape), eta=eta, sigma_floor=1.0,
                                 generator=generator, device=device, keep_on="device", clip_range=clip_range,
                                 step_scales=step_scales)
        yield traj.images.cpu()


def model_image_batches(unet, train_config, sampler, *, n: int, generator: torch.Generator,
                        device: torch.device | str = "cpu", progress: bool = False, step_scales: Tensor | None = None
                        ) -> Iterator[Tensor]:
    """n images from a UNet2DModel with the settings of a `SamplerConfig` (and a SAC run's per-step std factors
    `step_scales`, if it saved any), in batches of sampler.batch_size: see `image_batches`."""
    c, size = unet.config.in_channels, unet.config.sample_size
    return image_batches(unet_output_fn(unet), sampler_schedule(train_config, sampler), n=n,
                         batch_size=sampler.batch_size, shape=(c, size, size), eta=sampler.eta,
                         generator=generator, device=device,
                         clip_range=sampler.clip_range if sampler.clip_sample else None, progress=progress,
                         step_scales=step_scales)


def sample_model(unet, train_config, sampler, **kwargs) -> Tensor:
    """All of `model_image_batches(unet, train_config, sampler, **kwargs)` as one (n, C, H, W) tensor in [-1, 1]."""
    return torch.cat(list(model_image_batches(unet, train_config, sampler, **kwargs)))
