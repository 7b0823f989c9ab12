"""The state subsamples of TRPO: S, on which the Fisher matrix is estimated, and S', the probe states that aim the
line search's first try; drawn uniformly or by step (docs/design.md, "TRPO", "The states, drawn by step")."""
from __future__ import annotations

import torch
from torch import Tensor

from rl.policy import DiffusionPolicy


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
    step k's share of F and of the KL (the late, low-noise steps carry nearly all of both: docs/design.md, "TRPO")."""
    return [1.0 / policy.sigma_tilde(k) ** 2 for k in range(policy.num_actions)]


def _by_step(flat: Tensor, batch: int) -> dict[int, Tensor]:
    """Flat state indices k·B + i as {k: sorted trajectory indices i}."""
    groups: dict[int, list[int]] = {}
    for f in flat.tolist():
        groups.setdefault(f // batch, []).append(f % batch)
    return {k: torch.tensor(sorted(v)) for k, v in sorted(groups.items())}
