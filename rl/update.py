"""The two-pass update shared by the policy-gradient algorithms (PPO, REINFORCE, SAC's actor, TRPO's
penalty mode): memory that does not grow with the number of denoising steps T.

Pass 1 (`DiffusionPolicy.sample`, no grad) cached every state and log π_old. Pass 2, here: the
batch is shuffled into microbatches; for each microbatch and each (sampled) step k, log π_θ is
recomputed from the cached (x_t, x_prev), the step's loss is formed and `backward()` is called at
once, freeing that step's graph; gradients accumulate over steps and over `gradient_accumulation`
microbatches, then the global norm is clipped and the optimizer steps. Since every cached state is
a constant, the summed per-step gradients equal the gradient of the whole objective built in one
graph (tested), at the memory cost of one step (docs/design.md, "Two-pass PPO").

Mixed precision: with `precision: fp16` every backward goes through torch's GradScaler (loss × S);
gradients are unscaled before clipping, and a step whose scaled gradients overflowed is skipped and
S halved: an expected event of dynamic loss scaling (counted in `scaler_skips`), not a failure.

Every algorithm's update has one signature, `Update`: (UpdateBatch, the algorithm's own persistent state or
None) -> UpdateStats; the trainer picks it from a table. The policy-gradient ones hand `two_pass` a `StepLoss`:
an object (its settings as fields, nothing closed over) whose `prepare` runs once per microbatch without
gradients and whose call gives one step's loss and the clip counts that the driver accumulates.

Conventions: `traj.x_t[k]`, `traj.x_prev[k]`: (B, C, H, W) states of step k; `traj.logp[k]`: (B,);
advantages `adv`: (B,) one per trajectory, or (T, B) one per state (GAE, SAC). Losses are averaged
over the steps trained and the trajectories, so the scale does not depend on T, B or the microbatching.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from config import RLConfig
from ddpm.ddim import DDIMStep
from ddpm.sampling import Trajectory
from rl import distributed
from rl.objectives import approx_kl, gaussian_kl
from rl.policy import DiffusionPolicy


@dataclass
class UpdateStats:
    """Diagnostics of one update, by their standard names (means over the update)."""
    loss: float = 0.0
    kl: float = 0.0                 # approx KL(π_old ‖ π_θ), k3 estimator, over the trained states
    clip_frac: float = 0.0          # fraction of trained states (or trajectories) whose clip was active
    ratio_mean: float = 1.0
    ratio_min: float = 1.0
    ratio_max: float = 1.0
    grad_norm: float = 0.0          # global gradient norm before clipping (mean over optimizer steps)
    grad_norm_clipped: float = 0.0  # after clipping
    kl_base: float = 0.0            # KL(π_θ ‖ π_base) per regularised state (β_k > 0)
    optimizer_steps: int = 0
    nonfinite: bool = False         # a non-finite loss or gradient was met: that optimizer step was skipped
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        d = {k: float(v) for k, v in vars(self).items() if k != "extra"}
        d.update({k: float(v) for k, v in self.extra.items()})
        return d


@dataclass
class UpdateBatch:
    """What one update reads: the policy and its optimizer (None for TRPO's natural step), a sampled batch and
    its advantages, the RL settings, the generator of the update's random draws, the fp16 loss scaler."""
    policy: DiffusionPolicy
    optimizer: torch.optim.Optimizer | None
    traj: Trajectory
    adv: Tensor  # (B,) or (T, B); SAC: the normalised rewards R̂ (B,), from which it forms its own advantages
    cfg: RLConfig
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None

    @property
    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()


Update = Callable[[UpdateBatch, Any], UpdateStats]
"""(batch, the algorithm's persistent state: SAC's networks, the penalty's β, or None) -> statistics."""


def adv_at(adv: Tensor, k: int, idx: Tensor) -> Tensor:
    """The advantages of trajectories `idx` at step k: adv (B,) or (T, B) -> (b,)."""
    return (adv[k] if adv.ndim == 2 else adv)[idx]


def microbatches(batch: int, size: int, *, generator: torch.Generator) -> list[Tensor]:
    """A random permutation of range(batch) cut into chunks of `size` (the last may be shorter)."""
    return list(torch.randperm(batch, generator=generator).split(size))


def trained_steps(num_steps: int, fraction: float, *, generator: torch.Generator) -> Tensor:
    """The steps trained on for one microbatch: all of them, or a random ceil(fraction·T) (sorted)."""
    if fraction >= 1.0:
        return torch.arange(num_steps)
    n = max(1, math.ceil(fraction * num_steps))
    return torch.randperm(num_steps, generator=generator)[:n].sort().values


class StepResult(NamedTuple):
    norm: float      # global gradient norm before clipping
    clipped: float   # after clipping (nan if not stepped)
    stepped: bool
    overflow: bool   # fp16 loss scaling overflowed: skipped by design, the scale was lowered


def clip_and_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *, grad_clip: float,
                  scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """Clip the global gradient norm and step; skip the step (and zero the gradients) if it is not finite.

    With several processes the gradients are first averaged over them, so all take the same step.
    With an enabled `scaler` (fp16) the gradients are unscaled first; a non-finite norm is then an
    overflow of the scaled gradients: the step is skipped and the scale lowered."""
    distributed.average_gradients(params)
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(norm):
        if scaling:
            scaler.update()  # unscale_ recorded the overflow: the scale is lowered
        optimizer.zero_grad(set_to_none=True)
        return StepResult(float(norm), float("nan"), False, scaling)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(float(norm), min(float(norm), grad_clip), True, False)


class Accumulator:
    """Running sums for UpdateStats over all trained states."""

    def __init__(self):
        self.loss = 0.0
        self.log_ratios: list[Tensor] = []
        self.clipped = 0.0
        self.clip_count = 0
        self.kl_base: list[float] = []
        self.norms: list[tuple[float, float]] = []
        self.surrogates: list[float] = []
        self.nonfinite = False
        self.overflows = 0
        self.loss_scale: float | None = None

    def add_counts(self, clipped: float, counted: int) -> None:
        self.clipped += clipped
        self.clip_count += counted

    def add_prepared(self, prep: Prepared) -> None:
        self.add_counts(prep.clipped, prep.counted)
        if prep.surrogate is not None:
            self.surrogates.append(prep.surrogate)

    def add_step(self, res: StepResult) -> None:
        self.norms.append((res.norm, res.clipped))
        self.nonfinite |= not (res.stepped or res.overflow)
        self.overflows += int(res.overflow)

    def stats(self) -> UpdateStats:
        lr = torch.cat(self.log_ratios) if self.log_ratios else torch.zeros(1)
        ratio = lr.exp()
        finite = [n for n in self.norms if math.isfinite(n[0])]
        extra = {"surrogate": sum(self.surrogates) / len(self.surrogates)} if self.surrogates else {}
        if self.loss_scale is not None:
            extra.update(loss_scale=self.loss_scale, scaler_skips=float(self.overflows))
        return UpdateStats(
            loss=self.loss, kl=float(approx_kl(lr)), clip_frac=self.clipped / max(1, self.clip_count),
            ratio_mean=float(ratio.mean()), ratio_min=float(ratio.min()), ratio_max=float(ratio.max()),
            grad_norm=sum(n for n, _ in finite) / max(1, len(finite)),
            grad_norm_clipped=sum(c for _, c in finite) / max(1, len(finite)),
            kl_base=sum(self.kl_base) / max(1, len(self.kl_base)),
            optimizer_steps=sum(1 for n in self.norms if math.isfinite(n[0])), nonfinite=self.nonfinite,
            extra=extra)


class Prepared(NamedTuple):
    """What `StepLoss.prepare` computed for one microbatch: data for its steps' losses, and statistics."""
    data: Any = None
    clipped: float = 0.0            # trajectories whose clip was active (the trajectory ratio)
    counted: int = 0
    surrogate: float | None = None  # the objective's value on the microbatch, where it has one


class StepTerm(NamedTuple):
    """One step's loss over a microbatch, and how many of its states had their clip active."""
    loss: Tensor  # scalar
    clipped: float = 0.0
    counted: int = 0


class StepLoss(abc.ABC):
    """A per-step policy loss for `two_pass`. `sum_over_steps`: the objective sums its steps' terms (the
    trajectory ratio) instead of averaging them."""
    sum_over_steps = False

    def prepare(self, batch: UpdateBatch, idx: Tensor) -> Prepared:
        """Once per microbatch `idx`, before its steps (no gradient): nothing by default."""
        return Prepared()

    @abc.abstractmethod
    def __call__(self, batch: UpdateBatch, k: int, idx: Tensor, out: DDIMStep, prep: Prepared) -> StepTerm:
        """Step k's loss for trajectories `idx`, from the recomputed step `out` (its graph is live)."""


def kl_base_coefficients(policy: DiffusionPolicy, cfg: RLConfig) -> list[float]:
    """β_k of the KL-to-base term of each step k: β_KL, plus β_final at the deterministic steps (σ_k = 0).

    A deterministic step's action x_prev = μ_old, so ∇θ log π_θ(x_prev | x_t) = 0 at θ_old: the policy
    gradient never reaches it, and its weights move only as a side effect of training the others.
    """
    return [cfg.kl_base_coef + (cfg.kl_final_coef if policy.deterministic(k) else 0.0)
            for k in range(policy.num_actions)]


def w_k(policy: DiffusionPolicy, mode: str) -> list[float]:
    """Weight w_k of step k's policy loss: 1 ('uniform'), or w_k = σ_k / ((1/T_s) Σ_j σ_j) over the T_s
    stochastic steps ('sigma'; 0 at a deterministic step, whose policy gradient is 0 anyway).

    With a Gaussian step, ∇_μ log π_k = (x_prev − μ)/σ_k² = ε/σ_k (per dimension), so the uniform objective's
    gradient is dominated by the late, low-noise steps (σ_k 0.14 against 0.99 at the first of 10 DDIM steps),
    which set texture and contrast; the early steps, where the layout and the crater's size are decided, get
    ~7x less. 'sigma' gives every stochastic step the same gradient scale in mean space (ε per dimension).
    """
    T = policy.num_actions
    if mode == "uniform":
        return [1.0] * T
    sigmas = [0.0 if policy.deterministic(k) else policy.sigma_tilde(k) for k in range(T)]
    mean = sum(sigmas) / max(1, sum(s > 0 for s in sigmas))
    return [s / mean for s in sigmas]


def backward_steps(batch: UpdateBatch, idx: Tensor, steps: Tensor, step_loss: StepLoss, prep: Prepared, *,
                   scale: float, kl_coefs: list[float], step_weights: list[float], acc: Accumulator) -> None:
    """For each step k: recompute log π_θ for trajectories idx, loss = scale·(w_k·step_loss + β_k·KL_base),
    backward, free the graph."""
    policy, traj = batch.policy, batch.traj
    for k in steps.tolist():
        out = policy.step_at(traj, k, idx)
        term = step_loss(batch, k, idx, out, prep)
        acc.add_counts(term.clipped, term.counted)
        loss = step_weights[k] * term.loss
        if kl_coefs[k] > 0:
            kl = gaussian_kl(out.mu, policy.base_mean_at(traj, k, idx), policy.sigma_tilde(k)).mean()
            loss = loss + kl_coefs[k] * kl
            acc.kl_base.append(float(kl.detach()))
        if not torch.isfinite(loss):
            acc.nonfinite = True
            continue
        loss_scaled = loss * scale
        (batch.scaler.scale(loss_scaled) if batch.scaling else loss_scaled).backward()
        acc.loss += float(loss.detach()) * scale
        acc.log_ratios.append((out.logp.detach().cpu() - traj.logp[k, idx].cpu()).double())


def two_pass(batch: UpdateBatch, step_loss: StepLoss, *, epochs: int) -> UpdateStats:
    """The shared loop: epochs × microbatches × steps, optimizer step every `gradient_accumulation`.

    The objective is the mean over trajectories of the mean over steps (per-step objectives) or of the
    sum over steps (`step_loss.sum_over_steps`, the trajectory ratio, whose gradient is A r Σ_t ∇ log π_t),
    each step's term weighted by w_k (`rl.step_weighting`); with `timestep_fraction` < 1 the trained steps
    are reweighted so that the estimate stays unbiased.
    """
    policy, cfg, gen = batch.policy, batch.cfg, batch.generator
    params = policy.trainable_parameters()
    kl_coefs, weights = kl_base_coefficients(policy, cfg), w_k(policy, cfg.step_weighting)
    acc = Accumulator()
    batch.optimizer.zero_grad(set_to_none=True)
    T, B = batch.traj.num_steps, batch.traj.batch_size
    for _ in range(epochs):
        chunks = microbatches(B, cfg.microbatch, generator=gen)
        for start in range(0, len(chunks), cfg.gradient_accumulation):
            group = chunks[start:start + cfg.gradient_accumulation]
            n_group = sum(len(c) for c in group)
            for idx in group:
                steps = trained_steps(T, cfg.ppo.timestep_fraction, generator=gen)
                prep = step_loss.prepare(batch, idx)
                acc.add_prepared(prep)
                # each step's loss is a mean over the microbatch: weight it by its share of the group
                scale = len(idx) / n_group * ((T if step_loss.sum_over_steps else 1) / len(steps))
                backward_steps(batch, idx, steps, step_loss, prep, scale=scale, kl_coefs=kl_coefs,
                               step_weights=weights, acc=acc)
            res = clip_and_step(params, batch.optimizer, grad_clip=cfg.grad_clip, scaler=batch.scaler)
            acc.add_step(res)
    if batch.scaling:
        acc.loss_scale = float(batch.scaler.get_scale())
    return acc.stats()
