"""Trust-region policy optimisation on the flattened trainable vector θ (full UNet or LoRA): the policy's
gradient pass, its surrogate and KL, the TRPO update and its KL-penalty variant. The pieces live by job: flat
vectors, CG and the line search in `rl/trust_region.py`, the state draws in `rl/states.py`, F v in `rl/fisher.py`.

Notation (Schulman et al. 2015; docs/design.md, "TRPO"):

| variable   | symbol | meaning |
|------------|--------|---------|
| `g`        | g      | ∇θ L(θ_old), L(θ) = (1/B) Σ_i mean_k A_{i,k} ρ_{i,k}(θ), the surrogate |
| `fvp`      | v ↦ F v + λ v | Fisher-vector product with damping λ |
| `s`        | s ≈ F⁻¹ g | the natural-gradient direction, by conjugate gradient |
| `max_kl`   | δ      | the trust-region radius |
| `full_step`| β s,  β = sqrt(2δ / sᵀ F s) | the largest step the quadratic KL model allows |
| `kl`       | KL(θ_old ‖ θ) = (1/(B·T)) Σ_{i,k} mean_dims (μ_old − μ_θ)² / (2σ̃_k²) | exact Gaussian KL over every state |
| `states`   | S      | the state subsample (`trpo.kl_states`) on which F is estimated, w_k each state's weight |
| `probe`    | S'     | further states, disjoint from S (`trpo.probe_states`), that aim the first line-search try |

The per-step Gaussians share σ̃ under θ_old and θ, so the KL is the closed form above, whose
Hessian at θ_old is the Fisher matrix F = Jᵀ W J (J = ∂μ/∂θ, W = I/σ̃² per dimension): F v is
estimated on S as Jᵀ (W (J v)), J v by a finite difference or forward-mode AD (`fisher_operator`). S is drawn
uniformly, or by step in proportion to 1/σ̃_k² (`trpo.state_draw: curvature`), since W makes the low-noise steps
carry most of F and of the KL (the last, deterministic one, at the σ floor, most of all).
The gradient pass also gives L(θ_old) and μ_old of every state, so each line-search try is one forward
pass without grad that gives both L(θ) and the exact KL over the whole batch: the trust region holds
on every state, not only on S. Everything is accumulated state by state, so graph memory stays O(1) in T.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ddpm.sampling import Trajectory
from rl import distributed
from rl.fisher import fisher_operator
from rl.objectives import gaussian_kl
from rl.policy import DiffusionPolicy
from rl.states import StateSample, draw_weights, state_subsample, state_subsamples
from rl.trust_region import (KEEP, LineSearchResult, backtracking_line_search, conjugate_gradient, flat_grad,
                             flat_params, set_flat_params)
from rl.update import UpdateBatch, UpdateStats, adv_at, clip_and_step


@dataclass
class GradientPass:
    """What the pass over the batch at θ_old gives: g, L(θ_old) and every state's mean μ_old."""
    g: Tensor            # (P,) ∇θ L(θ_old)
    surrogate: float     # L(θ_old) (= mean A up to the rounding of the recomputed log-probs)
    mu_old: Tensor       # (T, B, C, H, W) μ_θold of every state, detached


def surrogate_term(out, traj: Trajectory, adv: Tensor, k: int, idx: Tensor) -> Tensor:
    """Step k's share of L(θ) for trajectories idx, Σ_i A_{i,k} ρ_{i,k} / (B·T) with ρ = exp(log π_θ − log π_old),
    in float64 (the line search compares differences of L of order 1e-4); differentiable in θ."""
    log_ratio = out.logp.double() - traj.logp[k, idx].to(out.logp.device).double()
    return (adv_at(adv, k, idx).to(log_ratio) * log_ratio.exp()).sum() / (traj.batch_size * traj.num_steps)


def policy_gradient(policy: DiffusionPolicy, traj: Trajectory, adv: Tensor, *, microbatch: int) -> GradientPass:
    """g = ∇θ L(θ) at the current θ (= θ_old), accumulated step by step, where
    L(θ) = (1/B) Σ_i mean_k A_{i,k} ρ_{i,k}(θ) and ∇θ ρ = ρ ∇θ log π_θ. The same forward passes give
    L(θ_old) and μ_old of every state, so the line search needs no pass at θ_old."""
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    T, B = traj.num_steps, traj.batch_size
    mu_old: list[list[Tensor]] = [[] for _ in range(T)]
    total = 0.0
    for idx in torch.arange(B).split(microbatch):  # in order, so concatenating gives trajectories 0..B-1
        for k in range(T):
            out = policy.step_at(traj, k, idx)
            term = surrogate_term(out, traj, adv, k, idx)
            term.backward()
            total += float(term.detach())
            mu_old[k].append(out.mu.detach())
    g = flat_grad(params).clone()
    for p in params:
        p.grad = None
    return GradientPass(g=g, surrogate=total, mu_old=torch.stack([torch.cat(m) for m in mu_old]))


def old_means(policy: DiffusionPolicy, traj: Trajectory, states: StateSample) -> dict[int, Tensor]:
    """μ_old of every state in S at the current θ (= θ_old), no grad."""
    with torch.no_grad():
        return {k: policy.step_at(traj, k, idx).mu.detach() for k, idx in states.items()}


def subsample_kl(policy: DiffusionPolicy, traj: Trajectory, states: StateSample, mu_old: dict[int, Tensor]) -> float:
    """KL(θ_old ‖ θ) over S, Σ_k w_k Σ_{i∈S_k} KL_{k,i} (the mean over states for a uniform draw), at the current θ,
    no grad, from one UNet call over all of S (`means_at`: a few states per step, which one call a step would run
    in batches of a few)."""
    with torch.no_grad():
        mus = policy.means_at(traj, states)  # (|S_k|, C, H, W) per step
        return sum(states.weight[k] * float(gaussian_kl(mu, mu_old[k], policy.sigma_tilde(k)).sum())
                   for k, mu in zip(states, mus))


def surrogate_and_kl(policy: DiffusionPolicy, traj: Trajectory, adv: Tensor, mu_old: Tensor, *,
                     microbatch: int, kl_limit: float = math.inf) -> tuple[float, float]:
    """L(θ) and KL(θ_old ‖ θ) = (1/(B·T)) Σ_{i,k} KL_{i,k} over every state of the batch, at the current θ,
    from one forward pass without grad (μ_old: (T, B, C, H, W) from `policy_gradient`), `microbatch`
    trajectories at a time, every step of each.

    Every KL_{i,k} ≥ 0, so once the partial sum after a microbatch passes `kl_limit` the whole does too: the
    pass stops there and returns (nan, the partial KL scaled up to all B trajectories), an estimate ≥ kl_limit
    of by how much the step overshoots. The trajectories are exchangeable, so that estimate is unbiased (a
    partial sum over some of the steps would not be: the KL differs from step to step by a factor of several).
    A try far over the trust region then costs a fraction of a pass."""
    T, B = traj.num_steps, traj.batch_size
    gain = kl = 0.0
    seen = 0
    with torch.no_grad():
        for idx in torch.arange(B).split(microbatch):
            for k in range(T):
                out = policy.step_at(traj, k, idx)
                gain += float(surrogate_term(out, traj, adv, k, idx))
                kl += float(gaussian_kl(out.mu, mu_old[k, idx.to(mu_old.device)], policy.sigma_tilde(k)).sum()) / (B * T)
            seen += len(idx)
            if kl > kl_limit and seen < B:
                return float("nan"), kl * B / seen
    return gain, kl


def probe_fraction(policy: DiffusionPolicy, traj: Trajectory, probe: StateSample, mu_old: Tensor, *,
                   set_step: Callable[[float], None], max_kl: float) -> tuple[float, float]:
    """f_0 = min(1, KEEP · sqrt(δ / KL_S'(β s))), the line search's first try aimed at the trust region's edge by
    the KL of the full step on S' (states disjoint from S; μ_old: (T, B, C, H, W)); returns (f_0, KL_S').

    s is fitted to S, so it leans on directions in which F_S has little curvature, and ½ β² sᵀF_S s = δ
    misjudges the exact KL (by how much: docs/design.md, "The first try, aimed by a probe"). On S',
    which s was not fitted to, the weighted KL is an unbiased estimate of the batch's, up to the sampling error of
    |S'| states, at the cost of one forward pass over them. Leaves θ = θ_old."""
    set_step(1.0)
    kl = distributed.mean_float(subsample_kl(policy, traj, probe,
                                             {k: mu_old[k, idx.to(mu_old.device)] for k, idx in probe.items()}))
    set_step(0.0)
    return (min(1.0, KEEP * math.sqrt(max_kl / kl)) if math.isfinite(kl) and kl > 0 else 1.0), kl


def averaged(fvp: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """v ↦ the mean over processes of each one's F v (each on its own states): every process then runs the
    same CG."""
    return lambda v: distributed.mean_(fvp(v))


def trpo_update(batch: UpdateBatch, state: None = None) -> UpdateStats:
    """One TRPO step: g, s = CG(F, g) with F on the state subsample S (drawn as `trpo.state_draw` says),
    β = sqrt(2δ / sᵀFs), the first try's fraction aimed by the KL on the probe states S' (`probe_fraction`; its
    time counts to the line search's), backtracking line search on the exact KL over every state of the batch and
    on the surrogate."""
    policy, traj, adv, cfg = batch.policy, batch.traj, batch.adv, batch.cfg
    t = cfg.trpo
    params = policy.trainable_parameters()
    theta_old = flat_params(params)
    clock = [time.perf_counter()]
    # with several processes g, F v, the surrogate and the KL are means over all of them, so every
    # process computes the same step and the same line-search decision
    grad = policy_gradient(policy, traj, adv, microbatch=cfg.microbatch)
    g = distributed.mean_(grad.g)
    base = distributed.mean_float(grad.surrogate)
    clock.append(time.perf_counter())
    if not torch.isfinite(g).all():
        return UpdateStats(nonfinite=True, extra={"accepted": 0.0})
    states, probe = state_subsamples(traj.num_steps, traj.batch_size, t.kl_states, t.probe_states,
                                     generator=batch.generator,
                                     step_weights=draw_weights(policy, t.state_draw))
    mu_old_s = {k: grad.mu_old[k, idx.to(grad.mu_old.device)] for k, idx in states.items()}

    fvp = averaged(fisher_operator(policy, traj, states, mu_old_s, damping=t.damping, method=t.fvp))
    cg = conjugate_gradient(fvp, g, iters=t.cg_iters, tol=t.cg_tol)
    shs = cg.xfx
    del fvp  # frees the retained graphs before the line search
    clock.append(time.perf_counter())
    residual = cg.residual / max(float(g @ g), 1e-30)
    if not (math.isfinite(shs) and shs > 0):
        return UpdateStats(nonfinite=not math.isfinite(shs), grad_norm=float(g.norm()),
                           extra={"accepted": 0.0, "cg_residual": residual})
    beta = math.sqrt(2 * t.max_kl / shs)
    full_step = beta * cg.x

    def set_step(frac: float) -> None:
        set_flat_params(params, theta_old + frac * full_step)

    first, probe_kl = 1.0, float("nan")
    if distributed.all_true(bool(probe)):  # every process has probe states, or none uses them
        first, probe_kl = probe_fraction(policy, traj, probe, grad.mu_old, set_step=set_step, max_kl=t.max_kl)

    def evaluate() -> tuple[float, float]:
        # microbatches of trajectories: the points where the pass may stop early (and where a stopped pass's
        # estimate is unbiased); a process's KL is its share of the mean over processes (all ≥ 0), so past
        # world·δ the mean is past δ
        gain, kl = surrogate_and_kl(policy, traj, adv, grad.mu_old, microbatch=cfg.microbatch,
                                    kl_limit=t.max_kl * distributed.world_size())
        return distributed.mean_float(gain) - base, distributed.mean_float(kl)

    ls = backtracking_line_search(
        set_step=set_step, evaluate=evaluate, expected_full=float(g @ full_step),
        max_kl=t.max_kl, coeff=t.backtrack_coeff, max_iters=t.backtrack_iters, accept_ratio=t.accept_ratio,
        rule=t.backtrack, first=first)
    clock.append(time.perf_counter())
    extra = {"cg_residual": residual, "cg_iters": float(cg.iters), "first_fraction": first,
             **({"probe_kl": probe_kl} if math.isfinite(probe_kl) else {}),
             "time_gradient_s": clock[1] - clock[0], "time_cg_s": clock[2] - clock[1],
             "time_line_search_s": clock[3] - clock[2]}
    return step_stats(ls, base, g, float(full_step.norm()), extra)


def step_stats(ls: LineSearchResult, base: float, g: Tensor, full_norm: float, extra: dict[str, float]) -> UpdateStats:
    """The statistics of one TRPO step from its line search (`base`: L(θ_old); `full_norm`: ‖β s‖), with `extra`."""
    return UpdateStats(loss=-(base + (ls.improvement if ls.accepted else 0.0)), kl=ls.kl if ls.accepted else 0.0,
                       grad_norm=float(g.norm()), optimizer_steps=int(ls.accepted),
                       extra={"accepted": float(ls.accepted), "backtrack_iters": float(ls.iters),
                              "step_size": full_norm * ls.step_fraction, "expected_improve": ls.expected,
                              "improvement": ls.improvement, "line_search_kl": ls.kl, **extra})


@dataclass
class PenaltyState:
    """The adaptive β of the KL-penalty variant (checkpointed with the run)."""
    beta: float


def kl_penalty_update(batch: UpdateBatch, state: PenaltyState) -> UpdateStats:
    """The penalty variant: `penalty_steps` gradient steps on L(θ) − β·KL(θ_old ‖ θ), then adapt β:
    ×2 if KL > 1.5 δ, ÷2 if KL < δ / 1.5 (Schulman et al. 2017, section 4)."""
    policy, traj, adv, cfg, scaler = batch.policy, batch.traj, batch.adv, batch.cfg, batch.scaler
    t = cfg.trpo
    params = policy.trainable_parameters()
    states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=batch.generator)
    mu_old = old_means(policy, traj, states)
    T, B = traj.num_steps, traj.batch_size
    norms = []
    for _ in range(t.penalty_steps):
        batch.optimizer.zero_grad(set_to_none=True)
        for k, idx_all in states.items():
            for start in range(0, len(idx_all), cfg.microbatch):
                idx, mu_ref = idx_all[start:start + cfg.microbatch], mu_old[k][start:start + cfg.microbatch]
                out = policy.step_at(traj, k, idx)
                ratio = torch.exp(out.logp - traj.logp[k, idx].to(out.logp))
                gain = (adv_at(adv, k, idx).to(out.logp) * ratio).sum() / (B * T)
                kl = gaussian_kl(out.mu, mu_ref, policy.sigma_tilde(k)).sum() / (B * T)
                loss = -(gain - state.beta * kl)
                (scaler.scale(loss) if batch.scaling else loss).backward()
        norms.append(clip_and_step(params, batch.optimizer, grad_clip=cfg.grad_clip, scaler=scaler))
    kl_now = distributed.mean_float(subsample_kl(policy, traj, states, mu_old))
    beta_used = state.beta
    if kl_now > 1.5 * t.max_kl:
        state.beta *= 2.0
    elif kl_now < t.max_kl / 1.5:
        state.beta /= 2.0
    finite = [n for n in norms if n.stepped]
    extra = {"penalty_beta": beta_used, "penalty_beta_next": state.beta}
    if batch.scaling:
        extra.update(loss_scale=float(scaler.get_scale()), scaler_skips=float(sum(n.overflow for n in norms)))
    return UpdateStats(kl=kl_now, grad_norm=sum(n.norm for n in finite) / max(1, len(finite)),
                       grad_norm_clipped=sum(n.clipped for n in finite) / max(1, len(finite)),
                       optimizer_steps=len(finite), nonfinite=any(not (n.stepped or n.overflow) for n in norms),
                       extra=extra)
