"""The frozen-UNet policy modes: a latent drift on the DDIM means, and a policy over sampler settings.

Both keep the diffusion model (DDPM or Stable Diffusion) frozen and train a small head, so they
cost one UNet forward per step and no backward through it. They are mixins: `policy_class(mode,
base)` puts one in front of `DiffusionPolicy` or `StableDiffusionPolicy`, so the UNet call (with
CFG for SD), decoding and saving of the base class are reused.

`latent` (δ_φ, "the diversity policy"): every step's Gaussian keeps σ̃_t and its mean moves by a
bounded drift, at most δ_max times the step's own noise level,

    μ_φ(x_t, t) = μ_DDIM(x_t, t) + δ_max · σ̃_t · tanh(f_φ(x_t, t)),      x_prev ~ N(μ_φ, σ_t² I),

so the log-prob, PPO's ratios and TRPO's KL are those of docs/design.md ("Policy") with μ_θ replaced by μ_φ. f_φ
is a three-layer conv net with a timestep embedding; its last layer starts at zero (δ = 0: the
policy starts at the base model).

`schedule` ("the scheduler policy"): one action per trajectory, u ~ N(m_φ(c), s² I), squashed into
bounds, p = low + (high − low) · sigmoid(u): DDPM p = (η, noise scale), SD p = (guidance scale, η)
with m_φ(c) = b + MLP(mean-pooled prompt embedding c). The trajectory then samples with those
settings (no grad). log π_φ(u | c) = mean_d log N(u_d; m_d, s²) (the same mean reduction as the
steps'; the squash is a fixed bijection, so it cancels in ratios), and the policy has one step:
the trajectory-level ratio. A `Trajectory` of this mode holds states (2, B, D): a zero placeholder
and u, so PPO, TRPO and REINFORCE run on it unchanged.

Shapes: x_t (B, C, H, W); t (B,) long; u, m (B, D); c (B, D_text).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from config import LatentSettings, ScheduleSettings
from ddpm.ddim import DDIMStep, gaussian_logprob
from ddpm.sampling import Trajectory, sample_trajectory
from rl.policy import DiffusionPolicy
from basics import CraterdiffError, first_line

HEAD_DIR = "policy_head"  # beside the frozen model in RUN/model/: config.json + head.safetensors


# ----------------------------------------------------------------------------------------------
# latent: the drift net
# ----------------------------------------------------------------------------------------------

class DriftNet(nn.Module):
    """δ_φ(x_t, t) = δ_max · σ̃_t · tanh(f_φ(x_t, t)): (B, C, H, W), (B,), σ̃ (B,) -> (B, C, H, W).

    Scaled by σ̃_t, the bound means the same at every step: a drift of a fixed size would be lost in
    the noise of the early steps (σ̃ ≈ 1) and dominate the last one (σ̃ = the floor)."""

    def __init__(self, channels: int, *, width: int, max_drift: float):
        super().__init__()
        self.max_drift = float(max_drift)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(width, width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # δ = 0 at the start: the policy is the base model
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
        temb = self.time_mlp(self.time_proj(t).to(x_t))  # (B, width)
        h = nn.functional.silu(self.conv_in(x_t) + temb[:, :, None, None])
        h = nn.functional.silu(self.conv_mid(h))
        return self.max_drift * sigma.to(x_t).reshape(-1, 1, 1, 1) * torch.tanh(self.conv_out(h))


class LatentDriftMixin:
    """mode `latent`: the frozen model's DDIM step plus the drift δ_φ on its mean."""

    def __init__(self, *args, latent: LatentSettings, **kw):
        super().__init__(*args, mode="latent", **kw)
        self.latent_settings = latent
        self.head = DriftNet(self.image_shape[0], width=latent.width, max_drift=latent.max_drift)
        # σ̃ of each sampler timestep, looked up by t (the sampler calls the drift with t, not k)
        sigma_by_t = torch.zeros(self.scheduler.config.num_train_timesteps)
        sigma_by_t[self.schedule.timesteps] = torch.tensor([self.sigma_tilde(k) for k in range(self.num_actions)])
        self.register_buffer("sigma_by_t", sigma_by_t, persistent=False)

    def drift(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.head(x_t, t, self.sigma_by_t[t.to(self.sigma_by_t.device)]).float()

    def step(self, k: int, x_t: Tensor, x_prev: Tensor, *, prompt_ids: Tensor | None = None,
             output: Tensor | None = None, with_drift: bool = True) -> DDIMStep:
        """log π_φ(x_prev | x_t); the frozen UNet runs without a graph (no backward through it)."""
        x_t = x_t.to(self.device)
        t = self._t(k, x_t.shape[0])
        if output is None:
            with torch.no_grad():
                output = self.model_output(x_t, t, prompt_ids)
        shift = self.drift(x_t, t) if with_drift else None
        return self._ddim(k, x_t, x_prev.to(self.device), output, mean_shift=shift)

    def base_mean_at(self, traj: Trajectory, k: int, idx: Tensor) -> Tensor:
        """μ_base: the frozen model's mean without the drift."""
        with torch.no_grad():
            return self.step(k, traj.x_t[k, idx], traj.x_prev[k, idx], prompt_ids=traj.prompts_of(idx),
                             with_drift=False).mu

    def _sample_kwargs(self) -> dict:
        return {"shift_fn": self.drift}

    def save(self, path: str | Path, *, pipeline: bool = True) -> None:
        super().save(path, pipeline=pipeline)
        if pipeline:
            save_head(self, Path(path) / "model", {"mode": "latent", **vars(self.latent_settings)})


# ----------------------------------------------------------------------------------------------
# schedule: a Gaussian policy over sampler settings
# ----------------------------------------------------------------------------------------------

def squash(u: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """p = low + (high − low) · sigmoid(u): R^D -> the box [low, high]."""
    return low + (high - low) * torch.sigmoid(u)


def unsquash(p: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """u = logit((p − low) / (high − low)), the inverse of `squash`."""
    return torch.logit((p - low) / (high - low))


class ScheduleHead(nn.Module):
    """m_φ(c) = b + MLP(c) (conditional, MLP's last layer starting at zero) or m_φ = b: -> (B, D)."""

    def __init__(self, start: Tensor, *, context_dim: int | None, hidden: int):
        super().__init__()
        self.bias = nn.Parameter(start.clone().float())  # (D,)
        self.mlp = None
        if context_dim is not None:
            self.mlp = nn.Sequential(nn.Linear(context_dim, hidden), nn.SiLU(), nn.Linear(hidden, start.numel()))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, context: Tensor | None, batch: int) -> Tensor:
        m = self.bias.expand(batch, -1)
        return m if self.mlp is None or context is None else m + self.mlp(context)


class ScheduleMixin:
    """mode `schedule`: one Gaussian action per trajectory over sampler settings."""

    def __init__(self, *args, schedule: ScheduleSettings, **kw):
        super().__init__(*args, mode="schedule", **kw)
        self.schedule_settings = schedule
        conditional = hasattr(self, "prompt_embeds")
        if conditional:  # Stable Diffusion
            self.param_names = ("guidance_scale", "eta")
            bounds, start = (schedule.guidance, schedule.eta), (self.guidance_scale, self.sampler.eta)
        else:
            self.param_names = ("eta", "noise_scale")
            bounds, start = (schedule.eta, schedule.noise_scale), (self.sampler.eta, 1.0)
        for name, b, s in zip(self.param_names, bounds, start):
            if len(b) != 2 or not b[0] < s < b[1]:
                raise CraterdiffError(f"rl.schedule: the bounds of {name} must be [low, high] with low < {s} < high "
                                      f"(its starting value), got {list(b)}")
        self.register_buffer("low", torch.tensor([b[0] for b in bounds]), persistent=False)
        self.register_buffer("high", torch.tensor([b[1] for b in bounds]), persistent=False)
        self.std = float(schedule.std)
        u0 = unsquash(torch.tensor(start, dtype=torch.float64), self.low.double(), self.high.double()).float()
        self.head = ScheduleHead(u0, context_dim=self.prompt_embeds.shape[-1] if conditional else None,
                                 hidden=schedule.hidden)
        self.base_head = copy.deepcopy(self.head).requires_grad_(False)  # π_base, for a KL-to-base term

    # --- the policy -------------------------------------------------------------------------------

    @property
    def num_actions(self) -> int:
        return 1

    def sigma_tilde(self, k: int) -> float:
        return self.std

    def deterministic(self, k: int) -> bool:
        return False

    def _context(self, prompt_ids: Tensor | None) -> Tensor | None:
        """c: the mean over tokens of each prompt's text embedding, (B, D_text); None for DDPM."""
        if prompt_ids is None or not hasattr(self, "prompt_embeds"):
            return None
        return self.prompt_embeds[prompt_ids.to(self.prompt_embeds.device)].mean(1).float()

    def _mean(self, head: ScheduleHead, prompt_ids: Tensor | None, batch: int) -> Tensor:
        return head(self._context(prompt_ids), batch)

    def step(self, k: int, x_t: Tensor, x_prev: Tensor, *, prompt_ids: Tensor | None = None,
             output: Tensor | None = None) -> DDIMStep:
        """log π_φ(u | c) of the actions u = x_prev (B, D); x_t is the placeholder state."""
        u = x_prev.to(self.device)
        m = self._mean(self.head, prompt_ids, u.shape[0])
        s = torch.full((u.shape[0],), self.std, device=u.device)
        return DDIMStep(x_prev=u, mu=m, x0=m, sigma=s, logp=gaussian_logprob(u, m, s))

    def means_at(self, traj: Trajectory, states: dict[int, Tensor]) -> list[Tensor]:
        """μ_φ of the actions of S, step by step: the head needs no UNet call."""
        return [self.step_at(traj, k, idx).mu for k, idx in states.items()]

    def base_mean_at(self, traj: Trajectory, k: int, idx: Tensor) -> Tensor:
        with torch.no_grad():
            return self._mean(self.base_head, traj.prompts_of(idx), len(idx)).to(self.device)

    def settings(self, u: Tensor) -> dict[str, Tensor]:
        """The sampler settings of actions u (B, D): {name: (B,)}."""
        p = squash(u, self.low.to(u), self.high.to(u))
        return {name: p[:, i] for i, name in enumerate(self.param_names)}

    # --- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch_size: int, *, generator: torch.Generator, keep_on: str | None = None,
               prompt_ids: Tensor | None = None, chunk: int | None = None) -> Trajectory:
        """Draw u per trajectory, then sample each image with its settings (no states kept)."""
        conditional = hasattr(self, "prompt_embeds")
        if conditional and prompt_ids is None:
            prompt_ids = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        m = self._mean(self.head, prompt_ids, batch_size).cpu()
        u = m + self.std * torch.randn(m.shape, generator=generator)  # (B, D), drawn on the CPU
        settings = self.settings(u)
        images = []
        was_training = self.unet.training
        self.unet.eval()
        try:
            for start in range(0, batch_size, chunk or batch_size):
                sl = slice(start, min(batch_size, start + (chunk or batch_size)))
                ids = None if prompt_ids is None else prompt_ids[sl].to(self.device)
                w = settings["guidance_scale"][sl].to(self.device) if conditional else None
                traj = sample_trajectory(
                    (lambda x, t: self._guided(self.unet, x, t, ids, w)) if conditional
                    else (lambda x, t: self.model_output(x, t)),
                    self.schedule, shape=(sl.stop - sl.start, *self.image_shape), eta=settings["eta"][sl].double(),
                    sigma_floor=self.sampler.sigma_floor, generator=generator, device=self.device, keep_on="device",
                    clip_range=self.clip_range, noise_scale=None if conditional else settings["noise_scale"][sl])
                images.append(self.decode(traj.states[-1], chunk=chunk or 16) if conditional else traj.images)
        finally:
            self.unet.train(was_training)
        logp = gaussian_logprob(u, m, torch.full((batch_size,), self.std))
        return Trajectory(states=torch.stack([torch.zeros_like(u), u]), logp=logp[None], schedule=self.schedule,
                          images=torch.cat(images), prompt_ids=None if prompt_ids is None else prompt_ids.cpu())

    def save(self, path: str | Path, *, pipeline: bool = True) -> None:
        super().save(path, pipeline=pipeline)
        if pipeline:
            save_head(self, Path(path) / "model", {"mode": "schedule", **vars(self.schedule_settings)})


# ----------------------------------------------------------------------------------------------
# building, saving and loading
# ----------------------------------------------------------------------------------------------

MIXINS = {"latent": LatentDriftMixin, "schedule": ScheduleMixin}


def policy_class(mode: str, base: type[DiffusionPolicy]) -> type[DiffusionPolicy]:
    """The policy class of a frozen-UNet mode on top of `base` (DiffusionPolicy or StableDiffusionPolicy)."""
    return type(f"{mode.capitalize()}{base.__name__}", (MIXINS[mode], base), {})


def save_head(policy: DiffusionPolicy, model_dir: Path, config: dict) -> None:
    """`model_dir/policy_head/`: config.json (mode and settings) and head.safetensors (φ)."""
    out = model_dir / HEAD_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in policy.head.state_dict().items()},
              out / "head.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))


def saved_head(model_dir: Path) -> tuple[str, LatentSettings | ScheduleSettings] | None:
    """The mode and settings of the head saved beside the model at `model_dir`, or None (a plain model)."""
    from config import config_from_dict

    f = Path(model_dir) / HEAD_DIR / "config.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    mode = data.pop("mode")
    return mode, config_from_dict(data, where=str(f), cls=LatentSettings if mode == "latent" else ScheduleSettings)


def load_head(policy: DiffusionPolicy, model_dir: Path) -> None:
    """Load φ saved by `save_head` into a policy of the same mode and settings."""
    state = load_file(Path(model_dir) / HEAD_DIR / "head.safetensors")
    try:
        policy.head.load_state_dict(state)
    except RuntimeError as e:
        raise CraterdiffError(f"the policy head in '{model_dir / HEAD_DIR}' does not fit its model "
                              f"({first_line(e, 120)})") from None
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise CraterdiffError(f"the policy head in '{model_dir / HEAD_DIR}' holds non-finite weights")
