"""RL numerics: PPO loss, trajectory ratio, two-pass = full graph, CG, Fisher-vector product, line search, GAE."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from config import RLConfig, SamplerConfig, config_from_dict
from ddpm.schedulers import make_train_scheduler
from ddpm.unet import build_unet
from rl.advantages import PerPromptStatTracker, gae, standardize
from rl.objectives import approx_kl, gaussian_kl
from rl.policy import DiffusionPolicy
from rl.ppo import ppo_clip_loss, ppo_update, reinforce_update, trajectory_log_ratio
from rl.fisher import fisher_vector_product
from rl.states import state_subsample
from rl.trpo import old_means, subsample_kl, trpo_update
from rl.trust_region import backtracking_line_search, conjugate_gradient, flat_params, set_flat_params
from rl.update import UpdateBatch, kl_base_coefficients, w_k




def tiny_policy(seed: int = 0, *, mode: str = "full", steps: int = 3, floor: float = 0.05) -> DiffusionPolicy:
    torch.manual_seed(seed)
    unet = build_unet("tiny", image_size=8, channels=1)
    sched = make_train_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    sampler = SamplerConfig(num_steps=steps, eta=1.0, sigma_floor=floor)
    return DiffusionPolicy(unet, sched, sampler, mode=mode)


PLAIN = {"kl_final_coef": 0.0, "step_weighting": "uniform", "gradient_accumulation": 4, "lr": 3e-5}
"""The plain update, without the default recipe's last-step hold and σ-weighted steps (the tests of those ask)."""


def rl_cfg(**kw) -> RLConfig:
    return config_from_dict({**PLAIN, **kw}, cls=RLConfig)


# --- objectives -------------------------------------------------------------------------------

def test_ppo_clip_loss_against_hand_computed_values():
    # ρ = exp(logp − logp_old) = [1.2, 0.5, 1.0, 2.0]; ε = 0.1
    logp_old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.2, 0.5, 1.0, 2.0]))
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    res = ppo_clip_loss(logp, logp_old, adv, clip_range=0.1)
    # per sample max(−Aρ, −A clip(ρ)): A>0,ρ=1.2: max(−1.2, −1.1) = −1.1 (clipped); A>0,ρ=0.5: max(−0.5, −0.9) = −0.5;
    # A<0,ρ=1: max(2, 2) = 2; A<0,ρ=2: max(2, 1.1) = 2
    expected = (-1.1 - 0.5 + 2.0 + 2.0) / 4
    assert res.loss.item() == pytest.approx(expected)
    assert res.clipped.tolist() == [True, False, False, False]
    # gradient is zero exactly where the clipped branch is active
    logp = logp.clone().requires_grad_(True)
    ppo_clip_loss(logp, logp_old, adv, clip_range=0.1).loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0 and logp.grad[3] != 0


def test_trajectory_ratio_clips_and_zeroes_gradients_where_clipped():
    log_r = torch.tensor([[0.01, 0.2, -0.01], [0.02, 0.01, -0.3], [0.03, 0.01, 0.0]], requires_grad=True)  # (T=3, B=3)
    out = trajectory_log_ratio(log_r, per_step_clip=0.05, global_clip=0.1)
    # column 0: steps 0.01,0.02,0.03 → sum 0.06 inside both clips
    # column 1: 0.2 → clipped to 0.05; sum 0.05+0.01+0.01 = 0.07, inside the global clip
    # column 2: −0.3 → −0.05; sum −0.01−0.05+0 = −0.06
    torch.testing.assert_close(out.log_r.detach(), torch.tensor([0.06, 0.07, -0.06]))
    assert out.step_active[:, 1].tolist() == [False, True, True]
    assert out.active.all()
    adv = torch.tensor([1.0, 1.0, 1.0])
    (adv * out.log_r.exp()).sum().backward()
    assert log_r.grad[0, 1] == 0 and log_r.grad[1, 2] == 0  # per-step clipped entries get no gradient
    assert log_r.grad[0, 0] != 0
    # global clip: a trajectory whose clipped sum exceeds the bound gets no gradient at all
    lr2 = torch.full((3, 1), 0.04, requires_grad=True)
    out2 = trajectory_log_ratio(lr2, per_step_clip=0.05, global_clip=0.1)
    assert not out2.active.item() and out2.log_r.item() == pytest.approx(0.1)
    out2.log_r.exp().sum().backward()
    assert (lr2.grad == 0).all()


def test_approx_kl_and_gaussian_kl():
    lr = torch.tensor([0.0, 0.1, -0.1])
    assert approx_kl(lr).item() == pytest.approx(((lr.exp() - 1) - lr).mean().item())
    assert approx_kl(torch.zeros(5)).item() == 0.0
    mu, mu_ref = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    # KL between N(0, σ²) and N(1, σ²) per dimension = 1/(2σ²); mean over dims keeps it
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, 0.5), torch.full((2,), 2.0))
    # against torch.distributions (sum over dims / d)
    d = torch.distributions
    ref = d.kl_divergence(d.Normal(mu_ref, 0.5), d.Normal(mu, 0.5)).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_kl(mu, mu_ref, 0.5), ref)


# --- the two-pass trick changes nothing -----------------------------------------------------------

class Capture(torch.optim.Optimizer):
    """An optimizer that records the gradients it is asked to apply, and applies nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = []

    def step(self, closure=None):
        self.grads.append(torch.cat([p.grad.reshape(-1).clone() for g in self.param_groups for p in g["params"]]))


def _perturb(policy, scale=1e-2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("ratio", ["per_step", "trajectory"])
def test_two_pass_gradient_equals_single_graph_gradient(ratio):
    policy = tiny_policy()
    traj = policy.sample(6, generator=torch.Generator().manual_seed(0))
    _perturb(policy)  # θ ≠ θ_old, so ratios differ from 1 and some clips are active
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.3, 0.7])
    cfg = rl_cfg(microbatch=2, gradient_accumulation=3, grad_clip=1e9,
                 ppo={"ratio": ratio, "clip_range": 0.02, "per_step_clip": 0.05, "global_clip": 0.1})
    params = policy.trainable_parameters()
    opt = Capture(params)
    ppo_update(UpdateBatch(policy, opt, traj, adv, cfg, torch.Generator().manual_seed(1)))
    assert len(opt.grads) == 1
    two_pass = opt.grads[0]

    # reference: the whole objective in one autograd graph
    for p in params:
        p.grad = None
    T = traj.num_steps
    logps = torch.stack([policy.step(k, traj.x_t[k], traj.x_prev[k]).logp for k in range(T)])  # (T, B)
    if ratio == "per_step":
        loss = torch.stack([ppo_clip_loss(logps[k], traj.logp[k], adv, clip_range=0.02).loss for k in range(T)]).mean()
    else:
        out = trajectory_log_ratio(logps - traj.logp, per_step_clip=0.05, global_clip=0.1)
        assert (~out.step_active).any()  # the test exercises the clipping
        loss = -(adv * out.log_r.exp()).mean()
    loss.backward()
    full = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(two_pass, full, rtol=1e-4, atol=1e-7)


def test_sigma_step_weighting_scales_each_steps_loss_by_its_noise():
    policy = tiny_policy(steps=4)
    T = policy.num_actions
    sig = [policy.sigma_tilde(k) for k in range(T - 1)]  # the last step is deterministic
    w = w_k(policy, "sigma")
    assert w[-1] == 0.0 and sum(w[:-1]) == pytest.approx(T - 1)  # mean 1 over the stochastic steps
    torch.testing.assert_close(torch.tensor(w[:-1]), torch.tensor(sig) / (sum(sig) / (T - 1)))
    assert w[0] > w[1] > w[2]  # the early, noisy steps weigh most
    assert w_k(policy, "uniform") == [1.0] * T

    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    _perturb(policy)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    cfg = rl_cfg(microbatch=2, gradient_accumulation=2, grad_clip=1e9, step_weighting="sigma",
                 ppo={"clip_range": 0.02})
    params = policy.trainable_parameters()
    opt = Capture(params)
    ppo_update(UpdateBatch(policy, opt, traj, adv, cfg, torch.Generator().manual_seed(1)))
    for p in params:
        p.grad = None
    logps = [policy.step(k, traj.x_t[k], traj.x_prev[k]).logp for k in range(T)]
    losses = torch.stack([ppo_clip_loss(logps[k], traj.logp[k], adv, clip_range=0.02).loss for k in range(T)])  # (T,)
    (torch.tensor(w) * losses).mean().backward(retain_graph=True)
    full = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(opt.grads[0], full, rtol=1e-4, atol=1e-7)
    # and it is not the uniform objective's gradient
    for p in params:
        p.grad = None
    losses.mean().backward()
    uniform = torch.cat([p.grad.reshape(-1) for p in params])
    assert not torch.allclose(opt.grads[0], uniform, rtol=1e-2)


def test_final_step_anchor_pulls_only_the_deterministic_step_toward_the_base():
    policy = tiny_policy(steps=3)
    policy.base_unet = copy.deepcopy(policy.unet).requires_grad_(False)
    T = policy.schedule.num_steps
    assert [policy.deterministic(k) for k in range(T)] == [False] * (T - 1) + [True]
    cfg = rl_cfg(microbatch=3, gradient_accumulation=2, grad_clip=1e9, kl_base_coef=0.5, kl_final_coef=4.0)
    assert kl_base_coefficients(policy, cfg) == [0.5] * (T - 1) + [4.5]
    traj = policy.sample(6, generator=torch.Generator().manual_seed(0))
    # the policy gradient at the deterministic step is zero at θ_old: x_prev = μ_old there
    old = policy.step(T - 1, traj.x_t[T - 1], traj.x_prev[T - 1])
    torch.testing.assert_close(traj.x_prev[T - 1], old.mu)
    _perturb(policy)  # θ ≠ θ_base
    # zero advantages: the whole gradient is Σ_k β_k ∇ mean_i KL_k(π_θ ‖ π_base) / T
    cfg = rl_cfg(microbatch=3, gradient_accumulation=2, grad_clip=1e9, kl_final_coef=4.0)
    params = policy.trainable_parameters()
    opt = Capture(params)
    ppo_update(UpdateBatch(policy, opt, traj, torch.zeros(6), cfg, torch.Generator().manual_seed(1)))
    for p in params:
        p.grad = None
    k = T - 1
    mu = policy.step(k, traj.x_t[k], traj.x_prev[k]).mu
    kl = gaussian_kl(mu, policy.base_mean_at(traj, k, torch.arange(6)), policy.sigma_tilde(k)).mean()
    (4.0 * kl / T).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in params])
    assert expected.norm() > 0
    torch.testing.assert_close(opt.grads[0], expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_reinforce_gradient_equals_single_graph_gradient():
    policy = tiny_policy()
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    opt = Capture(policy.trainable_parameters())
    reinforce_update(UpdateBatch(policy, opt, traj, adv, rl_cfg(microbatch=4, gradient_accumulation=1, grad_clip=1e9),
                                 torch.Generator().manual_seed(1)))
    for p in policy.trainable_parameters():
        p.grad = None
    logps = torch.stack([policy.step(k, traj.x_t[k], traj.x_prev[k]).logp for k in range(traj.num_steps)])
    (-(adv * logps).mean()).backward()
    full = torch.cat([p.grad.reshape(-1) for p in policy.trainable_parameters()])
    torch.testing.assert_close(opt.grads[0], full, rtol=1e-4, atol=1e-7)


# --- TRPO pieces --------------------------------------------------------------------------------

def test_conjugate_gradient_against_linalg_solve():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    spd = a @ a.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    res = conjugate_gradient(lambda v: spd @ v, b, iters=100, tol=1e-20)
    torch.testing.assert_close(res.x, torch.linalg.solve(spd, b), rtol=1e-6, atol=1e-8)
    few = conjugate_gradient(lambda v: spd @ v, b, iters=3)
    assert few.iters == 3 and few.residual > res.residual
    # xᵀFx from the residual equals the explicit product, converged or not
    for r in (res, few):
        torch.testing.assert_close(r.xfx, float(r.x @ spd @ r.x), rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("method", ["jvp", "double_vjp", "fd", "fd_forward"])
def test_fisher_vector_product_against_explicit_fisher(method):
    # Only conv_out is trainable, so the Fisher matrix F = Jᵀ W J is small enough to build explicitly:
    # J = ∂μ/∂θ over the states of S (every dimension), W = 1/(σ̃_k² · d · |S|) (the KL is a mean).
    policy = tiny_policy()
    for name, p in policy.unet.named_parameters():
        p.requires_grad_(name.startswith("conv_out"))
    params = policy.trainable_parameters()
    traj = policy.sample(3, generator=torch.Generator().manual_seed(0))
    states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=torch.Generator().manual_seed(0))
    mu_old = old_means(policy, traj, states)
    n_states = sum(len(v) for v in states.values())
    n = sum(p.numel() for p in params)
    fisher = torch.zeros(n, n, dtype=torch.float64)
    for k, idx in states.items():
        mu = policy.step(k, traj.x_t[k, idx], traj.x_prev[k, idx]).mu.reshape(-1)
        rows = []
        for j in range(mu.numel()):
            grads = torch.autograd.grad(mu[j], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jac = torch.stack(rows).double()  # (len(idx)·d, n)
        d = mu.numel() // len(idx)
        fisher += jac.T @ jac / (policy.sigma_tilde(k) ** 2 * d * n_states)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    fv = fisher_vector_product(policy, traj, states, mu_old, v, damping=0.0, method=method)
    if method.startswith("fd"):  # a float32 difference quotient: accurate as a vector, not to 1e-3 in every entry
        assert float((fv.double() - fisher @ v.double()).norm() / (fisher @ v.double()).norm()) < 2e-3
    else:
        torch.testing.assert_close(fv.double(), fisher @ v.double(), rtol=1e-3, atol=1e-6)
    fv_damped = fisher_vector_product(policy, traj, states, mu_old, v, damping=0.1, method=method)
    torch.testing.assert_close(fv_damped, fv + 0.1 * v, rtol=1e-5, atol=1e-6)


def test_line_search_rejects_over_limit_steps_and_restores():
    state = {"frac": None}
    trace = []

    def set_step(f):
        state["frac"] = f
        trace.append(f)

    # KL grows as 8δ·f²: f = 1 and 0.5 are over the limit, 0.25 is inside
    res = backtracking_line_search(set_step=set_step, evaluate=lambda: (state["frac"], 8e-3 * state["frac"] ** 2),
                                   expected_full=1.0, max_kl=1e-3,
                                   coeff=0.5, max_iters=5, accept_ratio=0.1)
    assert res.accepted and res.step_fraction == 0.25 and res.kl <= 1e-3 and res.iters == 3
    # a single try over the limit is rejected and θ_old restored
    trace.clear()
    res = backtracking_line_search(set_step=set_step, evaluate=lambda: (state["frac"], 8e-3 * state["frac"] ** 2),
                                   expected_full=1.0, max_kl=1e-3,
                                   coeff=0.5, max_iters=1, accept_ratio=0.1)
    assert not res.accepted and trace[-1] == 0.0
    # a step that does not improve the surrogate enough is rejected too
    res = backtracking_line_search(set_step=set_step, evaluate=lambda: (-1.0, 0.0),
                                   expected_full=1.0, max_kl=1e-3, coeff=0.5, max_iters=3, accept_ratio=0.1)
    assert not res.accepted and trace[-1] == 0.0


def test_line_search_pass_stops_once_the_kl_is_past_the_limit():
    """The KL is a sum of non-negative terms, so a partial sum past the limit decides the try: the pass stops
    after that microbatch of trajectories and gives (nan, its KL scaled to the batch, ≥ the limit); under the
    limit it is the full pass, bit for bit."""
    from rl.trpo import policy_gradient, surrogate_and_kl

    policy = tiny_policy()
    traj = policy.sample(6, generator=torch.Generator().manual_seed(0))
    adv = standardize(traj.images.mean((1, 2, 3)))
    mu_old = policy_gradient(policy, traj, adv, microbatch=3).mu_old
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    gain, kl = surrogate_and_kl(policy, traj, adv, mu_old, microbatch=3)
    assert kl > 0 and math.isfinite(gain)
    assert surrogate_and_kl(policy, traj, adv, mu_old, microbatch=3, kl_limit=2 * kl) == (gain, kl)
    with torch.no_grad():  # each half's KL over every step, by hand: (1/(B·T)) Σ_{i in half, k} KL_{i,k}
        halves = [sum(float(gaussian_kl(policy.step_at(traj, k, idx).mu, mu_old[k, idx],
                                        policy.sigma_tilde(k)).sum()) for k in range(traj.num_steps))
                  / (6 * traj.num_steps) for idx in torch.arange(6).split(3)]
    assert sum(halves) == pytest.approx(kl, rel=1e-9) and min(halves) > 0
    # past the limit after the first half: stopped there, its KL times B / 3 (the halves' estimates average to kl)
    stopped_gain, estimate = surrogate_and_kl(policy, traj, adv, mu_old, microbatch=3, kl_limit=halves[0] / 2)
    assert math.isnan(stopped_gain) and estimate == pytest.approx(2 * halves[0], rel=1e-9)
    # past it only after the last microbatch: that is the full pass
    assert surrogate_and_kl(policy, traj, adv, mu_old, microbatch=3, kl_limit=(halves[0] + kl) / 2) == (gain, kl)


def test_kl_line_search_rule_aims_at_the_trust_region_edge():
    """rule 'kl': a try over the region is shrunk to KEEP·sqrt(δ/KL) of itself, so a KL quadratic in the step
    (8δ·f²) is inside on the second try, at the fraction KEEP·sqrt(1/8), where 'geometric' needs a third."""
    from rl.trust_region import KEEP

    state = {"frac": None}
    quadratic = lambda: (state["frac"], 8e-3 * state["frac"] ** 2)  # noqa: E731
    res = backtracking_line_search(set_step=lambda f: state.update(frac=f), evaluate=quadratic, expected_full=1.0,
                                   max_kl=1e-3, coeff=0.5, max_iters=5, accept_ratio=0.1, rule="kl")
    assert res.accepted and res.iters == 2 and res.step_fraction == pytest.approx(KEEP * math.sqrt(1 / 8))
    assert res.kl == pytest.approx(8e-3 * KEEP**2 / 8) and res.kl <= 1e-3
    # a rejection for too little gain (KL inside) shrinks by coeff, as the geometric rule does
    gains = iter([-1.0, 1.0])
    res = backtracking_line_search(set_step=lambda f: state.update(frac=f), evaluate=lambda: (next(gains), 0.0),
                                   expected_full=1.0, max_kl=1e-3, coeff=0.5, max_iters=5, accept_ratio=0.1, rule="kl")
    assert res.accepted and res.step_fraction == 0.5 and res.iters == 2
    with pytest.raises(ValueError, match="unknown line-search rule"):
        backtracking_line_search(set_step=lambda f: None, evaluate=quadratic, expected_full=1.0, max_kl=1e-3,
                                 coeff=0.5, max_iters=1, accept_ratio=0.1, rule="armijo")
    # a first try aimed by the probe starts there (and lands inside at once)
    res = backtracking_line_search(set_step=lambda f: state.update(frac=f), evaluate=quadratic, expected_full=1.0,
                                   max_kl=1e-3, coeff=0.5, max_iters=5, accept_ratio=0.1, rule="kl", first=0.3)
    assert res.accepted and res.iters == 1 and res.step_fraction == 0.3
    with pytest.raises(ValueError, match="first try's fraction"):
        backtracking_line_search(set_step=lambda f: None, evaluate=quadratic, expected_full=1.0, max_kl=1e-3,
                                 coeff=0.5, max_iters=1, accept_ratio=0.1, first=1.5)


def test_state_subsamples_keep_s_and_draw_a_disjoint_probe():
    from rl.states import state_subsamples

    flat = lambda d: {k * 4 + i for k, idx in d.items() for i in idx.tolist()}  # noqa: E731
    for n, n_probe in [(6, 5), (10, 100), (0, 5), (3, 0)]:
        alone = state_subsample(3, 4, n, generator=torch.Generator().manual_seed(3))
        s, probe = state_subsamples(3, 4, n, n_probe, generator=torch.Generator().manual_seed(3))
        assert flat(s) == flat(alone) and len(flat(s)) == (12 if n == 0 else n)  # the same S with or without S'
        assert not flat(s) & flat(probe)
        assert len(flat(probe)) == min(n_probe, 12 - len(flat(s)))


def test_allocate_takes_the_largest_quotients_above_one_state_a_step():
    """D'Hondt with a floor of one: the n − T states after the first of each step go to the n − T largest quotients
    w_k / j, j = 2 … cap_k (brute force), so n_k ∝ w_k where the floor and caps do not bind."""
    from rl.states import allocate

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = (torch.rand(5, generator=gen) * 100).tolist()
        caps = torch.randint(1, 9, (5,), generator=gen).tolist()
        for n in range(5, sum(caps) + 1):
            quotients = sorted(((w[k] / j, k) for k in range(5) for j in range(2, caps[k] + 1)), reverse=True)
            expected = [1 + sum(1 for _, k in quotients[:n - 5] if k == j) for j in range(5)]
            assert allocate(w, n, caps) == expected
    assert allocate([400.0, 48.0, 1.0, 1.0], 32, [64] * 4) == [27, 3, 1, 1]  # 400/27 > 48/4
    with pytest.raises(ValueError, match="cannot draw 3 states stratified over 4 steps"):
        allocate([1.0] * 4, 3, [8] * 4)


def test_stratified_draw_is_unbiased_disjoint_and_beats_the_uniform_one():
    """Σ_k w_k Σ_{i∈S_k} x_{k,i} estimates the batch mean without bias under both draws; with values whose scale
    follows the step weights (as each step's KL follows 1/σ̃_k²) the stratified draw's variance is far smaller.
    S' is disjoint from S and stratified alike."""
    from rl.states import allocate, state_subsamples

    T, B, n, n_probe = 4, 16, 10, 8
    w = [1.0, 3.0, 10.0, 60.0]
    x = torch.rand(T, B, generator=torch.Generator().manual_seed(0)).double() * torch.tensor(w).double()[:, None]
    estimates = {"uniform": [], "curvature": []}
    for seed in range(2000):
        for how, weights in (("uniform", None), ("curvature", w)):
            s, probe = state_subsamples(T, B, n, n_probe, generator=torch.Generator().manual_seed(seed),
                                        step_weights=weights)
            estimates[how].append(float(sum(s.weight[k] * x[k, idx].sum() for k, idx in s.items())))
            assert s.size == n and probe.size == n_probe
            assert all(not set(s.get(k, torch.tensor([])).tolist()) & set(idx.tolist()) for k, idx in probe.items())
            if weights is not None:
                assert [len(s[k]) for k in range(T)] == allocate(w, n, [B] * T)
                assert [len(probe[k]) for k in range(T)] == allocate(w, n_probe, [B - len(s[k]) for k in range(T)])
                assert all(s.weight[k] == 1 / (T * len(s[k])) for k in s)
    mean = float(x.mean())
    for how, est in estimates.items():
        e = torch.tensor(est)
        assert abs(float(e.mean()) - mean) < 4 * float(e.std()) / math.sqrt(len(e)), how
    assert float(torch.tensor(estimates["curvature"]).var()) < 0.2 * float(torch.tensor(estimates["uniform"]).var())
    # no S' when S takes a whole step (S' could not represent it) or leaves fewer states than steps
    gen = torch.Generator().manual_seed(0)
    assert state_subsamples(T, 4, 10, 6, generator=gen, step_weights=w)[1] == {}  # the last step's 4 all in S
    assert state_subsamples(T, B, 4 * B - 3, 8, generator=gen, step_weights=w)[1] == {}


def test_forward_difference_base_point_is_the_graphs_own_output():
    """fd_forward takes μ(θ) from the retained graph's outputs instead of a second pass: that is only exact if the
    no-grad pass at θ that μ(θ + hv) is compared with gives the same bits."""
    from torch.func import functional_call

    from rl.fisher import _StepMean

    policy = tiny_policy()
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    states = state_subsample(traj.num_steps, traj.batch_size, 7, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad(), policy.plain():
        mus = policy.means_at(traj, states)
    step_mean = _StepMean(policy)
    primals = {name: p.detach() for name, p in step_mean.named_parameters() if p.requires_grad}
    with torch.no_grad(), policy.plain():
        again = functional_call(step_mean, primals, (traj, states))
    assert all(torch.equal(a.detach(), b) for a, b in zip(mus, again))


def test_probe_aims_the_first_try_at_the_trust_region_edge():
    """In the quadratic regime (a small step) the probe's fraction f_0 puts the KL on S' at KEEP² δ, whatever
    the full step's KL; a full step already inside keeps f_0 = 1; θ is left at θ_old."""
    from rl.states import state_subsamples
    from rl.trpo import policy_gradient, probe_fraction
    from rl.trust_region import KEEP

    policy = tiny_policy()
    params = policy.trainable_parameters()
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    adv = standardize(traj.images.mean((1, 2, 3)))
    mu_old = policy_gradient(policy, traj, adv, microbatch=4).mu_old
    _, probe = state_subsamples(traj.num_steps, traj.batch_size, 3, 6, generator=torch.Generator().manual_seed(1))
    mu_probe = {k: mu_old[k, idx] for k, idx in probe.items()}
    theta = flat_params(params)
    d = 1e-4 * theta.norm() * torch.nn.functional.normalize(torch.randn(theta.numel(),
                                                                        generator=torch.Generator().manual_seed(2)), dim=0)
    set_step = lambda f: set_flat_params(params, theta + f * d)  # noqa: E731
    set_step(1.0)
    kl_full = subsample_kl(policy, traj, probe, mu_probe)
    set_step(0.0)
    for over in (16.0, 3.0):
        f0, kl = probe_fraction(policy, traj, probe, mu_old, set_step=set_step, max_kl=kl_full / over)
        assert torch.equal(flat_params(params), theta) and kl == pytest.approx(kl_full)
        assert f0 == pytest.approx(KEEP / math.sqrt(over))
        set_step(f0)
        assert subsample_kl(policy, traj, probe, mu_probe) == pytest.approx(KEEP ** 2 * kl_full / over, rel=0.02)
        set_step(0.0)
    assert probe_fraction(policy, traj, probe, mu_old, set_step=set_step, max_kl=2 * kl_full)[0] == 1.0


def test_probe_saves_line_search_passes_and_keeps_the_trust_region():
    """With 3 of 24 states for F the full step overshoots the exact KL (the second try lands inside); the probe's
    12 further states aim the first try, so fewer passes are needed, and every accepted step stays within δ."""
    policy = tiny_policy()
    params = policy.trainable_parameters()
    theta = flat_params(params)
    tries = {}
    for probe_states in (0, 12):
        cfg = rl_cfg(microbatch=8, trpo={"max_kl": 1e-3, "kl_states": 3, "probe_states": probe_states, "cg_iters": 5})
        tries[probe_states] = []
        for seed in range(4):
            traj = policy.sample(8, generator=torch.Generator().manual_seed(seed))
            adv = standardize(traj.images.mean((1, 2, 3)))
            stats = trpo_update(UpdateBatch(policy, None, traj, adv, cfg, torch.Generator().manual_seed(seed)))
            assert stats.extra["accepted"] and stats.kl <= 1e-3
            assert ("probe_kl" in stats.extra) == (probe_states > 0)
            assert (stats.extra["first_fraction"] < 1.0) == (probe_states > 0)
            tries[probe_states].append(stats.extra["backtrack_iters"])
            set_flat_params(params, theta)
    assert sum(tries[12]) < sum(tries[0]), tries


def test_trpo_update_draws_its_states_by_step_and_keeps_the_trust_region(monkeypatch):
    """state_draw curvature: S and S' are drawn with the weights 1/σ̃_k², and every accepted step is within δ."""
    from rl import states, trpo

    policy = tiny_policy()
    params = policy.trainable_parameters()
    theta = flat_params(params)
    draws = []
    real = trpo.state_subsamples
    monkeypatch.setattr(trpo, "state_subsamples", lambda *a, **kw: draws.append(kw["step_weights"]) or real(*a, **kw))
    cfg = rl_cfg(microbatch=8, trpo={"max_kl": 1e-3, "kl_states": 6, "probe_states": 6, "cg_iters": 5,
                                     "state_draw": "curvature"})
    for seed in range(3):
        traj = policy.sample(8, generator=torch.Generator().manual_seed(seed))
        adv = standardize(traj.images.mean((1, 2, 3)))
        stats = trpo_update(UpdateBatch(policy, None, traj, adv, cfg, torch.Generator().manual_seed(seed)))
        assert stats.extra["accepted"] and 0 < stats.kl <= 1e-3 and stats.extra["probe_kl"] > 0
        set_flat_params(params, theta)
    expected = [1 / policy.sigma_tilde(k) ** 2 for k in range(policy.num_actions)]
    assert draws == [expected] * 3 and expected[-1] > expected[0]
    assert states.draw_weights(policy, "uniform") is None
    with pytest.raises(ValueError, match="unknown state draw 'step'; choose one of uniform, curvature"):
        states.draw_weights(policy, "step")


def test_every_accepted_trpo_step_is_inside_the_trust_region():
    policy = tiny_policy()
    params = policy.trainable_parameters()
    cfg = rl_cfg(microbatch=8, trpo={"max_kl": 1e-3, "kl_states": 0, "cg_iters": 5})
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    for it in range(3):
        traj = policy.sample(8, generator=gen)
        adv = standardize(traj.images.mean((1, 2, 3)))
        before = flat_params(params)
        states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=gen)
        mu_old = old_means(policy, traj, states)
        stats = trpo_update(UpdateBatch(policy, None, traj, adv, cfg, gen))
        kl_after = subsample_kl(policy, traj, states, mu_old)
        if stats.extra["accepted"]:
            accepted += 1
            assert kl_after <= 1e-3 * (1 + 1e-6)
            assert not torch.equal(before, flat_params(params))
        else:
            assert torch.equal(before, flat_params(params))
    assert accepted >= 1
    # an impossible radius (tiny δ with accept_ratio demanding more than possible) keeps θ_old
    cfg_tight = rl_cfg(microbatch=8, trpo={"max_kl": 1e-12, "kl_states": 0, "cg_iters": 3, "backtrack_iters": 1,
                                           "accept_ratio": 10.0})
    before = flat_params(params)
    stats = trpo_update(UpdateBatch(policy, None, traj, adv, cfg_tight, gen))
    assert not stats.extra["accepted"] and torch.equal(before, flat_params(params))
    set_flat_params(params, before)


# --- advantages ---------------------------------------------------------------------------------

def test_gae_against_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    T, B, gamma, lam = 5, 3, 0.9, 0.8
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T + 1, B, generator=g, dtype=torch.float64)
    adv = gae(r, v, gamma=gamma, lam=lam)
    for k in range(T):
        for b in range(B):
            expected = sum((gamma * lam) ** l * (r[k + l, b] + gamma * v[k + l + 1, b] - v[k + l, b])
                           for l in range(T - k))
            assert adv[k, b].item() == pytest.approx(float(expected), rel=1e-9, abs=1e-12)
    # λ = 1, γ = 1, V = 0: the advantage is the reward-to-go
    torch.testing.assert_close(gae(r, torch.zeros(T + 1, B, dtype=torch.float64), gamma=1.0, lam=1.0),
                               r.flip(0).cumsum(0).flip(0))


def test_normalisation_and_per_prompt_tracker():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    a = standardize(r)
    assert a.mean().abs() < 1e-12 and a.std(unbiased=False).item() == pytest.approx(1.0)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))  # GAE's (T, B): over every element
    torch.testing.assert_close(standardize(x), torch.from_numpy((x.numpy() - x.numpy().mean()) / x.numpy().std()).double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(standardize(torch.tensor([5.0]), r), torch.tensor([(5 - 2.5) / 1.25 ** 0.5],
                                                                               dtype=torch.float64))
    assert torch.equal(standardize(torch.full((4,), 0.1)), torch.zeros(4, dtype=torch.float64))
    tr = PerPromptStatTracker(history=8, min_count=2)
    out = tr(torch.tensor([1.0, 3.0, 10.0, 30.0]), ["a", "a", "b", "b"])
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))


# --- learning -------------------------------------------------------------------------------------

def test_short_ppo_run_raises_its_reward():
    # A tiny problem: reward = mean brightness of the image. PPO must raise it within a few iterations.
    policy = tiny_policy(steps=3, floor=0.1)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    cfg = rl_cfg(microbatch=16, gradient_accumulation=1, ppo={"clip_range": 0.2, "epochs": 2})
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(20):
        traj = policy.sample(32, generator=gen)
        reward = traj.images.mean((1, 2, 3))
        history.append(reward.mean().item())
        ppo_update(UpdateBatch(policy, opt, traj, standardize(reward), cfg, gen))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > first + 0.1, history
    assert math.isfinite(last)


@pytest.mark.parametrize("draw", ["uniform", "curvature"])
def test_gauss_newton_fisher_product_equals_the_double_backward_hessian_product(draw):
    """At θ_old the KL's Hessian is exactly the Gauss-Newton matrix, so F v = Jᵀ H_μ J v must equal the
    double-backward ∇θ((∇θ KL)·v) through the whole UNet (every weight trainable, attention included), the KL over
    S weighted as the draw weighs it (1/|S| uniform; 1/(T·|S_k|) stratified by step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rl.fisher import fisher_operator
    from rl.states import draw_weights, state_subsamples

    policy = tiny_policy()
    params = policy.trainable_parameters()
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    states, _ = state_subsamples(traj.num_steps, traj.batch_size, 6, 0, generator=torch.Generator().manual_seed(2),
                                 step_weights=draw_weights(policy, draw))
    assert len(set(states.weight.values())) == (1 if draw == "uniform" else len(set(map(len, states.values()))))
    mu_old = old_means(policy, traj, states)
    with sdpa_kernel(SDPBackend.MATH):  # KL over S = Σ_steps w_k Σ_i KL_i, with its graph
        kl = sum(gaussian_kl(policy.step(k, traj.x_t[k, idx], traj.x_prev[k, idx]).mu, mu_old[k],
                             policy.sigma_tilde(k)).sum() * states.weight[k] for k, idx in states.items())
        grad_kl = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])
    for method in ("jvp", "double_vjp", "fd", "fd_forward"):
        fvp = fisher_operator(policy, traj, states, mu_old, damping=0.0, method=method)
        for seed in (1, 2):
            v = torch.randn(grad_kl.numel(), generator=torch.Generator().manual_seed(seed))
            hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
            expected = torch.cat([h.reshape(-1) for h in hv])
            if method.startswith("fd"):  # a float32 difference quotient: accurate as a vector (O(h) one-sided)
                assert float((fvp(v) - expected).norm() / expected.norm()) < 3e-3
            else:
                torch.testing.assert_close(fvp(v), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
