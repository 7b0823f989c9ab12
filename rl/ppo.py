"""Two-pass PPO and REINFORCE (docs/design.md, "Two-pass PPO", "REINFORCE").

Both run through the shared two-pass update of `rl/update.py` (per-step backward, memory O(1) in T);
this module holds only their per-step losses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from config import RLConfig
from ddpm.ddim import DDIMStep
from ddpm.sampling import Trajectory
from rl.objectives import ppo_clip_loss, reinforce_loss, trajectory_log_ratio, trajectory_surrogate
from rl.policy import DiffusionPolicy
from rl.update import Accumulator, StepLoss, UpdateStats, adv_at, two_pass


def ppo_update(policy: DiffusionPolicy, optimizer: torch.optim.Optimizer, traj: Trajectory, adv: Tensor,
               cfg: RLConfig, *, generator: torch.Generator, scaler: torch.amp.GradScaler | None = None
               ) -> UpdateStats:
    """One PPO update on a sampled batch (`rl.ppo.ratio`: per_step or trajectory)."""
    p = cfg.ppo
    if p.ratio == "per_step":
        def make_loss(idx: Tensor, acc: Accumulator) -> StepLoss:
            def step_loss(k: int, idx: Tensor, out: DDIMStep) -> Tensor:
                a = adv_at(adv, k, idx).to(out.logp)
                res = ppo_clip_loss(out.logp, traj.logp[k, idx].to(out.logp), a, clip_range=p.clip_range)
                acc.clipped += float(res.clipped.sum())
                acc.clip_count += len(idx)
                return res.loss
            return step_loss
        return two_pass(policy, optimizer, traj, cfg, make_loss, generator=generator, epochs=p.epochs, scaler=scaler)

    def make_traj_loss(idx: Tensor, acc: Accumulator) -> StepLoss:
        # no-grad pass: the trajectory log-ratio of this microbatch under the current θ
        with torch.no_grad():
            log_r_steps = torch.stack([policy.step_at(traj, k, idx).logp.cpu()
                                       - traj.logp[k, idx].cpu() for k in range(traj.num_steps)])
        a = (adv if adv.ndim == 1 else adv.mean(0))[idx].double()
        ratio = trajectory_log_ratio(log_r_steps.double(), per_step_clip=p.per_step_clip, global_clip=p.global_clip)
        acc.clipped += float((~ratio.active).sum())
        acc.clip_count += len(idx)
        acc.surrogates.append(float(trajectory_surrogate(a, ratio)))
        weight = (a * ratio.log_r.exp() * ratio.active).float()  # A_i r_i, zero where globally clipped

        def step_loss(k: int, idx: Tensor, out: DDIMStep) -> Tensor:
            # ∇(A r) = A r Σ_t ∇ log π_θ(t) over the unclipped steps; r is a constant here
            mask = ratio.step_active[k].to(out.logp.device)
            return -(weight.to(out.logp) * out.logp * mask).mean()
        return step_loss

    return two_pass(policy, optimizer, traj, cfg, make_traj_loss, generator=generator, epochs=p.epochs,
                     sum_over_steps=True, scaler=scaler)


def reinforce_update(policy: DiffusionPolicy, optimizer: torch.optim.Optimizer, traj: Trajectory, adv: Tensor,
                     cfg: RLConfig, *, generator: torch.Generator, scaler: torch.amp.GradScaler | None = None
                     ) -> UpdateStats:
    """One REINFORCE step: L = −(1/B) Σ_i A_i · mean_k log π_θ(x_prev | x_t), same two-pass memory."""
    def make_loss(idx: Tensor, acc: Accumulator) -> StepLoss:
        return lambda k, idx, out: reinforce_loss(out.logp, adv_at(adv, k, idx).to(out.logp))
    return two_pass(policy, optimizer, traj, cfg, make_loss, generator=generator, epochs=1, scaler=scaler)
