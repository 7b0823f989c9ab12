"""Fisher-vector products of the DDIM policy on a state subsample S: v ↦ F v + λ v = Jᵀ H_μ J v + λ v at the current
θ (= θ_old), J = ∂μ_θ(S)/∂θ, H_μ = ∂²KL_S/∂μ² (docs/design.md, "TRPO", "F v as Gauss-Newton").

The KL over S is a quadratic in μ_θ with its minimum (0) at θ_old, so its Hessian there is exactly Jᵀ H_μ J: the
Fisher matrix. `fisher_operator` computes μ_θ(S) once with its graph; each product is then J v, by one of the
methods of `JV_METHODS` (`trpo.fvp`), and Jᵀ (H_μ J v) as a vjp through that retained graph. Memory: the graphs of
the |S| states (`trpo.kl_states` bounds it), independent of T.
"""
from __future__ import annotations

import abc
import contextlib
import math
from typing import Callable

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm.sampling import Trajectory
from rl.objectives import gaussian_kl
from rl.policy import DiffusionPolicy
from rl.states import StateSample
from rl.trust_region import flat_grads


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


FD_STEP = 1e-3
"""h of `central_difference` relative to ‖θ‖ / ‖v‖: the step moves θ by 0.1 % of its norm, between float32
rounding, O(ε/h), and the O(h²) truncation (how it was chosen: docs/design.md, "TRPO")."""

FD_FORWARD_STEP = 1e-4
"""h of `forward_difference` relative to ‖θ‖ / ‖v‖: the O(h) truncation wants a smaller step than the central
difference's (docs/design.md, "TRPO")."""


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


def grad_context(policy: DiffusionPolicy, *extra) -> contextlib.ExitStack:
    """Gradients on, in `policy.plain()` (fp32: second derivatives of low-precision activations are noise; no
    gradient checkpointing, so the graph is kept), plus `extra` contexts."""
    stack = contextlib.ExitStack()
    for c in (torch.enable_grad(), policy.plain(), *extra):
        stack.enter_context(c)
    return stack


class JacobianProduct(abc.ABC):
    """v (P,) ↦ J v, per step of S (|S_k|, C, H, W), at the current θ (= θ_old). `graph_contexts` are entered while
    `fisher_operator` builds μ_θ(S)'s graph, and `attach` is handed that graph's outputs inside them."""

    def __init__(self, policy: DiffusionPolicy, traj: Trajectory, states: StateSample,
                 params: list[torch.nn.Parameter]):
        self.policy, self.traj, self.states, self.params = policy, traj, states, params

    def graph_contexts(self) -> list:
        """Contexts the graph of μ_θ(S) must be built in, besides `grad_context`: none by default."""
        return []

    def attach(self, mus: list[Tensor]) -> None:
        """Keep what the products need from the graph's outputs `mus`: nothing by default."""

    @abc.abstractmethod
    def __call__(self, v: Tensor) -> list[Tensor]:
        """J v for a flat v (P,), per step of S."""


class FunctionalJv(JacobianProduct):
    """The methods that evaluate μ_θ(S) with θ substituted (`torch.func.functional_call`): forward-mode AD and the
    finite differences."""

    def __init__(self, policy: DiffusionPolicy, traj: Trajectory, states: StateSample,
                 params: list[torch.nn.Parameter]):
        super().__init__(policy, traj, states, params)
        self.step_mean = _StepMean(policy)
        names = {id(p): name for name, p in self.step_mean.named_parameters()}
        self.keys = [names[id(p)] for p in params]
        self.primals = {key: p.detach() for key, p in zip(self.keys, params)}

    def mean_at(self, theta: dict[str, Tensor]) -> list[Tensor]:
        """μ of the states of S with the parameters `theta` (names -> tensors) substituted."""
        return functional_call(self.step_mean, theta, (self.traj, self.states))

    def tangents(self, v: Tensor) -> dict[str, Tensor]:
        """The flat v (P,) as parameter-shaped tangents, by name."""
        out, offset = {}, 0
        for key, p in zip(self.keys, self.params):
            out[key] = v[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return out


class ForwardModeJv(FunctionalJv):
    """`jvp`: forward-mode AD (`torch.func.jvp` through `functional_call`), one forward pass carrying the tangent v,
    with the plain-math attention kernel (the fused ones have no forward derivative)."""

    def __call__(self, v: Tensor) -> list[Tensor]:
        with grad_context(self.policy, sdpa_kernel(SDPBackend.MATH), contiguous_norm_inputs(self.policy)):
            return list(jvp(self.mean_at, (self.primals,), (self.tangents(v),))[1])


class DoubleVjpJv(JacobianProduct):
    """`double_vjp`: J v = ∂/∂u [(Jᵀu)·v], the derivative of a graph of Jᵀu (linear in a dummy u) built once with
    create_graph: a backward pass through a backward pass (the graph needs the plain-math attention kernel)."""

    def graph_contexts(self) -> list:
        return [sdpa_kernel(SDPBackend.MATH)]

    def attach(self, mus: list[Tensor]) -> None:
        self.dummies = [torch.zeros_like(mu, requires_grad=True) for mu in mus]
        self.jt_u = flat_grads(torch.autograd.grad(mus, self.params, grad_outputs=self.dummies, create_graph=True,
                                                   allow_unused=True), self.params)  # (P,) Jᵀu, linear in u

    def __call__(self, v: Tensor) -> list[Tensor]:
        return list(torch.autograd.grad(self.jt_u @ v, self.dummies, retain_graph=True))


class CentralDifferenceJv(FunctionalJv):
    """`fd`: J v ≈ (μ(θ + hv) − μ(θ − hv)) / 2h (`central_difference`), two forward passes without grad in fp32, with
    their fused kernels: no library gives J v cheaper on the CPU."""

    def __call__(self, v: Tensor) -> list[Tensor]:
        with torch.no_grad(), self.policy.plain():
            return central_difference(self.mean_at, self.primals, self.tangents(v))


class ForwardDifferenceJv(FunctionalJv):
    """`fd_forward`: J v ≈ (μ(θ + hv) − μ(θ)) / h (`forward_difference`), one forward pass without grad; μ(θ) is the
    graph's own outputs, the same UNet call and kernels as μ(θ + hv) without grad (bitwise equal on CPU, tested)."""

    def attach(self, mus: list[Tensor]) -> None:
        self.mean_old = [mu.detach() for mu in mus]

    def __call__(self, v: Tensor) -> list[Tensor]:
        with torch.no_grad(), self.policy.plain():
            return forward_difference(self.mean_at, self.primals, self.tangents(v), self.mean_old)


JV_METHODS: dict[str, type[JacobianProduct]] = {"jvp": ForwardModeJv, "double_vjp": DoubleVjpJv,
                                                "fd": CentralDifferenceJv, "fd_forward": ForwardDifferenceJv}
FVP_METHODS = tuple(JV_METHODS)


class FisherOperator:
    """v ↦ F v + λ v = Jᵀ (H_μ J v) + λ v, the vjp through the retained graph of μ_θ(S) (`mus`)."""

    def __init__(self, mus: list[Tensor], params: list[torch.nn.Parameter], curvature: list[Tensor],
                 j_v: JacobianProduct, damping: float):
        self.mus, self.params, self.curvature, self.j_v, self.damping = mus, params, curvature, j_v, damping

    def __call__(self, v: Tensor) -> Tensor:
        jv = self.j_v(v)  # J_k v per step, (|S_k|, C, H, W)
        hv = torch.autograd.grad(self.mus, self.params, grad_outputs=[h * x for h, x in zip(self.curvature, jv)],
                                 retain_graph=True, allow_unused=True)
        return flat_grads(hv, self.params).detach() + self.damping * v


def fisher_operator(policy: DiffusionPolicy, traj: Trajectory, states: StateSample, mu_old: dict[int, Tensor], *,
                    damping: float, method: str = "jvp") -> FisherOperator:
    """v ↦ F v + λ v at the current θ (= θ_old) on S (μ_old: {k: (|S_k|, C, H, W)}), J v by `method` (JV_METHODS).
    μ_θ(S) is built with its graph once, in one UNet call; the operator then serves many v."""
    if method not in JV_METHODS:
        raise ValueError(f"unknown Fisher-vector product method {method!r}; choose one of {', '.join(FVP_METHODS)}")
    params = policy.trainable_parameters()
    curvature = [kl_mu_curvature(mu_old[k], policy.sigma_tilde(k), states.weight[k]) for k in states]  # diag H_μ
    j_v = JV_METHODS[method](policy, traj, states, params)
    # the first-order graph keeps the fused attention kernel (2x faster on CPU) unless the method differentiates it
    with grad_context(policy, *j_v.graph_contexts()):
        mus = policy.means_at(traj, states)  # (|S_k|, C, H, W) per step, one UNet call
        j_v.attach(mus)
    return FisherOperator(mus, params, curvature, j_v, damping)


def fisher_vector_product(policy: DiffusionPolicy, traj: Trajectory, states: StateSample,
                          mu_old: dict[int, Tensor], v: Tensor, *, damping: float, method: str = "jvp") -> Tensor:
    """F v + λ v for one v (see `fisher_operator`, which serves many v at the same θ)."""
    return fisher_operator(policy, traj, states, mu_old, damping=damping, method=method)(v)
