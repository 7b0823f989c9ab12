"""Trust-region policy optimisation on the flattened trainable vector θ (full UNet or LoRA).

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
carry most of F and of the KL (the last, deterministic one, at the σ floor, ~0.8 on the shipped model).
The gradient pass also gives L(θ_old) and μ_old of every state, so each line-search try is one forward
pass without grad that gives both L(θ) and the exact KL over the whole batch: the trust region holds
on every state, not only on S. Everything is accumulated state by state, so graph memory stays O(1) in T.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm.sampling import Trajectory
from rl import distributed
from rl.objectives import gaussian_kl
from rl.update import UpdateBatch, UpdateStats, adv_at, clip_and_step
from rl.policy import DiffusionPolicy

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
    xfx: float       # xᵀ F x, from the residual: no product of its own


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, *, iters: int, tol: float = 1e-10) -> CGResult:
    """Solve F x = b for symmetric positive-definite F given only v ↦ F v (Hestenes-Stiefel CG).

    x_0 = 0, r_0 = p_0 = b; α = rᵀr / pᵀFp; x += αp; r −= αFp; p = r + (r'ᵀr'/rᵀr) p.
    Stops after `iters` products or once rᵀr < tol. The residual is r = b − F x, so xᵀFx = xᵀ(b − r)
    comes without another product (TRPO's step length needs it; at `configs/trpo.yaml`'s 64 of 640 states a
    product costs about a tenth of the gradient pass).
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
    return CGResult(x=x, residual=rr, iters=done, xfx=float(x @ (b - r)))


@dataclass
class LineSearchResult:
    accepted: bool
    step_fraction: float  # coeff^j of the accepted try (0 if none)
    kl: float             # KL of the accepted step (or of the last try)
    improvement: float    # L(θ_new) − L(θ_old) (or of the last try)
    expected: float       # gᵀ step of that try
    iters: int            # tries made


def backtracking_line_search(*, set_step: Callable[[float], None], evaluate: Callable[[], tuple[float, float]],
                             expected_full: float, max_kl: float, coeff: float, max_iters: int,
                             accept_ratio: float, rule: str = "geometric", first: float = 1.0) -> LineSearchResult:
    """Try θ_old + f_j · full_step from f_0 = `first` (1 in Schulman et al. 2015; `probe_fraction` aims it):
    accept the first whose exact KL ≤ δ and whose surrogate gain ≥ accept_ratio × the expected gain
    f_j gᵀ full_step (and > 0). If none is accepted, θ_old is restored (set_step(0)).

    rule 'geometric': f_{j+1} = coeff · f_j. rule 'kl': after a try over the trust region,
    f_{j+1} = f_j · KEEP · sqrt(δ / KL_j), the largest fraction inside it if the KL is quadratic in the
    step (as it is near θ_old, KL ≈ ½ f² sᵀFs); after any other rejection, coeff · f_j. The quadratic
    model on a uniformly drawn state subsample underestimates the exact KL (on the shipped model by 1.0x at 64
    states and 1.4-1.6x at 32 or 16, medians, up to 2.5x; docs/results/trpo_solve), so 'kl' usually lands inside
    on the second try where 'geometric' may need several, and keeps more of the step.

    set_step(f) puts θ = θ_old + f · full_step; evaluate() gives (surrogate gain, KL) at the current θ.
    """
    if rule not in ("geometric", "kl"):
        raise ValueError(f"unknown line-search rule {rule!r}; choose 'geometric' or 'kl'")
    if not 0.0 < first <= 1.0:
        raise ValueError(f"first try's fraction must be in (0, 1], got {first}")
    gain = kl_val = expected = float("nan")
    frac = first
    for j in range(max_iters):
        set_step(frac)
        (gain, kl_val), expected = evaluate(), frac * expected_full
        if math.isfinite(kl_val) and math.isfinite(gain) and kl_val <= max_kl and gain > 0 \
                and gain >= accept_ratio * expected:
            return LineSearchResult(True, frac, kl_val, gain, expected, j + 1)
        over = rule == "kl" and math.isfinite(kl_val) and kl_val > max_kl
        frac *= KEEP * math.sqrt(max_kl / kl_val) if over else coeff
    set_step(0.0)
    return LineSearchResult(False, 0.0, kl_val, gain, expected, max_iters)


KEEP = 0.95
"""The 'kl' line-search rule aims at this fraction of the step that the quadratic model puts on the trust
region's edge, so that a KL a little above quadratic still lands inside."""


# ----------------------------------------------------------------------------------------------
# The policy-specific pieces: g, the KL on a state subsample, F v
# ----------------------------------------------------------------------------------------------

class StateSample(dict):
    """A subsample of the batch's states, {step k: sorted trajectory indices}, with `weight[k]`: w_k, the weight of
    each of step k's states in the estimate of a batch mean, mean_{k,i} x_{k,i} ≈ Σ_k w_k Σ_{i∈S_k} x_{k,i}.
    A uniform draw of n states has w_k = 1/n; a draw stratified by step, n_k states at step k, w_k = 1/(T·n_k).
    Both are unbiased."""

    def __init__(self, idx: dict[int, Tensor], weight: dict[int, float]):
        super().__init__(idx)
        self.weight = weight

    @classmethod
    def uniform(cls, idx: dict[int, Tensor]) -> "StateSample":
        """A uniform draw: w = 1/|S| for every state."""
        n = sum(len(v) for v in idx.values())
        return cls(idx, {k: 1.0 / n for k in idx})

    @classmethod
    def by_step(cls, idx: dict[int, Tensor], num_steps: int) -> "StateSample":
        """A draw stratified by step (every step represented): w_k = 1/(T·|S_k|)."""
        return cls(idx, {k: 1.0 / (num_steps * len(v)) for k, v in idx.items()})

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.values())


def state_subsample(num_steps: int, batch: int, n: int, *, generator: torch.Generator) -> StateSample:
    """S: n random (step k, trajectory i) pairs without replacement (all if n = 0 or n ≥ T·B), grouped
    by step: {k: trajectory indices}."""
    return state_subsamples(num_steps, batch, n, 0, generator=generator)[0]


def state_subsamples(num_steps: int, batch: int, n: int, n_probe: int, *, generator: torch.Generator,
                     step_weights: list[float] | None = None) -> tuple[StateSample, StateSample]:
    """S and S', n_probe further states disjoint from S (fewer if S leaves fewer; none if S is every state).

    Uniform (`step_weights` None): n random states of the T·B; S is the same draw with or without S'.
    Stratified: n_k states at step k, n_k ∝ step_weights[k] with at least one per step (`allocate`), drawn without
    replacement within the step; S' likewise, from each step's remaining trajectories (none if S takes every
    trajectory of a step or leaves fewer than T states: S' could not represent every step)."""
    total = num_steps * batch
    if n == 0 or n >= total:
        return StateSample.uniform(_by_step(torch.arange(total), batch)), StateSample({}, {})
    if step_weights is None:
        order = torch.randperm(total, generator=generator)
        return (StateSample.uniform(_by_step(order[:n], batch)),
                StateSample.uniform(_by_step(order[n:n + n_probe], batch)))
    counts = allocate(step_weights, n, [batch] * num_steps)
    left, caps = min(n_probe, total - n), [batch - c for c in counts]
    probe_counts = allocate(step_weights, left, caps) if left >= num_steps and min(caps) > 0 else None
    s, probe = {}, {}
    for k in range(num_steps):
        order = torch.randperm(batch, generator=generator)
        s[k] = order[:counts[k]].sort().values
        if probe_counts and probe_counts[k]:
            probe[k] = order[counts[k]:counts[k] + probe_counts[k]].sort().values
    return StateSample.by_step(s, num_steps), StateSample.by_step(probe, num_steps)


def allocate(weights: list[float], n: int, caps: list[int]) -> list[int]:
    """n_k: n states over the steps, n_k ≈ n w_k / Σw, at least one per step and at most caps[k] (D'Hondt: each state
    after the first of every step goes to the step with the largest w_k / (n_k + 1)). Needs T ≤ n ≤ Σ caps."""
    T = len(weights)
    if not T <= n <= sum(caps):
        raise ValueError(f"cannot draw {n} states stratified over {T} steps of at most {caps} states each: "
                         f"choose between {T} and {sum(caps)}")
    counts = [1] * T
    for _ in range(n - T):
        open_steps = [k for k in range(T) if counts[k] < caps[k]]
        k = max(open_steps, key=lambda j: weights[j] / (counts[j] + 1))
        counts[k] += 1
    return counts


STATE_DRAWS = ("uniform", "curvature")
"""How S and S' are drawn (`trpo.state_draw`)."""


def draw_weights(policy: DiffusionPolicy, draw: str) -> list[float] | None:
    """`state_subsamples`' step_weights for the draw `draw`: None (uniform) or `curvature_weights`."""
    if draw not in STATE_DRAWS:
        raise ValueError(f"unknown state draw {draw!r}; choose one of {', '.join(STATE_DRAWS)}")
    return curvature_weights(policy) if draw == "curvature" else None


def curvature_weights(policy: DiffusionPolicy) -> list[float]:
    """1/σ̃_k² per step: the scale of the KL's curvature in μ at step k (H_μ = 1/σ̃_k² per dimension), so of
    step k's share of F and of the KL. On the shipped model the last, deterministic step (σ̃ = the 0.05 floor)
    holds ~0.8 of both; a uniform draw of 32 states gives it about 3."""
    return [1.0 / policy.sigma_tilde(k) ** 2 for k in range(policy.num_actions)]


def _by_step(flat: Tensor, batch: int) -> dict[int, Tensor]:
    """Flat state indices k·B + i as {k: sorted trajectory indices i}."""
    groups: dict[int, list[int]] = {}
    for f in flat.tolist():
        groups.setdefault(f // batch, []).append(f % batch)
    return {k: torch.tensor(sorted(v)) for k, v in sorted(groups.items())}


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
    misjudges the exact KL (uniform draws of 16-32 states underestimate it 1.4-1.6x on the shipped model, so the
    full step's first try mostly fails and costs a pass over the batch; draws by step put it at 0.7-0.95x). On S',
    which s was not fitted to, the weighted KL is an unbiased estimate of the batch's, up to the sampling error of
    |S'| states, at the cost of one forward pass over them. Leaves θ = θ_old."""
    set_step(1.0)
    kl = distributed.mean_float(subsample_kl(policy, traj, probe,
                                             {k: mu_old[k, idx.to(mu_old.device)] for k, idx in probe.items()}))
    set_step(0.0)
    return (min(1.0, KEEP * math.sqrt(max_kl / kl)) if math.isfinite(kl) and kl > 0 else 1.0), kl


def kl_mu_curvature(mu_old: Tensor, sigma_tilde: float, weight: float) -> Tensor:
    """diag H_μ, H_μ = ∂²/∂μ² [w Σ_i KL_i(μ)] at μ = μ_old, shaped like μ: the KL's curvature in the
    mean, by autograd on `gaussian_kl` itself (so it follows its reduction). The KL is a sum of
    per-dimension squares, so H_μ is diagonal and H_μ·1 is its diagonal. Elementwise: no network."""
    m = mu_old.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        grad = torch.autograd.grad(gaussian_kl(m, mu_old, sigma_tilde).sum() * weight, m, create_graph=True)[0]
        return torch.autograd.grad(grad.sum(), m)[0]


class _StepMean(torch.nn.Module):
    """μ_θ of cached states as a module call, so `torch.func.functional_call` can substitute θ."""

    def __init__(self, policy: DiffusionPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, traj: Trajectory, states: StateSample) -> list[Tensor]:
        return self.policy.means_at(traj, states)


@contextlib.contextmanager
def contiguous_norm_inputs(module: torch.nn.Module):
    """Make every GroupNorm's input contiguous inside: forward-mode AD of CPU group_norm fails on the
    strided tangents that diffusers' resnet blocks hand it ("view size is not compatible"), a torch
    limitation; `.contiguous()` is the identity on values and on the primal of contiguous inputs."""
    hooks = [m.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
             for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def fisher_operator(policy: DiffusionPolicy, traj: Trajectory, states: StateSample,
                    mu_old: dict[int, Tensor], *, damping: float, method: str = "jvp") -> Callable[[Tensor], Tensor]:
    """v ↦ F v + λ v at the current θ (= θ_old), as the Gauss-Newton product F v = Jᵀ H_μ J v.

    The KL over S is a quadratic in μ_θ with its minimum (0) at θ_old, so its Hessian there is
    exactly Jᵀ H_μ J (J = ∂μ_θ(S)/∂θ, H_μ = ∂²KL/∂μ² constant and diagonal): the Fisher matrix.
    μ_θ(S) is computed once with its graph; each product is then J v, and Jᵀ (H_μ J v) as a vjp
    through that retained graph. J v is computed by

    - `jvp`: forward-mode AD (`torch.func.jvp` through `functional_call`), one forward pass that
      carries the tangent v;
    - `double_vjp`: J v = ∂/∂u [(Jᵀu)·v], the derivative of a graph of Jᵀu (linear in a dummy u)
      built once with create_graph: a backward pass through a backward pass;
    - `fd`: the central difference J v ≈ (μ(θ + hv) − μ(θ − hv)) / 2h (`central_difference`), two forward
      passes without grad in fp32, with their fused kernels: no library gives J v cheaper on the
      CPU, where forward-mode AD through the UNet costs ~6 forward passes;
    - `fd_forward`: the forward difference J v ≈ (μ(θ + hv) − μ(θ)) / h (`forward_difference`), one such
      pass, μ(θ) computed once per operator; O(h) error against O(h²), so h is 10x smaller.

    Measured on the shipped model (64 states, 2 CPU threads, before S was batched into one UNet call):
    building 0.4 s (jvp) against 4.1 s, a product 1.55 s against 1.7 s. Memory: the graphs of the |S| states
    (`trpo.kl_states` bounds it), independent of T.
    """
    if method not in FVP_METHODS:
        raise ValueError(f"unknown Fisher-vector product method {method!r}; choose one of {', '.join(FVP_METHODS)}")
    params = policy.trainable_parameters()
    curvature = [kl_mu_curvature(mu_old[k], policy.sigma_tilde(k), states.weight[k]) for k in states]  # diag H_μ
    # second derivatives and forward-mode AD of attention need the plain-math SDPA kernel (the fused
    # CPU/flash kernels have neither; the first-order graph of the jvp method keeps the fused one, 2x
    # faster on CPU); `plain()`: fp32 (second derivatives of low-precision activations are noise) and
    # no gradient checkpointing, so the graph is kept
    def context(*extra) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for c in (torch.enable_grad(), policy.plain(), *extra):
            stack.enter_context(c)
        return stack

    with context(*([sdpa_kernel(SDPBackend.MATH)] if method == "double_vjp" else [])):
        mus = policy.means_at(traj, states)  # (|S_k|, C, H, W) per step, one UNet call
        if method == "double_vjp":
            dummies = [torch.zeros_like(mu, requires_grad=True) for mu in mus]
            jt_u = _flat(torch.autograd.grad(mus, params, grad_outputs=dummies, create_graph=True,
                                             allow_unused=True), params)  # (P,) Jᵀu, linear in u
    if method != "double_vjp":
        step_mean = _StepMean(policy)
        names = {id(p): name for name, p in step_mean.named_parameters()}
        keys = [names[id(p)] for p in params]
        primals = {key: p.detach() for key, p in zip(keys, params)}
        mean_at = lambda theta: functional_call(step_mean, theta, (traj, states))  # noqa: E731
    if method == "fd_forward":
        # μ(θ) for the difference: the graph's own outputs, the same UNet call and kernels as μ(θ + hv) without
        # grad (bitwise equal on CPU, tested), so no second forward pass
        mean_old = [mu.detach() for mu in mus]

    def j_v(v: Tensor) -> list[Tensor]:
        if method == "double_vjp":
            return list(torch.autograd.grad(jt_u @ v, dummies, retain_graph=True))
        tangents, offset = {}, 0
        for key, p in zip(keys, params):
            tangents[key] = v[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if method in ("fd", "fd_forward"):
            with torch.no_grad(), policy.plain():
                return (central_difference(mean_at, primals, tangents) if method == "fd"
                        else forward_difference(mean_at, primals, tangents, mean_old))
        with context(sdpa_kernel(SDPBackend.MATH), contiguous_norm_inputs(policy)):
            return jvp(mean_at, (primals,), (tangents,))[1]

    def fvp(v: Tensor) -> Tensor:
        jv = j_v(v)  # J_k v per step, (|S_k|, C, H, W)
        hv = torch.autograd.grad(mus, params, grad_outputs=[h * x for h, x in zip(curvature, jv)],
                                 retain_graph=True, allow_unused=True)
        return _flat(hv, params).detach() + damping * v

    return fvp


FVP_METHODS = ("jvp", "double_vjp", "fd", "fd_forward")

FD_STEP = 1e-3
"""h of `central_difference` relative to ‖θ‖ / ‖v‖: the step moves θ by 0.1 % of its norm. Of 1e-4 … 3e-2 this
was the most accurate on the tests' tiny UNet (7e-5 relative to forward-mode AD; float32 rounding dominates below,
the O(h²) truncation above), and it is 1e-4 from it on the shipped model (`bench.trpo`, docs/results/trpo_speed)."""

FD_FORWARD_STEP = 1e-4
"""h of `forward_difference` relative to ‖θ‖ / ‖v‖. Of 1e-5 … 3e-3 this was the most accurate on the tests' tiny
UNet (1.2-1.5e-3 relative to forward-mode AD, against the central difference's 1e-4 at its own best step): the
O(h) truncation wants a smaller step than the central difference's, float32 rounding, O(ε/h), a larger one."""


def _scaled_step(theta: dict[str, Tensor], v: dict[str, Tensor], rel: float) -> float:
    """h = rel · ‖θ‖ / ‖v‖: a difference step that moves θ by the fraction `rel` of its norm."""
    norm = lambda d: math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))  # noqa: E731
    return rel * max(norm(theta), 1e-12) / max(norm(v), 1e-30)


def central_difference(f: Callable[[dict[str, Tensor]], list[Tensor]], theta: dict[str, Tensor],
                       v: dict[str, Tensor]) -> list[Tensor]:
    """J v ≈ (f(θ + h v) − f(θ − h v)) / 2h, h = FD_STEP · ‖θ‖ / ‖v‖ (error O(h²) against O(h) one-sided).

    θ and v map parameter names to tensors; f gives a list of outputs. θ ± hv are new tensors, so a graph
    that holds θ itself (the Fisher operator's) stays valid."""
    h = _scaled_step(theta, v, FD_STEP)
    plus = f({k: theta[k] + h * v[k] for k in theta})
    minus = f({k: theta[k] - h * v[k] for k in theta})
    return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


def forward_difference(f: Callable[[dict[str, Tensor]], list[Tensor]], theta: dict[str, Tensor],
                       v: dict[str, Tensor], f_theta: list[Tensor]) -> list[Tensor]:
    """J v ≈ (f(θ + h v) − f(θ)) / h, h = FD_FORWARD_STEP · ‖θ‖ / ‖v‖, given f_theta = f(θ): one evaluation of
    f per product against `central_difference`'s two, error O(h) against O(h²)."""
    h = _scaled_step(theta, v, FD_FORWARD_STEP)
    plus = f({k: theta[k] + h * v[k] for k in theta})
    return [(a - b) / h for a, b in zip(plus, f_theta)]


def fisher_vector_product(policy: DiffusionPolicy, traj: Trajectory, states: StateSample,
                          mu_old: dict[int, Tensor], v: Tensor, *, damping: float, method: str = "jvp") -> Tensor:
    """F v + λ v for one v (see `fisher_operator`, which serves many v at the same θ)."""
    return fisher_operator(policy, traj, states, mu_old, damping=damping, method=method)(v)


# ----------------------------------------------------------------------------------------------
# Updates
# ----------------------------------------------------------------------------------------------

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
    step_norm = float(full_step.norm()) * ls.step_fraction
    return UpdateStats(loss=-(base + (ls.improvement if ls.accepted else 0.0)), kl=ls.kl if ls.accepted else 0.0,
                       grad_norm=float(g.norm()), optimizer_steps=int(ls.accepted),
                       extra={"accepted": float(ls.accepted), "backtrack_iters": float(ls.iters),
                              "step_size": step_norm, "cg_residual": residual, "cg_iters": float(cg.iters),
                              "expected_improve": ls.expected, "improvement": ls.improvement,
                              "line_search_kl": ls.kl, "first_fraction": first,
                              **({"probe_kl": probe_kl} if math.isfinite(probe_kl) else {}),
                              "time_gradient_s": clock[1] - clock[0], "time_cg_s": clock[2] - clock[1], "time_line_search_s": clock[3] - clock[2]})


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
