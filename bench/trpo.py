"""TRPO against PPO, side by side in one process: iteration time, where it goes, and the trust region held.

    python -m bench.trpo --out DIR [--ppo-cfg configs/default.yaml] [--trpo-cfg configs/trpo.yaml]
                         [--repeats 3] [--set KEY=VALUE ...] [--profile]

Every variant fine-tunes the same base model with the same reward artifact (`--set reward.artifact=...`
applies to all) at the same batch and number of denoising steps; each runs one warm-up iteration and
`repeats` timed ones, from the same seed. Variants:

- `ppo`: the PPO config, with its UNet-evaluation bound (bench.iteration, timed between the iterations) and,
  with `--profile`, the top torch.profiler entries of one iteration (DIR/ppo_profile.txt);
- `trpo_published`: the TRPO config with the settings of the published comparison (J v by double
  backward, 64 states, 10 CG iterations, geometric backtracking);
- `trpo`: the TRPO config as it is (16 states drawn by step in proportion to 1/σ̃_k², 8 CG iterations);
- `trpo_64`: the published solve, 64 uniformly drawn states and 10 CG iterations, with J v by central difference
  and today's line search (`configs/trpo.yaml` until 2026-12-05);
- `trpo_32`: 32 uniformly drawn states, 8 CG iterations, J v by forward difference, today's line search
  (`configs/trpo.yaml` on 2026-12-05);
- `trpo_lean`: the TRPO config with 16 states for F and 4 CG iterations (faster, but it loses held-out quality:
  docs/results/main_trpo_lean).

For the TRPO variants: the update split into gradient pass, CG and line search, the CG residual
‖g − F s‖² / ‖g‖², line-search tries, the accepted KL against δ; and the error of each J v method
against forward-mode AD on the config's state subsample. Writes DIR/trpo.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from config import load_config
from bench.iteration import TIMES, medians, overheads, timed_iterations
from rl.trainer import Finetuner
from rl.fisher import fisher_operator
from rl.states import draw_weights, state_subsamples
from rl.trpo import policy_gradient
from basics import PROJECT_ROOT
from utils import apply_threads

PUBLISHED = ["rl.trpo.fvp=double_vjp", "rl.trpo.kl_states=64", "rl.trpo.cg_iters=10", "rl.trpo.backtrack=geometric",
             "rl.trpo.probe_states=0", "rl.trpo.state_draw=uniform"]
"""The TRPO settings of the published comparison (docs/results/main), on today's code."""
LEAN = ["rl.trpo.kl_states=16", "rl.trpo.cg_iters=4", "rl.trpo.probe_states=0", "rl.trpo.state_draw=uniform"]
"""A quarter of the states for F and 4 CG iterations: 1.42-1.48x PPO, but lower held-out quality over 3 training
seeds."""


def published_solve(name: str) -> list[str]:
    """The rl.trpo settings of configs/experiments/main/<name>.yaml as --set overrides, so that they apply to any
    TRPO config: `trpo_64` (the published solve: 64 uniformly drawn states, 10 CG iterations, J v by central
    difference) or `trpo_32` (32 states, 8 CG iterations, J v by forward difference: configs/trpo.yaml on
    2026-12-05), both with today's line search."""
    import yaml

    trpo = yaml.safe_load((PROJECT_ROOT / "configs" / "experiments" / "main" / f"{name}.yaml").read_text())["rl"]["trpo"]
    return [f"rl.trpo.{key}={value}" for key, value in trpo.items()]


TRPO_FIELDS = ("time_gradient_s", "time_cg_s", "time_line_search_s", "cg_residual", "cg_iters", "backtrack_iters",
               "line_search_kl", "first_fraction")


def fvp_errors(ft: Finetuner, *, repeats: int = 2) -> dict[str, dict[str, float]]:
    """Each J v method's Fisher-vector product against forward-mode AD ('jvp') on the config's state
    subsample at θ_old, for `repeats` random unit v: relative error ‖F̂v − Fv‖/‖Fv‖ and time per product."""
    t = ft.cfg.rl.trpo
    traj = ft.policy.sample(ft.cfg.rl.batch_size, generator=torch.Generator().manual_seed(0),
                            chunk=ft.cfg.rl.sample_batch)
    adv = torch.randn(traj.batch_size, generator=torch.Generator().manual_seed(1)).double()
    mu_old = policy_gradient(ft.policy, traj, adv, microbatch=ft.cfg.rl.microbatch).mu_old
    states = state_subsamples(traj.num_steps, traj.batch_size, t.kl_states, 0, generator=torch.Generator().manual_seed(2),
                              step_weights=draw_weights(ft.policy, t.state_draw))[0]
    mu_s = {k: mu_old[k, idx] for k, idx in states.items()}
    n = sum(p.numel() for p in ft.policy.trainable_parameters())
    vs = [torch.nn.functional.normalize(torch.randn(n, generator=torch.Generator().manual_seed(3 + i)), dim=0)
          for i in range(repeats)]
    results, reference = {}, None
    for method in ("jvp", "fd", "fd_forward", "double_vjp"):
        t0 = time.perf_counter()
        op = fisher_operator(ft.policy, traj, states, mu_s, damping=0.0, method=method)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        products = [op(v) for v in vs]
        per = (time.perf_counter() - t0) / repeats
        reference = reference or products
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(products, reference))
        results[method] = {"build_s": build, "product_s": per, "rel_error_vs_jvp": err}
        del op
    return results


def profile_iteration(ft: Finetuner, path: Path, top: int = 20) -> list[dict]:
    """torch.profiler over one iteration; the `top` operators by self CPU time, also written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ft.iteration()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return [{"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ppo-cfg", default=str(PROJECT_ROOT / "configs" / "default.yaml"))
    p.add_argument("--trpo-cfg", default=str(PROJECT_ROOT / "configs" / "trpo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", nargs="+", default=["ppo", "trpo_published", "trpo_64", "trpo_32", "trpo", "trpo_lean"])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {"ppo": (args.ppo_cfg, []), "trpo_published": (args.trpo_cfg, PUBLISHED),
               "trpo": (args.trpo_cfg, []), "trpo_lean": (args.trpo_cfg, LEAN),
               "trpo_64": (args.trpo_cfg, published_solve("trpo_64")),
               "trpo_32": (args.trpo_cfg, published_solve("trpo_32"))}
    result: dict = {"threads": None, "variants": {}}
    for name in args.variants:
        path, extra = configs[name]
        cfg = load_config(path, [*args.overrides, *extra])
        apply_threads(cfg.num_threads)
        r = cfg.rl
        ft, rows, bound = timed_iterations(cfg, out / "runs" / name, args.repeats, bound=r.algorithm != "trpo")
        entry = {"config": path, "overrides": [*args.overrides, *extra], "batch": r.batch_size,
                 "T": cfg.sampler.num_steps, "microbatch": r.microbatch, **medians(rows, (*TIMES, *TRPO_FIELDS))}
        if r.algorithm == "trpo":
            accepted = [row["line_search_kl"] for row in rows if row["accepted"]]
            t = r.trpo
            entry.update(max_kl=t.max_kl, kl_states=t.kl_states, cg_iters_cfg=t.cg_iters, fvp=t.fvp,
                         probe_states=t.probe_states, backtrack=t.backtrack, accepted=len(accepted), tried=len(rows),
                         max_accepted_kl=max(accepted, default=0.0),
                         every_accepted_kl_within_delta=all(k <= t.max_kl for k in accepted))
            if name == "trpo":
                entry["fvp_methods"] = fvp_errors(ft)
        else:
            entry.update(bound, **overheads(rows, bound))
            if args.profile:
                entry["profile_top"] = profile_iteration(ft, out / "ppo_profile.txt")
        result["variants"][name] = entry
        result["threads"] = torch.get_num_threads()
        del ft
    v = result["variants"]
    if "ppo" in v:
        for name in v:
            v[name]["time_vs_ppo"] = v[name]["time_iteration_s"] / v["ppo"]["time_iteration_s"]
    (out / "trpo.json").write_text(json.dumps(result, indent=2))
    for name, entry in v.items():
        print(f"== {name}")
        for k, val in entry.items():
            if isinstance(val, (int, float, bool, str)):
                print(f"  {k:<34} {val:.4g}" if isinstance(val, float) else f"  {k:<34} {val}")


if __name__ == "__main__":
    main()
