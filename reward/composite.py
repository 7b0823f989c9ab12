"""The composite reward: each component z-scored within the batch, then weighted.

Notation: r_c (n,) the per-sample rewards of component c (higher = better), w_c its weight,
z(r) = (r − mean r) / (std r + ε) computed over the batch; R = Σ_c w_c z(r_c).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


def zscore(r: Tensor, *, eps: float = 1e-8) -> Tensor:
    """z(r) = (r − mean r) / (std r + ε) over the batch (population std); a constant r gives zeros."""
    r = r.double()
    centred = r - r.mean()
    std = centred.pow(2).mean().sqrt()
    return centred / (std + eps) if std > eps else torch.zeros_like(r)


def composite_reward(components: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """R_i = Σ_c w_c z(r_c)_i over the components with w_c > 0; (n,) float64.

    Z-scoring puts components of very different scales (MMD² ~1e-3, realism logits ~1) on one
    footing, so the weights say how much each matters. A weight naming no computed component is
    an error, so a typo cannot silently switch a term off.
    """
    active = {c: w for c, w in weights.items() if w > 0}
    missing = sorted(set(active) - set(components))
    if missing:
        raise KeyError(f"reward weights name components that were not computed: {missing}")
    if not active:
        raise ValueError("every reward weight is 0: give at least one component a positive weight")
    n = next(iter(components.values())).shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    for c, w in active.items():
        total = total + w * zscore(components[c])
    return total
