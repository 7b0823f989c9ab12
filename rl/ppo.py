"""Two-pass PPO and REINFORCE (docs/design.md, "Two-pass PPO", "REINFORCE"): their objectives, one function
per equation, their per-step losses and their updates, which run through the shared two-pass driver of
`rl/update.py` (per-step backward, memory O(1) in T).

Notation:

| variable    | symbol | meaning |
|-------------|--------|---------|
| `logp`      | log π_θ(x_prev ∣ x_t) | under the current parameters, (B,) |
| `logp_old`  | log π_old             | recorded when the batch was sampled, (B,) |
| `adv`       | A                     | advantage of each trajectory (or of each state with GAE), (B,) |
| `ratio`     | ρ = exp(log π_θ − log π_old) | |
| `clip_range`| ε                     | PPO clip range |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm.ddim import DDIMStep
from rl.objectives import reinforce_loss
from rl.update import Prepared, StepLoss, StepTerm, UpdateBatch, UpdateStats, adv_at, two_pass


@dataclass
class ClipLoss:
    """loss: scalar; ratio: (B,) ρ; clipped: (B,) bool, True where the clipped term was the active one."""
    loss: Tensor
    ratio: Tensor
    clipped: Tensor


def ppo_clip_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, clip_range: float) -> ClipLoss:
    """L = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1 − ε, 1 + ε))   (Schulman et al. 2017, eq. 7, negated).

    The gradient is zero for samples whose clipped term is the larger (the 'clipped' ones).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return ClipLoss(loss=torch.maximum(unclipped, clipped).mean(), ratio=ratio.detach(),
                    clipped=(clipped > unclipped).detach())


@dataclass
class TrajectoryRatio:
    """log_r: (B,) clipped trajectory log-ratio; step_active: (T, B) bool, per-step term unclipped;
    active: (B,) bool, global clip inactive; raw: (B,) Σ_t log r_t without any clipping."""
    log_r: Tensor
    step_active: Tensor
    active: Tensor
    raw: Tensor


def trajectory_log_ratio(log_r_steps: Tensor, *, per_step_clip: float, global_clip: float) -> TrajectoryRatio:
    """log r = clip(Σ_t clip(log r_t, ±c_step), ±c_global)   (the seed's PPO-DDPM ratio).

    log_r_steps: (T, B) per-step log-ratios log π_θ − log π_old. Gradients flow only through the
    steps whose log r_t is inside ±c_step, and only for trajectories whose sum is inside ±c_global.
    """
    per = log_r_steps.clamp(-per_step_clip, per_step_clip)
    total = per.sum(0)
    log_r = total.clamp(-global_clip, global_clip)
    return TrajectoryRatio(log_r=log_r, step_active=log_r_steps.abs() < per_step_clip,
                           active=total.abs() < global_clip, raw=log_r_steps.sum(0))


def trajectory_surrogate(adv: Tensor, ratio: TrajectoryRatio) -> Tensor:
    """The value of the trajectory objective, min form: mean_i min(A_i r_i^raw, A_i r_i^clipped)."""
    return torch.minimum(adv * ratio.raw.exp(), adv * ratio.log_r.exp()).mean()


class ClipStepLoss(StepLoss):
    """Per-step ratio (`rl.ppo.ratio: per_step`): step k's `ppo_clip_loss`."""

    def __init__(self, clip_range: float):
        self.clip_range = clip_range

    def __call__(self, batch: UpdateBatch, k: int, idx: Tensor, out: DDIMStep, prep: Prepared) -> StepTerm:
        res = ppo_clip_loss(out.logp, batch.traj.logp[k, idx].to(out.logp), adv_at(batch.adv, k, idx).to(out.logp),
                            clip_range=self.clip_range)
        return StepTerm(res.loss, float(res.clipped.sum()), len(idx))


class TrajectoryStepLoss(StepLoss):
    """Trajectory ratio (`rl.ppo.ratio: trajectory`): `prepare` forms each trajectory's clipped ratio r_i
    under the current θ (no grad); step k's loss is −mean_i A_i r_i log π_θ(t_k) over its unclipped terms, so the
    summed steps give ∇(A r) = A r Σ_t ∇ log π_θ(t)."""
    sum_over_steps = True

    def __init__(self, per_step_clip: float, global_clip: float):
        self.per_step_clip, self.global_clip = per_step_clip, global_clip

    def prepare(self, batch: UpdateBatch, idx: Tensor) -> Prepared:
        traj = batch.traj
        with torch.no_grad():
            log_r_steps = torch.stack([batch.policy.step_at(traj, k, idx).logp.cpu() - traj.logp[k, idx].cpu()
                                       for k in range(traj.num_steps)])  # (T, b)
        a = (batch.adv if batch.adv.ndim == 1 else batch.adv.mean(0))[idx].double()
        ratio = trajectory_log_ratio(log_r_steps.double(), per_step_clip=self.per_step_clip,
                                     global_clip=self.global_clip)
        weight = (a * ratio.log_r.exp() * ratio.active).float()  # A_i r_i, zero where globally clipped
        return Prepared((weight, ratio.step_active), clipped=float((~ratio.active).sum()), counted=len(idx),
                        surrogate=float(trajectory_surrogate(a, ratio)))

    def __call__(self, batch: UpdateBatch, k: int, idx: Tensor, out: DDIMStep, prep: Prepared) -> StepTerm:
        weight, step_active = prep.data
        mask = step_active[k].to(out.logp.device)
        return StepTerm(-(weight.to(out.logp) * out.logp * mask).mean())


class ReinforceStepLoss(StepLoss):
    """Step k's `reinforce_loss`."""

    def __call__(self, batch: UpdateBatch, k: int, idx: Tensor, out: DDIMStep, prep: Prepared) -> StepTerm:
        return StepTerm(reinforce_loss(out.logp, adv_at(batch.adv, k, idx).to(out.logp)))


def ppo_update(batch: UpdateBatch, state: None = None) -> UpdateStats:
    """One PPO update on a sampled batch (`rl.ppo.ratio`: per_step or trajectory), `rl.ppo.epochs` passes."""
    p = batch.cfg.ppo
    loss = (ClipStepLoss(p.clip_range) if p.ratio == "per_step"
            else TrajectoryStepLoss(p.per_step_clip, p.global_clip))
    return two_pass(batch, loss, epochs=p.epochs)


def reinforce_update(batch: UpdateBatch, state: None = None) -> UpdateStats:
    """One REINFORCE step: L = −(1/B) Σ_i A_i · mean_k log π_θ(x_prev | x_t), same two-pass memory."""
    return two_pass(batch, ReinforceStepLoss(), epochs=1)
