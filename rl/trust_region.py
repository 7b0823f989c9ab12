"""The optimisation pieces of a trust-region step, independent of the policy: flat parameter vectors, conjugate
gradient on a matrix given only by its products, and the backtracking line search (docs/design.md, "TRPO")."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def flat_params(params: list[torch.nn.Parameter]) -> Tensor:
    """θ as one detached vector (P,), the parameters concatenated in order."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: list[torch.nn.Parameter], flat: Tensor) -> None:
    """Inverse of `flat_params`: copy the vector (P,) back into the parameters."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def flat_grads(grads: tuple[Tensor | None, ...], params: list[torch.nn.Parameter]) -> Tensor:
    """Concatenated gradients (zeros where None), in the order of `params`."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    """Concatenated .grad of each parameter (zeros where None)."""
    return flat_grads(tuple(p.grad for p in params), params)


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
    comes without another product (TRPO's step length needs it).
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
    model on a state subsample misjudges the exact KL (docs/design.md, "TRPO"), so 'kl' usually lands inside
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
