"""From rewards to advantages: batch or per-prompt normalisation, GAE with a critic, clipping.

Notation: R_i the reward of trajectory i (B,); A_i (B,) or A_{k,i} (T, B) advantages; V(s_k) the
critic's value of state s_k = x_t at step k; γ, λ the GAE discount and trace parameters. The reward
arrives only at the end of a trajectory: r_k = 0 for k < T − 1 and r_{T−1} = R.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Sequence

import torch
from torch import Tensor, nn


def standardize(x: Tensor, ref: Tensor | None = None, *, eps: float = 1e-8) -> Tensor:
    """z = (x − mean ref) / (std ref + ε), with the population std over every element of `ref` (x itself by
    default), in float64; a constant `ref` gives zeros. Batch normalisation of rewards is standardize(R)."""
    x = x.double()
    ref = x if ref is None else ref.double()
    std = ref.std(unbiased=False)
    return (x - ref.mean()) / (std + eps) if std > eps else torch.zeros_like(x)


class PerPromptStatTracker:
    """A_i = (R_i − mean_p) / (std_p + ε) with the statistics of R over the last `history` rewards of
    sample i's prompt p (DDPO's per-prompt tracker). Until a prompt has `min_count` rewards, the batch
    statistics are used. Unconditional models have one prompt, '' (then this is batch normalisation
    with a history buffer)."""

    def __init__(self, *, history: int, min_count: int = 16):
        self.history, self.min_count = history, min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=history))

    def __call__(self, rewards: Tensor, prompts: Sequence[str]) -> Tensor:
        r = rewards.double()
        out = torch.empty_like(r)
        for p in set(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            self.buffers[p].extend(r[idx].tolist())
            buf = torch.tensor(list(self.buffers[p]), dtype=torch.float64)
            ref = buf if len(buf) >= self.min_count else r
            out[idx] = standardize(r[idx], ref)
        return out

    def state_dict(self) -> dict:
        return {"history": self.history, "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for p, vals in state["buffers"].items():
            self.buffers[p].extend(vals)


def discounted_sum(delta: Tensor, factor: float) -> Tensor:
    """A_k = Σ_{l≥0} factor^l δ_{k+l} over the step axis of δ (T, B), computed backwards as
    A_k = δ_k + factor · A_{k+1}; float64 (T, B)."""
    out = torch.zeros_like(delta, dtype=torch.float64)
    running = torch.zeros(delta.shape[1:], dtype=torch.float64)
    for k in reversed(range(delta.shape[0])):
        running = delta[k].double() + factor * running
        out[k] = running
    return out


def gae(rewards: Tensor, values: Tensor, *, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16):

        δ_k = r_k + γ V(s_{k+1}) − V(s_k),   A_k = Σ_{l≥0} (γλ)^l δ_{k+l}

    rewards: (T, B) per-step rewards; values: (T+1, B), V of the T states and of the final state
    (0 for a terminal state). Returns (T, B). Computed backwards: A_k = δ_k + γλ A_{k+1}.
    """
    T = rewards.shape[0]
    if values.shape[0] != T + 1:
        raise ValueError(f"values must have T+1 = {T + 1} rows, got {values.shape[0]}")
    delta = rewards.double() + gamma * values[1:].double() - values[:-1].double()
    return discounted_sum(delta, gamma * lam)


def terminal_rewards(rewards: Tensor, num_steps: int) -> Tensor:
    """(B,) trajectory rewards -> (T, B) per-step rewards, all at the last step."""
    r = torch.zeros(num_steps, rewards.shape[0], dtype=torch.float64)
    r[-1] = rewards.double()
    return r


class Critic(nn.Module):
    """V(x_t, t): a small conv net with a sinusoidal embedding of the timestep; returns (B,)."""

    def __init__(self, channels: int, *, width: int = 32, num_train_timesteps: int = 1000):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.embed = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def _t_features(self, t: Tensor) -> Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), 8, device=t.device))
        angle = t.float()[:, None] / self.num_train_timesteps * freqs[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        h = self.conv_in(x_t) + self.embed(self._t_features(t))[:, :, None, None]
        return self.body(h).squeeze(1)


def critic_values(critic: Critic, states: Tensor, timesteps: Tensor) -> Tensor:
    """V(s_k) for every cached state: states (T+1, B, C, H, W), timesteps (T,) -> (T+1, B); the final
    state (the image) is terminal, V = 0."""
    T, B = timesteps.shape[0], states.shape[1]
    values = torch.zeros(T + 1, B, dtype=torch.float64)
    device = next(critic.parameters()).device
    with torch.no_grad():
        for k in range(T):
            values[k] = critic(states[k].to(device), timesteps[k].expand(B).to(device)).double().cpu()
    return values


def fit_critic(critic: Critic, optimizer: torch.optim.Optimizer, states: Tensor, timesteps: Tensor,
               returns: Tensor, *, epochs: int = 1) -> float:
    """Regress V(s_k) on the λ-returns G_k = A_k + V(s_k) (T, B) by MSE; returns the last loss."""
    device = next(critic.parameters()).device
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(timesteps.shape[0]):
            B = states.shape[1]
            v = critic(states[k].to(device), timesteps[k].expand(B).to(device))
            loss = ((v - returns[k].to(device, v.dtype)) ** 2).mean() / timesteps.shape[0]
            loss.backward()
            total += loss.item()
        optimizer.step()
    return total


def clip_advantages(adv: Tensor, bound: float) -> Tensor:
    """A ← clip(A, −bound, bound)."""
    return adv.clamp(-bound, bound)
