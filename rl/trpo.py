"""Trust-region policy optimisation on the flattened trainable vector θ (full UNet or LoRA).

Notation (Schulman et al. 2015; docs/design.md, "TRPO"):

| variable   | symbol | meaning |
|------------|--------|---------|
| `g`        | g      | ∇θ L(θ_old), L(θ) = (1/B) Σ_i mean_k A_{i,k} ρ_{i,k}(θ), the surrogate |
| `fvp`      | v ↦ F v + λ v | Fisher-vector product with damping λ |
| `s`        | s ≈ F⁻¹ g | the natural-gradient direction, by conjugate gradient |
| `max_kl`   | δ      | the trust-region radius |
| `full_step`| β s,  β = sqrt(2δ / sᵀ F s) | the largest step the quadratic KL model allows |
| `kl`       | KL(θ_old ‖ θ) = (1/|S|) Σ_{(i,k)∈S} mean_dims (μ_old − μ_θ)² / (2σ̃_k²) | exact Gaussian KL on a state subsample S |

The per-step Gaussians share σ̃ under θ_old and θ, so the KL is the closed form above, whose
Hessian at θ_old is the Fisher matrix F = Jᵀ W J (J = ∂μ/∂θ, W = I/σ̃² per dimension): F v is
computed as Jᵀ (W (J v)) through graphs built once per update (`fisher_operator`). The gradient and
the surrogate are accumulated state by state, so memory stays O(1) in T.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm.sampling import Trajectory
from rl import distributed
from rl.objectives import gaussian_kl
from rl.update import UpdateStats, adv_at, clip_and_step
from rl.policy import DiffusionPolicy
from utils import RLConfig

# ----------------------------------------------------------------------------------------------
# Flat parameter vectors
# ----------------------------------------------------------------------------------------------


def flat_params(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: list[torch.nn.Parameter], flat: Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def _flat(grads: tuple[Tensor | None, ...], params: list[torch.nn.Parameter]) -> Tensor:
    """Concatenated gradients (zeros where None), in the order of `params`."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    """Concatenated .grad of each parameter (zeros where None)."""
    return _flat(tuple(p.grad for p in params), params)


# ----------------------------------------------------------------------------------------------
# Conjugate gradient and line search
# ----------------------------------------------------------------------------------------------

@dataclass
class CGResult:
    x: Tensor
    residual: float  # ‖b − F x‖² at exit
    iters: int


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, *, iters: int, tol: float = 1e-10) -> CGResult:
    """Solve F x = b for symmetric positive-definite F given only v ↦ F v (Hestenes-Stiefel CG).

    x_0 = 0, r_0 = p_0 = b; α = rᵀr / pᵀFp; x += αp; r −= αFp; p = r + (r'ᵀr'/rᵀr) p.
    Stops after `iters` products or once rᵀr < tol.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = float(r @ r)
    done = 0
    for done in range(1, iters + 1):
        if rr < tol:
            done -= 1
            break
        fp = fvp(p)
        alpha = rr / float(p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(x=x, residual=rr, iters=done)


@dataclass
class LineSearchResult:
    accepted: bool
    step_fraction: float  # coeff^j of the accepted try (0 if none)
    kl: float             # KL of the accepted step (or of the last try)
    improvement: float    # L(θ_new) − L(θ_old) (or of the last try)
    expected: float       # gᵀ step of that try
    iters: int            # tries made


def backtracking_line_search(*, set_step: Callable[[float], None], surrogate_gain: Callable[[], float],
                             kl: Callable[[], float], expected_full: float, max_kl: float, coeff: float,
                             max_iters: int, accept_ratio: float) -> LineSearchResult:
    """Try θ_old + coeff^j · full_step for j = 0, 1, ...: accept the first whose exact KL ≤ δ and whose
    surrogate gain ≥ accept_ratio × the expected gain coeff^j gᵀ full_step (and > 0). If none is
    accepted, θ_old is restored (set_step(0)).

    set_step(f) puts θ = θ_old + f · full_step; surrogate_gain() and kl() evaluate at the current θ.
    """
    gain = kl_val = expected = float("nan")
    for j in range(max_iters):
        frac = coeff**j
        set_step(frac)
        kl_val, gain, expected = kl(), surrogate_gain(), frac * expected_full
        if math.isfinite(kl_val) and math.isfinite(gain) and kl_val <= max_kl and gain > 0 \
                and gain >= accept_ratio * expected:
            return LineSearchResult(True, frac, kl_val, gain, expected, j + 1)
    set_step(0.0)
    return LineSearchResult(False, 0.0, kl_val, gain, expected, max_iters)


# ----------------------------------------------------------------------------------------------
# The policy-specific pieces: g, the KL on a state subsample, F v
# ----------------------------------------------------------------------------------------------

def state_subsample(num_steps: int, batch: int, n: int, *, generator: torch.Generator) -> dict[int, Tensor]:
    """S: n random (step k, trajectory i) pairs without replacement (all if n = 0 or n ≥ T·B), grouped
    by step: {k: trajectory indices}."""
    total = num_steps * batch
    flat = torch.arange(total) if n == 0 or n >= total else torch.randperm(total, generator=generator)[:n]
    groups: dict[int, list[int]] = {}
    for f in flat.tolist():
        groups.setdefault(f // batch, []).append(f % batch)
    return {k: torch.tensor(sorted(v)) for k, v in sorted(groups.items())}


def policy_gradient(policy: DiffusionPolicy, traj: Trajectory, adv: Tensor, *, microbatch: int) -> Tensor:
    """g = ∇θ (1/B) Σ_i mean_k A_{i,k} log π_θ(x_prev | x_t) at the current θ, accumulated step by step."""
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    T, B = traj.num_steps, traj.batch_size
    for idx in torch.arange(B).split(microbatch):
        for k in range(T):
            out = policy.step_at(traj, k, idx)
            ((adv_at(adv, k, idx).to(out.logp) * out.logp).sum() / (B * T)).backward()
    g = flat_grad(params).clone()
    for p in params:
        p.grad = None
    return g


def old_means(policy: DiffusionPolicy, traj: Trajectory, states: dict[int, Tensor]) -> dict[int, Tensor]:
    """μ_old of every state in S at the current θ (= θ_old), no grad."""
    with torch.no_grad():
        return {k: policy.step_at(traj, k, idx).mu.detach() for k, idx in states.items()}


def subsample_kl(policy: DiffusionPolicy, traj: Trajectory, states: dict[int, Tensor],
                 mu_old: dict[int, Tensor]) -> float:
    """KL(θ_old ‖ θ) over S (mean over states) at the current θ, no grad."""
    n = sum(len(v) for v in states.values())
    total = 0.0
    with torch.no_grad():
        for k, idx in states.items():
            out = policy.step_at(traj, k, idx)
            total += float(gaussian_kl(out.mu, mu_old[k], policy.sigma_tilde(k)).sum() / n)
    return total


def kl_mu_curvature(mu_old: Tensor, sigma_tilde: float, n: int) -> Tensor:
    """diag H_μ, H_μ = ∂²/∂μ² [Σ_i KL_i(μ) / n] at μ = μ_old, shaped like μ: the KL's curvature in the
    mean, by autograd on `gaussian_kl` itself (so it follows its reduction). The KL is a sum of
    per-dimension squares, so H_μ is diagonal and H_μ·1 is its diagonal. Elementwise: no network."""
    m = mu_old.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        grad = torch.autograd.grad(gaussian_kl(m, mu_old, sigma_tilde).sum() / n, m, create_graph=True)[0]
        return torch.autograd.grad(grad.sum(), m)[0]


def fisher_operator(policy: DiffusionPolicy, traj: Trajectory, states: dict[int, Tensor],
                    mu_old: dict[int, Tensor], *, damping: float) -> Callable[[Tensor], Tensor]:
    """v ↦ F v + λ v at the current θ (= θ_old), as the Gauss-Newton product F v = Jᵀ H_μ J v.

    The KL over S is a quadratic in μ_θ with its minimum (0) at θ_old, so its Hessian there is
    exactly Jᵀ H_μ J (J = ∂μ_θ(S)/∂θ, H_μ = ∂²KL/∂μ² constant and diagonal): the Fisher matrix.
    μ_θ(S) is computed once with its graph, and Jᵀu once with its own graph (linear in a dummy
    u); each product is then two backward passes and no forward:

        J v = ∂/∂u [(Jᵀu)·v]    (the double-vjp trick: forward-mode AD fails on diffusers' UNet on CPU),
        F v = Jᵀ (H_μ J v)       (a vjp through the retained graph of μ).

    Measured on the shipped model (64 states, one CPU thread): 5.5 s a product against 7.9 s for
    differentiating (∇θ KL)·v once more through the UNet, ~1.3x over the 11 products of an update.
    Memory: the graphs of the |S| states (`trpo.kl_states` bounds it), independent of T.
    """
    params = policy.trainable_parameters()
    n = sum(len(v) for v in states.values())
    # J v differentiates through the backward of attention, which needs the plain-math SDPA kernel:
    # the fused CPU/flash kernels have no second derivative. `plain()`: fp32 (second derivatives of
    # low-precision activations are noise) and no gradient checkpointing, so the graph is kept.
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), policy.plain():
        mus = [policy.step_at(traj, k, idx).mu for k, idx in states.items()]  # (|S_k|, C, H, W)
        dummies = [torch.zeros_like(mu, requires_grad=True) for mu in mus]
        jt_u = _flat(torch.autograd.grad(mus, params, grad_outputs=dummies, create_graph=True, allow_unused=True),
                     params)  # (P,) Jᵀu, linear in u
    curvature = [kl_mu_curvature(mu_old[k], policy.sigma_tilde(k), n) for k in states]  # diag H_μ per step

    def fvp(v: Tensor) -> Tensor:
        jv = torch.autograd.grad(jt_u @ v, dummies, retain_graph=True)  # J_k v per step
        hv = torch.autograd.grad(mus, params, grad_outputs=[h * x for h, x in zip(curvature, jv)],
                                 retain_graph=True, allow_unused=True)
        return _flat(hv, params).detach() + damping * v

    return fvp


def fisher_vector_product(policy: DiffusionPolicy, traj: Trajectory, states: dict[int, Tensor],
                          mu_old: dict[int, Tensor], v: Tensor, *, damping: float) -> Tensor:
    """F v + λ v for one v (see `fisher_operator`, which serves many v at the same θ)."""
    return fisher_operator(policy, traj, states, mu_old, damping=damping)(v)


def surrogate(policy: DiffusionPolicy, traj: Trajectory, adv: Tensor, *, microbatch: int) -> float:
    """L(θ) = (1/B) Σ_i mean_k A_{i,k} ρ_{i,k}(θ) over the whole batch, no grad."""
    T, B = traj.num_steps, traj.batch_size
    total = 0.0
    with torch.no_grad():
        for idx in torch.arange(B).split(microbatch):
            for k in range(T):
                out = policy.step_at(traj, k, idx)
                ratio = torch.exp(out.logp.cpu().double() - traj.logp[k, idx].cpu().double())
                total += float((adv_at(adv, k, idx).double() * ratio).sum()) / (B * T)
    return total


# ----------------------------------------------------------------------------------------------
# Updates
# ----------------------------------------------------------------------------------------------

def trpo_update(policy: DiffusionPolicy, traj: Trajectory, adv: Tensor, cfg: RLConfig, *,
                generator: torch.Generator) -> UpdateStats:
    """One TRPO step: g, s = CG(F, g), β = sqrt(2δ / sᵀFs), backtracking line search on the exact KL."""
    t = cfg.trpo
    params = policy.trainable_parameters()
    theta_old = flat_params(params)
    clock = [time.perf_counter()]
    # with several processes g, F v, the surrogate and the KL are means over all of them, so every
    # process computes the same step and the same line-search decision
    g = distributed.mean_(policy_gradient(policy, traj, adv, microbatch=cfg.microbatch))
    clock.append(time.perf_counter())
    if not torch.isfinite(g).all():
        return UpdateStats(nonfinite=True, extra={"accepted": 0.0})
    states = state_subsample(traj.num_steps, traj.batch_size, t.kl_states, generator=generator)
    mu_old = old_means(policy, traj, states)

    local_fvp = fisher_operator(policy, traj, states, mu_old, damping=t.damping)
    fvp = lambda v: distributed.mean_(local_fvp(v))  # noqa: E731
    cg = conjugate_gradient(fvp, g, iters=t.cg_iters, tol=t.cg_tol)
    shs = float(cg.x @ fvp(cg.x))
    del fvp, local_fvp  # frees the retained graphs before the line search
    clock.append(time.perf_counter())
    if not (math.isfinite(shs) and shs > 0):
        return UpdateStats(nonfinite=not math.isfinite(shs), grad_norm=float(g.norm()),
                           extra={"accepted": 0.0, "cg_residual": cg.residual})
    beta = math.sqrt(2 * t.max_kl / shs)
    full_step = beta * cg.x
    L = lambda: distributed.mean_float(surrogate(policy, traj, adv, microbatch=cfg.microbatch))  # noqa: E731
    base = L()

    def set_step(frac: float) -> None:
        set_flat_params(params, theta_old + frac * full_step)

    ls = backtracking_line_search(
        set_step=set_step, surrogate_gain=lambda: L() - base,
        kl=lambda: distributed.mean_float(subsample_kl(policy, traj, states, mu_old)),
        expected_full=float(g @ full_step),
        max_kl=t.max_kl, coeff=t.backtrack_coeff, max_iters=t.backtrack_iters, accept_ratio=t.accept_ratio)
    clock.append(time.perf_counter())
    step_norm = float(full_step.norm()) * ls.step_fraction
    return UpdateStats(loss=-(base + (ls.improvement if ls.accepted else 0.0)), kl=ls.kl if ls.accepted else 0.0,
                       grad_norm=float(g.norm()), optimizer_steps=int(ls.accepted),
                       extra={"accepted": float(ls.accepted), "backtrack_iters": float(ls.iters),
                              "step_size": step_norm, "cg_residual": cg.residual, "cg_iters": float(cg.iters),
                              "expected_improve": ls.expected, "improvement": ls.improvement,
                              "line_search_kl": ls.kl, "time_gradient_s": clock[1] - clock[0],
                              "time_cg_s": clock[2] - clock[1], "time_line_search_s": clock[3] - clock[2]})


@dataclass
class PenaltyState:
    """The adaptive β of the KL-penalty variant (checkpointed with the run)."""
    beta: float


def kl_penalty_update(policy: DiffusionPolicy, optimizer: torch.optim.Optimizer, traj: Trajectory, adv: Tensor,
                      cfg: RLConfig, state: PenaltyState, *, generator: torch.Generator,
                      scaler: torch.amp.GradScaler | None = None) -> UpdateStats:
    """The penalty variant: `penalty_steps` gradient steps on L(θ) − β·KL(θ_old ‖ θ), then adapt β:
    ×2 if KL > 1.5 δ, ÷2 if KL < δ / 1.5 (Schulman et al. 2017, section 4)."""
    t = cfg.trpo
    params = policy.trainable_parameters()
    states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=generator)
    mu_old = old_means(policy, traj, states)
    T, B = traj.num_steps, traj.batch_size
    norms = []
    for _ in range(t.penalty_steps):
        optimizer.zero_grad(set_to_none=True)
        for k, idx_all in states.items():
            for start in range(0, len(idx_all), cfg.microbatch):
                idx, mu_ref = idx_all[start:start + cfg.microbatch], mu_old[k][start:start + cfg.microbatch]
                out = policy.step_at(traj, k, idx)
                ratio = torch.exp(out.logp - traj.logp[k, idx].to(out.logp))
                gain = (adv_at(adv, k, idx).to(out.logp) * ratio).sum() / (B * T)
                kl = gaussian_kl(out.mu, mu_ref, policy.sigma_tilde(k)).sum() / (B * T)
                loss = -(gain - state.beta * kl)
                (scaler.scale(loss) if scaler is not None else loss).backward()
        norms.append(clip_and_step(params, optimizer, grad_clip=cfg.grad_clip, scaler=scaler))
    kl_now = distributed.mean_float(subsample_kl(policy, traj, states, mu_old))
    beta_used = state.beta
    if kl_now > 1.5 * t.max_kl:
        state.beta *= 2.0
    elif kl_now < t.max_kl / 1.5:
        state.beta /= 2.0
    finite = [n for n in norms if n.stepped]
    extra = {"penalty_beta": beta_used, "penalty_beta_next": state.beta}
    if scaler is not None and scaler.is_enabled():
        extra.update(loss_scale=float(scaler.get_scale()), scaler_skips=float(sum(n.overflow for n in norms)))
    return UpdateStats(kl=kl_now, grad_norm=sum(n.norm for n in finite) / max(1, len(finite)),
                       grad_norm_clipped=sum(n.clipped for n in finite) / max(1, len(finite)),
                       optimizer_steps=len(finite), nonfinite=any(not (n.stepped or n.overflow) for n in norms),
                       extra=extra)
