"""The Stable Diffusion policy: DDIM in latent space with classifier-free guidance, rewards on decoded images.

The UNet (UNet2DConditionModel) is the policy network, trained through peft LoRA (`lora`, the
default) or in full; the VAE and the text encoder stay frozen. Every trajectory draws one prompt
from the training prompts; its text embedding c and the empty prompt's c_∅ condition every step:

    ε̂ = ε_θ(z_t, t, c_∅) + w (ε_θ(z_t, t, c) − ε_θ(z_t, t, c_∅))          (CFG, w = guidance_scale)

in both RL passes, so log π_θ(z_prev | z_t) is the DDIM Gaussian of docs/design.md ("Policy") on the latents z.
The batch's final latents are decoded, D(z / s), turned into the data's channels and size, and
scored by the reward model like DDPM samples.

Shapes: z (B, 4, h, w); prompt ids (B,) long into `prompt_embeds` (N, L, D); images (B, C, H, W).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from config import LoRASettings, SamplerConfig
from ddpm.pipeline import save_sampler_call, save_step_scales
from ddpm.sampling import Trajectory
from ddpm.schedulers import sampler_scheduler
from ddpm.stable_diffusion import StableDiffusionParts, decode_latents, encode_prompts, to_channels
from rl.policy import DiffusionPolicy


class StableDiffusionPolicy(DiffusionPolicy):
    """π_θ(z_prev | z_t, c) of a Stable Diffusion UNet with CFG; images decoded for the reward."""

    checkpoint_pipeline = False  # checkpoints keep θ only (policy.safetensors, the adapter), not 2 GB of SD

    def __init__(self, parts: StableDiffusionParts, sampler: SamplerConfig, *, prompts: list[str],
                 guidance_scale: float, image_size: int, channels: int, mode: str = "lora",
                 lora: LoRASettings | None = None, keep_base: bool = False):
        super().__init__(parts.unet, parts.scheduler, sampler, mode=mode, lora=lora, keep_base=keep_base)
        self.vae, self.text_encoder, self.tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
        self.guidance_scale = float(guidance_scale)
        self.out_size, self.out_channels = image_size, channels
        self.register_buffer("uncond_embed", encode_prompts(parts, [""]), persistent=False)  # (1, L, D)
        self.prompts: list[str] = []
        self.set_prompts(prompts)

    # --- prompts ----------------------------------------------------------------------------------

    def set_prompts(self, prompts: list[str]) -> None:
        """Encode the prompts trajectories are conditioned on (training, or the test set for evaluation)."""
        self.prompts = list(prompts)
        embeds = encode_prompts(self._parts(), self.prompts, device=self.uncond_embed.device)
        self.register_buffer("prompt_embeds", embeds, persistent=False)  # (N, L, D)

    def _parts(self) -> StableDiffusionParts:
        return StableDiffusionParts(self.network, self.vae, self.text_encoder, self.tokenizer, self.scheduler)

    # --- ε̂ with classifier-free guidance -----------------------------------------------------------

    def _guided(self, unet, z_t: Tensor, t: Tensor, prompt_ids: Tensor, w: Tensor | None = None) -> Tensor:
        """CFG output; `w` (B,) per-sample guidance scales (the schedule policy), else `guidance_scale`."""
        cond = self.prompt_embeds[prompt_ids.to(self.prompt_embeds.device)]  # (B, L, D)
        if w is None and self.guidance_scale == 1.0:
            with self._amp():
                return unet(z_t, t, encoder_hidden_states=cond).sample.float()
        uncond = self.uncond_embed.expand_as(cond)
        # one UNet call on the stacked [unconditional; conditional] batch
        with self._amp():
            out = unet(torch.cat([z_t, z_t]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        eps_u, eps_c = out.chunk(2)
        scale = self.guidance_scale if w is None else w.to(out).reshape(-1, *([1] * (out.ndim - 1)))
        return eps_u + scale * (eps_c - eps_u)

    def model_output(self, x_t: Tensor, t: Tensor, prompt_ids: Tensor | None = None) -> Tensor:
        if prompt_ids is None:
            raise ValueError("the Stable Diffusion policy needs the prompt of every latent (prompt_ids)")
        return self._guided(self.unet, x_t, t, prompt_ids)

    @torch.no_grad()
    def base_model_output(self, x_t: Tensor, t: Tensor, prompt_ids: Tensor | None = None) -> Tensor:
        if self.mode == "full":
            if self.base_unet is None:
                raise RuntimeError("the policy was built without keep_base=True; no base model for the KL term")
            return self._guided(self.base_unet, x_t, t, prompt_ids)
        return super().base_model_output(x_t, t, prompt_ids)

    # --- sampling and decoding --------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: Tensor, *, chunk: int = 16) -> Tensor:
        """Final latents (B, 4, h, w) -> images (B, C, H, W) in [-1, 1] in the data's channels and size."""
        out = []
        for z in latents.to(self.device).split(chunk):
            with self._amp():
                x = decode_latents(self.vae, z)
            x = to_channels(x, self.out_channels)
            if x.shape[-1] != self.out_size:
                x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(-1, 1)
            out.append(x)
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, batch_size: int, *, generator: torch.Generator, keep_on: str | None = None,
               prompt_ids: Tensor | None = None, chunk: int | None = None) -> Trajectory:
        """Pass 1: B trajectories, each with a prompt drawn uniformly from `prompts` (or the given ids)."""
        if prompt_ids is None:
            prompt_ids = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        traj = super().sample(batch_size, generator=generator, keep_on=keep_on, prompt_ids=prompt_ids, chunk=chunk)
        traj.images = self.decode(traj.states[-1], chunk=chunk or 16)  # the base class's images: the latents
        return traj

    # --- saving -----------------------------------------------------------------------------------

    def save(self, path: str | Path, *, pipeline: bool = True) -> None:
        """`path/adapter/` (LoRA: diffusers' format for `load_lora_weights`, and peft's) and, with `pipeline`,
        `path/model/`: a StableDiffusionPipeline with the fine-tuned (merged) UNet, the frozen VAE, text encoder and
        tokenizer, the trained DDIM chain as its scheduler and the call's steps, η and CFG scale in `sampler.json`."""
        from diffusers import StableDiffusionPipeline

        from utils import atomic_directory

        path = Path(path)
        if self.mode == "lora":
            self.unet.save_pretrained(path / "adapter", safe_serialization=True)
            save_diffusers_lora(self.unet, path / "adapter")
        if pipeline:
            with atomic_directory(path / "model") as tmp:
                StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                        unet=self.merged_unet(), safety_checker=None,
                                        scheduler=sampler_scheduler(self.scheduler.config, self.sampler),
                                        feature_extractor=None, requires_safety_checker=False
                                        ).save_pretrained(tmp, safe_serialization=True)
                save_sampler_call(tmp, self.sampler, guidance_scale=self.guidance_scale)
                if self.log_noise_scale is not None:
                    save_step_scales(tmp, self.step_scales().cpu())


def save_diffusers_lora(peft_unet, directory: Path) -> None:
    """The UNet's LoRA as diffusers' `pytorch_lora_weights.safetensors` (keys unet.<module>.lora_A/B.weight, the
    LoraConfig with rank and α in its metadata): `StableDiffusionPipeline.load_lora_weights(directory)` loads it onto
    the base pipeline."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_unet).items()}
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True,
                                              unet_lora_adapter_metadata=peft_unet.peft_config["default"].to_dict())
