"""The SAC-style algorithm: an entropy-regularised actor-critic on the DDIM policy (docs/design.md, "SAC").

The denoising chain is the MDP: state s_k = (x_{t_k}, t_k), action a_k = x_{t_{k+1}} = s_{k+1} (a
deterministic transition), and the reward only at the image: r_k = 0 for k < T − 1, r_{T−1} = R̂_i,
the trajectory's set-level reward normalised as for every algorithm. The actor is the policy's
Gaussian with a learned log std factor ζ_k per stochastic step (`DiffusionPolicy.enable_noise_scale`).

Notation:

| variable     | symbol | meaning |
|--------------|--------|---------|
| `entropy`    | H_k    | closed-form entropy of step k's Gaussian, reduced like the log-prob, (T,); 0 on deterministic steps |
| `alpha`      | α      | temperature |
| `values`     | V_ψ(s_k) | the critic, (T+1, B), V(s_T) = 0 at the image |
| `next_target`| V̄(s_{k+1}) | the Polyak-averaged target critic at the next state, (T, B) |
| `target`     | y_k    | soft λ-return (λ = 0: the one-step soft Bellman target r_k + α H_k + γ V̄(s_{k+1})), (T, B) |
| `adv`        | Â_k    | soft advantage y_k − V_ψ(s_k), normalised and clipped, (T, B) |
| `lam`        | λ      | trace parameter of the soft λ-return (`rl.critic.lam`) |

On-policy per batch, with no replay buffer: a sample's reward is its leave-one-out credit inside its
own batch, so a stored transition's reward goes stale as soon as the batch distribution moves.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from config import CriticConfig, SACConfig
from ddpm.ddim import DDIMStep
from rl.advantages import (Critic, clip_advantages, critic_values, discounted_sum, fit_critic, standardize,
                           terminal_rewards)
from rl.objectives import reinforce_loss
from rl.policy import DiffusionPolicy
from rl.update import Prepared, StepLoss, StepTerm, UpdateBatch, UpdateStats, two_pass
from utils import load_optimizer_state

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def gaussian_entropy(sigma: Tensor | float, *, dims: int, reduction: str = "mean") -> Tensor:
    """H(N(μ, σ² I_d)) = d · (½ log(2πe) + log σ), reduced like the log-prob: 'mean' divides by d
    (nats per dimension), 'sum' is the entropy of the d-dimensional Gaussian. Differentiable in σ."""
    h = _HALF_LOG_2PI_E + torch.log(torch.as_tensor(sigma, dtype=torch.float32))
    return h if reduction == "mean" else dims * h


def soft_bellman_target(rewards: Tensor, next_target: Tensor, entropy: Tensor, *, alpha: float,
                        gamma: float) -> Tensor:
    """y_k = r_k + α H_k + γ V̄(s_{k+1})   (the soft value of s_k: V(s) = E_a[Q(s, a)] + α H(π(·|s)),
    with Q(s_k, a_k) = r_k + γ V(s_{k+1}) for the deterministic transition s_{k+1} = a_k).

    rewards: (T, B); next_target: (T, B) V̄ of each step's next state, 0 after the last step (the
    image is terminal); entropy: (T,). Returns (T, B) float64."""
    return rewards.double() + alpha * entropy.double()[:, None] + gamma * next_target.double()


def soft_lambda_return(one_step: Tensor, values: Tensor, *, gamma: float, lam: float) -> Tensor:
    """y_k = V_ψ(s_k) + Σ_{l≥0} (γλ)^l δ_{k+l},  δ_k = y_k^(1) − V_ψ(s_k)   (soft TD(λ), as GAE on the soft
    one-step targets y^(1) = `soft_bellman_target`): λ = 0 gives y^(1), λ = 1 the Monte-Carlo soft return
    Σ_l γ^l (r_{k+l} + α H_{k+l}) (with γ = 1). Why λ > 0: the reward arrives only at the deterministic
    last step, whose log-prob has zero gradient, so with λ = 0 every other step learns only from a
    fresh critic's bootstrap.

    one_step: (T, B); values: (T, B) V_ψ(s_k). Returns (T, B) float64; computed backwards,
    A_k = δ_k + γλ A_{k+1}."""
    return discounted_sum(one_step.double() - values.double(), gamma * lam) + values.double()


def polyak_update(target: nn.Module, source: nn.Module, *, tau: float) -> None:
    """ψ̄ ← (1 − τ) ψ̄ + τ ψ for every parameter (Lillicrap et al. 2016; SAC's target critic)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


def temperature_loss(log_alpha: Tensor, entropy_mean: Tensor | float, target_entropy: float) -> Tensor:
    """L(log α) = log α · (H̄ − H_target)   (Haarnoja et al. 2018b, eq. 18 with the closed-form entropy):
    its gradient lowers α while the entropy exceeds the target and raises it below."""
    return log_alpha * (float(entropy_mean) - target_entropy)


def action_entropies(policy: DiffusionPolicy) -> Tensor:
    """H_k (T,) of every action under the current ζ (with grad), 0 on deterministic steps (no noise is
    drawn there, so they carry no entropy term)."""
    out = []
    for k in range(policy.num_actions):
        if policy.deterministic(k):
            out.append(torch.zeros((), device=policy.device))
            continue
        scale = policy.noise_scale(k)
        sigma = torch.as_tensor(policy.sigma_tilde(k), device=policy.device)
        out.append(gaussian_entropy(sigma * scale if scale is not None else sigma, dims=_dims(policy),
                                    reduction=policy.sampler.logprob_reduction).to(policy.device))
    return torch.stack(out)


def _dims(policy: DiffusionPolicy) -> int:
    """d = C·H·W of one action (what 'sum' reduction multiplies the per-dimension entropy by)."""
    return math.prod(policy.image_shape)


def stochastic_steps(policy: DiffusionPolicy) -> list[int]:
    """The steps k that draw noise (σ_k > 0): the ones with an entropy term."""
    return [k for k in range(policy.num_actions) if not policy.deterministic(k)]


class SoftActorCritic(nn.Module):
    """The critic V_ψ, its target V̄, log α and their optimisers: everything SAC keeps across iterations."""

    def __init__(self, policy: DiffusionPolicy, cfg: SACConfig, critic: CriticConfig):
        super().__init__()
        self.cfg = cfg
        self.critic = Critic(policy.image_shape[0], width=critic.width,
                             num_train_timesteps=policy.scheduler.config.num_train_timesteps).to(policy.device)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic.lr)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha)))
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        # H_target: the starting policy's (ζ = 0) mean entropy over the stochastic actions, plus the offset
        with torch.no_grad():
            steps = stochastic_steps(policy)
            base = torch.stack([gaussian_entropy(policy.sigma_tilde(k), dims=_dims(policy),
                                                 reduction=policy.sampler.logprob_reduction) for k in steps])
        self.target_entropy = float(base.mean()) + cfg.target_entropy_offset

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def checkpoint_state(self) -> dict:
        return {"critic": self.critic.state_dict(), "target": self.target.state_dict(),
                "critic_optimizer": self.critic_opt.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "alpha_optimizer": self.alpha_opt.state_dict(), "target_entropy": self.target_entropy}

    def load_checkpoint_state(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        load_optimizer_state(self.critic_opt, state["critic_optimizer"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        load_optimizer_state(self.alpha_opt, state["alpha_optimizer"])
        self.target_entropy = float(state["target_entropy"])


class ActorStepLoss(StepLoss):
    """Step k's actor loss: −mean_i Â_{k,i} log π_θ(a_k | s_k), minus α H_k(ζ) at a stochastic step when the
    noise scales are learned."""

    def __init__(self, adv: Tensor, alpha: float, entropy_steps: set[int]):
        self.adv, self.alpha, self.entropy_steps = adv, alpha, entropy_steps  # adv: (T, B) soft advantages

    def __call__(self, batch: UpdateBatch, k: int, idx: Tensor, out: DDIMStep, prep: Prepared) -> StepTerm:
        policy = batch.policy
        loss = reinforce_loss(out.logp, self.adv[k, idx].to(out.logp))
        if k in self.entropy_steps:
            sigma = policy.sigma_tilde(k) * policy.noise_scale(k)
            loss = loss - self.alpha * gaussian_entropy(sigma, dims=_dims(policy),
                                                        reduction=policy.sampler.logprob_reduction)
        return StepTerm(loss)


def sac_update(batch: UpdateBatch, sac: SoftActorCritic) -> UpdateStats:
    """One SAC iteration on a sampled batch; `batch.adv` (B,) are the normalised trajectory rewards R̂.

    1. the soft λ-returns y_k on the one-step targets r_k + α H_k + γ V̄(s_{k+1}), and Â_k = y_k − V_ψ(s_k),
       from the networks as they are;
    2. the critic regresses y for `critic_steps` steps, each followed by a Polyak update of V̄;
    3. the actor descends L_π = −mean_{k,i} Â_{k,i} log π_θ(a_k | s_k) − α mean_k H_k(ζ) through the
       two-pass per-step update (memory independent of T);
    4. with `auto_alpha`, one step on L(log α) = log α · (H̄ − H_target).
    """
    policy, traj, cfg = batch.policy, batch.traj, batch.cfg
    s, c = cfg.sac, cfg.critic
    T, alpha = traj.num_steps, sac.alpha
    with torch.no_grad():
        entropy = action_entropies(policy).cpu()                              # (T,)
    values = critic_values(sac.critic, traj.states, traj.timesteps)          # (T+1, B), V(s_T) = 0
    target_values = critic_values(sac.target, traj.states, traj.timesteps)   # (T+1, B)
    one_step = soft_bellman_target(terminal_rewards(batch.adv, T), target_values[1:], entropy, alpha=alpha,
                                   gamma=c.gamma)
    y = soft_lambda_return(one_step, values[:-1], gamma=c.gamma, lam=c.lam)
    adv = clip_advantages(standardize(y - values[:-1]), cfg.advantages.clip)

    critic_loss = 0.0
    for _ in range(s.critic_steps):
        critic_loss = fit_critic(sac.critic, sac.critic_opt, traj.states, traj.timesteps, y.float())
        polyak_update(sac.target, sac.critic, tau=s.tau)

    steps = set(stochastic_steps(policy))
    learn_entropy = policy.log_noise_scale is not None and policy.log_noise_scale.requires_grad
    stats = two_pass(batch, ActorStepLoss(adv, alpha, steps if learn_entropy else set()), epochs=1)

    with torch.no_grad():
        entropy_mean = action_entropies(policy)[sorted(steps)].mean()
    if s.auto_alpha and not stats.nonfinite:
        sac.alpha_opt.zero_grad(set_to_none=True)
        temperature_loss(sac.log_alpha, entropy_mean, sac.target_entropy).backward()
        sac.alpha_opt.step()
    scales = policy.step_scales()
    stats.extra.update(critic_loss=critic_loss, alpha=alpha, entropy=float(entropy_mean),
                       target_entropy=sac.target_entropy, value_mean=float(values[:-1].mean()),
                       soft_target_mean=float(y.mean()),
                       noise_scale_min=float(scales.min()) if scales is not None else 1.0,
                       noise_scale_max=float(scales.max()) if scales is not None else 1.0)
    return stats
