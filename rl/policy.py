"""The diffusion policy π_θ: a UNet whose output (ε̂ or v̂) defines the DDIM Gaussian of every denoising step.

Modes (`rl.policy_mode`):
- `full`: every UNet weight is trained; the KL regulariser's base is a frozen copy of the start.
- `lora`: the UNet is frozen and peft LoRA adapters are trained; the base is the same UNet with its
  adapters disabled (no second copy in memory). Saved as a peft adapter.
- `latent`, `schedule`: the UNet is frozen and a small head is trained (`rl/modes.py`); this class
  then only keeps the UNet frozen and hands θ, saving and restoring to the head.

Precision: the UNet passes (sampling and pass 2) run under autocast to `amp_dtype` (fp16/bf16, set
by `build_policy` from the config); outputs are cast back to fp32 before the Gaussian log-prob, so
log-probs, ratios and losses are fp32. `plain()` turns autocast and gradient checkpointing off for
TRPO's Fisher-vector products, which differentiate twice.

Noise scale (SAC's actor, `enable_noise_scale`): a learned log factor ζ_k on the std of every
stochastic step, σ_k e^ζ_k drawn and σ̃_k e^ζ_k in the log-prob, part of θ; saved beside the model as
`noise_scale.json` (docs/design.md, "SAC").

Step index k runs over the T DDIM steps (k = 0 is the noisiest); `schedule` holds t_k, ᾱ_k, ᾱ_prev,k.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from config import LoRASettings, SamplerConfig
from ddpm.ddim import DDIMStep, ddim_sigma, ddim_step_logprob
from ddpm.pipeline import save_pipeline, unet_folder
from ddpm.sampling import Trajectory, concat_trajectories, sample_trajectory
from ddpm.schedulers import sampler_schedule
from utils import autocast


FROZEN_UNET_MODES = ("latent", "schedule")
NOISE_SCALE_KEY = "log_noise_scale"  # ζ's name in `trainable_state`


class DiffusionPolicy(nn.Module):
    """π_θ(x_prev | x_t) for each DDIM step, plus sampling and saving."""

    checkpoint_pipeline = True  # checkpoints also hold the loadable pipeline (small for the pixel DDPM)

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, sampler: SamplerConfig, *, mode: str = "full",
                 lora: LoRASettings | None = None, keep_base: bool = False):
        super().__init__()
        self.mode = mode
        self.scheduler = scheduler
        self.sampler = sampler
        self.schedule = sampler_schedule(scheduler.config, sampler)
        self.base_unet: UNet2DModel | None = None
        if mode == "full":
            self.unet = unet
            self.unet.requires_grad_(True)
            if keep_base:
                self.base_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        elif mode == "lora":
            from peft import LoraConfig, get_peft_model

            lora = lora or LoRASettings()
            unet.requires_grad_(False)
            config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=list(lora.target_modules), init_lora_weights=True)
            self.unet = get_peft_model(unet, config)
            config.base_model_name_or_path = unet_folder(unet)  # recorded in adapter_config.json
        elif mode in FROZEN_UNET_MODES:
            self.unet = unet.requires_grad_(False)
        else:
            raise ValueError(f"unknown policy mode {mode!r}; choose 'full', 'lora', 'latent' or 'schedule'")
        self.head: nn.Module | None = None  # the trained module of the frozen-UNet modes (rl/modes.py)
        self.amp_dtype: torch.dtype | None = None  # autocast dtype of the UNet passes (None: fp32)
        self._plain = False
        self.log_noise_scale: nn.Parameter | None = None  # ζ (T,), SAC's learned std factors (None: off)
        self.max_log_noise_scale = 0.0

    # --- precision and memory -------------------------------------------------------------------

    @property
    def network(self) -> nn.Module:
        """The diffusers UNet itself (under the peft wrapper in `lora` mode)."""
        return self.unet.get_base_model() if self.mode == "lora" else self.unet

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's block activations in backward (diffusers' non-reentrant checkpointing)."""
        self.network.enable_gradient_checkpointing()

    def _amp(self):
        return autocast(self.device, None if self._plain else self.amp_dtype)

    @contextlib.contextmanager
    def plain(self):
        """fp32 and no gradient checkpointing inside (for second derivatives through the UNet)."""
        net, was_plain = self.network, self._plain
        checkpointing = net.is_gradient_checkpointing
        self._plain = True
        if checkpointing:
            net.disable_gradient_checkpointing()
        try:
            yield self
        finally:
            self._plain = was_plain
            if checkpointing:
                net.enable_gradient_checkpointing()

    # --- parameters ---------------------------------------------------------------------------

    @property
    def trained(self) -> nn.Module:
        """The module holding θ: the UNet (full, lora) or the head (latent, schedule)."""
        return self.unet if self.head is None else self.head

    def trainable_parameters(self) -> list[nn.Parameter]:
        """θ: the UNet's weights (full), the LoRA adapters' (lora) or the head's, in a fixed order; then ζ
        when the noise scale is learned."""
        own = [p for p in self.trained.parameters() if p.requires_grad]
        zeta = self.log_noise_scale
        return own + ([zeta] if zeta is not None and zeta.requires_grad else [])

    # --- the learned noise scale (SAC) ------------------------------------------------------------

    def enable_noise_scale(self, *, max_log_scale: float, trainable: bool = True) -> None:
        """Give every stochastic step a log std factor ζ_k, initialised to 0 (the DDIM std) and bounded
        to |ζ_k| <= max_log_scale; deterministic steps (σ_k = 0) stay noiseless whatever ζ_k is."""
        self.log_noise_scale = nn.Parameter(torch.zeros(self.num_actions, device=self.device),
                                            requires_grad=trainable)
        self.max_log_noise_scale = float(max_log_scale)

    def noise_scale(self, k: int) -> Tensor | None:
        """e^ζ_k, the factor on step k's std (differentiable in ζ), or None for the DDIM std."""
        if self.log_noise_scale is None or self.deterministic(k):
            return None
        m = self.max_log_noise_scale
        return self.log_noise_scale[k].clamp(-m, m).exp()

    def step_scales(self) -> Tensor | None:
        """(T,) e^ζ_k of every step without grad (1 on deterministic steps), or None when ζ is off."""
        if self.log_noise_scale is None:
            return None
        with torch.no_grad():
            return torch.stack([s.detach() if (s := self.noise_scale(k)) is not None
                                else torch.ones((), device=self.device) for k in range(self.num_actions)])

    def use_step_scales(self, scales: Tensor) -> None:
        """Sample with saved factors e^ζ_k (T,) (a SAC run's model), frozen."""
        self.enable_noise_scale(max_log_scale=float("inf"), trainable=False)
        with torch.no_grad():
            self.log_noise_scale.copy_(scales.log().to(self.log_noise_scale))

    @property
    def num_actions(self) -> int:
        """Policy steps per trajectory: the T DDIM steps (one action per trajectory in `schedule`)."""
        return self.schedule.num_steps

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- ε̂ and the step ------------------------------------------------------------------------

    def model_output(self, x_t: Tensor, t: Tensor, prompt_ids: Tensor | None = None) -> Tensor:
        """The UNet output (ε̂ or v̂, per `schedule.prediction_type`): (B, C, H, W), t (B,) long.
        An unconditional model takes no prompts (prompt_ids None)."""
        with self._amp():
            return self.unet(x_t, t).sample.float()

    @torch.no_grad()
    def base_model_output(self, x_t: Tensor, t: Tensor, prompt_ids: Tensor | None = None) -> Tensor:
        """The frozen base model's output (π_base, for the KL regulariser)."""
        if self.mode == "lora":
            with self.unet.disable_adapter():
                return self.model_output(x_t, t, prompt_ids)
        if self.mode in FROZEN_UNET_MODES:
            return self.model_output(x_t, t, prompt_ids)
        if self.base_unet is None:
            raise RuntimeError("the policy was built without keep_base=True; no base model for the KL term")
        with self._amp():
            return self.base_unet(x_t, t).sample.float()

    def _t(self, k: int, batch: int) -> Tensor:
        return self.schedule.timesteps[k].expand(batch).to(self.device)

    def step(self, k: int, x_t: Tensor, x_prev: Tensor, *, prompt_ids: Tensor | None = None,
             output: Tensor | None = None) -> DDIMStep:
        """log π_θ(x_prev | x_t) at step k (with grad if enabled); x_t, x_prev: (B, C, H, W)."""
        x_t, x_prev = x_t.to(self.device), x_prev.to(self.device)
        if output is None:
            output = self.model_output(x_t, self._t(k, x_t.shape[0]), prompt_ids)
        return self._ddim(k, x_t, x_prev, output)

    def _ddim(self, k: int, x_t: Tensor, x_prev: Tensor, output: Tensor, *, mean_shift: Tensor | None = None
              ) -> DDIMStep:
        """The DDIM Gaussian of step k around the model output (mean moved by `mean_shift`, if given)."""
        return ddim_step_logprob(output, x_t, alpha_bar_t=self.schedule.alpha_bar_t[k],
                                 alpha_bar_prev=self.schedule.alpha_bar_prev[k], eta=self.sampler.eta,
                                 sigma_floor=self.sampler.sigma_floor, x_prev=x_prev, clip_range=self.clip_range,
                                 reduction=self.sampler.logprob_reduction,
                                 prediction_type=self.schedule.prediction_type, mean_shift=mean_shift,
                                 noise_scale=self.noise_scale(k))

    def step_at(self, traj: Trajectory, k: int, idx: Tensor) -> DDIMStep:
        """`step` on the cached step k of trajectories idx (with their prompts)."""
        return self.step(k, traj.x_t[k, idx], traj.x_prev[k, idx], prompt_ids=traj.prompts_of(idx))

    def means_at(self, traj: Trajectory, states: dict[int, Tensor]) -> list[Tensor]:
        """μ_θ of the cached states S = {k: trajectories} (with grad if enabled), one (|S_k|, C, H, W) per step,
        from one UNet call over all of them (a timestep per sample) instead of one small call per step."""
        x_t = torch.cat([traj.x_t[k, idx] for k, idx in states.items()]).to(self.device)  # (|S|, C, H, W)
        t = torch.cat([self._t(k, len(idx)) for k, idx in states.items()])
        prompts = None if traj.prompt_ids is None else torch.cat([traj.prompts_of(idx) for idx in states.values()])
        output = self.model_output(x_t, t, None if prompts is None else prompts.to(self.device))
        mus, offset = [], 0
        for k, idx in states.items():
            part = slice(offset, offset + len(idx))
            mus.append(self.step(k, x_t[part], traj.x_prev[k, idx], prompt_ids=traj.prompts_of(idx),
                                 output=output[part]).mu)
            offset += len(idx)
        return mus

    def base_mean_at(self, traj: Trajectory, k: int, idx: Tensor) -> Tensor:
        """μ_base on the cached step k of trajectories idx: (b, C, H, W), no grad."""
        x_t, prompt_ids = traj.x_t[k, idx].to(self.device), traj.prompts_of(idx)
        output = self.base_model_output(x_t, self._t(k, x_t.shape[0]), prompt_ids)
        return self.step(k, x_t, traj.x_prev[k, idx], output=output).mu

    def sigma_tilde(self, k: int) -> float:
        """σ̃_k = max(σ_k, sigma_floor)."""
        s = ddim_sigma(self.schedule.alpha_bar_t[k], self.schedule.alpha_bar_prev[k], self.sampler.eta)
        return max(float(s), self.sampler.sigma_floor)

    def deterministic(self, k: int) -> bool:
        """Whether step k draws no noise (σ_k = 0, e.g. the last DDIM step with ᾱ_prev = 1)."""
        return float(ddim_sigma(self.schedule.alpha_bar_t[k], self.schedule.alpha_bar_prev[k], self.sampler.eta)) == 0.0

    @property
    def clip_range(self) -> float | None:
        return self.sampler.clip_range if self.sampler.clip_sample else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.network.config
        return cfg.in_channels, cfg.sample_size, cfg.sample_size

    # --- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch_size: int, *, generator: torch.Generator, keep_on: str | None = None,
               prompt_ids: Tensor | None = None, chunk: int | None = None) -> Trajectory:
        """Pass 1: B trajectories under the current θ, with every state and log π_old (no grad);
        `prompt_ids` (B,) condition a conditional model; `chunk` trajectories per forward (None: all)."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            parts = []
            for start in range(0, batch_size, chunk or batch_size):
                b = min(chunk or batch_size, batch_size - start)
                ids = None if prompt_ids is None else prompt_ids[start:start + b].to(self.device)
                traj = sample_trajectory(lambda x, t: self.model_output(x, t, ids), self.schedule,
                                         shape=(b, *self.image_shape), eta=self.sampler.eta,
                                         sigma_floor=self.sampler.sigma_floor, generator=generator,
                                         device=self.device, keep_on=keep_on or self.sampler.keep_on,
                                         clip_range=self.clip_range, reduction=self.sampler.logprob_reduction,
                                         step_scales=self.step_scales(), **self._sample_kwargs())
                traj.prompt_ids = None if ids is None else ids.cpu()
                parts.append(traj)
        finally:
            self.unet.train(was_training)
        return concat_trajectories(parts)

    def _sample_kwargs(self) -> dict:
        """Extra arguments of `sample_trajectory` (the latent mode's drift)."""
        return {}

    # --- saving -----------------------------------------------------------------------------------

    def merged_unet(self) -> UNet2DModel:
        """A plain UNet2DModel with θ folded in (LoRA merged), loadable by diffusers alone."""
        if self.mode != "lora":
            return self.unet
        return copy.deepcopy(self.unet).merge_and_unload()

    def save(self, path: str | Path, *, pipeline: bool = True) -> None:
        """`path/model/`: the (merged) UNet as a DDIMPipeline of the trained chain with its sampler.json
        (ddpm.pipeline.save_pipeline); LoRA also `path/adapter/` (peft, its base UNet's folder recorded: loadable with
        peft.PeftModel.from_pretrained(base_unet, path/adapter))."""
        path = Path(path)
        if pipeline:
            save_pipeline(self.merged_unet(), self.scheduler, path / "model", sampler=self.sampler,
                          step_scales=self.step_scales())
        if self.mode == "lora":
            self.unet.save_pretrained(path / "adapter", safe_serialization=True)

    def trainable_state(self) -> dict[str, Tensor]:
        """θ by name (for checkpoints and for restoring the last good weights)."""
        state = {n: p.detach().clone() for n, p in self.trained.named_parameters() if p.requires_grad}
        if self.log_noise_scale is not None and self.log_noise_scale.requires_grad:
            state[NOISE_SCALE_KEY] = self.log_noise_scale.detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.trained.named_parameters())
        if self.log_noise_scale is not None:
            params[NOISE_SCALE_KEY] = self.log_noise_scale
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
