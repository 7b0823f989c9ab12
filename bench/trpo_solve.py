"""How good a cheaper TRPO solve is: the surrogate gain its direction buys per unit of exact KL over the batch.

    python -m bench.trpo_solve --out DIR [--cfg configs/trpo.yaml] [--iterations 3] [--draws 2]
                               [--settings 64:10:fd 16:8:fd_forward:curvature ...] [--set KEY=VALUE ...]

Runs `iterations` TRPO iterations of the config (one process). At each, before its update and so at θ_old, every setting
(states for F : CG iterations : J v method [: draw], the draw `trpo.state_draw`'s, uniform unless named) solves
F x = g on `draws` state subsamples (the probe states drawn alike), and each solution is
scored against the whole batch, not against the subsample it was fitted to:

    η(x) = gᵀ(βx) / sqrt(2 KL(βx)),   β = sqrt(2δ / xᵀF_S x)

KL the exact KL over every state of the batch (`surrogate_and_kl`), so η is the first-order surrogate gain per
sqrt of trust region that a step along x buys (scale-free where the KL is quadratic in the step), the natural
gradient's if x = F⁻¹g. Also per solve: its time, KL(βx)/δ (by how much the quadratic model on S misjudges the
exact KL: where the line search's first try lands without the probe), and the probe's estimate of KL(βx) on
`trpo.probe_states` further states over the exact one. η / η of the first setting, averaged over iterations and
draws, is the figure of merit. Writes DIR/solve.json (every solve and the summary) and prints the summary.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from bench.iteration import bench_parser
from config import load_config
from rl import trpo
from rl.fisher import FVP_METHODS, fisher_operator
from rl.states import STATE_DRAWS, draw_weights, state_subsamples
from rl.trainer import Finetuner
from rl.trust_region import conjugate_gradient, flat_params, set_flat_params
from utils import apply_threads

SETTINGS = ("64:10:fd", "32:8:fd_forward", "32:8:fd_forward:curvature", "24:8:fd_forward:curvature",
            "16:8:fd_forward:curvature", "16:10:fd_forward:curvature")
"""configs/trpo.yaml's solve until 2026-12-05 (64 uniform states, 10 CG), its solve on 2026-12-05 (32 and 8), then
draws by step in proportion to 1/σ̃_k² (16 and 8: configs/trpo.yaml since 2026-12-06)."""


def parse_setting(text: str) -> tuple[int, int, str, str]:
    """'states:cg_iters:method[:draw]' → (states, cg_iters, method, draw), draw 'uniform' unless given (the
    `trpo.state_draw` choices); one line naming the problem otherwise."""
    parts = text.split(":")
    if len(parts) == 3:
        parts.append("uniform")
    if len(parts) != 4 or not (parts[0].isdigit() and parts[1].isdigit()) or parts[2] not in FVP_METHODS \
            or parts[3] not in STATE_DRAWS:
        raise SystemExit(f"error: setting {text!r} is not STATES:CG_ITERS:METHOD[:DRAW] (e.g. 32:8:fd_forward or "
                         f"16:8:fd_forward:curvature; methods {', '.join(FVP_METHODS)}; draws {', '.join(STATE_DRAWS)})")
    return int(parts[0]), int(parts[1]), parts[2], parts[3]


def score_solves(policy, traj, adv, cfg, settings, *, draws: int, seed: int) -> list[dict]:
    """Every setting's solve on `draws` state subsamples of this batch at the current θ (= θ_old), scored as in
    the module docstring; θ is left at θ_old."""
    t, mb = cfg.trpo, cfg.microbatch
    params = policy.trainable_parameters()
    theta = flat_params(params)
    grad = trpo.policy_gradient(policy, traj, adv, microbatch=mb)
    g = grad.g
    rows = []
    for text in settings:
        n, iters, method, how = parse_setting(text)
        weights = draw_weights(policy, how)
        for draw in range(draws):
            states, probe = state_subsamples(traj.num_steps, traj.batch_size, n, t.probe_states,
                                             generator=torch.Generator().manual_seed(seed + draw),
                                             step_weights=weights)
            mu_s = {k: grad.mu_old[k, idx] for k, idx in states.items()}
            t0 = time.perf_counter()
            fvp = fisher_operator(policy, traj, states, mu_s, damping=t.damping, method=method)
            cg = conjugate_gradient(fvp, g, iters=iters, tol=t.cg_tol)
            solve_s = time.perf_counter() - t0
            del fvp
            step = math.sqrt(2 * t.max_kl / cg.xfx) * cg.x
            set_flat_params(params, theta + step)
            gain, kl = trpo.surrogate_and_kl(policy, traj, adv, grad.mu_old, microbatch=mb)
            probe_kl = (trpo.subsample_kl(policy, traj, probe, {k: grad.mu_old[k, i] for k, i in probe.items()})
                        if probe else None)  # none left when S is every state
            set_flat_params(params, theta)
            rows.append({"setting": text, "draw": draw, "solve_s": solve_s, "eta": float(g @ step) / math.sqrt(2 * kl),
                         "kl_over_delta": kl / t.max_kl,
                         "probe_over_exact": None if probe_kl is None else probe_kl / kl,
                         "gain": gain - grad.surrogate, "linear_gain": float(g @ step),
                         "cg_residual": cg.residual / float(g @ g)})
    return rows


def summarise(rows: list[dict], settings) -> dict[str, dict[str, float]]:
    """Per setting: median solve time, mean η relative to the first setting's at the same iteration (over
    iterations and draws), its range, and the mean KL(βx)/δ and probe/exact ratios."""
    ref = {}
    for r in rows:
        if r["setting"] == settings[0]:
            ref.setdefault(r["iteration"], []).append(r["eta"])
    out = {}
    for s in settings:
        mine = [r for r in rows if r["setting"] == s]
        rel = [r["eta"] / statistics.mean(ref[r["iteration"]]) for r in mine]
        out[s] = {"solve_s": statistics.median(r["solve_s"] for r in mine), "eta_relative": statistics.mean(rel),
                  "eta_relative_min": min(rel), "eta_relative_max": max(rel),
                  "kl_over_delta": statistics.mean(r["kl_over_delta"] for r in mine),
                  "probe_over_exact": statistics.mean(probed) if (probed := [r["probe_over_exact"] for r in mine
                                                                              if r["probe_over_exact"] is not None])
                  else None,
                  "probe_over_exact_min": min(probed, default=None), "probe_over_exact_max": max(probed, default=None),
                  "solves": len(mine)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, "trpo.yaml")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--draws", type=int, default=2, help="state subsamples per setting and iteration")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), help="STATES:CG_ITERS:METHOD; the first is "
                   "the reference")
    args = p.parse_args(argv)
    for s in args.settings:
        parse_setting(s)
    cfg = load_config(args.cfg, args.overrides)
    if cfg.rl.algorithm != "trpo":
        raise SystemExit(f"error: {args.cfg} trains with rl.algorithm={cfg.rl.algorithm}; give a TRPO config "
                         f"(configs/trpo.yaml) or --set rl.algorithm=trpo")
    apply_threads(cfg.num_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ft = Finetuner(cfg, out / "run")
    rows: list[dict] = []
    for it in range(args.iterations):  # Finetuner.iteration's sample, reward and update, the solves scored between
        traj = ft.policy.sample(cfg.rl.batch_size, generator=ft.generator, chunk=cfg.rl.sample_batch)
        reward, prompts = ft.score(traj)
        adv = ft.advantages(reward.rewards, traj, prompts)
        rows += [{"iteration": it, **row} for row in score_solves(ft.policy, traj, adv, cfg.rl, args.settings,
                                                                  draws=args.draws, seed=1000 * it)]
        ft.update(traj, adv)
    summary = summarise(rows, args.settings)
    result = {"config": args.cfg, "overrides": args.overrides, "threads": torch.get_num_threads(),
              "max_kl": cfg.rl.trpo.max_kl, "probe_states": cfg.rl.trpo.probe_states, "summary": summary,
              "solves": rows}
    (out / "solve.json").write_text(json.dumps(result, indent=2))
    print(f"{'setting':<26} {'solve s':>8} {'η / ref':>8} {'range':>13} {'KL(βx)/δ':>9} {'probe/exact':>11}")
    for s, e in summary.items():
        print(f"{s:<26} {e['solve_s']:8.2f} {e['eta_relative']:8.3f} {e['eta_relative_min']:6.3f}-"
              f"{e['eta_relative_max']:.3f} {e['kl_over_delta']:9.2f} "
              + (f"{e['probe_over_exact']:11.2f}" if e["probe_over_exact"] is not None else f"{'-':>11}"))


if __name__ == "__main__":
    main()
